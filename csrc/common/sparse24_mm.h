// sparse24_mm: out[M, N] = x[M, K] @ W[N, K]^T (+ bias) with W in the 2:4 format of SPEC.md section 4
// (values [N, K/2] the kept elements in order, meta int16 [N, K/16] the 4-bit codes i0 | i1 << 2 of each
// group of 4, group g at bits 4 * (g % 4) of meta[:, g / 4]). fp32 accumulation, output in x's dtype.
// Framework-free; dllm_kernels/reference/sparse24.py is the readable statement.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/logits_to_confidence.h"  // DllmDtype

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* x;  // [m, k], row stride x_stride elements, unit last stride
  int64_t m, k, x_stride;
  const void* values;   // [n, k / 2] contiguous, x's dtype
  const int16_t* meta;  // [n, k / 16] contiguous, canonical layout
  int64_t n;
  const void* bias;  // [n] or NULL, x's dtype
  void* out;         // [m, n] contiguous, x's dtype
  int dtype;         // DllmDtype
} DllmSparse24Params;

void dllm_sparse24_mm_cpu(const DllmSparse24Params* params, int num_threads);
int dllm_sparse24_mm_cuda(const DllmSparse24Params* params, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
