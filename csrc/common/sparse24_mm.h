// sparse24_mm: out[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W in the 2:4 format of docs/ops.md
// (values [N, K/2] the kept elements in order, meta int16 [N, K/16] the 4-bit codes i0 | i1 << 2 of each
// group of 4, group g at bits 4 * (g % 4) of meta[:, g / 4]). fp32 accumulation, output in x's dtype.
// Framework-free; dllm_kernels/reference/sparse24.py is the readable statement.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;  // [m, k], row stride x_stride elements, unit last stride, x_dtype
  int64_t m, k, x_stride;
  const void* values;   // [n, k / 2] contiguous, x's dtype
  const int16_t* meta;  // [n, k / 16] contiguous, canonical layout
  int64_t n;
  const void* bias;  // [n] or NULL, x's dtype
  void* out;         // [m, n] contiguous, x_dtype
  int dtype;         // DllmDtype of values and bias
  // DllmDtype of x and out: dtype, or (CPU only) fp32 with a 16-bit weight, which armor_linear uses to
  // keep its fp32 inner product unrounded.
  int x_dtype;
} DllmSparse24Params;

// armor_linear: out = blockdiag(wrap_out) . W . blockdiag(wrap_in) . x (+ bias) per row of x, fp32 throughout
// (16-bit inputs: the wrapped x goes to the tensor cores as hi + lo 16-bit parts). mm describes x, the 2:4
// weight, bias and out as for sparse24_mm (x_dtype == dtype); wrap_in [k / wrap_in_bs, bs, bs] and wrap_out
// [n / wrap_out_bs, bs, bs] are contiguous blocks in dtype. CUDA: wrap_out_bs a power of two up to 256
// (fused into the product's epilogue up to 64).
typedef struct {
  DllmSparse24Params mm;
  const void* wrap_in;
  int64_t wrap_in_bs;
  const void* wrap_out;
  int64_t wrap_out_bs;
} DllmArmorParams;

void dllm_sparse24_mm_cpu(const DllmSparse24Params* params, int num_threads);
// CUDA kernels (csrc/cuda): enqueued on stream, no host sync. workspace: device memory of
// dllm_sparse24_mm_cuda_workspace(params) bytes (fp32 partial sums of a split K; 0 bytes: NULL is fine),
// which depends on the shapes, dtype and the current device only.
size_t dllm_sparse24_mm_cuda_workspace(const DllmSparse24Params* params);
int dllm_sparse24_mm_cuda(const DllmSparse24Params* params, void* workspace, cudaStream_t stream);
// armor_linear: workspace of dllm_armor_linear_cuda_workspace(params) bytes (NULL if 0).
size_t dllm_armor_linear_cuda_workspace(const DllmArmorParams* params);
int dllm_armor_linear_cuda(const DllmArmorParams* params, void* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
