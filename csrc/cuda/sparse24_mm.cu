// sparse24_mm on CUDA: out[M, N] = x[M, K] @ W^T (+ bias), W in the 2:4 format of docs/ops.md
// (values [N, K/2], canonical int16 meta [N, K/16]), fp32 accumulation, output in x's dtype.
// Framework-free: raw pointers in, launches on the caller's stream, no host sync, no allocation.
// dllm_kernels/reference/sparse24.py is the readable statement, csrc/cpu/sparse24_mm.cpp the CPU kernel.
//
// fp16 / bf16: sparse tensor cores, mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.T.T.f32
// (sm_80 and later, sm_90a included; ::ordered_metadata is the .sp variant ptxas recommends, and the
// canonical codes are ordered, i0 < i1). The product is computed transposed,
// out^T[N, M] = W[N, K] . x^T[K, M]: the sparse weight is the instruction's A operand (rows = output
// features, 2:4 along K as mma.sp requires), x^T is B (M padded to the instruction's n = 8 and masked),
// D is a 16 x 8 tile of out^T held in fp32.
//
// The instruction's operands, per PTX ISA "Matrix Fragments for sparse mma.m16n8k32 with .f16 and .bf16
// types" and "Sparse matrix storage" (lane = 4 g + t: g = groupID, t = threadID_in_group):
//   A  a0 = row g, the kept pair of 4-wide chunk t (low half = the lower kept position); a1 = row g+8,
//      chunk t; a2 = row g, chunk 4+t; a3 = row g+8, chunk 4+t.
//   B  b_j = x^T[k = 8 j + 2 t + {0, 1}][n = g] (low half = the even k).
//   D  d0, d1 = (row g, n = 2 t + {0, 1}); d2, d3 = (row g+8, the same n).
//   E  sparsity selector s in {0, 1}: lanes 4 g + 2 s (chunks 0..3) and 4 g + 2 s + 1 (chunks 4..7)
//      supply the metadata; bits 4 c..4 c+3 of the low half hold row g's code i0 | i1 << 2 of the
//      supplier's chunk c, bits 16 + 4 c.. the same for row g+8: the canonical nibble.
//
// Which 4-wide chunks of K an instruction covers is free, as long as A, B and E agree. A warp owns 16
// weight rows and walks K in blocks of 64 (16 chunks, two instructions). Lane t reads, for rows g and
// g+8, the 16-byte segment u(t) = (0, 2, 1, 3)[t] of the block's values (chunks 4u .. 4u+3; word i of the
// uint4 = chunk 4u + i). Instruction s of the block maps its chunk t to chunk 4 u(t) + 2 s and its chunk
// 4+t to chunk 4 u(t) + 2 s + 1: a = (words 2s of rows g, g+8, words 2s+1 of rows g, g+8), straight from
// the 16-byte loads. B register j of lane (g, t = 2h + q) is then k = 4 c + 2 q + {0, 1} of chunk
// c = 8 h + 4 (j & 1) + 2 s + (j >> 1), read from the shared-memory copy of x; the segment order u and
// the row pitch (130 words, 2 mod 32 banks) make those 4-byte reads conflict-free.
//
// Metadata: converted in the kernel from the canonical meta, no second copy is stored. Instruction s
// uses selector s, so lane t supplies metadata to instruction s = t >> 1 as supplier p = t & 1, and its
// chunk 4 p + c' is chunk 4 u(c') + t of the block. A row's canonical meta for the block is four int16
// W0..W3 (one 8-byte load; W_w holds chunks 4w..4w+3 at nibble c % 4), so lane t's register is nibble t
// of W0, W2, W1, W3 (the u order) for row g in the low half and for row g+8 in the high half: two shifts,
// two masks and one byte_perm per row. One register serves both instructions of the block.
//
// Grid: CTA = 4 warps = 64 weight rows x MT = 8 * NT rows of x (NT = 1, 2, 4, 8 by M) x one K split.
// K is walked in stages of 256 (4 blocks): each warp issues its 4 blocks of 16-byte value loads and
// 8-byte meta loads, the CTA copies the stage of x (MT x 256, zero outside [0, M) x [0, K)) to shared
// memory with 8-byte cp.async, then the warps run 8 instructions per n-tile. Small M is bound by reading
// the weight once: when the (n, m) tiles give fewer than kTargetCtasPerSm CTAs per SM, K is split into
// whole stages across CTAs, as far as the fp32 workspace stays small next to the weight
// (splits <= K / (16 M)). With one split the kernel stores out (+ bias); with several each CTA writes its
// fp32 partial tile to the workspace [splits][M][N] and reduce_kernel sums the splits in order and adds
// the bias (deterministic: no atomics). Larger M tiles over M through the grid's y dimension.
// fp32 inputs: fp32_kernel, CUDA cores, one warp per (output feature, 8 rows of x), lanes stride the groups
// of 4, fixed-order warp reduction.
//
// Both paths skip the pruned positions, as every sparse kernel does: a non-finite x there (0 * inf in the
// dense reference) does not reach the output.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "common/sparse24_mm.h"
#include "cuda/dtypes.cuh"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace dllm {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// CTAs per SM the register budget must allow: 4 (128 registers) with up to 4 n-tiles, 3 (168) with 8.
template <int NT>
constexpr int kMinCtasPerSm = NT == 8 ? 3 : 4;
constexpr int kRowsPerWarp = 16;  // the instruction's m
constexpr int kRowsPerCta = kWarps * kRowsPerWarp;
constexpr int kBlockK = 64;  // two instructions (k = 32 each)
constexpr int kStageBlocks = 4;
constexpr int kStageK = kStageBlocks * kBlockK;
constexpr int kXsPitch = kStageK / 2 + 2;  // words per row of the x stage: 2 mod 32 banks
constexpr int kPiecesPerRow = kStageK / 4;  // 8-byte pieces of a stage row
constexpr uint32_t kPadMeta = 0x44444444u;  // code 0b0100 = (0, 1) in every nibble: valid, for padding
constexpr int kTargetCtasPerSm = 4;
constexpr int64_t kMaxSplits = 64;
constexpr int kReduceThreads = 256;
constexpr int kF32Rows = 8;  // rows of x per warp in the fp32 kernel
constexpr unsigned kFullMask = 0xffffffffu;

