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
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <memory>

#include "common/sparse24_mm.h"
#include "cpu/features.h"
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

// bf16 x and weight with AVX512-BF16 (Zen 4, Sapphire Rapids) and at least kPairRowsMin rows of x: the
// 16 lanes of a vector hold 16 rows of x instead. A group of 4 columns keeps one of 6 pairs of positions;
// the x values of all 6 pairs of every group are laid out once per 16 rows of x (pairs[g][pattern] holds
// (x[m][4g + i0], x[m][4g + i1]) for m = 0..15 as bf16 pairs), so that a group of a weight row is one
// vdpbf16ps: its 2 kept values, broadcast, against the pair vector its code names. 32 multiply-adds an
// instruction and no permute; kRows * 2 weight rows interleave to cover the instruction's latency.
constexpr int64_t kPairRowsMin = 8;
constexpr int kPairWeightRows = 8;
constexpr int kPatternFirst[6] = {0, 0, 0, 1, 1, 2}, kPatternSecond[6] = {1, 2, 3, 2, 3, 3};

// pairs [K / 4][6][16] words for rows [m0, m0 + 16) of x (rows past M are zero).
void lay_out_pairs(const DllmSparse24Params& p, int64_t m0, int64_t g_begin, int64_t g_end, uint32_t* pairs) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int64_t g = g_begin; g < g_end; ++g) {
    uint32_t* out = pairs + g * 6 * kLanes;
    for (int pattern = 0; pattern < 6; ++pattern) {
      for (int64_t m = 0; m < kLanes; ++m) {
        uint32_t pair = 0;
        if (m0 + m < p.m) {
          const uint16_t* row = x + (m0 + m) * p.x_stride + 4 * g;
          pair = row[kPatternFirst[pattern]] | static_cast<uint32_t>(row[kPatternSecond[pattern]]) << 16;
        }
        out[pattern * kLanes + m] = pair;
      }
    }
  }
}

// Output rows [n0, n0 + R) for rows [m0, m0 + 16) of x. Per 16 groups, each row's 16 pair offsets are
// worked out in one vector (nibbles, pattern lookup, offset) and read back from L1 in the inner loop.
template <int R>
__attribute__((target("arch=x86-64-v4,avx512bf16"))) inline void pair_rows(const DllmSparse24Params& p,
                                                                            const uint32_t* pairs, int64_t m0,
                                                                            int64_t n0) {
  const int64_t groups = p.k / 4;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i shifts = _mm512_slli_epi32(_mm512_and_si512(lane, _mm512_set1_epi32(7)), 2);
  const __m512i pattern_of_code = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 3, 0, 0, 2, 4, 5, 0);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  alignas(64) int32_t offsets[R][kLanes];
  for (int64_t g0 = 0; g0 < groups; g0 += kLanes) {  // 16 groups: 4 int16 of meta a row (K % 64 == 0)
    // (g * 6 + pattern) * 16 words: the pair vector of group g, pattern
    const __m512i first = _mm512_mullo_epi32(_mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(g0))),
                                             _mm512_set1_epi32(6 * kLanes));
    for (int r = 0; r < R; ++r) {
      uint64_t word;
      std::memcpy(&word, reinterpret_cast<const uint16_t*>(p.meta) + (n0 + r) * (p.k / 16) + g0 / 4, 8);
      const __m512i halves = _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(static_cast<int>(word)),
                                                     _mm512_set1_epi32(static_cast<int>(word >> 32)));
      const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(halves, shifts), _mm512_set1_epi32(15));
      const __m512i pattern = _mm512_permutexvar_epi32(codes, pattern_of_code);
      _mm512_store_si512(offsets[r], _mm512_add_epi32(first, _mm512_slli_epi32(pattern, 4)));
    }
    for (int64_t g = 0; g < kLanes; ++g) {
      for (int r = 0; r < R; ++r) {
        const uint32_t* values = static_cast<const uint32_t*>(p.values) + (n0 + r) * groups;  // a pair a group
        const __m512i x_pairs = _mm512_load_si512(pairs + offsets[r][g]);
        const __m512i w_pair = _mm512_set1_epi32(static_cast<int>(values[g0 + g]));
        acc[r] = _mm512_dpbf16_ps(acc[r], reinterpret_cast<__m512bh>(x_pairs), reinterpret_cast<__m512bh>(w_pair));
      }
    }
  }
  const simd::bf16* bias = static_cast<const simd::bf16*>(p.bias);
  for (int r = 0; r < R; ++r) {
    alignas(64) float lanes[kLanes];
    _mm512_store_ps(lanes, acc[r]);
    const float b = bias ? simd::to_float(bias[n0 + r]) : 0.f;
    for (int64_t m = 0; m < kLanes && m0 + m < p.m; ++m)
      static_cast<simd::bf16*>(p.out)[(m0 + m) * p.n + n0 + r] = simd::to_bf16(lanes[m] + b);
  }
}

