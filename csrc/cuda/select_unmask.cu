// select_unmask on CUDA. Framework-free: raw pointers in, one launch on the caller's stream, no host
// sync and no allocation (CUDA-graph capturable). docs/ops.md is the contract;
// dllm_kernels/reference/select_unmask.py the readable statement and csrc/cpu/select_unmask.cpp the
// same selection on the CPU.
//
// One CTA per row (grid-stride over rows). Every position gets a 64-bit key that orders the row the
// way the contract does: the high word is the score mapped to an order-preserving uint32 (-0.0 as
// +0.0, so the two tie as they compare equal), the low word L - 1 - position (equal scores: lower
// position first); an unselectable position (ineligible, NaN, -inf) gets key 0, below every
// selectable key (those are >= 2^55). Keys are distinct, so "the first n of the order" is exactly
// "key >= the n-th largest key". Rows up to kThreads * 16 positions keep their keys in registers;
// longer rows recompute them from global memory on every pass.
//
// Per row: one block reduction gives the selectable count, the threshold count and the smallest and
// largest selectable key. The factor policy sorts the selectable keys (bitonic, in shared memory, up
// to kSortCap at a time; longer rows take them kSortCap at a time, cut off by a radix select) and
// checks passes_factor at each rank. select_count gives n; the cut key is then known directly (n = 0,
// n = the selectable count, n = the threshold count, or inside the factor sort) or comes from an exact
// MSB-first radix select with 8-bit digits over the keys (shared-memory histogram; counts do not
// depend on the order of the atomics), starting below the common prefix of the smallest and largest
// key and skipping the position digits no key uses. Every thread then writes its positions' selected
// flag and, with token and x, the fused commit. Nothing depends on thread timing: the only
// order-dependent step, the gather before the sort, is undone by the sort of distinct keys.
//
// near_best counts against a row bound from the largest key (a second block reduction) and otherwise
// goes as threshold. The set rules (local_leap, hierarchy) take the cut of their floor,
// min(min_per_row, S), as above; each thread then decides its positions by the rule, reading the
// neighbourhood from global memory (local_leap: the nearest anchor within radius, O(min(radius, its
// distance)) reads; hierarchy: a larger score in the run, O(run length), cut short at the first one),
// and a block sum gives the count.
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "common/select_unmask.h"
#include "cuda/ptx.cuh"

namespace dllm {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMinCtasPerSm = 2;  // caps registers at 128: ptxas left to itself spills at 64 (K = 4, sm_80)
constexpr int kBins = 256;                    // 8-bit digits
constexpr int kSortCap = 4096;                // keys sorted at once (factor): 32 KiB of dynamic shared memory
constexpr int kMaxGrid = 65536;               // more rows: grid-stride
constexpr int64_t kMaxLength = kSelectCudaMaxLength;
static_assert(kMaxLength == INT_MAX - kThreads, "positions are ints and pos + kThreads must not overflow");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr uint64_t kAbove = ~uint64_t{0};  // above every key: as a cut it selects nothing
static_assert(kThreads == kBins, "one histogram bin per thread when clearing");
static_assert(kBins == 8 * 32, "the digit scan gives each lane of a warp 8 bins");
static_assert(kSortCap * sizeof(uint64_t) + 2048 <= 48 * 1024, "more shared memory needs an opt-in");

// The order key of one position (0: not selectable).
__device__ __forceinline__ uint64_t make_key(float score, bool eligible, int pos, int length) {
  uint32_t bits = __float_as_uint(score);
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  if (!eligible || nan || bits == 0xff800000u) return 0;
  if ((bits & 0x7fffffffu) == 0) bits = 0;  // -0.0 ties with +0.0
  const uint32_t ord = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint32_t>(length - 1 - pos);
}

// The score of a selectable key (-0.0 comes back as +0.0: every comparison treats them alike).
__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t ord = static_cast<uint32_t>(key >> 32);
  return __uint_as_float((ord & 0x80000000u) ? (ord ^ 0x80000000u) : ~ord);
}