// armor_linear's wrap_out: blockdiag([size / bs, bs, bs] blocks) applied across N, or none (blocks NULL).
struct Wrap {
  const void* blocks;
  int64_t bs;
};

// Launch geometry, derived from metadata only (make_plan), shared by the workspace query and the launch.
struct Plan {
  int64_t n_blocks;     // CTAs along N (kRowsPerCta rows each)
  int64_t m_tiles;      // tiles of 8 * n_tiles rows of x
  int64_t splits;       // K splits (1: no workspace)
  int64_t k_per_split;  // a multiple of kStageK
  int n_tiles;          // NT: instruction n-tiles (8 rows of x each) per CTA
  bool vec_w;           // 16-byte value loads and 8-byte meta loads (K % 64 == 0, aligned pointers)
  bool vec_x;           // 8-byte cp.async of x (aligned rows)
  bool partial_out;     // write fp32 partials to the workspace even unsplit (a wrap_out too wide to fuse)
};

// A lane's weight rows g and g+8 (nullptr past N): value pointers advanced to its segment u(t), meta
// pointers advanced to block t of a stage.
struct LaneRows {
  const uint16_t* values[2];
  const uint16_t* meta[2];
  int64_t seg_k;  // first column of the segment within a block: 16 u(t)
  int64_t meta_k;  // first column of the lane's meta block within a stage: 64 t
};

// Values of block kb (its 16-byte segment) for rows g, g+8; zeros past N and, in element mode, for a
// segment at or past k_end (segments are 16 columns, k_end a multiple of 16).
template <bool kVecW>
__device__ __forceinline__ void load_values(const LaneRows& w, int64_t kb, int64_t k_end, uint4 (&v)[2]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    v[i] = make_uint4(0, 0, 0, 0);
    if (w.values[i] == nullptr) continue;
    if constexpr (kVecW) {  // K % 64 == 0: the whole block is inside [0, K)
      v[i] = __ldg(reinterpret_cast<const uint4*>(w.values[i] + kb / 2));
    } else if (kb + w.seg_k < k_end) {
      const uint16_t* src = w.values[i] + kb / 2;
      v[i] = make_uint4(uint32_t{__ldg(src)} | uint32_t{__ldg(src + 1)} << 16,
                        uint32_t{__ldg(src + 2)} | uint32_t{__ldg(src + 3)} << 16,
                        uint32_t{__ldg(src + 4)} | uint32_t{__ldg(src + 5)} << 16,
                        uint32_t{__ldg(src + 6)} | uint32_t{__ldg(src + 7)} << 16);
    }
  }
}