__attribute__((target("arch=x86-64-v4,avx512bf16"))) void pair_block(const DllmSparse24Params& p,
                                                                     const uint32_t* pairs, int64_t m0,
                                                                     int64_t n0, int64_t rows) {
  if (rows == kPairWeightRows) return pair_rows<kPairWeightRows>(p, pairs, m0, n0);
  for (int64_t r = 0; r < rows; ++r) pair_rows<1>(p, pairs, m0, n0 + r);
}

bool pairs_apply(const DllmSparse24Params& p) {
  return cpu_has_avx512_bf16() && p.dtype == DLLM_BFLOAT16 && p.x_dtype == DLLM_BFLOAT16 && p.m >= kPairRowsMin && p.k > 0 &&
         p.k % 64 == 0 && reinterpret_cast<uintptr_t>(p.values) % 4 == 0;
}

void run_pairs(const DllmSparse24Params& p, int num_threads) {
  const int64_t groups = p.k / 4;
  AlignedBuffer storage(groups * 6 * kLanes);  // 4-byte words, as floats' storage
  uint32_t* pairs = reinterpret_cast<uint32_t*>(storage.data);
  const int64_t n_blocks = (p.n + kPairWeightRows - 1) / kPairWeightRows;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  for (int64_t m0 = 0; m0 < p.m; m0 += kLanes) {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g += 64) lay_out_pairs(p, m0, g, std::min(groups, g + 64), pairs);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_blocks; ++b) {
      const int64_t n0 = b * kPairWeightRows;
      pair_block(p, pairs, m0, n0, std::min<int64_t>(kPairWeightRows, p.n - n0));
    }
  }
}

// bf16 x and weight with AMX (Sapphire Rapids and later), at least kPairRowsMin rows of x: the tile unit
// multiplies 16 x 32 bf16 by 32 x 16 in one instruction, so the product is bound by reading the weight,
// whose 2:4 form is 9/16 of the dense bytes. Per K chunk of 32, each of 2 x 16 weight rows is expanded to
// dense bf16 with one vpexpandw (the kept-position bitmap from its 8 codes), and x^T, laid out once per 16
// rows of x in the tile unit's pair order ([K / 2][16 rows] of (x[m][2k], x[m][2k + 1])), is the other
// operand. Pruned positions are zeros in the expanded tile: the tile unit multiplies them, so non-finite x
// at a pruned column would reach the output; such calls take the paths above (finite x checked per call).
constexpr int kAmxRows = 16;  // weight rows per tile (the tile's 16 rows)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {
  static const bool ready = [] {
    if (!cpu_has_amx_bf16()) return false;
    constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ready;
}

// x^T for rows [m0, m0 + 16) in the tile unit's pair order, pairs [k0 / 2, k1 / 2).
void lay_out_vnni(const DllmSparse24Params& p, int64_t m0, int64_t k0, int64_t k1, uint32_t* vnni) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int64_t k = k0; k < k1; k += 2)
    for (int64_t m = 0; m < kLanes; ++m) {
      const uint16_t* row = x + (m0 + m) * p.x_stride + k;
      vnni[k / 2 * kLanes + m] = m0 + m < p.m ? row[0] | static_cast<uint32_t>(row[1]) << 16 : 0;
    }
}

// The kept-position bitmaps of weight row n, K bits (a bit a column), from its meta: a byte of meta holds
// 2 codes, a byte of bitmap their 8 columns; both nibbles map through a 16-entry table (vpshufb).
__attribute__((target("arch=x86-64-v4"))) void kept_bitmap(const DllmSparse24Params& p, int64_t n, uint8_t* bits) {
  const __m512i table = _mm512_broadcast_i32x4(_mm_setr_epi8(3, 3, 3, 3, 3, 3, 3, 3, 5, 6, 3, 3, 9, 10, 12, 3));
  const __m512i low = _mm512_set1_epi8(15);
  const uint8_t* meta = reinterpret_cast<const uint8_t*>(p.meta) + n * (p.k / 8);
  for (int64_t i = 0; i < p.k / 8; i += 64) {  // K % 512 == 0: whole vectors
    const __m512i codes = _mm512_loadu_si512(meta + i);
    const __m512i first = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, low));
    const __m512i second = _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(codes, 4), low));
    _mm512_storeu_si512(bits + i, _mm512_or_si512(first, _mm512_slli_epi16(_mm512_and_si512(second, low), 4)));
  }
}

