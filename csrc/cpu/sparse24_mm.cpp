// sparse24_mm on the CPU: out[M, N] = x[M, K] @ W^T (+ bias) with W in the 2:4 format (values + meta),
// never expanded to dense: one multiply-add per kept element, fp32 accumulation, OpenMP over blocks of
// output rows n.
//
// x is first converted to an fp32 scratch copy (it is small at decode: M x K), zero-padded to whole
// chunks of 32 columns. A chunk of 32 columns of a weight row holds 8 groups = 16 kept values and a
// 32-bit word of meta (two int16, group g's code at bits 4g). Lane j of the chunk's value vector belongs
// to column 4 * (j / 2) + ((meta >> 2j) & 3), so one two-source permute of the chunk's 32 x values
// (vpermt2ps) lines x up with the 16 values: one vector FMA per 16 kept elements.
//
// Reuse: a tile of kRows weight rows x MT rows of x keeps kRows * MT accumulators in registers; each
// loaded (and converted) weight vector serves MT rows of x, each loaded pair of x vectors serves kRows
// weight rows. Columns are walked in blocks of kBlockK so the x tile stays in L1 while the m-tiles of a
// panel of x reuse the weight block from L1; partial sums cross blocks in a per-thread buffer.
#include <algorithm>
#include <cstring>
#include <memory>

#include "common/sparse24_mm.h"
#include "cpu/simd.h"

namespace dllm {
namespace {

using simd::kLanes;
using simd::vfloat;
using simd::vint;
using simd::vuint;

constexpr int kRows = 4;           // weight rows sharing each load of x
constexpr int kTileM = 4;          // rows of x sharing each loaded weight vector
constexpr int64_t kPanelM = 64;    // rows of x whose partial sums a thread keeps across column blocks
constexpr int64_t kChunk = 32;     // columns of K per vector of 16 kept values
constexpr int64_t kBlockK = 1024;  // columns per block (x tile: kTileM * 4 KiB in L1)
static_assert(kBlockK % kChunk == 0, "blocks hold whole chunks");

// Lane j of a chunk gathers column 4 * (j / 2) + (2-bit field j of the chunk's 32-bit meta word).
DLLM_SIMD_INLINE vint chunk_index(uint32_t codes) {
  const vuint shift = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vuint base = {0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28};
  return reinterpret_cast<vint>((((vuint{} + codes) >> shift) & 3u) + base);
}

// The weight rows of one tile: 16 kept values and their index vector per chunk.
template <class T, int R>
struct WeightRows {
  const T* values[R];        // row starts, K / 2 elements
  const uint16_t* meta[R];   // row starts, K / 16 elements
  int64_t half_chunk;        // K % 32 == 16: the last chunk holds 8 values and one int16 of meta

