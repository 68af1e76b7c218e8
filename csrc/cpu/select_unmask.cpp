// select_unmask on the CPU: OpenMP over rows. A row gathers its selectable (score, position) pairs,
// counts what its policy needs, and selects the first n of the order with a partial selection
// (std::nth_element on a strict total order, so the result is exact and independent of threads). The
// set rules mark their positions in O(L) scans of the row, then add the floor the same way.
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

// local_leap: passing the threshold, or passing low_threshold within radius of an anchor (an eligible
// position passing the threshold; a finite bound is never passed by NaN or -inf). One scan each way
// finds the nearest anchor on that side.
void local_leap_rule(const DllmSelectParams& p, const float* score, const bool* eligible, bool* selected) {
  int64_t anchor = -1;
  for (int64_t j = 0; j < p.length; ++j) {
    const bool high = eligible[j] && dllm::passes_threshold(p, score[j]);
    anchor = high ? j : anchor;
    selected[j] = high || (eligible[j] && anchor >= 0 && j - anchor <= p.radius &&
                           dllm::passes(p, score[j], p.low_threshold));
  }
  anchor = -1;
  for (int64_t j = p.length - 1; j >= 0; --j) {
    anchor = eligible[j] && dllm::passes_threshold(p, score[j]) ? j : anchor;
    selected[j] = selected[j] || (eligible[j] && anchor >= 0 && anchor - j <= p.radius &&
                                  dllm::passes(p, score[j], p.low_threshold));
  }
}

// hierarchy: passing the threshold, or passing low_threshold with the largest selectable score of its run
// of consecutive eligible positions (ties included).
void hierarchy_rule(const DllmSelectParams& p, const float* score, const bool* eligible, bool* selected) {
  for (int64_t begin = 0; begin < p.length;) {
    if (!eligible[begin]) {
      selected[begin++] = false;
      continue;
    }
    int64_t end = begin;
    float best = -INFINITY;
    for (; end < p.length && eligible[end]; ++end) best = score[end] > best ? score[end] : best;  // not NaN
    for (int64_t j = begin; j < end; ++j) {
      selected[j] = dllm::passes_threshold(p, score[j]) ||
                    (score[j] == best && dllm::passes(p, score[j], p.low_threshold));
    }
    begin = end;
  }
}

// A set rule's selection united with the first min(min_per_row, S) of the order; returns the count.
int64_t select_set(const DllmSelectParams& p, const float* score, const bool* eligible, Entry* entries,
                   int64_t n_selectable, bool* selected) {
  if (p.policy == DLLM_POLICY_LOCAL_LEAP) {
    local_leap_rule(p, score, eligible, selected);
  } else {
    hierarchy_rule(p, score, eligible, selected);
  }
  const int64_t floor = std::min(p.min_per_row, n_selectable);
  if (floor < n_selectable) std::nth_element(entries, entries + floor, entries + n_selectable, before);
  for (int64_t e = 0; e < floor; ++e) selected[entries[e].pos] = true;
  int64_t n = 0;  // every selected position is selectable, so among the entries
  for (int64_t e = 0; e < n_selectable; ++e) n += selected[entries[e].pos];
  return n;
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
  bool* selected = p.selected + row * p.length;
  if (dllm::is_set_rule(p.policy)) {
    const int64_t n = select_set(p, score, eligible, entries, n_selectable, selected);
    p.count[row] = static_cast<int32_t>(n);
    if (p.x != nullptr) {
      const int64_t* token = p.token + row * p.token_stride;
      int64_t* x = p.x + row * p.x_stride;
      for (const Entry* e = entries; e < end; ++e) {
        if (selected[e->pos]) x[e->pos] = token[e->pos];
      }
    }
    return;
  }
  int64_t n_pass = 0;
  if (p.policy == DLLM_POLICY_THRESHOLD || p.policy == DLLM_POLICY_TOPK_OR_THRESHOLD) {
    for (const Entry* e = entries; e < end; ++e) n_pass += dllm::passes_threshold(p, e->score);
  } else if (p.policy == DLLM_POLICY_NEAR_BEST && n_selectable > 0) {
    float best = entries[0].score;
    for (const Entry* e = entries; e < end; ++e) best = e->score > best ? e->score : best;
    const double bound = dllm::near_best_bound(p, best);
    for (const Entry* e = entries; e < end; ++e) n_pass += dllm::passes(p, e->score, bound);
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
