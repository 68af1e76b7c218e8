// logits_to_confidence: the launch description and the per-row reduction state that every compiled
// backend (csrc/cpu, csrc/cuda) shares. Framework-free; docs/ops.md is the contract and
// dllm_kernels/reference/logits_to_confidence.py the readable math.
//
// One pass over a row keeps a ConfState: the two largest raw logits (and the first index of the
// largest), the sum of 2^t with t = (l - lmax) * c (c = log2(e) / T for tempered scores, else log2(e)),
// the sum of 2^t * t (entropy), and for sampling the largest Gumbel key l + T * g (the order of
// l / T + g, without overflow at small T) with its first index and logit. t is computed from the
// difference l - lmax, exactly 0 at the maximum, so z >= 1 and every score stays in its range.
// States of vocabulary chunks merge exactly (up to fp32 rounding), so a row may be split across threads,
// CTAs or tensor-parallel ranks: with vocab_start, a shard's kernel uses global ids (tokens, banned ids,
// Philox counters) and can write the row's state (store_state) instead of finalizing it; the merge
// entry points combine the states of every shard and finalize.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "common/macros.h"
#include "common/philox.h"
#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

// Same order as SCORES in dllm_kernels/ops/logits_to_confidence.py.
enum DllmScoreKind {
  DLLM_SCORE_PROB = 0,
  DLLM_SCORE_MARGIN = 1,
  DLLM_SCORE_NEG_ENTROPY = 2,
  DLLM_SCORE_LOGIT_MARGIN = 3,
  DLLM_SCORE_RANDOM = 4,
};

typedef struct {
  const void* logits;  // row (o, i) starts at o * stride_outer + i * stride_inner elements
  int dtype;           // DllmDtype
  int64_t n_outer, n_inner, vocab;
  int64_t stride_outer, stride_inner;
  const bool* eligible;   // [n_outer * n_inner] or NULL (every row)
  const int64_t* banned;  // [n_banned] global ids; ids outside [vocab_start, vocab_start + vocab) are ignored
  int64_t n_banned;
  int64_t vocab_start;  // global id of column 0: a vocabulary shard's offset (0 for whole rows)
  float temperature;  // 0: argmax; in [1e-30, 1e30] (checked by the op): Gumbel-max sample
  int score_kind;     // DllmScoreKind
  int tempered_score;
  uint64_t seed, offset;
  int64_t* token;  // [n_outer * n_inner] outputs, contiguous
  float* score;
  double* state;  // non-NULL: each row's state (DLLM_STATE_FIELDS doubles, store_state) instead of token/score
} DllmConfidenceParams;

// A row's state as doubles: lmax (NaN once a NaN was read), l2, z, s1, kmax, kl, lidx, kidx (global ids;
// -1 if none). Doubles hold every fp32 value and every index exactly.
#define DLLM_STATE_FIELDS 8

// CPU kernel (csrc/cpu): OpenMP with num_threads threads.
void dllm_logits_to_confidence_cpu(const DllmConfidenceParams* params, int num_threads);

// CUDA kernel (csrc/cuda): enqueued on stream; workspace (device memory of
// dllm_logits_to_confidence_cuda_workspace(params) bytes) holds split-vocabulary partial states.
size_t dllm_logits_to_confidence_cuda_workspace(const DllmConfidenceParams* params);
int dllm_logits_to_confidence_cuda(const DllmConfidenceParams* params, void* workspace, cudaStream_t stream);