  DLLM_SIMD_INLINE void load(int r, int64_t c, bool last, vfloat& w, vint& idx) const {
    if (last && half_chunk) {
      T buf[kLanes] = {};
      std::memcpy(buf, values[r] + kLanes * c, sizeof(T) * kLanes / 2);
      w = simd::load(buf);
      idx = chunk_index(meta[r][2 * c]);  // upper 8 lanes index the zero padding of x
    } else {
      w = simd::load(values[r] + kLanes * c);
      uint32_t codes;
      std::memcpy(&codes, meta[r] + 2 * c, sizeof codes);
      idx = chunk_index(codes);
    }
  }
};

// acc[r][m] += W[r, chunks c0..c1) . x[m, same columns] for R weight rows and MT rows of x.
template <int R, int MT, class T>
DLLM_SIMD_INLINE void tile(const WeightRows<T, R>& w, int64_t c0, int64_t c1, int64_t n_chunks,
                           const float* x, int64_t ldx, vfloat (&acc)[R][MT]) {
  for (int64_t c = c0; c < c1; ++c) {
    vfloat wv[R];
    vint idx[R];
    for (int r = 0; r < R; ++r) w.load(r, c, c == n_chunks - 1, wv[r], idx[r]);
    for (int m = 0; m < MT; ++m) {
      const float* xm = x + m * ldx + kChunk * c;
      const vfloat lo = simd::load(xm), hi = simd::load(xm + kLanes);
      for (int r = 0; r < R; ++r) acc[r][m] += wv[r] * __builtin_shuffle(lo, hi, idx[r]);
    }
  }
}

// out[i] = v in x_dtype (a switch per output element: nothing beside the K / 2 multiply-adds behind it).
DLLM_SIMD_INLINE void store_out(const DllmSparse24Params& p, int64_t i, float v) {
  switch (p.x_dtype) {
    case DLLM_FLOAT32:
      static_cast<float*>(p.out)[i] = v;
      return;
    case DLLM_FLOAT16:
      static_cast<_Float16*>(p.out)[i] = simd::from_float<_Float16>(v);
      return;
    default:
      static_cast<simd::bf16*>(p.out)[i] = simd::from_float<simd::bf16>(v);
  }
}

// An uninitialised float buffer on a cache-line boundary (every element is written before it is read).
struct AlignedBuffer {
  std::unique_ptr<float[]> storage;
  float* data;
  explicit AlignedBuffer(int64_t n) : storage(new float[n + kLanes]) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(storage.get());
    data = storage.get() + (-address / sizeof(float)) % kLanes;
  }
};

struct Job {
  const DllmSparse24Params& p;
  const float* x;  // fp32 scratch [m, ldx]
  int64_t ldx, n_chunks;
};

// Rows [n0, n0 + R) of the output for x rows [m0, m0 + mt) (mt <= kTileM), columns of block [c0, c1).
template <int R, int MT, class T>
DLLM_SIMD_INLINE void tile_block(const Job& job, const WeightRows<T, R>& w, int64_t m0, int64_t c0, int64_t c1,
                                 float* partial, bool first, bool last, int64_t n0) {
  vfloat acc[R][MT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) acc[r][m] = first ? vfloat{} : simd::load(partial + (m * R + r) * kLanes);
  tile<R, MT>(w, c0, c1, job.n_chunks, job.x + m0 * job.ldx, job.ldx, acc);
  if (!last) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) simd::store(partial + (m * R + r) * kLanes, acc[r][m]);
    return;
  }
  const DllmSparse24Params& p = job.p;
  const T* bias = static_cast<const T*>(p.bias);
  for (int r = 0; r < R; ++r) {
    const float b = bias ? simd::to_float(bias[n0 + r]) : 0.f;
    for (int m = 0; m < MT; ++m) store_out(p, (m0 + m) * p.n + n0 + r, simd::reduce_sum(acc[r][m]) + b);
  }
}

// tile_block for mt <= MT rows of x (the tile size is a template parameter: accumulators in registers).
template <int R, int MT, class T>
DLLM_SIMD_INLINE void tile_block_mt(const Job& job, const WeightRows<T, R>& w, int64_t m0, int64_t mt, int64_t c0,
                                    int64_t c1, float* partial, bool first, bool last, int64_t n0) {
  if constexpr (MT > 1) {
    if (mt < MT) return tile_block_mt<R, MT - 1>(job, w, m0, mt, c0, c1, partial, first, last, n0);
  }
  tile_block<R, MT>(job, w, m0, c0, c1, partial, first, last, n0);
}

// Output rows [n0, n0 + R), x rows [m0, m1) with m1 - m0 <= kPanelM.
template <int R, class T>
DLLM_SIMD_INLINE void row_block_impl(const Job& job, int64_t n0, int64_t m0, int64_t m1, float* partial) {
  const DllmSparse24Params& p = job.p;
  WeightRows<T, R> w;
  for (int r = 0; r < R; ++r) {
    w.values[r] = static_cast<const T*>(p.values) + (n0 + r) * (p.k / 2);
    w.meta[r] = reinterpret_cast<const uint16_t*>(p.meta) + (n0 + r) * (p.k / 16);
  }
  w.half_chunk = p.k % kChunk != 0;
  constexpr int64_t block_chunks = kBlockK / kChunk;
  // At least one pass, so that K = 0 still stores the bias (or 0).
  for (int64_t c0 = 0; c0 == 0 || c0 < job.n_chunks; c0 += block_chunks) {
    const int64_t c1 = std::min(job.n_chunks, c0 + block_chunks);
    const bool first = c0 == 0, last = c1 == job.n_chunks;
    for (int64_t m = m0; m < m1; m += kTileM) {
      float* part = partial + (m - m0) * R * kLanes;
      tile_block_mt<R, kTileM>(job, w, m, std::min<int64_t>(kTileM, m1 - m), c0, c1, part, first, last, n0);
    }
  }
}

