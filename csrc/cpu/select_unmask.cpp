// select_unmask on the CPU: OpenMP over rows. A row gathers its selectable (score, position) pairs,
// counts what its policy needs, and selects the first n of the order with a partial selection
// (std::nth_element on a strict total order, so the result is exact and independent of threads).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/select_unmask.h"

namespace {

struct Entry {
  float score;
  int64_t pos;
};

// The selection order: higher score first, equal scores lower position first.
inline bool before(const Entry& a, const Entry& b) {
  return a.score > b.score || (a.score == b.score && a.pos < b.pos);
}

void select_row(const DllmSelectParams& p, int64_t row, std::vector<Entry>& entries) {
  const float* score = p.score + row * p.score_stride;
  const bool* eligible = p.eligible + row * p.eligible_stride;
  entries.clear();
  int64_t n_pass = 0;
  for (int64_t j = 0; j < p.length; ++j) {
    const float s = score[j];
    if (eligible[j] && !std::isnan(s) && s != -INFINITY) {
      entries.push_back({s, j});
      n_pass += dllm::passes_threshold(p, s);
    }
  }
  const int64_t n_selectable = static_cast<int64_t>(entries.size());
  int64_t factor_prefix = 0;
  if (p.policy == DLLM_POLICY_FACTOR) {
    std::sort(entries.begin(), entries.end(), before);
    while (factor_prefix < n_selectable &&
           dllm::passes_factor(p, entries[factor_prefix].score, factor_prefix + 1)) {
      ++factor_prefix;
    }
  }
  const int64_t n = dllm::select_count(p, row, n_selectable, n_pass, factor_prefix);
  if (n < n_selectable && p.policy != DLLM_POLICY_FACTOR) {
    std::nth_element(entries.begin(), entries.begin() + n, entries.end(), before);
  }

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
    std::vector<Entry> entries;
    entries.reserve(static_cast<size_t>(p.length));
#pragma omp for schedule(static)
    for (int64_t row = 0; row < p.rows; ++row) select_row(p, row, entries);
  }
}
