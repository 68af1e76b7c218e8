// logits_to_confidence on the CPU: one pass over each eligible row, OpenMP over (row, vocabulary
// chunk) work items; a row is split into chunks only when there are fewer rows than threads, and
// its chunk states merge exactly (common/logits_to_confidence.h). Ineligible rows are never read.
//
// Each chunk is walked in L1-sized blocks: convert to fp32 (banned ids set to -inf), take the block
// maximum, update the top-1/top-2 logits with a scalar rescan only when the block can change them
// (rare after the first blocks), then add 2^((l - lmax) * c) over the block in SIMD.
//
// Sampling walks the block in units of 64 columns (chunks start on whole units): one Philox call on 16
// counters gives the words of 64 consecutive columns (4 a counter), transposed into column order. A
// unit whose largest logit l has l + T * kGumbelBound <= the best key so far cannot win and draws no noise.
//
// A vocabulary shard (vocab_start > 0) is walked in "virtual" columns: global id minus base, where base is
// vocab_start rounded down to a whole unit; the lead columns before the shard read as -inf. Units then fall
// on the same Philox calls as in the whole row, and indices turn global by adding base.
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "common/logits_to_confidence.h"
#include "cpu/features.h"
#include "cpu/simd.h"

namespace dllm {

template <>
struct MulHiLo<simd::vuint> {
  // Even and odd lanes as 64-bit halves of the register: two 32x32 -> 64 multiplies (vpmuludq), no widening.
  static DLLM_SIMD_INLINE void run(uint32_t a, simd::vuint b, simd::vuint& hi, simd::vuint& lo) {
    const simd::vuint64x8 pairs = reinterpret_cast<simd::vuint64x8>(b);
    const simd::vuint64x8 even = (pairs & 0xffffffffu) * a;
    const simd::vuint64x8 odd = (pairs >> 32) * a;
    hi = reinterpret_cast<simd::vuint>((even >> 32) | (odd & 0xffffffff00000000u));
    lo = b * a;
  }
};

namespace {

// Philox on AVX-512. There is no 32-bit high multiply, and GCC lowers the generic 64-bit products to
// vpmullq (slow on Zen 4). Here 16 words travel as their even and odd lanes, each in the low half of a
// 64-bit lane (the high halves hold garbage that nothing reads): vpmuludq then gives a full 64-bit
// product per lane, its high word one shift away and its low word already in place. Plain inline
// functions with an AVX-512 target: only the AVX-512 clone calls them, and inlines them there (the other
// clones compile calls they never make).
template <int N>  // N independent sets of 16 words: their multiply chains interleave
struct WordsAvx512 {
  __m512i even[N], odd[N];

