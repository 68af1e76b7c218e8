// logits_to_confidence on CUDA. Framework-free: raw pointers in, launches on the caller's stream.
// docs/ops.md is the contract; csrc/cpu/logits_to_confidence.cpp is the same algorithm on the CPU.
//
// One CTA per (row, vocabulary chunk). A row is read in "groups": the 16-byte-aligned slots of
// W = 16 / sizeof(element) elements, so every row reads whole vectors whatever its alignment (only
// the first and last group of a row may be partial). Thread t of a chunk takes the chunk's groups
// t, t + kThreads, ... in increasing order and keeps its own ConfState; thread states merge with a
// tie-break on the index (threads interleave), so the first index of a maximum wins, as on the CPU.
// Few rows split the vocabulary into several chunks: the scan kernel then writes one state per chunk
// into the workspace (ConfState[rows][splits], row-major) and merge_kernel combines them per row; with
// one chunk the scan kernel finalizes and no workspace is needed. A vocabulary shard (vocab_start) works in
// global ids: its indices, banned ids and Philox counters are offset by vocab_start; with params.state the
// row's merged state is stored instead of being finalized.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/logits_to_confidence.h"
#include "cuda/launch.cuh"

namespace dllm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinCtasPerSm = 4;    // caps registers at 64: 1024 threads and 64 KiB of loads in flight per SM
constexpr int kMergeThreads = 128;  // one warp per row
constexpr int kMergeRows = kMergeThreads / 32;
constexpr int kTargetCtasPerSm = 8;       // split until rows * splits reaches this many CTAs per SM...
constexpr int64_t kMinChunkGroups = 512;  // ...but keep at least 8 KiB per chunk
// Banned-id bitmap words per CTA: with the static 384 B it stays under the 48 KiB that needs no opt-in,
// and covers 385024 ids (a 256K vocabulary needs no split).
constexpr int64_t kMaxBanWords = 12032;
static_assert(kMaxBanWords * 4 + kWarps * sizeof(ConfState) <= 48 * 1024, "more shared memory needs an opt-in");
constexpr int64_t kMaxChunkGroups = int64_t{1} << 26;  // chunk offsets in elements fit an int
constexpr unsigned kFullMask = 0xffffffffu;

// Element bits -> float for each storage dtype; kNegInf is the bit pattern of -inf (padding).
template <class StorageT, uint32_t NegInf>
struct DtypeBase {
  using Storage = StorageT;
  static constexpr int kWidth = 16 / sizeof(Storage);  // elements per group
  static constexpr int kBits = 8 * sizeof(Storage);
  static constexpr int kPerWord = 32 / kBits;
  static constexpr uint32_t kElemMask = kBits == 32 ? ~0u : (1u << kBits) - 1;
  static constexpr uint32_t kGroupMask = (1u << kWidth) - 1;
  static constexpr uint32_t kNegInf = NegInf;
};
struct F32 : DtypeBase<uint32_t, 0xFF800000u> {
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b); }
};
struct F16 : DtypeBase<uint16_t, 0xFC00u> {
  static __device__ __forceinline__ float to_float(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
};
struct BF16 : DtypeBase<uint16_t, 0xFF80u> {
  static __device__ __forceinline__ float to_float(uint32_t b) { return __uint_as_float(b << 16); }
};

// A row's result: its (token, score), or its state (indices already global) for a merge across shards.
__device__ __forceinline__ void write_row(const DllmConfidenceParams& p, const ConfConsts& k, int64_t r,
                                          const ConfState& st, bool to_state) {
  if (to_state) {
    store_state(st, 0, p.state + r * DLLM_STATE_FIELDS);
  } else {
    finalize_state(st, p, k, static_cast<uint32_t>(r), p.token + r, p.score + r);
  }
}

// An ineligible row (never read): the empty state, or what it finalizes to.
__device__ __forceinline__ void write_ineligible_row(const DllmConfidenceParams& p, int64_t r, bool to_state) {
  if (to_state) {
    store_state(empty_state(), 0, p.state + r * DLLM_STATE_FIELDS);
  } else {
    p.token[r] = -1;
    p.score[r] = -INFINITY;
  }
}

// Launch geometry, derived from metadata only (make_plan), shared by the workspace query and launch.
struct Plan {
  int64_t rows;
  int64_t splits;  // chunks per row
  int64_t gpc;     // groups per chunk
  int ban_words;   // shared bitmap words per CTA (0 without banned ids)
};

struct RowCtx {
  ConfConsts k;
  uint64_t seed;
  uint32_t row, offset_lo, offset_hi;
};

// Without sampling the key fields stay empty in every state, so they need no shuffle.
template <bool kSample>
__device__ __forceinline__ ConfState shfl_down(const ConfState& s, int delta) {
  ConfState o = s;
  o.lmax = __shfl_down_sync(kFullMask, s.lmax, delta);
  o.l2 = __shfl_down_sync(kFullMask, s.l2, delta);
  o.z = __shfl_down_sync(kFullMask, s.z, delta);
  o.s1 = __shfl_down_sync(kFullMask, s.s1, delta);
  o.lidx = __shfl_down_sync(kFullMask, s.lidx, delta);
  o.nan = __shfl_down_sync(kFullMask, s.nan, delta);
  if constexpr (kSample) {
    o.kmax = __shfl_down_sync(kFullMask, s.kmax, delta);
    o.kl = __shfl_down_sync(kFullMask, s.kl, delta);
    o.kidx = __shfl_down_sync(kFullMask, s.kidx, delta);
  }
  return o;
}

// Lane 0 ends with the merge of the whole warp (fixed tree: deterministic sums).
template <bool kSample>
__device__ __forceinline__ void warp_reduce(ConfState& st, const ConfConsts& k) {
#pragma unroll
  for (int delta = 1; delta < 32; delta *= 2) merge_states_any_order(st, shfl_down<kSample>(st, delta), k);
}

// 2^t; flushing results below 2^-126 to 0 changes z and s1 by less than fp32 can hold.
__device__ __forceinline__ float exp2_ftz(float t) {
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(t));
  return e;
}