// Output rows [n0, n0 + 2 * 16) (rows past N are zero weights) for rows [m0, m0 + 16) of x; bits: room for
// 32 rows' bitmaps.
__attribute__((target("arch=x86-64-v4,avx512vbmi2,amx-tile,amx-bf16"))) void amx_block(
    const DllmSparse24Params& p, const uint32_t* vnni, int64_t m0, int64_t n0, uint8_t* bits) {
  alignas(64) uint16_t dense[2][kAmxRows][32];
  alignas(64) float acc[2][kAmxRows][kLanes];
  const int64_t chunks = p.k / 32;
  const int64_t rows = std::min<int64_t>(2 * kAmxRows, p.n - n0);
  for (int64_t r = 0; r < rows; ++r) kept_bitmap(p, n0 + r, bits + r * (p.k / 8));
  std::memset(dense, 0, sizeof dense);  // rows past N stay zero
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      uint32_t kept;
      std::memcpy(&kept, bits + r * (p.k / 8) + 4 * c, 4);
      const uint16_t* values = static_cast<const uint16_t*>(p.values) + (n0 + r) * (p.k / 2) + 16 * c;
      _mm512_store_si512(dense[r / kAmxRows][r % kAmxRows], _mm512_maskz_expandloadu_epi16(kept, values));
    }
    _tile_loadd(2, dense[0], 64);
    _tile_loadd(3, dense[1], 64);
    _tile_loadd(4, vnni + c * 16 * kLanes, 64);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 3, 4);
  }
  _tile_stored(0, acc[0], 64);
  _tile_stored(1, acc[1], 64);
  const simd::bf16* bias = static_cast<const simd::bf16*>(p.bias);
  for (int64_t r = 0; r < rows; ++r) {
    const float b = bias ? simd::to_float(bias[n0 + r]) : 0.f;
    for (int64_t m = 0; m < kLanes && m0 + m < p.m; ++m)
      static_cast<simd::bf16*>(p.out)[(m0 + m) * p.n + n0 + r] = simd::to_bf16(acc[r / kAmxRows][r % kAmxRows][m] + b);
  }
}

// Tiles 0, 1: accumulators; 2, 3: expanded weight; 4: x^T; all 16 rows of 64 bytes. A constant in memory:
// GCC's _tile_loadconfig tells the compiler it reads 8 bytes only, so a config built on the stack right
// before it may not be stored yet.
constexpr TileConfig kTileConfig = [] {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = kAmxRows;
    config.bytes_per_row[t] = 64;
  }
  return config;
}();

__attribute__((target("amx-tile"))) void amx_begin() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void amx_end() { _tile_release(); }

// Every element of x is finite (the tile unit must not meet a non-finite x at a pruned column).
bool x_finite(const DllmSparse24Params& p) {
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  uint16_t special = 0;
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t k = 0; k < p.k; ++k) special |= ((x[m * p.x_stride + k] & 0x7F80) == 0x7F80);
  return special == 0;
}

bool amx_apply(const DllmSparse24Params& p) {
  return p.dtype == DLLM_BFLOAT16 && p.x_dtype == DLLM_BFLOAT16 && p.m >= kPairRowsMin && p.k > 0 &&
         p.k % 512 == 0 && amx_ready() && x_finite(p);
}

void run_amx(const DllmSparse24Params& p, int num_threads) {
  AlignedBuffer storage(p.k / 2 * kLanes);  // 4-byte words, as floats' storage
  uint32_t* vnni = reinterpret_cast<uint32_t*>(storage.data);
  const int64_t n_blocks = (p.n + 2 * kAmxRows - 1) / (2 * kAmxRows);
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
  {
    const std::unique_ptr<uint8_t[]> bits(new uint8_t[2 * kAmxRows * p.k / 8]);
    amx_begin();
    for (int64_t m0 = 0; m0 < p.m; m0 += kLanes) {
#pragma omp for schedule(static)
      for (int64_t k = 0; k < p.k; k += 256) lay_out_vnni(p, m0, k, std::min(p.k, k + 256), vnni);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < n_blocks; ++b) amx_block(p, vnni, m0, b * 2 * kAmxRows, bits.get());
    }
    amx_end();
  }
}

}  // namespace
}  // namespace dllm

extern "C" void dllm_sparse24_mm_cpu(const DllmSparse24Params* params, int num_threads) {
  using namespace dllm;
  const DllmSparse24Params& p = *params;
  if (p.m <= 0 || p.n <= 0) return;
  // Small products run on one thread, on every path: below this many multiply-adds a fork / join costs
  // more than it saves.
  constexpr int64_t kMinParallel = int64_t{1} << 18;
  if (p.m * p.n * std::max<int64_t>(p.k, 1) / 2 < kMinParallel) num_threads = 1;
  if (amx_apply(p)) return run_amx(p, num_threads);
  if (pairs_apply(p)) return run_pairs(p, num_threads);
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
