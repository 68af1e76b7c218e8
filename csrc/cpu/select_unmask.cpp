// select_unmask on the CPU: OpenMP over rows. A row gathers its selectable (score, position) pairs,
// counts what its policy needs, and selects the first n of the order with a partial selection
// (std::nth_element on a strict total order, so the result is exact and independent of threads).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "common/select_unmask.h"

namespace {

struct Entry {  // 8 bytes: a row holds fewer than 2^31 positions (the binding checks)
  float score;
  int32_t pos;
};

// The selection order: higher score first, equal scores lower position first.
inline bool before(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.pos < b.pos);
}

// entries has room for a whole row.
void select_row(const DllmSelectParams& p, int64_t row, Entry* entries) {
  const float* score = p.score + row * p.score_stride;
  const bool* eligible = p.eligible + row * p.eligible_stride;
  int64_t n_selectable = 0;
  for (int64_t j0 = 0; j0 < p.length; j0 += 8) {
    const int64_t j1 = std::min<int64_t>(j0 + 8, p.length);
    if (j1 - j0 == 8) {  // eligible windows are narrow: skip 8 ineligible positions at a time
      uint64_t any;
      std::memcpy(&any, eligible + j0, 8);
      if (any == 0) continue;
    }
    for (int64_t j = j0; j < j1; ++j) {  // branch-free append of the selectable positions
      const float s = score[j];
      entries[n_selectable] = {s, static_cast<int32_t>(j)};
      n_selectable += eligible[j] & (s == s) & (s != -INFINITY);
    }
  }
  Entry* const end = entries + n_selectable;
  int64_t n_pass = 0;
  if (p.policy == DLLM_POLICY_THRESHOLD || p.policy == DLLM_POLICY_TOPK_OR_THRESHOLD) {
    for (const Entry* e = entries; e < end; ++e) n_pass += dllm::passes_threshold(p, e->score);
  }
  int64_t factor_prefix = 0;
  if (dllm::uses_factor(p.policy)) {
    std::sort(entries, end, before);
    while (factor_prefix < n_selectable && dllm::passes_factor(p, entries[factor_prefix].score, factor_prefix + 1)) {
      ++factor_prefix;
    }
  }
  const int64_t n = dllm::select_count(p, row, n_selectable, n_pass, factor_prefix);
  if (n < n_selectable && !dllm::uses_factor(p.policy)) std::nth_element(entries, entries + n, end, before);

  bool* selected = p.selected + row * p.length;
  std::memset(selected, 0, static_cast<size_t>(p.length));
  for (int64_t e = 0; e < n; ++e) selected[entries[e].pos] = true;
  p.count[row] = static_cast<int32_t>(n);
  if (p.x != nullptr) {
    const int64_t* token = p.token + row * p.token_stride;
    int64_t* x = p.x + row * p.x_stride;
    for (int64_t e = 0; e < n; ++e) x[entries[e].pos] = token[entries[e].pos];
  }
}

}  // namespace

extern "C" void dllm_select_unmask_cpu(const DllmSelectParams* params, int num_threads) {
  const DllmSelectParams& p = *params;
#pragma omp parallel num_threads(num_threads) if (p.rows * p.length > 16384)
  {
    const std::unique_ptr<Entry[]> entries(new Entry[static_cast<size_t>(p.length)]);  // no zeroing
#pragma omp for schedule(static)
    for (int64_t row = 0; row < p.rows; ++row) select_row(p, row, entries.get());
  }
}