// A CTA's share of a row: whole 16-byte groups; chunk element e is row index v_begin + e, and only
// elements in [lo, hi) are the row's (the first and last group of a row may stick out of it).
template <class Tr>
struct Chunk {
  const uint4* groups;
  int64_t v_begin;
  int n_groups, lo, hi;

  // Group q as raw bits; elements outside [lo, hi) read as -inf.
  __device__ __forceinline__ uint4 load(int q) const {
    constexpr int W = Tr::kWidth;
    const int e0 = q * W;
    if (e0 >= lo && e0 + W <= hi) return __ldg(groups + q);
    const auto* elems = reinterpret_cast<const typename Tr::Storage*>(groups);
    uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < W; ++j) {
      const int e = e0 + j;
      const uint32_t bits = e >= lo && e < hi ? static_cast<uint32_t>(__ldg(elems + e)) : Tr::kNegInf;
      w[j / Tr::kPerWord] |= bits << (Tr::kBits * (j % Tr::kPerWord));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
};

// Adds 2^t (and 2^t * t) of the group, t = (x - lmax) * c: exactly 0 at the maximum, so z >= 1.
template <int W, bool kEntropy>
__device__ __forceinline__ void accumulate(const float (&x)[W], float lmax, float c, ConfState& st) {
  float z = 0.f, s1 = 0.f;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    const float t = (x[j] - lmax) * c;
    const float e = exp2_ftz(t);
    z += e;
    if constexpr (kEntropy) s1 += e * fmaxf(t, kMinExponent);  // -inf logit: 0 * -1024, not 0 * -inf
  }
  st.z += z;
  if constexpr (kEntropy) st.s1 += s1;
}

// Sampling keys x + T * g of the group of indices [idx0, idx0 + W), S = idx0 mod 4 (a template
// parameter, so that every Philox word is a register): one Philox call per 4 columns, counter col / 4,
// word col % 4. Unfused multiply and add, as on the CPU. Indices only grow within a thread, so a strict
// comparison keeps the first index of a maximum.
template <int W, int S>
__device__ __forceinline__ void sample_group(const float (&x)[W], int64_t idx0, const RowCtx& ctx, ConfState& st) {
  constexpr int kCounters = (S + W + 3) / 4;
  const uint32_t counter0 = static_cast<uint32_t>((idx0 - S) >> 2);  // idx0 - S: a multiple of 4 (floor)
#pragma unroll
  for (int i = 0; i < kCounters; ++i) {  // one counter's four words live at a time (64 registers a thread)
    uint32_t w[4] = {counter0 + i, ctx.row, ctx.offset_lo, ctx.offset_hi};
    philox4<uint32_t>(w[0], w[1], w[2], w[3], ctx.seed);
#pragma unroll
    for (int word = 0; word < 4; ++word) {
      const int j = 4 * i + word - S;  // the group element of this word
      if (j < 0 || j >= W) continue;
      const float g = -logf(-logf(uniform_from_word(w[word])));
      const float key = __fadd_rn(x[j], __fmul_rn(ctx.k.temperature, g));
      if (key > st.kmax) {
        st.kmax = key;
        st.kidx = idx0 + j;
        st.kl = x[j];
      }
    }
  }
}

