// select_unmask: the launch description and the per-row count rule shared by the compiled backends.
// Framework-free; docs/ops.md is the contract and dllm_kernels/reference/select_unmask.py the readable
// statement.
//
// Every policy but the set rules reduces to a count n per row: select the first n selectable positions
// of the stable descending order on (score, -position). Selectable = eligible, score neither -inf nor
// NaN. The set rules (local_leap, hierarchy) select the selectable positions that pass a per-position
// rule, united with the first min(min_per_row, selectable) of that order.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/macros.h"
#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

// Same order as POLICIES in dllm_kernels/ops/select_unmask.py.
enum DllmPolicy {
  DLLM_POLICY_TOPK = 0,
  DLLM_POLICY_THRESHOLD = 1,
  DLLM_POLICY_FACTOR = 2,
  DLLM_POLICY_TOPK_OR_THRESHOLD = 3,
  DLLM_POLICY_ALL = 4,
  DLLM_POLICY_FACTOR_UPSTREAM = 5,
  DLLM_POLICY_LOCAL_LEAP = 6,
  DLLM_POLICY_HIERARCHY = 7,
  DLLM_POLICY_NEAR_BEST = 8,
};

typedef struct {
  const float* score;  // [rows, length], row stride score_stride, unit last stride
  const bool* eligible;
  int64_t rows, length;
  int64_t score_stride, eligible_stride;
  int policy;  // DllmPolicy
  const void* k;  // [rows] int32 or int64 (k_is_int64), or NULL
  int k_is_int64;
  double threshold;
  int inclusive;
  double factor;
  int64_t min_per_row;
  double low_threshold;  // local_leap, hierarchy
  int64_t radius;        // local_leap, >= 0
  double margin;         // near_best
  const int64_t* token;  // [rows, length] or NULL: fused commit x[selected] = token[selected]
  int64_t* x;
  int64_t token_stride, x_stride;
  bool* selected;  // [rows, length] contiguous outputs
  int32_t* count;  // [rows]
} DllmSelectParams;

void dllm_select_unmask_cpu(const DllmSelectParams* params, int num_threads);
int dllm_select_unmask_cuda(const DllmSelectParams* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"

namespace dllm {

// The longest row the CUDA kernel takes: positions are ints, and pos + its 256 threads must not overflow
// (dllm_kernels/ops/select_unmask.py's cuda provider declines longer rows).
constexpr int64_t kSelectCudaMaxLength = 2147483647 - 256;

DLLM_HD DLLM_INLINE int64_t row_k(const DllmSelectParams& p, int64_t row) {
  if (p.k == nullptr) return 0;
  const int64_t k = p.k_is_int64 ? static_cast<const int64_t*>(p.k)[row] : static_cast<const int32_t*>(p.k)[row];
  return k < 0 ? 0 : k;
}

DLLM_HD DLLM_INLINE bool passes(const DllmSelectParams& p, float score, double bound) {
  const double s = score;
  return p.inclusive ? s >= bound : s > bound;
}

DLLM_HD DLLM_INLINE bool passes_threshold(const DllmSelectParams& p, float score) {
  return passes(p, score, p.threshold);
}

// The policies that select by a per-position rule instead of a count.
DLLM_HD DLLM_INLINE bool is_set_rule(int policy) {
  return policy == DLLM_POLICY_LOCAL_LEAP || policy == DLLM_POLICY_HIERARCHY;
}

// near_best's bound, from the row's largest selectable score: dInfer's min(threshold, best - margin).
DLLM_HD DLLM_INLINE double near_best_bound(const DllmSelectParams& p, float best) {
  const double bound = static_cast<double>(best) - p.margin;
  return bound < p.threshold ? bound : p.threshold;
}

// The policies that need the longest passing prefix of the sorted order.
DLLM_HD DLLM_INLINE bool uses_factor(int policy) {
  return policy == DLLM_POLICY_FACTOR || policy == DLLM_POLICY_FACTOR_UPSTREAM;
}

// Fast-dLLM's factor rule at 1-based rank i: c_i >= 1 - factor / (i + 1); rank 1 always passes.
DLLM_HD DLLM_INLINE bool passes_factor(const DllmSelectParams& p, float score, int64_t rank) {
  return rank == 1 || static_cast<double>(score) >= 1.0 - p.factor / static_cast<double>(rank + 1);
}

// The count of a row from what the policy needs: the selectable count, how many pass the threshold
// (near_best: its row bound), and (factor) the longest passing prefix of the order. The set rules count
// their selection instead; here they get their floor.
DLLM_HD DLLM_INLINE int64_t select_count(const DllmSelectParams& p, int64_t row, int64_t n_selectable,
                                         int64_t n_pass, int64_t factor_prefix) {
  const int64_t k = row_k(p, row);
  const int64_t top_k = k < n_selectable ? k : n_selectable;
  int64_t n;
  switch (p.policy) {
    case DLLM_POLICY_TOPK:
      n = top_k;
      break;
    case DLLM_POLICY_THRESHOLD:
    case DLLM_POLICY_NEAR_BEST:
      n = n_pass;
      break;
    case DLLM_POLICY_FACTOR:
      n = factor_prefix;
      break;
    case DLLM_POLICY_FACTOR_UPSTREAM:  // Fast-dLLM's released loop also commits a last rank that fails first
      n = factor_prefix == n_selectable - 1 ? n_selectable : factor_prefix;
      break;
    case DLLM_POLICY_TOPK_OR_THRESHOLD:
      n = n_pass >= k ? n_pass : top_k;
      break;
    case DLLM_POLICY_LOCAL_LEAP:
    case DLLM_POLICY_HIERARCHY:
      n = 0;
      break;
    default:
      n = n_selectable;
  }
  const int64_t floor = p.min_per_row < n_selectable ? p.min_per_row : n_selectable;
  return n > floor ? n : floor;
}

}  // namespace dllm
#endif  // __cplusplus