struct Row {
  const float* score;
  const uint8_t* eligible;  // bool
  int length;

  __device__ __forceinline__ uint64_t key(int pos) const {
    return make_key(score[pos], eligible[pos] != 0, pos, length);
  }
  // local_leap's anchor: eligible and passing the threshold (which NaN and -inf never pass).
  __device__ __forceinline__ bool anchor(const DllmSelectParams& p, int pos) const {
    return eligible[pos] != 0 && passes_threshold(p, score[pos]);
  }
};

// A thread's keys: positions threadIdx.x + i * kThreads. K > 0: held in registers (length <= K *
// kThreads); K == 0: recomputed from global memory on every pass over the row.
template <int K>
struct Keys {
  uint64_t k[K];

  __device__ __forceinline__ void load(const Row& row) {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int pos = static_cast<int>(threadIdx.x) + i * kThreads;
      k[i] = pos < row.length ? row.key(pos) : 0;
    }
  }
  template <class F>
  __device__ __forceinline__ void each(const Row& row, F&& f) const {
#pragma unroll
    for (int i = 0; i < K; ++i) {
      const int pos = static_cast<int>(threadIdx.x) + i * kThreads;
      if (pos < row.length) f(k[i], pos);
    }
  }
};

template <>
struct Keys<0> {
  __device__ __forceinline__ void load(const Row&) {}
  template <class F>
  __device__ __forceinline__ void each(const Row& row, F&& f) const {
    for (int pos = static_cast<int>(threadIdx.x); pos < row.length; pos += kThreads) f(row.key(pos), pos);
  }
};

// One warp's share of block_stats, 32 bytes: read back with two 16-byte loads.
struct alignas(16) WarpStats {
  uint32_t n_sel, n_pass, unused[2];
  uint64_t kmin, kmax;
};

struct alignas(16) Shared {
  uint32_t hist[kBins];  // all zero between radix passes (warp 0 clears what it reads)
  WarpStats red_stats[kWarps];
  alignas(16) int red_min[kWarps];
  uint32_t red_sum[kWarps];
  uint64_t prefix;  // radix select state, written by one lane of warp 0
  uint32_t remaining;
  int done;
  int slot;  // gather cursor
};

// Per-row totals, identical in every thread.
struct RowStats {
  uint32_t n_sel, n_pass;
  uint64_t kmin, kmax;  // smallest and largest selectable key (n_sel > 0)
};

__device__ __forceinline__ uint32_t hi32(uint64_t v) { return static_cast<uint32_t>(v >> 32); }
__device__ __forceinline__ uint32_t lo32(uint64_t v) { return static_cast<uint32_t>(v); }
__device__ __forceinline__ uint64_t join(uint32_t hi, uint32_t lo) { return (static_cast<uint64_t>(hi) << 32) | lo; }

// Warp-wide reductions of 32-bit values: redux.sync from sm_80, butterfly shuffles before.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
template <class T, class Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int d = 16; d > 0; d /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, d));
  return v;
}
__device__ __forceinline__ uint32_t warp_sum(uint32_t v) {
  return warp_reduce(v, [](uint32_t a, uint32_t b) { return a + b; });
}
__device__ __forceinline__ uint32_t warp_min(uint32_t v) {
  return warp_reduce(v, [](uint32_t a, uint32_t b) { return a < b ? a : b; });
}
__device__ __forceinline__ uint32_t warp_max(uint32_t v) {
  return warp_reduce(v, [](uint32_t a, uint32_t b) { return a > b ? a : b; });
}
__device__ __forceinline__ int warp_min(int v) {
  return warp_reduce(v, [](int a, int b) { return a < b ? a : b; });
}
#else
__device__ __forceinline__ uint32_t warp_sum(uint32_t v) { return __reduce_add_sync(kFullMask, v); }
__device__ __forceinline__ uint32_t warp_min(uint32_t v) { return __reduce_min_sync(kFullMask, v); }
__device__ __forceinline__ uint32_t warp_max(uint32_t v) { return __reduce_max_sync(kFullMask, v); }
__device__ __forceinline__ int warp_min(int v) { return __reduce_min_sync(kFullMask, v); }
#endif