// Adds the group of indices [idx0, idx0 + W) (banned: bit j set = index idx0 + j is banned) to st.
// Indices only grow within a thread, so strict comparisons keep the first index of a maximum.
template <class Tr, bool kSample>
__device__ __forceinline__ void process_group(const uint4& raw, int64_t idx0, uint32_t banned, const RowCtx& ctx,
                                              ConfState& st) {
  constexpr int W = Tr::kWidth;
  const ConfConsts& k = ctx.k;
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
  float x[W];
  float vmax = -INFINITY;
  bool nan = false;
#pragma unroll
  for (int j = 0; j < W; ++j) {
    x[j] = Tr::to_float((words[j / Tr::kPerWord] >> (Tr::kBits * (j % Tr::kPerWord))) & Tr::kElemMask);
    if (banned >> j & 1u) x[j] = -INFINITY;
    nan |= x[j] != x[j];
    vmax = fmaxf(vmax, x[j]);  // ignores NaN, like the CPU kernel
  }
  st.nan |= nan;

  if (vmax > st.lmax) {  // rare after the first groups: the thread's maximum moves here
    int first = 0;
#pragma unroll
    for (int j = W - 1; j >= 0; --j)
      if (x[j] == vmax) first = j;
    float second = st.lmax;
#pragma unroll
    for (int j = 0; j < W; ++j)
      if (j != first) second = fmaxf(second, x[j]);
    rescale(st.z, st.s1, (st.lmax - vmax) * k.c);
    st.l2 = second;
    st.lmax = vmax;
    st.lidx = idx0 + first;
  } else if (vmax > st.l2) {
    st.l2 = vmax;
  }

  // key = x + T * g with g < kGumbelBound and rounding monotone: when vmax + T * kGumbelBound <= kmax no
  // key of the group can win, and it draws no noise.
  if constexpr (kSample) {
    if (__fadd_rn(vmax, __fmul_rn(k.temperature, kGumbelBound)) > st.kmax) {
      switch (static_cast<int>(idx0 & 3)) {
        case 0:
          sample_group<W, 0>(x, idx0, ctx, st);
          break;
        case 1:
          sample_group<W, 1>(x, idx0, ctx, st);
          break;
        case 2:
          sample_group<W, 2>(x, idx0, ctx, st);
          break;
        default:
          sample_group<W, 3>(x, idx0, ctx, st);
      }
    }
  }

  if (st.lmax == -INFINITY) return;  // only -inf so far: no mass, and no exp2(-inf - -inf)
  if (k.need_entropy) {
    accumulate<W, true>(x, st.lmax, k.c, st);
  } else {
    accumulate<W, false>(x, st.lmax, k.c, st);
  }
}

