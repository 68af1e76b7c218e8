// block_attention: attention of a block of queries over a KV cache with the block-diffusion visibility
// rule (docs/ops.md#block_attention; dllm_kernels/reference/block_attention.py is the readable statement).
// Query i of row b sits at p = q_start[b] + i and sees key j iff j < kv_len[b] and (block_size == 0 or
// j / block_size <= p / block_size); query head h reads KV head h / (n_heads / n_kv_heads).
// Framework-free; the CUDA kernel is csrc/cuda/block_attention.cu.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* q;  // [batch, n_queries, n_heads, head_dim], strides q_stride (elements), unit last stride
  int64_t q_stride[3];
  void* k_cache;  // [batch, s_max, n_kv_heads, head_dim], unit last stride (written only with k_new)
  void* v_cache;
  int64_t k_stride[3], v_stride[3];
  const void* k_new;  // [batch, n_queries, n_kv_heads, head_dim] or NULL (then v_new is NULL too)
  const void* v_new;
  int64_t k_new_stride[3], v_new_stride[3];
  const int32_t* q_start;  // [batch]
  const int32_t* kv_len;   // [batch]
  void* out;               // [batch, n_queries, n_heads, head_dim] contiguous, q's dtype, 16-byte aligned
  float* lse;              // [batch, n_heads, n_queries] contiguous (natural log), or NULL
  int64_t batch, n_queries, s_max, n_heads, n_kv_heads, head_dim;
  int64_t block_size;  // 0: every valid key is visible
  float scale;         // softmax scale
  int dtype;           // DllmDtype of q, the caches, k_new / v_new and out
  int num_splits;      // KV splits per query tile: 0 = chosen from the shapes and the SM count
} DllmBlockAttentionParams;

// CUDA (csrc/cuda): fp16 / bf16, head_dim 64 or 128, q / k_cache / v_cache / k_new / v_new rows 16-byte
// aligned (base pointers and the three outer strides). Enqueued on stream, no host sync. workspace: device
// memory of dllm_block_attention_cuda_workspace(params) bytes (the split-KV partial results; 0 bytes: NULL is
// fine), which depends on the shapes and the current device only. Returns a cudaError_t.
size_t dllm_block_attention_cuda_workspace(const DllmBlockAttentionParams* params);
int dllm_block_attention_cuda(const DllmBlockAttentionParams* params, void* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