// Canonical meta of block t of the stage at ks, rows g, g+8: four int16 W0..W3 as (W0 | W1 << 16,
// W2 | W3 << 16); code (0, 1) for words past N or past k_end.
template <bool kVecW>
__device__ __forceinline__ void load_meta(const LaneRows& w, int64_t ks, int64_t k_end, uint2 (&m)[2]) {
  const int64_t kb = ks + w.meta_k;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    m[i] = make_uint2(kPadMeta, kPadMeta);
    if (w.meta[i] == nullptr || kb >= k_end) continue;
    if constexpr (kVecW) {
      m[i] = __ldg(reinterpret_cast<const uint2*>(w.meta[i] + ks / 16));
    } else {
      uint32_t word[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) word[j] = kb + 16 * j < k_end ? uint32_t{__ldg(w.meta[i] + ks / 16 + j)} : 0x4444u;
      m[i] = make_uint2(word[0] | word[1] << 16, word[2] | word[3] << 16);
    }
  }
}

// The metadata register that lane t' of the group needs for a block whose canonical meta is m: nibble t'
// of W0, W2, W1, W3 (the segment order u), row g in the low half, row g+8 in the high half.
__device__ __forceinline__ uint32_t meta_register(const uint2 (&m)[2], int t_reader) {
  const int sh = 4 * t_reader;
  const uint32_t z0 = ((m[0].x >> sh) & 0x000F000Fu) | ((m[0].y >> sh) & 0x000F000Fu) << 4;
  const uint32_t z1 = ((m[1].x >> sh) & 0x000F000Fu) | ((m[1].y >> sh) & 0x000F000Fu) << 4;
  return __byte_perm(z0, z1, 0x6420);
}

// Lane t holds the canonical meta of block t of the stage; returns, in e[r], the register of block t ^ r
// for this lane (a 4 x 4 transpose within the group of 4 lanes: 3 shuffles).
__device__ __forceinline__ void meta_transpose(const uint2 (&m)[2], int t, uint32_t (&e)[4]) {
  e[0] = meta_register(m, t);
#pragma unroll
  for (int r = 1; r < 4; ++r) e[r] = __shfl_xor_sync(kFullMask, meta_register(m, t ^ r), r);
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Instruction s of a block for every n-tile. xl: this lane's x words for the block (row g of n-tile 0,
// chunk 8h, half q).
template <class Tr, int NT, int S>
__device__ __forceinline__ void mma_step(const uint4 (&v)[2], uint32_t e, const uint32_t* xl, float (&acc)[NT][4]) {
  const uint32_t a[4] = {word(v[0], 2 * S), word(v[1], 2 * S), word(v[0], 2 * S + 1), word(v[1], 2 * S + 1)};
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const uint32_t* xn = xl + nt * 8 * kXsPitch + 4 * S;
    const uint32_t b[4] = {xn[0], xn[8], xn[2], xn[10]};  // chunks 8h + 2S + {0, 4, 1, 5}
    ptx::mma_sp_16832<Tr::kBf16, S>(acc[nt], a, b, e);
  }
}

// Copies rows [m0, m0 + MT) x columns [ks, ks + kStageK) of x to xs (kXsPitch words per row), zero
// outside [0, M) x [0, k_end). Pieces are 4 columns (8 bytes); k_end is a multiple of 16.
template <class Tr, int MT>
__device__ __forceinline__ void stage_x(const DllmSparse24Params& p, bool vec_x, int64_t m0, int64_t ks,
                                        int64_t k_end, uint32_t* xs) {
  const auto* x = static_cast<const uint16_t*>(p.x);
  for (int i = threadIdx.x; i < MT * kPiecesPerRow; i += kThreads) {
    const int row = i / kPiecesPerRow, piece = i % kPiecesPerRow;
    const int64_t m = m0 + row, k = ks + 4 * piece;
    uint32_t* dst = xs + row * kXsPitch + 2 * piece;
    if (m < p.m && k < k_end) {
      const uint16_t* src = x + m * p.x_stride + k;
      if (vec_x) {
        ptx::cp_async8(dst, src);
      } else {
        *reinterpret_cast<uint2*>(dst) = make_uint2(uint32_t{__ldg(src)} | uint32_t{__ldg(src + 1)} << 16,
                                                    uint32_t{__ldg(src + 2)} | uint32_t{__ldg(src + 3)} << 16);
      }
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(0, 0);
    }
  }
}

// out[m, n] = sum_j wrap[n / bs, n % bs, j] * block[j * stride] + bias[n]: one output of blockdiag(wrap) . z,
// `block` pointing at z's first element of n's diagonal block.
template <class Tr>
__device__ __forceinline__ void store_wrapped(const DllmSparse24Params& p, const Wrap& wrap, const float* block,
                                              int stride, int64_t m, int64_t n) {
  const auto* a = static_cast<const typename Tr::Storage*>(wrap.blocks) + n * wrap.bs;  // row n % bs of its block
  float sum = 0.f;
  for (int j = 0; j < wrap.bs; ++j) sum = fmaf(Tr::to_float(a[j]), block[j * stride], sum);
  if (p.bias != nullptr) sum += Tr::to_float(static_cast<const typename Tr::Storage*>(p.bias)[n]);
  static_cast<typename Tr::Storage*>(p.out)[m * p.n + n] = Tr::from_float(sum);
}

