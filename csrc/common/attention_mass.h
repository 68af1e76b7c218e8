// attention_mass: the attention mass every key receives from a block of queries (the Elastic-Cache
// statistic), from block_attention's lse, without materialising the [B, H, Sq, S] probabilities
// (docs/ops.md#attention_mass; dllm_kernels/reference/attention_mass.py is the readable statement).
// mass[b, j] = sum over heads h and counted queries i that see key j of exp(q[b,i,h] . k[b,j,h/G] * scale -
// lse[b,h,i]); 0 for keys past kv_len, keys no counted query sees and excluded keys (key_mask). Query i of
// row b sits at p = q_start[b] + i and sees key j iff j < kv_len[b] and (block_size == 0 or
// j / block_size <= p / block_size). top[b]: the first index of the row's largest mass (a NaN counts as
// largest), -1 where no mass is positive. Framework-free; kernels in csrc/cpu and csrc/cuda.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/macros.h"
#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* q;  // [batch, n_queries, n_heads, head_dim], strides q_stride (elements), unit last stride
  int64_t q_stride[3];
  const void* k_cache;  // [batch, s_max, n_kv_heads, head_dim], unit last stride
  int64_t k_stride[3];
  const float* lse;  // [batch, n_heads, n_queries], strides lse_stride (natural log)
  int64_t lse_stride[3];
  const int32_t* q_start;     // [batch]
  const int32_t* kv_len;      // [batch]
  const bool* query_mask;     // [batch, n_queries] or NULL (every query counted)
  int64_t query_mask_stride[2];
  const bool* key_mask;  // [batch, s_max] or NULL (no key excluded); true = excluded
  int64_t key_mask_stride[2];
  float* mass;           // [batch, s_max] contiguous
  int64_t* top;          // [batch]
  int64_t batch, n_queries, s_max, n_heads, n_kv_heads, head_dim;
  int64_t block_size;  // 0: every valid key is visible
  float scale;
  int dtype;  // DllmDtype of q and k_cache
} DllmAttentionMassParams;

// CPU (csrc/cpu): every dtype; q_start >= 0 and 0 <= kv_len <= s_max (the caller checks).
void dllm_attention_mass_cpu(const DllmAttentionMassParams* params, int num_threads);

// CUDA (csrc/cuda): fp16 / bf16, head_dim 64 or 128, q / k_cache 4-byte aligned with even strides. Enqueued
// on stream, no host sync, no workspace. Returns a cudaError_t.
int dllm_attention_mass_cuda(const DllmAttentionMassParams* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"

namespace dllm {

// The end of the keys query i of row b sees (kv already clamped to [0, s_max]); written so that a huge
// block_size cannot overflow.
DLLM_HD DLLM_INLINE int64_t mass_visible_end(int64_t block_size, int64_t q_start, int64_t i, int64_t kv) {
  if (block_size == 0) return kv;
  const int64_t pos = q_start + i;
  if (pos < 0) return 0;
  const int64_t block_start = pos - pos % block_size;
  return kv - block_start <= block_size ? kv : block_start + block_size;
}

// The first query of a row that sees key j (queries before it see only keys before j): lim grows with i.
DLLM_HD DLLM_INLINE int64_t mass_first_query(int64_t block_size, int64_t q_start, int64_t j) {
  if (block_size == 0) return 0;
  const int64_t first = j - j % block_size - q_start;
  return first > 0 ? first : 0;
}

// top's order: a NaN before any number, then the larger value, then the lower index.
DLLM_HD DLLM_INLINE bool mass_before(float a, int64_t ia, float b, int64_t ib) {
  const bool a_nan = a != a, b_nan = b != b;
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a != b) return a > b;
  return ia < ib;
}

}  // namespace dllm
#endif
