// Types every framework-free kernel header shares (C and C++, host and device).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// The float element types of the ops' tensors.
enum DllmDtype { DLLM_FLOAT32 = 0, DLLM_FLOAT16 = 1, DLLM_BFLOAT16 = 2 };

typedef struct CUstream_st* cudaStream_t;  // as CUDA's driver_types.h declares it

#ifdef __cplusplus
}  // extern "C"
#endif