// out[m, n] = sum_j wrap[n / bs, n % bs, j] * z[(n - n % bs + j), m] + bias[n] for the CTA's 64 rows of N
// starting at n_base (a multiple of bs) and `cols` outputs m starting at m_base; z: [64][cols] fp32 in
// shared memory. Consecutive threads take consecutive n (coalesced stores of out [M, N]).
template <class Tr>
__device__ __forceinline__ void wrap_out_tile(const DllmSparse24Params& p, const Wrap& wrap, const float* z,
                                              int cols, int64_t n_base, int64_t m_base, int64_t m_end) {
  for (int i = threadIdx.x; i < kRowsPerCta * cols; i += kThreads) {
    const int row = i % kRowsPerCta, col = i / kRowsPerCta;
    const int64_t n = n_base + row, m = m_base + col;
    if (n >= p.n || m >= m_end) continue;
    const int within = static_cast<int>(n % wrap.bs);
    store_wrapped<Tr>(p, wrap, z + (row - within) * cols + col, cols, m, n);
  }
}

// Grid: (n_blocks, min(m_tiles, 65535), splits); CTA (n, m-tile, split) covers weight rows
// [64 n, 64 n + 64), rows of x [MT m, MT m + MT) and columns [split * k_per_split, ...) of K.
// kArmor (armor_linear): x holds each input row twice, as the hi and lo 16-bit parts of its fp32 value
// (rows 2m, 2m + 1), so the two accumulator columns a lane holds (2t, 2t + 1) add up to output row m in
// the lane itself; then blockdiag(wrap_out) across N (a wrap block never crosses the CTA's 64 rows: bs
// divides 64), bias and the store, through shared memory.
template <class Tr, int NT, bool kVecW, bool kArmor>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm<NT>)
    mma_kernel(const DllmSparse24Params p, const Plan plan, const Wrap wrap, float* __restrict__ partial) {
  constexpr int MT = 8 * NT;
  __shared__ __align__(16) uint32_t xs[MT * kXsPitch];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta + warp * kRowsPerWarp;
  const bool active = n0 < p.n;  // warp-uniform: the instruction needs the whole warp
  const int64_t split = blockIdx.z;
  const int64_t k_begin = split * plan.k_per_split;
  const int64_t k_end = min_i64(p.k, k_begin + plan.k_per_split);

  LaneRows w;
  w.seg_k = 16 * ((t & 1) << 1 | t >> 1);
  w.meta_k = kBlockK * t;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t n = n0 + g + 8 * i;
    w.values[i] = n < p.n ? static_cast<const uint16_t*>(p.values) + n * (p.k / 2) + w.seg_k / 2 : nullptr;
    w.meta[i] = n < p.n ? reinterpret_cast<const uint16_t*>(p.meta) + n * (p.k / 16) + w.meta_k / 16 : nullptr;
  }
  // This lane's B words within a block of the stage: row g, chunk 8h, half q.
  const uint32_t* xl = xs + g * kXsPitch + 16 * (t >> 1) + (t & 1);

  for (int64_t mt = blockIdx.y; mt < plan.m_tiles; mt += gridDim.y) {
    const int64_t m0 = mt * MT;
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    for (int64_t ks = k_begin; ks < k_end; ks += kStageK) {
      const int blocks = static_cast<int>(min_i64(kStageBlocks, ceil_div(k_end - ks, kBlockK)));
      uint4 v[kStageBlocks][2];
      uint2 m[2];
      if (active) {  // the weight loads fly while x is staged
#pragma unroll
        for (int b = 0; b < kStageBlocks; ++b)
          if (b < blocks) load_values<kVecW>(w, ks + b * kBlockK, k_end, v[b]);
        load_meta<kVecW>(w, ks, k_end, m);
      }
      __syncthreads();  // every warp is done with the previous stage of x
      stage_x<Tr, MT>(p, plan.vec_x, m0, ks, k_end, xs);
      ptx::cp_async_wait_all();
      __syncthreads();
      if (active) {
        uint32_t e[4];
        meta_transpose(m, t, e);
#pragma unroll
        for (int b = 0; b < kStageBlocks; ++b) {
          if (b < blocks) {
            const int r = t ^ b;
            const uint32_t eb = r == 0 ? e[0] : r == 1 ? e[1] : r == 2 ? e[2] : e[3];
            mma_step<Tr, NT, 0>(v[b], eb, xl + b * (kBlockK / 2), acc);
            mma_step<Tr, NT, 1>(v[b], eb, xl + b * (kBlockK / 2), acc);
          }
        }
      }
    }

    if constexpr (kArmor) {
      const int64_t m_out = p.m / 2;
      if (plan.splits > 1 || plan.partial_out) {  // the sums of the pairs; wrap_reduce_kernel does the rest
        if (!active) continue;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int64_t n = n0 + g + 8 * i;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int64_t m = m0 / 2 + nt * 4 + t;
            if (n < p.n && m < m_out)
              partial[(split * m_out + m) * p.n + n] = fmaf(acc[nt][2 * i + 1], 1.f / Tr::kLoScale, acc[nt][2 * i]);
          }
        }
        continue;
      }
      constexpr int kCols = MT / 2;  // output rows of the tile
      float* z = reinterpret_cast<float*>(xs);  // [64][kCols]: xs is free once every warp is past its mma
      __syncthreads();
      if (active) {
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            z[(warp * kRowsPerWarp + g + 8 * i) * kCols + nt * 4 + t] =
                fmaf(acc[nt][2 * i + 1], 1.f / Tr::kLoScale, acc[nt][2 * i]);
      }
      __syncthreads();
      wrap_out_tile<Tr>(p, wrap, z, kCols, static_cast<int64_t>(blockIdx.x) * kRowsPerCta, m0 / 2, m_out);
      continue;  // the next tile's first barrier waits for every warp to be done with z
    }
    if (!active) continue;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t n = n0 + g + 8 * i;
      if (n >= p.n) continue;
      const bool add_bias = plan.splits == 1 && p.bias != nullptr;
      const float bias = add_bias ? Tr::to_float(static_cast<const uint16_t*>(p.bias)[n]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int64_t m = m0 + nt * 8 + 2 * t + j;
          if (m >= p.m) continue;
          const float v = acc[nt][2 * i + j];
          if (plan.splits == 1) {
            static_cast<uint16_t*>(p.out)[m * p.n + n] = Tr::from_float(add_bias ? v + bias : v);
          } else {
            partial[(split * p.m + m) * p.n + n] = v;
          }
        }
      }
    }
  }
}