  __attribute__((target("avx512f"))) static inline WordsAvx512 of(const simd::vuint (&v)[N]) {
    WordsAvx512 r;
    for (int i = 0; i < N; ++i) {
      r.even[i] = reinterpret_cast<__m512i>(v[i]);
      r.odd[i] = _mm512_maskz_srli_epi64(0xFF, r.even[i], 32);
    }
    return r;
  }
  __attribute__((target("avx512f"))) static inline WordsAvx512 of(uint32_t k) {
    simd::vuint v[N];
    for (int i = 0; i < N; ++i) v[i] = simd::vuint{} + k;
    return of(v);
  }
  __attribute__((target("avx512f"))) inline simd::vuint words(int i) const {
    return reinterpret_cast<simd::vuint>(
        _mm512_mask_blend_epi32(0xAAAA, even[i], _mm512_maskz_slli_epi64(0xFF, odd[i], 32)));
  }
  __attribute__((target("avx512f"))) friend inline WordsAvx512 operator^(WordsAvx512 a, WordsAvx512 b) {
    for (int i = 0; i < N; ++i) {
      a.even[i] = _mm512_xor_si512(a.even[i], b.even[i]);
      a.odd[i] = _mm512_xor_si512(a.odd[i], b.odd[i]);
    }
    return a;
  }
  __attribute__((target("avx512f"))) friend inline WordsAvx512 operator^(WordsAvx512 a, uint32_t k) {
    const __m512i key = _mm512_set1_epi32(static_cast<int>(k));
    for (int i = 0; i < N; ++i) {
      a.even[i] = _mm512_xor_si512(a.even[i], key);
      a.odd[i] = _mm512_xor_si512(a.odd[i], key);
    }
    return a;
  }
};

template <int N>
struct MulHiLoAvx512 {
  // The zero-masked forms: GCC 12 warns that the unmasked ones read an undefined pass-through.
  __attribute__((target("avx512f"))) static inline void run(uint32_t a, WordsAvx512<N> b, WordsAvx512<N>& hi,
                                                             WordsAvx512<N>& lo) {
    const __m512i factor = _mm512_set1_epi32(static_cast<int>(a));
    for (int i = 0; i < N; ++i) {
      lo.even[i] = _mm512_maskz_mul_epu32(0xFF, b.even[i], factor);
      lo.odd[i] = _mm512_maskz_mul_epu32(0xFF, b.odd[i], factor);
      hi.even[i] = _mm512_maskz_srli_epi64(0xFF, lo.even[i], 32);
      hi.odd[i] = _mm512_maskz_srli_epi64(0xFF, lo.odd[i], 32);
    }
  }
};

// The four Philox words of N vectors of 16 counters (c0) sharing the rest of the counter (c1..c3).
template <int N>
__attribute__((target("avx512f"))) inline void philox4_avx512(const simd::vuint (&c0)[N], uint32_t c1, uint32_t c2,
                                                              uint32_t c3, uint64_t seed, simd::vuint (&w)[N][4]) {
  WordsAvx512<N> c[4] = {WordsAvx512<N>::of(c0), WordsAvx512<N>::of(c1), WordsAvx512<N>::of(c2),
                         WordsAvx512<N>::of(c3)};
  philox4<WordsAvx512<N>, MulHiLoAvx512<N>>(c[0], c[1], c[2], c[3], seed);
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < 4; ++k) w[i][k] = c[k].words(i);
}

using simd::kLanes;
using simd::vfloat;
using simd::vint;
using simd::vuint;

constexpr int64_t kBlock = 2048;                // fp32 block kept in L1
constexpr int64_t kMinChunk = 16 * 1024;        // smallest vocabulary chunk worth a thread
constexpr int64_t kMinParallel = 32 * 1024;     // fewer logits than this: one thread beats a fork / join
constexpr int64_t kUnit = 4 * kLanes;           // sampling columns per Philox call on a vector of counters
// A block whose candidates exceed half its columns samples every unit instead (one Philox call per 64
// columns beats one per 32 candidates there; measured on Sapphire Rapids).
constexpr int64_t kDenseNum = 1, kDenseDen = 2;
constexpr int kCandidateSets = 2;   // candidate vectors per Philox call (3 or more spill registers)
constexpr float kRaceRange = 65536.f;  // race filter while |logits|, |best key| <= T * this
static_assert(kBlock % kUnit == 0, "blocks hold whole sampling units");

struct RowContext {
  const ConfConsts& k;
  const int64_t* banned;  // sorted virtual columns, in [lead, lead + vocab)
  int64_t n_banned;
  int64_t lead;     // virtual column of the row's first logit
  uint32_t base_counter;  // Philox counter of virtual column 0 (base / 4)
  uint64_t seed, offset;
  bool avx512;  // AVX-512 paths allowed (cpu_has_avx512: then the AVX-512 clone is the one running)
};

// Converts virtual columns [begin, begin + n) (logit v - lead) to fp32 in buf (lead columns and the
// padding to whole vectors -inf, banned ids -inf) and returns the block maximum; a NaN seen sets nan.
template <class T>
DLLM_SIMD_INLINE float load_block(const T* row, int64_t begin, int64_t n, const RowContext& ctx, float* buf,
                                  int& nan) {
  const int64_t* ban = std::lower_bound(ctx.banned, ctx.banned + ctx.n_banned, begin);
  const int64_t* ban_end = ctx.banned + ctx.n_banned;
  vfloat vmax = simd::splat(-INFINITY);
  vint vnan = vint{};
  for (int64_t j = 0; j < n; j += kLanes) {
    if (j + kLanes <= n && begin + j >= ctx.lead) {
      simd::store(buf + j, simd::load(row + (begin + j - ctx.lead)));
    } else {
      for (int64_t i = j; i < j + kLanes; ++i)
        buf[i] = i < n && begin + i >= ctx.lead ? simd::to_float(row[begin + i - ctx.lead]) : -INFINITY;
    }
    for (; ban < ban_end && *ban < begin + j + kLanes; ++ban) buf[*ban - begin] = -INFINITY;
    const vfloat x = simd::load(buf + j);
    vmax = simd::max_ignore_nan(vmax, x);
    vnan |= x != x;
  }
  for (int64_t j = (n + kLanes - 1) / kLanes * kLanes; j % kUnit != 0; ++j) buf[j] = -INFINITY;  // whole units
  nan |= simd::any(vnan);
  return simd::reduce_max(vmax);
}

// First j < n with buf[j] == value (value is in the block).
DLLM_SIMD_INLINE int64_t find_first(const float* buf, int64_t n, float value) {
  for (int64_t j = 0;; j += kLanes) {
    if (simd::any(simd::load(buf + j) == value)) {
      while (buf[j] != value) ++j;
      return j;
    }
  }
}

// Largest buf[j] over j < n other than position skip (repeats of the maximum count).
DLLM_SIMD_INLINE float max_except(const float* buf, int64_t n, int64_t skip) {
  const vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  vfloat vmax = simd::splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat x = simd::load(buf + j);
    vmax = simd::max_ignore_nan(vmax, simd::select(lane + static_cast<int32_t>(j) == static_cast<int32_t>(skip), vmax, x));
  }
  return simd::reduce_max(vmax);
}