// Grid: one CTA per (row, chunk) item (grid-stride when there are more than a grid holds).
// Dynamic shared memory: plan.ban_words words of banned-id bitmap.
template <class Tr, bool kSample>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm)
    scan_kernel(const DllmConfidenceParams p, const Plan plan, ConfState* __restrict__ partial) {
  using Storage = typename Tr::Storage;
  constexpr int W = Tr::kWidth;
  constexpr int kUnroll = kSample ? 1 : 4;  // plain scans are memory bound: keep 4 loads in flight
  extern __shared__ uint32_t ban[];         // bit b: index v_begin + b is banned
  __shared__ ConfState warp_states[kWarps];
  const ConfConsts k = make_consts(p);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t n_items = plan.rows * plan.splits;

  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    __syncthreads();  // the previous item is done with ban and warp_states
    const int64_t r = item / plan.splits, split = item % plan.splits;
    if (p.eligible != nullptr && !p.eligible[r]) {
      if (plan.splits == 1 && threadIdx.x == 0) write_ineligible_row(p, r, p.state != nullptr);
      continue;
    }
    const int64_t o = r / p.n_inner;
    const uintptr_t row = reinterpret_cast<uintptr_t>(p.logits) +
                          (o * p.stride_outer + (r - o * p.n_inner) * p.stride_inner) * sizeof(Storage);
    // Row group g is the 16-byte slot holding indices g * W - shift + [0, W).
    const int shift = static_cast<int>(row % 16 / sizeof(Storage));
    const int64_t g_begin = split * plan.gpc;
    const int64_t row_groups = (p.vocab + shift + W - 1) / W;
    const int64_t v_begin = g_begin * W - shift;
    const int n_groups = static_cast<int>(row_groups <= g_begin ? 0 : min_i64(row_groups - g_begin, plan.gpc));
    const Chunk<Tr> chunk{reinterpret_cast<const uint4*>(row - row % 16) + g_begin, v_begin, n_groups,
                          split == 0 ? shift : 0, static_cast<int>(min_i64(int64_t{n_groups} * W, p.vocab - v_begin))};

    if (p.n_banned > 0) {
      for (int w = threadIdx.x; w < plan.ban_words; w += kThreads) ban[w] = 0;
      __syncthreads();
      for (int64_t b = threadIdx.x; b < p.n_banned; b += kThreads) {
        const int64_t id = p.banned[b] - p.vocab_start, bit = id - v_begin;
        if (id >= 0 && id < p.vocab && bit >= 0 && bit < plan.gpc * W) atomicOr(&ban[bit >> 5], 1u << (bit & 31));
      }
      __syncthreads();
    }

    const RowCtx ctx{k, p.seed, static_cast<uint32_t>(r), static_cast<uint32_t>(p.offset),
                     static_cast<uint32_t>(p.offset >> 32)};
    ConfState st = empty_state();
    for (int q = threadIdx.x; q < chunk.n_groups; q += kUnroll * kThreads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (q + u * kThreads < chunk.n_groups) raw[u] = chunk.load(q + u * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int qu = q + u * kThreads;
        if (qu < chunk.n_groups) {
          // W divides 32, so a group's W bits lie in one bitmap word.
          const uint32_t banned = p.n_banned > 0 ? ban[qu * W / 32] >> (qu * W % 32) & Tr::kGroupMask : 0u;
          process_group<Tr, kSample>(raw[u], p.vocab_start + v_begin + qu * W, banned, ctx, st);
        }
      }
    }

    warp_reduce<kSample>(st, k);
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kWarps ? warp_states[lane] : empty_state();
      warp_reduce<kSample>(st, k);
      if (lane == 0) {
        if (plan.splits == 1) {
          write_row(p, k, r, st, p.state != nullptr);
        } else {
          partial[item] = st;
        }
      }
    }
  }
}

// One warp per row: merges the row's chunk states (workspace [rows, splits]) and finalizes, or stores the
// merged state (kState: one branch per instantiation keeps the warp shuffles inlined).
template <bool kState>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const DllmConfidenceParams p, const Plan plan, const ConfState* __restrict__ partial) {
  const ConfConsts k = make_consts(p);
  const int lane = threadIdx.x % 32;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kMergeRows;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeRows + threadIdx.x / 32; r < plan.rows; r += stride) {
    if (p.eligible != nullptr && !p.eligible[r]) {  // its chunks were never scanned
      if (lane == 0) write_ineligible_row(p, r, kState);
      continue;
    }
    ConfState st = empty_state();
    for (int64_t s = lane; s < plan.splits; s += 32) merge_states_any_order(st, partial[r * plan.splits + s], k);
    warp_reduce<true>(st, k);
    if (lane == 0) write_row(p, k, r, st, kState);
  }
}

// One thread per row: the states of every shard ([n_parts][rows][DLLM_STATE_FIELDS]), merged and finalized.
__global__ void __launch_bounds__(kMergeThreads)
    merge_shards_kernel(const DllmConfidenceParams p, const double* __restrict__ states, int64_t n_parts) {
  const ConfConsts k = make_consts(p);
  const int64_t rows = p.n_outer * p.n_inner;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kMergeThreads + threadIdx.x; r < rows;
       r += static_cast<int64_t>(gridDim.x) * kMergeThreads) {
    ConfState st = empty_state();
    for (int64_t part = 0; part < n_parts; ++part)
      merge_states_any_order(st, load_state(states + (part * rows + r) * DLLM_STATE_FIELDS), k);
    finalize_state(st, p, k, static_cast<uint32_t>(r), p.token + r, p.score + r);
  }
}

int64_t group_width(int dtype) { return dtype == DLLM_FLOAT32 ? F32::kWidth : BF16::kWidth; }