// out = sum of the splits' partials in split order (+ bias), one element per thread, grid-stride.
template <class Tr>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const DllmSparse24Params p, int64_t splits, const float* __restrict__ partial) {
  const int64_t total = p.m * p.n;
  const auto* bias = static_cast<const uint16_t*>(p.bias);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
    float s = partial[i];
    for (int64_t sp = 1; sp < splits; ++sp) s += partial[sp * total + i];
    if (bias != nullptr) s += Tr::to_float(bias[i % p.n]);
    static_cast<uint16_t*>(p.out)[i] = Tr::from_float(s);
  }
}

// fp32: one warp per (output feature n, 8 rows of x); lane l takes the groups l, l + 32, ... of row n.
__global__ void __launch_bounds__(kThreads) fp32_kernel(const DllmSparse24Params p) {
  const int lane = threadIdx.x % 32;
  const int64_t m_tiles = ceil_div(p.m, kF32Rows), items = p.n * m_tiles, groups = p.k / 4;
  const auto* values = static_cast<const float*>(p.values);
  const auto* meta = reinterpret_cast<const uint16_t*>(p.meta);
  const auto* x = static_cast<const float*>(p.x);
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; item < items;
       item += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t n = item % p.n, m0 = item / p.n * kF32Rows;
    const int rows = static_cast<int>(min_i64(kF32Rows, p.m - m0));
    const float* vrow = values + n * (p.k / 2);
    const uint16_t* mrow = meta + n * (p.k / 16);
    const float* xr = x + m0 * p.x_stride;
    float acc[kF32Rows];
#pragma unroll
    for (int r = 0; r < kF32Rows; ++r) acc[r] = 0.f;
    for (int64_t q = lane; q < groups; q += 32) {
      const float v0 = vrow[2 * q], v1 = vrow[2 * q + 1];
      const uint32_t code = uint32_t{mrow[q / 4]} >> (4 * (q % 4)) & 0xFu;
      const int64_t k0 = 4 * q + (code & 3u), k1 = 4 * q + (code >> 2);
#pragma unroll
      for (int r = 0; r < kF32Rows; ++r)
        if (r < rows) acc[r] = fmaf(v1, xr[r * p.x_stride + k1], fmaf(v0, xr[r * p.x_stride + k0], acc[r]));
    }
    const float bias = p.bias != nullptr ? static_cast<const float*>(p.bias)[n] : 0.f;
#pragma unroll
    for (int r = 0; r < kF32Rows; ++r) {
#pragma unroll
      for (int d = 16; d > 0; d /= 2) acc[r] += __shfl_xor_sync(kFullMask, acc[r], d);
      if (lane == r && r < rows)
        static_cast<float*>(p.out)[(m0 + r) * p.n + n] = p.bias != nullptr ? acc[r] + bias : acc[r];
    }
  }
}