// Words w0..w3 of 16 counters (lane i: columns 4i .. 4i + 3 of a unit) -> the unit's 64 columns in order.
DLLM_SIMD_INLINE void to_columns(const vuint (&w)[4], vuint (&cols)[4]) {
  const vint lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const vint hi = lo + 8;
  const vuint a01 = __builtin_shuffle(w[0], w[1], lo), b01 = __builtin_shuffle(w[0], w[1], hi);
  const vuint a23 = __builtin_shuffle(w[2], w[3], lo), b23 = __builtin_shuffle(w[2], w[3], hi);
  const vint first = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
  const vint second = first + 8;
  cols[0] = __builtin_shuffle(a01, a23, first);
  cols[1] = __builtin_shuffle(a01, a23, second);
  cols[2] = __builtin_shuffle(b01, b23, first);
  cols[3] = __builtin_shuffle(b01, b23, second);
}

// Race filter: a key l + T * g beats best only if -log u < 2^t, t = (l - best) / (T ln 2); as
// -log u >= 1 - u >= 2^e with e the binary exponent of 1 - u, a column with e >= t + 1 cannot win and
// skips the two logs (the 1 is slack for rounding). Trusted only while the fp32 rounding of keys near
// best stays far below T * ln 2: |best|, |logits| <= T * 2^16. DLLM_CPU_DISABLE=race turns it off (tests:
// the tokens and scores must not change).
DLLM_SIMD_INLINE bool race_filter_holds(float best, float lmax, float temperature) {
  static const bool allowed = !cpu_disabled("race");
  return allowed && std::isfinite(best) && std::max(std::fabs(best), std::fabs(lmax)) <= temperature * kRaceRange;
}

// t + 1 per lane (NaN logits give NaN: never below it); +inf keeps every lane.
DLLM_SIMD_INLINE vfloat race_limit(vfloat x, float best, float temperature, bool race) {
  return race ? (x - best) * (kLog2e / temperature) + 1.f : simd::splat(INFINITY);
}