// Split a row only when rows alone give fewer than kTargetCtasPerSm CTAs per SM, into chunks of at
// least kMinChunkGroups groups; banned ids cap a chunk at what the shared bitmap covers.
Plan make_plan(const DllmConfidenceParams& p, int sms) {
  const int64_t rows = p.n_outer * p.n_inner;
  const int64_t width = group_width(p.dtype);
  const int64_t groups = (p.vocab + 2 * width - 2) / width;  // most groups a row spans, at any alignment
  const int64_t target = static_cast<int64_t>(kTargetCtasPerSm) * sms;
  int64_t splits = 1;
  if (rows < target) splits = std::max<int64_t>(1, min_i64(ceil_div(target, rows), groups / kMinChunkGroups));
  int64_t gpc = min_i64(ceil_div(groups, splits), kMaxChunkGroups);
  if (p.n_banned > 0) gpc = min_i64(gpc, kMaxBanWords * 32 / width);
  splits = ceil_div(groups, gpc);  // no chunk left empty by the rounding
  const int ban_words = p.n_banned > 0 ? static_cast<int>(ceil_div(gpc * width, 32)) : 0;
  return Plan{rows, splits, gpc, ban_words};
}

template <class Tr, bool kSample>
cudaError_t launch_scan(const DllmConfidenceParams& p, const Plan& plan, ConfState* partial, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(plan.ban_words) * sizeof(uint32_t);
  scan_kernel<Tr, kSample><<<grid_size(plan.rows * plan.splits), kThreads, smem, stream>>>(p, plan, partial);
  return cudaGetLastError();
}

template <class Tr>
cudaError_t launch_typed(const DllmConfidenceParams& p, const Plan& plan, ConfState* partial, cudaStream_t stream) {
  return make_consts(p).sample ? launch_scan<Tr, true>(p, plan, partial, stream)
                               : launch_scan<Tr, false>(p, plan, partial, stream);
}

}  // namespace
}  // namespace dllm

extern "C" size_t dllm_logits_to_confidence_cuda_workspace(const DllmConfidenceParams* params) {
  using namespace dllm;
  int sms = 0;
  if (params->n_outer * params->n_inner == 0 || params->vocab < 1 || sm_count(&sms) != cudaSuccess) return 0;
  const Plan plan = make_plan(*params, sms);
  return plan.splits > 1 ? static_cast<size_t>(plan.rows * plan.splits) * sizeof(ConfState) : 0;
}

extern "C" int dllm_logits_to_confidence_cuda(const DllmConfidenceParams* params, void* workspace,
                                              cudaStream_t stream) {
  using namespace dllm;
  const DllmConfidenceParams& p = *params;
  if (p.n_outer * p.n_inner == 0) return cudaSuccess;
  const int64_t element = 16 / group_width(p.dtype);
  if (p.vocab < 1 || reinterpret_cast<uintptr_t>(p.logits) % element != 0) return cudaErrorInvalidValue;
  int sms = 0;
  if (const cudaError_t err = sm_count(&sms)) return err;
  const Plan plan = make_plan(p, sms);
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  ConfState* partial = static_cast<ConfState*>(workspace);

  cudaError_t err;
  switch (p.dtype) {
    case DLLM_FLOAT32:
      err = launch_typed<F32>(p, plan, partial, stream);
      break;
    case DLLM_FLOAT16:
      err = launch_typed<F16>(p, plan, partial, stream);
      break;
    case DLLM_BFLOAT16:
      err = launch_typed<BF16>(p, plan, partial, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int grid = grid_size(ceil_div(plan.rows, kMergeRows));
  if (p.state != nullptr) {
    merge_kernel<true><<<grid, kMergeThreads, 0, stream>>>(p, plan, partial);
  } else {
    merge_kernel<false><<<grid, kMergeThreads, 0, stream>>>(p, plan, partial);
  }
  return cudaGetLastError();
}

extern "C" int dllm_logits_to_confidence_merge_cuda(const DllmConfidenceParams* params, const double* states,
                                                    int64_t n_parts, cudaStream_t stream) {
  using namespace dllm;
  const int64_t rows = params->n_outer * params->n_inner;
  if (rows == 0) return cudaSuccess;
  merge_shards_kernel<<<grid_size(ceil_div(rows, kMergeThreads)), kMergeThreads, 0, stream>>>(*params, states, n_parts);
  return cudaGetLastError();
}