// Warp-wide min / max of a 64-bit value from two 32-bit reductions.
__device__ __forceinline__ uint64_t warp_min_u64(uint64_t v) {
  const uint32_t hi = warp_min(hi32(v));
  const uint32_t lo = warp_min(hi32(v) == hi ? lo32(v) : 0xffffffffu);
  return join(hi, lo);
}
__device__ __forceinline__ uint64_t warp_max_u64(uint64_t v) {
  const uint32_t hi = warp_max(hi32(v));
  const uint32_t lo = warp_max(hi32(v) == hi ? lo32(v) : 0u);
  return join(hi, lo);
}

// One barrier. sm.red_stats is next written in the next row, after its first barrier.
__device__ __forceinline__ RowStats block_stats(uint32_t n_sel, uint32_t n_pass, uint64_t kmin, uint64_t kmax,
                                                Shared& sm) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  n_sel = warp_sum(n_sel);
  n_pass = warp_sum(n_pass);
  kmin = warp_min_u64(kmin);
  kmax = warp_max_u64(kmax);
  if (lane == 0) sm.red_stats[warp] = WarpStats{n_sel, n_pass, {0, 0}, kmin, kmax};
  __syncthreads();
  RowStats st{0, 0, kAbove, 0};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const WarpStats ws = sm.red_stats[w];
    st.n_sel += ws.n_sel;
    st.n_pass += ws.n_pass;
    st.kmin = ws.kmin < st.kmin ? ws.kmin : st.kmin;
    st.kmax = ws.kmax > st.kmax ? ws.kmax : st.kmax;
  }
  return st;
}

// Block-wide minimum; one barrier. sm.red_min is next written after at least one more barrier.
__device__ __forceinline__ int block_min(int v, Shared& sm) {
  v = warp_min(v);
  if (threadIdx.x % 32 == 0) sm.red_min[threadIdx.x / 32] = v;
  __syncthreads();
  int m = sm.red_min[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = sm.red_min[w] < m ? sm.red_min[w] : m;
  return m;
}

// Block-wide sum; one barrier. sm.red_sum is written once a row, after the row's first barrier.
__device__ __forceinline__ uint32_t block_sum(uint32_t v, Shared& sm) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) sm.red_sum[threadIdx.x / 32] = v;
  __syncthreads();
  uint32_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += sm.red_sum[w];
  return total;
}

