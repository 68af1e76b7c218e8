// credit_confidence: the launch description and the per-row epilogue that every compiled backend
// (csrc/cpu, csrc/cuda) shares. Framework-free; docs/ops.md is the contract and
// dllm_kernels/reference/credit_confidence.py the readable math.
//
// The vocabulary pass is logits_to_confidence's scan (its row states at vocab_start 0, score "prob",
// T = 0): lmax, its first index lidx and z = sum exp(l - lmax), one read of each eligible row. This
// epilogue then touches only a row's S credit slots and the S logits at their tokens: it decays the
// slots, credits lidx with pmax^gamma (pmax = 1 / z), and takes the fused argmax and its fused softmax
// probability without a second pass over V. Ineligible rows have the empty state (lidx = -1), as do rows
// with every logit -inf or banned: both only decay.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/logits_to_confidence.h"
#include "common/macros.h"
#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const double* state;  // [rows][DLLM_STATE_FIELDS]: logits_to_confidence's scan of every row (empty if ineligible)
  const void* logits;   // row r = o * n_inner + i starts at o * stride_outer + i * stride_inner elements
  int dtype;            // DllmDtype
  int64_t n_outer, n_inner, vocab;
  int64_t stride_outer, stride_inner;
  const int64_t* banned;  // [n_banned] ids read as -inf (ids outside [0, vocab) match no slot)
  int64_t n_banned;
  int64_t* credit_token;  // row r's slots at r * token_stride, unit stride; -1 = empty
  float* credit_value;    // row r's slots at r * value_stride, unit stride
  int64_t slots, token_stride, value_stride;
  float alpha, beta, gamma;  // checked by the op: 0 <= alpha <= ALPHA_MAX, 0 <= beta <= 1, 0 <= gamma < inf
  int64_t* token;            // [rows] outputs, contiguous
  float* score;
} DllmCreditParams;

// CPU epilogue (csrc/cpu): OpenMP over rows with num_threads threads.
void dllm_credit_confidence_cpu(const DllmCreditParams* params, int num_threads);
// CUDA epilogue (csrc/cuda): one thread per row, enqueued on stream; no allocation, no sync.
int dllm_credit_confidence_cuda(const DllmCreditParams* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"

namespace dllm {

// The slot that takes token's credit: the one holding it, else the first empty one, else the one with
// the smallest value (the lowest index on ties), whose token is evicted.
DLLM_HD DLLM_INLINE int64_t credit_slot(const int64_t* tok, const float* val, int64_t slots, int64_t token) {
  int64_t empty = -1, smallest = 0;
  for (int64_t s = 0; s < slots; ++s) {
    if (tok[s] == token) return s;
    if (tok[s] == -1 && empty < 0) empty = s;
    if (val[s] < val[smallest]) smallest = s;
  }
  return empty >= 0 ? empty : smallest;
}

// The raw logit of a slot token in [0, vocab), as the scan saw it (banned ids read -inf).
template <class Load>
DLLM_HD DLLM_INLINE float slot_logit(const DllmCreditParams& p, const Load& load, int64_t token) {
  for (int64_t k = 0; k < p.n_banned; ++k)
    if (p.banned[k] == token) return -INFINITY;
  return load(token);
}

// The fused logit f = l + b of a slot token holding credit c, with its boost b = alpha * log(c + 1) (fp32,
// c + 1 first, as upstream).
template <class Load>
DLLM_HD DLLM_INLINE float fused_logit(const DllmCreditParams& p, const Load& load, int64_t token, float c,
                                      float& boost) {
  boost = p.alpha * logf(c + 1.f);
  return slot_logit(p, load, token) + boost;
}

// One row: decay, credit, then (token, score). load(v) is the row's logit at v as fp32. Slot tokens
// outside [0, vocab) (a state this op never writes) are never read and take no part in the fused row.
template <class Load>
DLLM_HD DLLM_INLINE void credit_row(const DllmCreditParams& p, int64_t row, const Load& load) {
  int64_t* tok = p.credit_token + row * p.token_stride;
  float* val = p.credit_value + row * p.value_stride;
  for (int64_t s = 0; s < p.slots; ++s) val[s] *= p.beta;  // an empty slot stays (-1, 0)
  const ConfState st = load_state(p.state + row * DLLM_STATE_FIELDS);
  if (st.nan || st.lmax == INFINITY) {
    p.token[row] = -1;
    p.score[row] = NAN;
    return;
  }
  if (st.lidx < 0) {  // ineligible, or nothing finite left
    p.token[row] = -1;
    p.score[row] = -INFINITY;
    return;
  }
  const int64_t slot = credit_slot(tok, val, p.slots, st.lidx);
  const float credit = powf(1.f / st.z, p.gamma);
  val[slot] = tok[slot] == st.lidx ? val[slot] + credit : credit;
  tok[slot] = st.lidx;

  // f_v differs from l_v only at slot tokens, and lidx holds a slot: any other token has
  // f = l <= lmax <= f_lidx and a larger id than lidx on a tie.
  int64_t best = -1;
  float f_best = -INFINITY;
  for (int64_t s = 0; s < p.slots; ++s) {
    const int64_t t = tok[s];
    if (t < 0 || t >= p.vocab) continue;
    float boost;
    const float f = fused_logit(p, load, t, val[s], boost);
    if (f > f_best || (f == f_best && t < best)) {
      best = t;
      f_best = f;
    }
  }
  // sum_v exp(f_v - f_best) = exp(lmax - f_best) z + sum over slots exp(f_v - f_best) (1 - exp(-b_v)),
  // b_v = f_v - l_v: every term is at most 1 (nothing overflows) and 1 - exp(-b) keeps small boosts exact.
  float denom = expf(st.lmax - f_best) * st.z;
  for (int64_t s = 0; s < p.slots; ++s) {
    const int64_t t = tok[s];
    if (t < 0 || t >= p.vocab) continue;
    float boost;
    const float f = fused_logit(p, load, t, val[s], boost);
    denom += expf(f - f_best) * -expm1f(-boost);
  }
  p.token[row] = best;
  p.score[row] = fminf(1.f / denom, 1.f);
}

}  // namespace dllm
#endif  // __cplusplus
