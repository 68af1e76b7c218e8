// Portability macros for headers shared by the CPU (g++) and CUDA (nvcc) kernels.
#pragma once

#if defined(__CUDACC__)
#define DLLM_HD __host__ __device__
#define DLLM_INLINE __forceinline__
#else
#define DLLM_HD
#define DLLM_INLINE inline __attribute__((always_inline))
#endif