// Sampling keys l + T * -log(-log u) from the Philox words, -inf where the exponent of 1 - u reaches
// limit; no logs at all when no lane is left. (A mask selected by a scalar condition here made GCC
// scalarize the comparison: the lanes are kept through the logits instead.)
DLLM_SIMD_INLINE vfloat sampling_key(vfloat x, vuint word, float temperature, vfloat limit) {
  const vfloat u = (__builtin_convertvector(word >> 9, vfloat) + 0.5f) * 0x1p-23f;
  const vfloat one_minus_u = 1.f - u;  // normal, >= 2^-24
  const vfloat exponent = __builtin_convertvector(reinterpret_cast<vint>(one_minus_u) >> 23, vfloat) - 127.f;
  const vfloat kept = simd::select(exponent < limit, x, simd::splat(-INFINITY));
  if (!simd::any(kept > -INFINITY)) return simd::splat(-INFINITY);
  return kept + temperature * -simd::log(-simd::log(u));
}

// Sampling keys l + T * g for the block (begin a multiple of kUnit, buf padded with -inf to whole units);
// updates (kmax, kidx, kl) with the first maximum.
template <bool kAvx512>
DLLM_SIMD_INLINE void sample_block(const float* buf, int64_t begin, int64_t n, uint32_t row_id,
                                   const RowContext& ctx, float* keys, ConfState& st) {
  const vuint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const float temperature = ctx.k.temperature;
  const float reach = temperature * kGumbelBound;  // l + reach bounds every key of l (rounding is monotone)
  float best = st.kmax;
  for (int64_t j = 0; j < n; j += kUnit) {
    vfloat x[4];
    for (int v = 0; v < 4; ++v) x[v] = simd::load(buf + j + v * kLanes);
    const vfloat top = simd::max_ignore_nan(simd::max_ignore_nan(x[0], x[1]), simd::max_ignore_nan(x[2], x[3]));
    if (!simd::any(top + reach > best)) {
      for (int v = 0; v < 4; ++v) simd::store(keys + j + v * kLanes, simd::splat(-INFINITY));
      continue;
    }
    const bool race = race_filter_holds(best, st.lmax, temperature);
    const vuint counters = lane + (ctx.base_counter + static_cast<uint32_t>((begin + j) / 4));
    const uint32_t offset_lo = static_cast<uint32_t>(ctx.offset), offset_hi = static_cast<uint32_t>(ctx.offset >> 32);
    vuint w[1][4] = {{counters, vuint{} + row_id, vuint{} + offset_lo, vuint{} + offset_hi}};
    if constexpr (kAvx512) {
      philox4_avx512<1>({counters}, row_id, offset_lo, offset_hi, ctx.seed, w);
    } else {
      philox4<vuint>(w[0][0], w[0][1], w[0][2], w[0][3], ctx.seed);
    }
    vuint cols[4];
    to_columns(w[0], cols);
    vfloat unit_max = simd::splat(-INFINITY);
    for (int v = 0; v < 4; ++v) {
      const vfloat key = sampling_key(x[v], cols[v], temperature, race_limit(x[v], best, temperature, race));
      simd::store(keys + j + v * kLanes, key);
      unit_max = simd::max_ignore_nan(unit_max, key);
    }
    best = std::max(best, simd::reduce_max(unit_max));
  }
  if (!(best > st.kmax)) return;
  for (int64_t j = 0; j < n; ++j) {
    if (keys[j] == best) {
      st.kmax = best;
      st.kidx = begin + j;
      st.kl = buf[j];
      return;
    }
  }
}