template <class T>
DLLM_SIMD_INLINE void row_block_typed(const Job& job, int64_t n0, int rows, int64_t m0, int64_t m1,
                                      float* partial) {
  if (rows == kRows) return row_block_impl<kRows, T>(job, n0, m0, m1, partial);
  for (int r = 0; r < rows; ++r) row_block_impl<1, T>(job, n0 + r, m0, m1, partial);
}

// One work item: output rows [n0, n0 + rows) (rows <= kRows) for x rows [m0, m1). Compiled once per ISA
// (no lambdas here: they would be compiled for the baseline ISA only).
DLLM_CPU_MULTIVERSION
void row_block(const Job& job, int64_t n0, int rows, int64_t m0, int64_t m1, float* partial) {
  switch (job.p.dtype) {
    case DLLM_FLOAT32:
      return row_block_typed<float>(job, n0, rows, m0, m1, partial);
    case DLLM_FLOAT16:
      return row_block_typed<_Float16>(job, n0, rows, m0, m1, partial);
    default:
      return row_block_typed<simd::bf16>(job, n0, rows, m0, m1, partial);
  }
}

// x row m as fp32, zero-padded to ldx columns.
template <class T>
DLLM_SIMD_INLINE void convert_x_row_typed(const DllmSparse24Params& p, int64_t m, float* dst, int64_t ldx) {
  const T* src = static_cast<const T*>(p.x) + m * p.x_stride;
  int64_t j = 0;
  for (; j + kLanes <= p.k; j += kLanes) simd::store(dst + j, simd::load(src + j));
  for (; j < p.k; ++j) dst[j] = simd::to_float(src[j]);
  for (; j < ldx; ++j) dst[j] = 0.f;
}

DLLM_CPU_MULTIVERSION
void convert_x_row(const DllmSparse24Params& p, int64_t m, float* dst, int64_t ldx) {
  switch (p.x_dtype) {
    case DLLM_FLOAT32:
      return convert_x_row_typed<float>(p, m, dst, ldx);
    case DLLM_FLOAT16:
      return convert_x_row_typed<_Float16>(p, m, dst, ldx);
    default:
      return convert_x_row_typed<simd::bf16>(p, m, dst, ldx);
  }
}

}  // namespace
}  // namespace dllm

extern "C" void dllm_sparse24_mm_cpu(const DllmSparse24Params* params, int num_threads) {
  using namespace dllm;
  const DllmSparse24Params& p = *params;
  if (p.m <= 0 || p.n <= 0) return;
  const int64_t n_chunks = (p.k + kChunk - 1) / kChunk;
  // Padded row stride: whole chunks, plus one cache line so that the rows of a tile do not share L1 sets.
  const int64_t ldx = n_chunks * kChunk + kLanes;
  AlignedBuffer scratch(p.m * ldx);
  float* x = scratch.data;
  const Job job{p, x, ldx, n_chunks};
  const int64_t n_blocks = (p.n + kRows - 1) / kRows;
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, n_blocks)));

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < p.m; ++m) convert_x_row(p, m, x + m * ldx, ldx);

    AlignedBuffer partial(kPanelM * kRows * kLanes);
    for (int64_t m0 = 0; m0 < p.m; m0 += kPanelM) {
      const int64_t m1 = std::min(p.m, m0 + kPanelM);
      // Static: each thread streams one contiguous range of the weight.
#pragma omp for schedule(static) nowait
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t n0 = b * kRows;
        row_block(job, n0, static_cast<int>(std::min<int64_t>(kRows, p.n - n0)), m0, m1, partial.data);
      }
    }
  }
}