// Split K only when the (n, m) tiles give fewer than kTargetCtasPerSm CTAs per SM, into whole stages,
// and at most K / (16 M) ways: the workspace (written and read once, 8 * splits * M * N bytes) then stays
// under about half of the weight's bytes (9/8 * N * K).
Plan make_plan(const DllmSparse24Params& p, int sms) {
  Plan plan{};
  plan.n_tiles = p.m <= 8 ? 1 : p.m <= 16 ? 2 : p.m <= 32 ? 4 : 8;
  plan.m_tiles = ceil_div(p.m, 8 * plan.n_tiles);
  plan.n_blocks = ceil_div(p.n, kRowsPerCta);
  const int64_t stages = ceil_div(p.k, kStageK);
  const int64_t ctas = plan.n_blocks * plan.m_tiles;
  const int64_t target = static_cast<int64_t>(kTargetCtasPerSm) * sms;
  int64_t splits = 1;
  if (ctas < target && stages > 1) {
    const int64_t workspace_cap = std::max<int64_t>(1, p.k / (16 * p.m));
    splits = std::min({ceil_div(target, ctas), workspace_cap, stages, kMaxSplits});
  }
  const int64_t stages_per_split = std::max<int64_t>(1, ceil_div(stages, splits));
  plan.k_per_split = stages_per_split * kStageK;
  plan.splits = std::max<int64_t>(1, ceil_div(stages, stages_per_split));  // no split left empty
  plan.vec_w = p.k % kBlockK == 0 && reinterpret_cast<uintptr_t>(p.values) % 16 == 0 &&
               reinterpret_cast<uintptr_t>(p.meta) % 8 == 0;
  plan.vec_x = reinterpret_cast<uintptr_t>(p.x) % 8 == 0 && p.x_stride % 4 == 0;
  return plan;
}

// out = blockdiag(wrap) . (sum of the splits' partials, in split order) + bias, for armor_linear when
// wrap_out is not fused into mma_kernel (split K, a block wider than 64, fp32). Grid: (N / 256 chunks,
// rows of out strided past 65535); a chunk holds whole wrap blocks (bs divides 256).
template <class Tr>
__global__ void __launch_bounds__(kReduceThreads)
    wrap_reduce_kernel(const DllmSparse24Params p, int64_t splits, const float* __restrict__ partial, const Wrap wrap) {
  __shared__ float z[kReduceThreads];
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  for (int64_t m = blockIdx.y; m < p.m; m += gridDim.y) {
    float s = 0.f;
    if (n < p.n)
      for (int64_t sp = 0; sp < splits; ++sp) s += partial[(sp * p.m + m) * p.n + n];
    __syncthreads();  // the previous row's z is read
    z[threadIdx.x] = s;
    __syncthreads();
    if (n >= p.n) continue;
    store_wrapped<Tr>(p, wrap, z + threadIdx.x - n % wrap.bs, 1, m, n);
  }
}

// inner = blockdiag(wrap_in) . x per row of x, in fp32. kHiLo: stored as the rows 2m (hi) and 2m + 1 (lo)
// of a 16-bit [2M, K] matrix with hi = round(v), lo = round((v - hi) * kLoScale) (0 when v is not finite,
// so that inf stays inf; an fp16 hi overflows past 65504, as a 16-bit input would); else as fp32 [M, K].
template <class Tr, bool kHiLo>
__global__ void __launch_bounds__(kReduceThreads) wrap_in_kernel(const DllmSparse24Params p, const Wrap wrap, void* inner) {
  const auto* x = static_cast<const typename Tr::Storage*>(p.x);
  const auto* blocks = static_cast<const typename Tr::Storage*>(wrap.blocks);
  const int64_t total = p.m * p.k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kReduceThreads) {
    const int64_t row = i / p.k, col = i % p.k;
    const int64_t within = col % wrap.bs;
    const auto* a = blocks + col * wrap.bs;
    const auto* xr = x + row * p.x_stride + col - within;
    float v = 0.f;
    for (int64_t j = 0; j < wrap.bs; ++j) v = fmaf(Tr::to_float(a[j]), Tr::to_float(xr[j]), v);
    if constexpr (kHiLo) {
      const uint16_t hi = Tr::from_float(v);  // lo scaled by Tr::kLoScale (cuda/dtypes.cuh)
      const float rest = v - Tr::to_float(hi);
      auto* out = static_cast<uint16_t*>(inner);
      out[2 * row * p.k + col] = hi;
      out[(2 * row + 1) * p.k + col] = Tr::from_float(isfinite(rest) ? rest * Tr::kLoScale : 0.f);
    } else {
      static_cast<float*>(inner)[i] = v;
    }
  }
}