// Keys of n_sets vectors of candidates (columns begin + idx, logits x) through one Philox call, folded
// into each lane's first (lowest-column) maximum: lanes see their columns in increasing order.
template <int n_sets>
__attribute__((target("arch=x86-64-v4"))) inline void key_sets(const int32_t* idx, const float* x, int64_t begin,
                                                             uint32_t row_id, const RowContext& ctx, float bound,
                                                             bool race, vfloat& best, vint& best_at) {
  vint at[n_sets];
  vuint counters[n_sets];
  for (int h = 0; h < n_sets; ++h) {
    at[h] = reinterpret_cast<vint>(_mm512_loadu_si512(idx + h * kLanes));
    counters[h] = reinterpret_cast<vuint>(at[h] >> 2) + (ctx.base_counter + static_cast<uint32_t>(begin / 4));
  }
  vuint w[n_sets][4];
  philox4_avx512<n_sets>(counters, row_id, static_cast<uint32_t>(ctx.offset), static_cast<uint32_t>(ctx.offset >> 32),
                         ctx.seed, w);
  const float temperature = ctx.k.temperature;
  for (int h = 0; h < n_sets; ++h) {
    const vfloat logits = simd::load(x + h * kLanes);
    const vint odd = (at[h] & 1) != 0;
    const vuint word = ((at[h] & 2) != 0) ? (odd ? w[h][3] : w[h][2]) : (odd ? w[h][1] : w[h][0]);
    const vfloat key = sampling_key(logits, word, temperature, race_limit(logits, bound, temperature, race));
    const vint better = key > best;
    best = better ? key : best;
    best_at = better ? at[h] : best_at;
  }
}

// sample_block on AVX-512, for the candidates only: the columns whose logit l has l + T * kGumbelBound
// above the best key of the earlier blocks (a few percent of a real vocabulary; every column of the first
// block). Their indices and logits are compressed into lists (vpcompressd); each Philox call takes
// kCandidateSets vectors of 16 on their own counters (their independent multiply chains interleave), with
// word col % 4 picked per lane; the race filter then leaves the logs to the few that can still win.
// The keys are the same fp32 arithmetic as sample_block's. A standalone AVX-512 function, called only
// when the CPU has AVX-512 (the other clones compile the call and never make it).
__attribute__((target("arch=x86-64-v4"))) void sample_candidates(const float* buf, int64_t begin, int64_t n,
                                                               uint32_t row_id, const RowContext& ctx,
                                                               int32_t* candidates, float* keys, ConfState& st) {
  float* candidate_logits = keys;  // keys are scratch until sample_block needs them
  const vint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const float temperature = ctx.k.temperature;
  const __m512 reach = _mm512_set1_ps(temperature * kGumbelBound), kmax = _mm512_set1_ps(st.kmax);
  int32_t count = 0;
  const int64_t dense_count = n * kDenseNum / kDenseDen;  // more candidates than this: sample every unit
  for (int64_t j = 0; j < n && count <= dense_count; j += kLanes) {
    const __m512 x = reinterpret_cast<__m512>(simd::load(buf + j));
    const __mmask16 can_win = _mm512_cmp_ps_mask(_mm512_add_ps(x, reach), kmax, _CMP_GT_OQ);
    // Compress in registers and store whole vectors: compress-to-memory (and a later gather) are
    // microcoded or slow on current x86 cores.
    const __m512i column = reinterpret_cast<__m512i>(lane + static_cast<int32_t>(j));
    _mm512_storeu_si512(candidates + count, _mm512_maskz_compress_epi32(can_win, column));
    _mm512_storeu_ps(candidate_logits + count, _mm512_maskz_compress_ps(can_win, x));
    count += __builtin_popcount(can_win);
  }
  if (count > dense_count) {
    sample_block<true>(buf, begin, n, row_id, ctx, keys, st);
    return;
  }
  // Pad both lists to a whole vector (logit -inf never wins): key_sets reads whole vectors.
  _mm512_storeu_si512(candidates + count, _mm512_setzero_si512());
  _mm512_storeu_ps(candidate_logits + count, _mm512_set1_ps(-INFINITY));
  const bool race = race_filter_holds(st.kmax, st.lmax, temperature);
  vfloat best = simd::splat(-INFINITY);
  vint best_at = vint{} - 1;
  int32_t c = 0;
  for (; count - c > kLanes; c += kCandidateSets * kLanes)
    key_sets<kCandidateSets>(candidates + c, candidate_logits + c, begin, row_id, ctx, st.kmax, race, best, best_at);
  if (c < count)  // a last vector alone: half the Philox work of a pair (blocks of a few candidates are common)
    key_sets<1>(candidates + c, candidate_logits + c, begin, row_id, ctx, st.kmax, race, best, best_at);
  const float block_best = simd::reduce_max(best);
  if (!(block_best > st.kmax)) return;
  int32_t first = INT32_MAX;
  for (int i = 0; i < kLanes; ++i)
    if (best[i] == block_best) first = std::min(first, best_at[i]);
  st.kmax = block_best;
  st.kidx = begin + first;
  st.kl = buf[first];
}