// The m-th largest selectable key, 2 <= m <= the selectable count (so kmin != kmax). MSB-first radix
// select on 8-bit digits; the digits above the first one where kmin and kmax differ are common to
// every selectable key, and the position digits at or above pos_top are 0 in every key: both are
// skipped. Ends as soon as the digit bucket holding the m-th key holds exactly the keys still needed:
// its prefix (lower bits 0) is then a cut with exactly m keys at or above it. Uniform in the block;
// leaves sm.hist all zero.
template <int K>
__device__ uint64_t radix_select(const Keys<K>& keys, const Row& row, uint32_t m, const RowStats& st, Shared& sm) {
  if (m <= 1 || st.kmin == st.kmax) return st.kmax;  // not reached: callers handle m == 1 themselves
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int pos_bits = 32 - __clz(row.length - 1);  // bits of the largest low word, length - 1
  const int pos_top = (pos_bits + 7) & ~7;
  const int first = (63 - __clzll(static_cast<long long>(st.kmin ^ st.kmax))) & ~7;
  uint64_t prefix = st.kmax & ~((uint64_t{2} << (first + 7)) - 1);
  uint32_t remaining = m;
  for (int shift = first; shift >= 0; shift -= 8) {
    if (shift < 32 && shift >= pos_top) continue;            // a digit every key has 0 in
    const uint64_t high = ~((uint64_t{2} << (shift + 7)) - 1);  // the bits above this digit
    keys.each(row, [&](uint64_t key, int) {
      if (key != 0 && ((key ^ prefix) & high) == 0) atomicAdd(&sm.hist[(key >> shift) & 0xff], 1u);
    });
    __syncthreads();
    if (warp == 0) {
      // Lane l takes digits 255 - 8l - i, i = 0..7: descending across the warp.
      uint4* bins = reinterpret_cast<uint4*>(&sm.hist[kBins - 8 - 8 * lane]);
      const uint4 lo = bins[0], hi = bins[1];
      bins[0] = make_uint4(0, 0, 0, 0);
      bins[1] = make_uint4(0, 0, 0, 0);
      const uint32_t c[8] = {hi.w, hi.z, hi.y, hi.x, lo.w, lo.z, lo.y, lo.x};
      uint32_t sum = 0;
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += c[i];
      uint32_t incl = sum;
#pragma unroll
      for (int d = 1; d < 32; d *= 2) {
        const uint32_t up = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += up;
      }
      uint32_t before = incl - sum;  // keys (matching the prefix) in higher digits than this lane's
      if (before < remaining && remaining <= incl) {  // exactly one lane
        int digit = 0;
        uint32_t bucket = 0;
        bool found = false;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          if (!found && before + c[i] >= remaining) {
            found = true;
            digit = kBins - 1 - 8 * lane - i;
            bucket = c[i];
          } else if (!found) {
            before += c[i];
          }
        }
        const uint32_t left = remaining - before;
        sm.prefix = prefix | (static_cast<uint64_t>(digit) << shift);
        sm.remaining = left;
        sm.done = bucket == left;
      }
    }
    __syncthreads();
    prefix = sm.prefix;
    remaining = sm.remaining;
    if (sm.done) break;  // sm.prefix / remaining / done are next written after the next barrier
  }
  return prefix;
}

// Descending bitonic sort of buf[0, n), n a power of two. Starts after, and ends with, a barrier.
__device__ void sort_desc(uint64_t* buf, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = static_cast<int>(threadIdx.x); t < n / 2; t += kThreads) {
        const int i = 2 * t - (t & (j - 1));  // bit j of i clear; partner i + j
        const uint64_t a = buf[i], b = buf[i + j];
        if ((i & k) == 0 ? a < b : a > b) {
          buf[i] = b;
          buf[i + j] = a;
        }
      }
      __syncthreads();
    }
  }
}

// Where the factor search left its last sorted batch: buf[i] is the key of 1-based rank first + i.
struct Sorted {
  int64_t first;
  int count;
};

// Fast-dLLM's factor rule: the longest prefix of the order with passes_factor at every rank. Sorts
// the selectable keys cap (a power of two) at a time in buf, best first; a batch after the first
// starts below the previous one's last key and, unless it is the last, ends at a radix-selected key.
// Stops at the first batch with a failing rank.
template <int K>
__device__ int64_t factor_prefix(const DllmSelectParams& p, const Keys<K>& keys, const Row& row, const RowStats& st,
                                 uint64_t* buf, int cap, Shared& sm, Sorted& sorted) {
  const int n_sel = static_cast<int>(st.n_sel);
  int done = 0;
  uint64_t upper = kAbove;  // keys below it are the ranks after done
  while (done < n_sel) {
    const int count = n_sel - done < cap ? n_sel - done : cap;
    const uint64_t lower = count < n_sel - done ? radix_select(keys, row, done + count, st, sm) : 1;
    int size = 1;
    while (size < count) size *= 2;
    if (threadIdx.x == 0) sm.slot = 0;
    for (int i = count + static_cast<int>(threadIdx.x); i < size; i += kThreads) buf[i] = 0;
    __syncthreads();  // sm.slot; the previous batch's reads of buf are behind block_min's barrier
    keys.each(row, [&](uint64_t key, int) {
      if (key >= lower && key < upper) {
        const int s = atomicAdd(&sm.slot, 1);
        if (s < count) buf[s] = key;  // exactly count keys are in range
      }
    });
    __syncthreads();
    sort_desc(buf, size);
    int fail = INT_MAX;
    for (int i = static_cast<int>(threadIdx.x); i < count; i += kThreads) {
      const int rank = done + i + 1;
      if (!passes_factor(p, key_score(buf[i]), rank)) fail = rank < fail ? rank : fail;
    }
    fail = block_min(fail, sm);
    sorted = Sorted{done + 1, count};
    if (fail != INT_MAX) return fail - 1;
    done += count;
    upper = lower;
  }
  return n_sel;
}

