// logits_to_confidence on the CPU: one pass over each eligible row, OpenMP over (row, vocabulary
// chunk) work items; a row is split into chunks only when there are fewer rows than threads, and
// its chunk states merge exactly (common/logits_to_confidence.h). Ineligible rows are never read.
//
// Each chunk is walked in L1-sized blocks: convert to fp32 (banned ids set to -inf), take the block
// maximum, update the top-1/top-2 logits with a scalar rescan only when the block can change them
// (rare after the first blocks), then add 2^(l*c - m) over the block in SIMD.
#include <algorithm>
#include <vector>

#include "common/logits_to_confidence.h"
#include "cpu/simd.h"

namespace dllm {

template <>
struct MulHiLo<simd::vuint> {
  static DLLM_SIMD_INLINE void run(uint32_t a, simd::vuint b, simd::vuint& hi, simd::vuint& lo) {
    const simd::vuint64 p = __builtin_convertvector(b, simd::vuint64) * static_cast<uint64_t>(a);
    hi = __builtin_convertvector(p >> 32, simd::vuint);
    lo = b * a;
  }
};

namespace {

using simd::kLanes;
using simd::vfloat;
using simd::vint;
using simd::vuint;

constexpr int64_t kBlock = 2048;                // fp32 block kept in L1
constexpr int64_t kMinChunk = 16 * 1024;        // smallest vocabulary chunk worth a thread
static_assert(kBlock % kLanes == 0, "blocks hold whole vectors");

struct RowContext {
  const ConfConsts& k;
  const int64_t* banned;  // sorted, in [0, vocab)
  int64_t n_banned;
  uint64_t seed, offset;
};

// Converts logits[begin, begin + n) to fp32 in buf (padded with -inf to whole vectors, banned ids
// set to -inf) and returns the block maximum; a NaN seen sets nan.
template <class T>
DLLM_SIMD_INLINE float load_block(const T* row, int64_t begin, int64_t n, const RowContext& ctx, float* buf,
                                  int& nan) {
  const int64_t* ban = std::lower_bound(ctx.banned, ctx.banned + ctx.n_banned, begin);
  const int64_t* ban_end = ctx.banned + ctx.n_banned;
  vfloat vmax = simd::splat(-INFINITY);
  vint vnan = vint{};
  for (int64_t j = 0; j < n; j += kLanes) {
    if (j + kLanes <= n) {
      simd::store(buf + j, simd::load(row + begin + j));
    } else {
      for (int64_t i = j; i < j + kLanes; ++i) buf[i] = i < n ? simd::to_float(row[begin + i]) : -INFINITY;
    }
    for (; ban < ban_end && *ban < begin + j + kLanes; ++ban) buf[*ban - begin] = -INFINITY;
    const vfloat x = simd::load(buf + j);
    vmax = simd::max_ignore_nan(vmax, x);
    vnan |= x != x;
  }
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

// Sampling keys l / T + g for the block; updates (kmax, kidx, kl) with the first maximum.
DLLM_SIMD_INLINE void sample_block(const float* buf, int64_t begin, int64_t n, uint32_t row_id,
                                   const RowContext& ctx, float* keys, ConfState& st) {
  const vuint lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vuint c1 = vuint{} + row_id;
  const vuint c2 = vuint{} + static_cast<uint32_t>(ctx.offset);
  const vuint c3 = vuint{} + static_cast<uint32_t>(ctx.offset >> 32);
  vfloat vmax = simd::splat(-INFINITY);
  for (int64_t j = 0; j < n; j += kLanes) {
    const vuint col = lane + static_cast<uint32_t>(begin + j);
    const vuint word = philox_word0<vuint>(col, c1, c2, c3, ctx.seed);
    const vfloat u = (__builtin_convertvector(word >> 9, vfloat) + 0.5f) * 0x1p-23f;
    const vfloat key = simd::load(buf + j) * ctx.k.inv_t - simd::log(-simd::log(u));
    simd::store(keys + j, key);
    vmax = simd::max_ignore_nan(vmax, key);
  }
  const float block_max = simd::reduce_max(vmax);
  if (!(block_max > st.kmax)) return;
  for (int64_t j = 0; j < n; ++j) {
    if (keys[j] == block_max) {
      st.kmax = block_max;
      st.kidx = begin + j;
      st.kl = buf[j];
      return;
    }
  }
}

template <class T>
DLLM_SIMD_INLINE void scan_chunk_impl(const T* row, int64_t begin, int64_t end, uint32_t row_id,
                                      const RowContext& ctx, ConfState& st) {
  alignas(64) float buf[kBlock];
  alignas(64) float keys[kBlock];
  const ConfConsts& k = ctx.k;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const float block_max = load_block(row, start, n, ctx, buf, st.nan);
    if (block_max > st.lmax) {  // the row's maximum moves into this block
      const int64_t j = find_first(buf, n, block_max);
      if (k.need_top2) st.l2 = std::max(st.lmax, max_except(buf, n, j));
      rescale(st.z, st.s1, st.lmax * k.c, block_max * k.c);
      st.lmax = block_max;
      st.lidx = start + j;
    } else if (block_max > st.l2) {
      st.l2 = block_max;
    }
    if (k.sample) sample_block(buf, start, n, row_id, ctx, keys, st);
    if (st.lmax == -INFINITY) continue;  // nothing but -inf so far: no mass to add

    const float m = st.lmax * k.c;
    vfloat z = vfloat{}, s1 = vfloat{};
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t j = 0; j < padded; j += kLanes) {
      const vfloat t = simd::load(buf + j) * k.c - m;
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

extern "C" void dllm_logits_to_confidence_cpu(const DllmConfidenceParams* params, int num_threads) {
  using namespace dllm;
  const DllmConfidenceParams& p = *params;
  const int64_t n_rows = p.n_outer * p.n_inner;
  const ConfConsts k = make_consts(p);

  std::vector<int64_t> banned;
  for (int64_t i = 0; i < p.n_banned; ++i)
    if (p.banned[i] >= 0 && p.banned[i] < p.vocab) banned.push_back(p.banned[i]);
  std::sort(banned.begin(), banned.end());
  const RowContext ctx{k, banned.data(), static_cast<int64_t>(banned.size()), p.seed, p.offset};

  std::vector<int64_t> rows;
  rows.reserve(n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    if (p.eligible == nullptr || p.eligible[r]) {
      rows.push_back(r);
    } else {
      p.token[r] = -1;
      p.score[r] = -INFINITY;
    }
  }
  const int64_t n_eligible = static_cast<int64_t>(rows.size());
  if (n_eligible == 0) return;

  // Split rows across threads only when rows alone cannot keep every thread busy.
  int64_t splits = 1;
  if (n_eligible < num_threads) {
    splits = std::min<int64_t>((num_threads + n_eligible - 1) / n_eligible,
                               std::max<int64_t>(1, p.vocab / kMinChunk));
  }
  const int64_t chunk = (p.vocab + splits - 1) / splits;
  const int64_t n_items = n_eligible * splits;
  std::vector<ConfState> states(n_items, empty_state());
  const char* base = static_cast<const char*>(p.logits);
  const size_t esize = element_size(p.dtype);

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (n_items > 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t r = rows[item / splits];
    const int64_t begin = (item % splits) * chunk;
    const int64_t end = std::min(p.vocab, begin + chunk);
    const int64_t o = r / p.n_inner, i = r % p.n_inner;
    const void* row = base + (o * p.stride_outer + i * p.stride_inner) * static_cast<int64_t>(esize);
    scan_chunk(p, row, begin, end, static_cast<uint32_t>(r), ctx, states[item]);
  }

  for (int64_t e = 0; e < n_eligible; ++e) {
    ConfState st = states[e * splits];
    for (int64_t s = 1; s < splits; ++s) merge_states(st, states[e * splits + s], k);
    const int64_t r = rows[e];
    finalize_state(st, p, k, static_cast<uint32_t>(r), &p.token[r], &p.score[r]);
  }
}