template <class T>
DLLM_SIMD_INLINE void scan_chunk_impl(const T* row, int64_t begin, int64_t end, uint32_t row_id,
                                      const RowContext& ctx, ConfState& st) {
  alignas(64) float buf[kBlock];
  alignas(64) float keys[kBlock + kLanes];  // candidate lists store and pad whole vectors
  alignas(64) int32_t candidates[kBlock + kLanes];
  const ConfConsts& k = ctx.k;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const float block_max = load_block(row, start, n, ctx, buf, st.nan);
    if (block_max > st.lmax) {  // the row's maximum moves into this block
      const int64_t j = find_first(buf, n, block_max);
      if (k.need_top2) st.l2 = std::max(st.lmax, max_except(buf, n, j));
      rescale(st.z, st.s1, (st.lmax - block_max) * k.c);
      st.lmax = block_max;
      st.lidx = start + j;
    } else if (block_max > st.l2) {
      st.l2 = block_max;
    }
    if (k.sample) {
      if (ctx.avx512) {
        sample_candidates(buf, start, n, row_id, ctx, candidates, keys, st);
      } else {
        sample_block<false>(buf, start, n, row_id, ctx, keys, st);
      }
    }
    if (st.lmax == -INFINITY) continue;  // nothing but -inf so far: no mass to add

    const float m = st.lmax;
    vfloat z = vfloat{}, s1 = vfloat{};
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t j = 0; j < padded; j += kLanes) {
      const vfloat t = (simd::load(buf + j) - m) * k.c;  // exactly 0 at the maximum: z >= 1
      const vfloat e = simd::exp2(t);
      z += e;
      if (k.need_entropy) s1 += e * simd::select(t > kMinExponent, t, simd::splat(kMinExponent));
    }
    st.z += simd::reduce_sum(z);
    if (k.need_entropy) st.s1 += simd::reduce_sum(s1);
  }
}

// One work item: the state of vocabulary chunk [begin, end) of one row. Compiled once per ISA.
DLLM_CPU_MULTIVERSION
void scan_chunk(const DllmConfidenceParams& p, const void* row, int64_t begin, int64_t end, uint32_t row_id,
                const RowContext& ctx, ConfState& st) {
  switch (p.dtype) {
    case DLLM_FLOAT32:
      return scan_chunk_impl(static_cast<const float*>(row), begin, end, row_id, ctx, st);
    case DLLM_FLOAT16:
      return scan_chunk_impl(static_cast<const _Float16*>(row), begin, end, row_id, ctx, st);
    default:
      return scan_chunk_impl(static_cast<const simd::bf16*>(row), begin, end, row_id, ctx, st);
  }
}

size_t element_size(int dtype) { return dtype == DLLM_FLOAT32 ? 4 : 2; }

}  // namespace
}  // namespace dllm