// Merge of the states of n_parts vocabulary shards, in any order (states [n_parts][rows][DLLM_STATE_FIELDS],
// rows = n_outer * n_inner), finalized into token / score; params->vocab is the whole vocabulary's size
// (the "random" score's column), logits / eligible / banned / state are not read.
void dllm_logits_to_confidence_merge_cpu(const DllmConfidenceParams* params, const double* states, int64_t n_parts);
int dllm_logits_to_confidence_merge_cuda(const DllmConfidenceParams* params, const double* states, int64_t n_parts,
                                         cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"

namespace dllm {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
// Clamp for t in 2^t * t: 2^-1024 is 0 in fp32, and the clamp keeps 0 * -inf from making a NaN.
constexpr float kMinExponent = -1024.f;
// -log(-log u) < 16.7 for every u the generator makes ((x >> 9) + 0.5) * 2^-23 (with the kernels' log
// approximations too): a logit l with l + T * 17 <= the best key so far cannot win, and needs no noise.
constexpr float kGumbelBound = 17.f;

struct ConfState {
  float lmax;    // largest raw logit (-inf if none)
  float l2;      // second largest, counting repeats (-inf if none)
  float z;       // sum of 2^((l - lmax) * c)
  float s1;      // sum of 2^t * t
  float kmax;    // largest sampling key
  float kl;      // raw logit at kidx
  int64_t lidx;  // first index of lmax (-1 if none)
  int64_t kidx;  // first index of kmax
  int nan;       // a NaN was read
};

DLLM_HD DLLM_INLINE ConfState empty_state() {
  return ConfState{-INFINITY, -INFINITY, 0.f, 0.f, -INFINITY, -INFINITY, -1, -1, 0};
}

// Launch constants derived once from the parameters.
struct ConfConsts {
  float c;            // log2(e) times the softmax scale
  float temperature;  // T of the sampling keys l + T * g
  bool sample;
  bool need_top2;
  bool need_entropy;
};

DLLM_HD DLLM_INLINE ConfConsts make_consts(const DllmConfidenceParams& p) {
  ConfConsts k;
  k.sample = p.temperature > 0.f;
  k.temperature = p.temperature;
  const bool tempered = k.sample && p.tempered_score && p.score_kind != DLLM_SCORE_LOGIT_MARGIN;
  k.c = tempered ? kLog2e / p.temperature : kLog2e;
  k.need_top2 = p.score_kind == DLLM_SCORE_MARGIN || p.score_kind == DLLM_SCORE_LOGIT_MARGIN;
  k.need_entropy = p.score_kind == DLLM_SCORE_NEG_ENTROPY;
  return k;
}

// (z, s1) summed against the maximum lmax_old, re-expressed against lmax_new >= lmax_old; d is
// (lmax_old - lmax_new) * c. Nothing summed yet (z == 0, lmax_old == -inf) stays 0.
DLLM_HD DLLM_INLINE void rescale(float& z, float& s1, float d) {
  if (z == 0.f) return;
  const float w = exp2f(d);
  s1 = w * (s1 + d * z);
  z *= w;
}

// Merge b into a, where b covers vocabulary indices after a's (ties keep a's index).
DLLM_HD DLLM_INLINE void merge_states(ConfState& a, const ConfState& b, const ConfConsts& k) {
  const float lmax = fmaxf(a.lmax, b.lmax);
  if (lmax != -INFINITY) {
    float bz = b.z, bs1 = b.s1;
    rescale(a.z, a.s1, (a.lmax - lmax) * k.c);
    rescale(bz, bs1, (b.lmax - lmax) * k.c);
    a.z += bz;
    a.s1 += bs1;
  }
  if (b.lmax > a.lmax) {
    a.l2 = fmaxf(a.lmax, b.l2);
    a.lmax = b.lmax;
    a.lidx = b.lidx;
  } else {
    a.l2 = fmaxf(a.l2, b.lmax);
  }
  if (b.kmax > a.kmax) {
    a.kmax = b.kmax;
    a.kidx = b.kidx;
    a.kl = b.kl;
  }
  a.nan |= b.nan;
}

// merge_states for states in any order (interleaved threads, shards): on equal maxima the lower index
// wins, so the result does not depend on the order.
DLLM_HD DLLM_INLINE void merge_states_any_order(ConfState& a, const ConfState& b, const ConfConsts& k) {
  const bool lower_l = b.lmax == a.lmax && b.lidx < a.lidx;
  const bool lower_k = b.kmax == a.kmax && b.kidx < a.kidx;
  merge_states(a, b, k);
  if (lower_l) a.lidx = b.lidx;
  if (lower_k) {
    a.kidx = b.kidx;
    a.kl = b.kl;
  }
}

// The state's DLLM_STATE_FIELDS doubles; index_base turns the state's column indices into global ids.
DLLM_HD DLLM_INLINE void store_state(const ConfState& s, int64_t index_base, double* out) {
  out[0] = s.nan ? NAN : s.lmax;
  out[1] = s.l2;
  out[2] = s.z;
  out[3] = s.s1;
  out[4] = s.kmax;
  out[5] = s.kl;
  out[6] = static_cast<double>(s.lidx < 0 ? -1 : s.lidx + index_base);
  out[7] = static_cast<double>(s.kidx < 0 ? -1 : s.kidx + index_base);
}

DLLM_HD DLLM_INLINE ConfState load_state(const double* in) {
  const bool nan = in[0] != in[0];
  return ConfState{nan ? -INFINITY : static_cast<float>(in[0]),
                   static_cast<float>(in[1]),
                   static_cast<float>(in[2]),
                   static_cast<float>(in[3]),
                   static_cast<float>(in[4]),
                   static_cast<float>(in[5]),
                   static_cast<int64_t>(in[6]),
                   static_cast<int64_t>(in[7]),
                   nan ? 1 : 0};
}

// The (token, score) of a row from its whole-row state. Scores are clamped to their ranges (prob and
// margin in [0, 1], neg_entropy <= 0) against the last rounding of the division; a sampled row whose
// every key rounded to -inf (logits near -FLT_MAX at a huge T) takes its argmax, so token == -1 exactly
// where the score is -inf or NaN.
DLLM_HD DLLM_INLINE void finalize_state(const ConfState& s, const DllmConfidenceParams& p, const ConfConsts& k,
                                        uint32_t row, int64_t* token, float* score) {
  if (s.nan || s.lmax == INFINITY) {
    *token = -1;
    *score = NAN;
    return;
  }
  if (s.lidx < 0) {
    *token = -1;
    *score = -INFINITY;
    return;
  }
  const bool sampled = k.sample && s.kidx >= 0;
  float value;
  switch (p.score_kind) {
    case DLLM_SCORE_PROB:
      value = fminf((sampled ? exp2f((s.kl - s.lmax) * k.c) : 1.f) / s.z, 1.f);
      break;
    case DLLM_SCORE_MARGIN:
      value = fminf(-expm1f((s.l2 - s.lmax) * k.c * kLn2) / s.z, 1.f);  // exact-ish when l2 ~ lmax
      break;
    case DLLM_SCORE_NEG_ENTROPY:
      value = fminf(kLn2 * s.s1 / s.z - logf(s.z), 0.f);
      break;
    case DLLM_SCORE_LOGIT_MARGIN:
      value = s.lmax - s.l2;
      break;
    default:
      value = counter_uniform(p.seed, p.offset, row, static_cast<uint32_t>(p.vocab));
  }
  *token = sampled ? s.kidx : s.lidx;
  *score = value;
}

}  // namespace dllm
#endif  // __cplusplus