// local_leap: an anchor within radius of pos, nearest first, so the scan stops at the closest one.
__device__ bool near_anchor(const DllmSelectParams& p, const Row& row, int pos, int radius) {
  for (int d = 1; d <= radius; ++d) {
    const bool left = d <= pos, right = d < row.length - pos;  // no int overflow for rows near 2^31
    if (!left && !right) break;
    if ((left && row.anchor(p, pos - d)) || (right && row.anchor(p, pos + d))) return true;
  }
  return false;
}

// hierarchy: no score in pos's run of eligible positions is larger than s (NaN and -inf never are).
__device__ bool run_max(const Row& row, int pos, float s) {
  for (int a = pos - 1; a >= 0 && row.eligible[a] != 0; --a) {
    if (row.score[a] > s) return false;
  }
  for (int a = pos + 1; a < row.length && row.eligible[a] != 0; ++a) {
    if (row.score[a] > s) return false;
  }
  return true;
}

// The set rules: the floor's cut, then each position by the rule; returns the row's count.
template <int K>
__device__ uint32_t select_set(const DllmSelectParams& p, const Keys<K>& keys, const Row& row, const RowStats& st,
                               Shared& sm, bool* selected, int64_t* x, const int64_t* token) {
  const uint32_t floor = p.min_per_row < st.n_sel ? static_cast<uint32_t>(p.min_per_row) : st.n_sel;
  uint64_t cut = kAbove;
  if (floor == 1) {
    cut = st.kmax;
  } else if (floor > 1) {
    cut = floor == st.n_sel ? st.kmin : radix_select(keys, row, floor, st, sm);
  }
  const int radius = p.radius < row.length ? static_cast<int>(p.radius) : row.length;
  const bool leap = p.policy == DLLM_POLICY_LOCAL_LEAP;
  uint32_t n = 0;
  keys.each(row, [&](uint64_t key, int pos) {
    bool sel = false;
    if (key != 0) {
      const float s = key_score(key);
      sel = key >= cut || passes_threshold(p, s) ||
            (passes(p, s, p.low_threshold) && (leap ? near_anchor(p, row, pos, radius) : run_max(row, pos, s)));
    }
    selected[pos] = sel;
    if (x != nullptr && sel) x[pos] = token[pos];
    n += sel ? 1u : 0u;
  });
  return block_sum(n, sm);
}