namespace dllm {
namespace {

// A row's result: its (token, score), or its state for a later merge.
void write_row(const DllmConfidenceParams& p, const ConfConsts& k, int64_t r, const ConfState& st, int64_t base) {
  if (p.state != nullptr) {
    store_state(st, base, p.state + r * DLLM_STATE_FIELDS);
  } else {
    finalize_state(st, p, k, static_cast<uint32_t>(r), &p.token[r], &p.score[r]);
  }
}

}  // namespace
}  // namespace dllm

extern "C" void dllm_logits_to_confidence_cpu(const DllmConfidenceParams* params, int num_threads) {
  using namespace dllm;
  const DllmConfidenceParams& p = *params;
  const int64_t n_rows = p.n_outer * p.n_inner;
  const ConfConsts k = make_consts(p);
  const int64_t lead = p.vocab_start % kUnit, base = p.vocab_start - lead;  // finalize_state needs base 0
  const int64_t span = lead + p.vocab;  // virtual columns of a row

  std::vector<int64_t> banned;
  for (int64_t i = 0; i < p.n_banned; ++i)
    if (p.banned[i] >= p.vocab_start && p.banned[i] - p.vocab_start < p.vocab) banned.push_back(p.banned[i] - base);
  std::sort(banned.begin(), banned.end());
  const RowContext ctx{k,        banned.data(), static_cast<int64_t>(banned.size()), lead, static_cast<uint32_t>(base / 4),
                       p.seed, p.offset,      cpu_has_avx512()};

  std::vector<int64_t> rows;
  rows.reserve(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (p.eligible == nullptr || p.eligible[r]) {
      rows.push_back(r);
    } else {
      write_row(p, k, r, empty_state(), base);
    }
  }
  const int64_t n_eligible = static_cast<int64_t>(rows.size());
  if (n_eligible == 0) return;

  // Split rows across threads only when rows alone cannot keep every thread busy; chunks are whole
  // sampling units (a chunk then starts on a Philox counter boundary).
  int64_t splits = 1;
  if (n_eligible < num_threads) {
    splits = std::min<int64_t>((num_threads + n_eligible - 1) / n_eligible, std::max<int64_t>(1, span / kMinChunk));
  }
  const int64_t chunk = ((span + splits - 1) / splits + kUnit - 1) / kUnit * kUnit;
  splits = (span + chunk - 1) / chunk;
  const int64_t n_items = n_eligible * splits;
  std::vector<ConfState> states(n_items, empty_state());
  const char* data = static_cast<const char*>(p.logits);
  const size_t esize = element_size(p.dtype);

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (n_items > 1 && n_eligible * p.vocab >= kMinParallel)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t r = rows[item / splits];
    const int64_t begin = (item % splits) * chunk;
    const int64_t end = std::min(span, begin + chunk);
    const int64_t o = r / p.n_inner, i = r % p.n_inner;
    const void* row = data + (o * p.stride_outer + i * p.stride_inner) * static_cast<int64_t>(esize);
    scan_chunk(p, row, begin, end, static_cast<uint32_t>(r), ctx, states[item]);
  }

  for (int64_t e = 0; e < n_eligible; ++e) {
    ConfState st = states[e * splits];
    for (int64_t s = 1; s < splits; ++s) merge_states(st, states[e * splits + s], k);
    write_row(p, k, rows[e], st, base);
  }
}

extern "C" void dllm_logits_to_confidence_merge_cpu(const DllmConfidenceParams* params, const double* states,
                                                    int64_t n_parts) {
  using namespace dllm;
  const DllmConfidenceParams& p = *params;
  const int64_t n_rows = p.n_outer * p.n_inner;
  const ConfConsts k = make_consts(p);
  for (int64_t r = 0; r < n_rows; ++r) {
    ConfState st = empty_state();
    for (int64_t part = 0; part < n_parts; ++part)
      merge_states_any_order(st, load_state(states + (part * n_rows + r) * DLLM_STATE_FIELDS), k);
    finalize_state(st, p, k, static_cast<uint32_t>(r), &p.token[r], &p.score[r]);
  }
}