template <class Tr, int NT, bool kArmor>
cudaError_t launch_mma(const DllmSparse24Params& p, const Plan& plan, const Wrap& wrap, float* partial,
                       cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.n_blocks), static_cast<unsigned>(min_i64(plan.m_tiles, 65535)),
                  static_cast<unsigned>(plan.splits));
  if (plan.vec_w) {
    mma_kernel<Tr, NT, true, kArmor><<<grid, kThreads, 0, stream>>>(p, plan, wrap, partial);
  } else {
    mma_kernel<Tr, NT, false, kArmor><<<grid, kThreads, 0, stream>>>(p, plan, wrap, partial);
  }
  return cudaGetLastError();
}

template <class Tr, bool kArmor>
cudaError_t launch_products(const DllmSparse24Params& p, const Plan& plan, const Wrap& wrap, float* partial,
                            cudaStream_t stream) {
  switch (plan.n_tiles) {
    case 1:
      return launch_mma<Tr, 1, kArmor>(p, plan, wrap, partial, stream);
    case 2:
      return launch_mma<Tr, 2, kArmor>(p, plan, wrap, partial, stream);
    case 4:
      return launch_mma<Tr, 4, kArmor>(p, plan, wrap, partial, stream);
    default:
      return launch_mma<Tr, 8, kArmor>(p, plan, wrap, partial, stream);
  }
}

template <class Tr>
cudaError_t launch_typed(const DllmSparse24Params& p, const Plan& plan, float* partial, int sms,
                         cudaStream_t stream) {
  const cudaError_t err = launch_products<Tr, false>(p, plan, Wrap{nullptr, 0}, partial, stream);
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t blocks = min_i64(ceil_div(p.m * p.n, kReduceThreads), static_cast<int64_t>(8) * sms);
  reduce_kernel<Tr><<<grid_size(blocks), kReduceThreads, 0, stream>>>(p, plan.splits, partial);
  return cudaGetLastError();
}

// armor_linear's workspace: the wrapped input (16-bit hi / lo rows, or fp32), then the fp32 partial sums
// when wrap_out is applied by wrap_reduce_kernel. Offsets in bytes, 256-aligned.
struct ArmorLayout {
  DllmSparse24Params inner;  // the sparse product's parameters: x = the wrapped input
  Plan plan;                 // its geometry (16-bit only)
  size_t inner_bytes, partial_offset, partial_bytes;
};

constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

ArmorLayout armor_layout(const DllmArmorParams& a, void* workspace, int sms) {
  const DllmSparse24Params& p = a.mm;
  ArmorLayout l{};
  l.inner = p;
  l.inner.x = workspace;
  l.inner.x_stride = p.k;
  const bool fp32 = p.dtype == DLLM_FLOAT32;
  l.inner_bytes = align256(static_cast<size_t>(p.m * p.k) * (fp32 ? sizeof(float) : 2 * sizeof(uint16_t)));
  l.partial_offset = l.inner_bytes;
  if (fp32) {
    l.inner.bias = nullptr;  // added by wrap_reduce_kernel, after wrap_out
    l.partial_bytes = static_cast<size_t>(p.m * p.n) * sizeof(float);
    return l;
  }
  l.inner.m = 2 * p.m;
  l.plan = make_plan(l.inner, sms);
  l.plan.partial_out = a.wrap_out_bs > kRowsPerCta;
  if (l.plan.splits > 1 || l.plan.partial_out)
    l.partial_bytes = static_cast<size_t>(l.plan.splits * p.m * p.n) * sizeof(float);
  return l;
}

bool armor_supported(const DllmArmorParams& a) {
  const DllmSparse24Params& p = a.mm;
  const int64_t bo = a.wrap_out_bs;
  return p.m >= 0 && p.n >= 0 && p.k >= 0 && p.k % 16 == 0 && p.x_dtype == p.dtype && a.wrap_in_bs > 0 &&
         p.k % a.wrap_in_bs == 0 && bo > 0 && (bo & (bo - 1)) == 0 && bo <= kReduceThreads && p.n % bo == 0;
}