template <int K>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm) select_kernel(const DllmSelectParams p, const int sort_cap) {
  uint64_t* const buf = reinterpret_cast<uint64_t*>(ptx::dynamic_smem());  // sort_cap keys (factor only)
  __shared__ Shared sm;
  sm.hist[threadIdx.x] = 0;  // ordered before any use by the first barrier of the first row
  const int length = static_cast<int>(p.length);
  const bool commit = p.x != nullptr && p.token != nullptr;

  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    __syncthreads();  // the previous row is done with shared memory
    const Row row{p.score + r * p.score_stride, reinterpret_cast<const uint8_t*>(p.eligible) + r * p.eligible_stride,
                  length};
    Keys<K> keys;
    keys.load(row);

    uint32_t n_sel = 0, n_pass = 0;
    uint64_t kmin = kAbove, kmax = 0;
    keys.each(row, [&](uint64_t key, int) {
      if (key != 0) {
        ++n_sel;
        n_pass += passes_threshold(p, key_score(key)) ? 1u : 0u;
        kmin = key < kmin ? key : kmin;
        kmax = key > kmax ? key : kmax;
      }
    });
    const RowStats st = block_stats(n_sel, n_pass, kmin, kmax, sm);
    bool* selected = p.selected + r * length;
    int64_t* x = commit ? p.x + r * p.x_stride : nullptr;
    const int64_t* token = commit ? p.token + r * p.token_stride : nullptr;
    if (is_set_rule(p.policy)) {
      const uint32_t count = select_set(p, keys, row, st, sm, selected, x, token);
      if (threadIdx.x == 0) p.count[r] = static_cast<int32_t>(count);
      continue;
    }

    double bound = p.threshold;  // what n_pass counts against
    n_pass = st.n_pass;
    if (p.policy == DLLM_POLICY_NEAR_BEST) {  // kmax is 0 in a row with nothing selectable: no key passes
      bound = near_best_bound(p, key_score(st.kmax));
      uint32_t c = 0;
      keys.each(row, [&](uint64_t key, int) { c += key != 0 && passes(p, key_score(key), bound) ? 1u : 0u; });
      n_pass = block_sum(c, sm);
    }

    int64_t factor = 0;
    Sorted sorted{0, 0};
    if (uses_factor(p.policy)) factor = factor_prefix(p, keys, row, st, buf, sort_cap, sm, sorted);
    const int64_t n = select_count(p, r, st.n_sel, n_pass, factor);

    // The cut: selected = selectable and key >= cut (or, when the count is the bound's, passing).
    uint64_t cut = kAbove;
    bool by_threshold = false;
    if (n == 0) {
      cut = kAbove;
    } else if (n == st.n_sel) {
      cut = st.kmin;
    } else if (n == n_pass) {
      by_threshold = true;  // the passing positions are a prefix of the order
    } else if (n == 1) {
      cut = st.kmax;
    } else if (n >= sorted.first && n < sorted.first + sorted.count) {
      cut = buf[n - sorted.first];
    } else {
      cut = radix_select(keys, row, static_cast<uint32_t>(n), st, sm);
    }

    keys.each(row, [&](uint64_t key, int pos) {
      const bool sel = key != 0 && (by_threshold ? passes(p, key_score(key), bound) : key >= cut);
      selected[pos] = sel;
      if (commit && sel) x[pos] = token[pos];
    });
    if (threadIdx.x == 0) p.count[r] = static_cast<int32_t>(n);
  }
}

template <int K>
cudaError_t launch(const DllmSelectParams& p, int sort_cap, cudaStream_t stream) {
  const int grid = static_cast<int>(p.rows < kMaxGrid ? p.rows : kMaxGrid);
  const size_t smem = static_cast<size_t>(sort_cap) * sizeof(uint64_t);
  select_kernel<K><<<grid, kThreads, smem, stream>>>(p, sort_cap);
  return cudaGetLastError();
}

}  // namespace
}  // namespace dllm

extern "C" int dllm_select_unmask_cuda(const DllmSelectParams* params, cudaStream_t stream) {
  using namespace dllm;
  const DllmSelectParams& p = *params;
  if (p.rows <= 0) return cudaSuccess;
  if (p.length < 0 || p.length > kMaxLength) return cudaErrorInvalidValue;
  int sort_cap = 0;  // the factor policy's sort buffer: a power of two >= min(length, kSortCap)
  if (uses_factor(p.policy) && p.length > 0) {
    sort_cap = 1;
    while (sort_cap < p.length && sort_cap < kSortCap) sort_cap *= 2;
  }
  if (p.length <= kThreads) return launch<1>(p, sort_cap, stream);
  if (p.length <= 4 * kThreads) return launch<4>(p, sort_cap, stream);
  if (p.length <= 16 * kThreads) return launch<16>(p, sort_cap, stream);
  return launch<0>(p, sort_cap, stream);
}