template <class Tr>
cudaError_t armor_typed(const DllmArmorParams& a, const ArmorLayout& l, void* workspace, int sms, cudaStream_t stream) {
  const DllmSparse24Params& p = a.mm;
  const Wrap wrap_in{a.wrap_in, a.wrap_in_bs}, wrap_out{a.wrap_out, a.wrap_out_bs};
  constexpr bool kFp32 = sizeof(typename Tr::Storage) == 4;
  if (p.k > 0) {
    const int64_t blocks = min_i64(ceil_div(p.m * p.k, kReduceThreads), static_cast<int64_t>(8) * sms);
    wrap_in_kernel<Tr, !kFp32><<<grid_size(blocks), kReduceThreads, 0, stream>>>(p, wrap_in, workspace);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  float* partial = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + l.partial_offset);
  int64_t splits = 1;
  if constexpr (kFp32) {
    DllmSparse24Params inner = l.inner;
    inner.out = partial;
    const int64_t blocks = min_i64(ceil_div(p.n * ceil_div(p.m, kF32Rows), kWarps), static_cast<int64_t>(64) * sms);
    fp32_kernel<<<grid_size(blocks), kThreads, 0, stream>>>(inner);
  } else {
    if (const cudaError_t err = launch_products<Tr, true>(l.inner, l.plan, wrap_out, partial, stream)) return err;
    if (l.partial_bytes == 0) return cudaSuccess;  // wrap_out and bias fused into the product
    splits = l.plan.splits;
  }
  if (const cudaError_t err = cudaGetLastError()) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.n, kReduceThreads)), static_cast<unsigned>(min_i64(p.m, 65535)));
  wrap_reduce_kernel<Tr><<<grid, kReduceThreads, 0, stream>>>(p, splits, partial, wrap_out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace dllm

extern "C" size_t dllm_sparse24_mm_cuda_workspace(const DllmSparse24Params* params) {
  using namespace dllm;
  const DllmSparse24Params& p = *params;
  int sms = 0;
  if (p.dtype == DLLM_FLOAT32 || p.m <= 0 || p.n <= 0 || p.k < 0 || sm_count(&sms) != cudaSuccess) return 0;
  const Plan plan = make_plan(p, sms);
  return plan.splits > 1 ? static_cast<size_t>(plan.splits * p.m * p.n) * sizeof(float) : 0;
}

extern "C" int dllm_sparse24_mm_cuda(const DllmSparse24Params* params, void* workspace, cudaStream_t stream) {
  using namespace dllm;
  const DllmSparse24Params& p = *params;
  if (p.m < 0 || p.n < 0 || p.k < 0 || p.k % 16 != 0 || p.x_dtype != p.dtype) return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  int sms = 0;
  if (const cudaError_t err = sm_count(&sms)) return err;
  if (p.dtype == DLLM_FLOAT32) {
    const int64_t blocks = min_i64(ceil_div(p.n * ceil_div(p.m, kF32Rows), kWarps), static_cast<int64_t>(64) * sms);
    fp32_kernel<<<grid_size(blocks), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  const Plan plan = make_plan(p, sms);
  if (plan.n_blocks > INT_MAX) return cudaErrorInvalidValue;
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* partial = static_cast<float*>(workspace);
  switch (p.dtype) {
    case DLLM_FLOAT16:
      return launch_typed<F16>(p, plan, partial, sms, stream);
    case DLLM_BFLOAT16:
      return launch_typed<BF16>(p, plan, partial, sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" size_t dllm_armor_linear_cuda_workspace(const DllmArmorParams* params) {
  using namespace dllm;
  int sms = 0;
  if (!armor_supported(*params) || sm_count(&sms) != cudaSuccess) return 0;
  const ArmorLayout l = armor_layout(*params, nullptr, sms);
  return l.partial_offset + l.partial_bytes;
}

extern "C" int dllm_armor_linear_cuda(const DllmArmorParams* params, void* workspace, cudaStream_t stream) {
  using namespace dllm;
  const DllmArmorParams& a = *params;
  if (!armor_supported(a)) return cudaErrorInvalidValue;
  if (a.mm.m == 0 || a.mm.n == 0) return cudaSuccess;
  int sms = 0;
  if (const cudaError_t err = sm_count(&sms)) return err;
  const ArmorLayout l = armor_layout(a, workspace, sms);
  if ((workspace == nullptr && l.partial_offset + l.partial_bytes > 0) || l.plan.n_blocks > INT_MAX)
    return cudaErrorInvalidValue;
  switch (a.mm.dtype) {
    case DLLM_FLOAT32:
      return armor_typed<F32>(a, l, workspace, sms, stream);
    case DLLM_FLOAT16:
      return armor_typed<F16>(a, l, workspace, sms, stream);
    case DLLM_BFLOAT16:
      return armor_typed<BF16>(a, l, workspace, sms, stream);
    default:
      return cudaErrorInvalidValue;
  }
}
