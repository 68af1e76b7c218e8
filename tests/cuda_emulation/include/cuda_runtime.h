// The CUDA runtime API subset the kernels call, for the host emulation (emulator.h).
#pragma once

#include "emulator.h"

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) { return err ? "emulated error" : "no error"; }
// The device id is the emulated SM count: launch.cuh caches the count per device, and the tests vary it.
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = dllm_emu::config.sms;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? dllm_emu::config.sms : static_cast<int>(dllm_emu::kMaxSmemBytes);
  return cudaSuccess;
}
template <class F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute, int value) {
  if (value < 0 || static_cast<size_t>(value) > dllm_emu::kMaxSmemBytes) return cudaErrorInvalidValue;
  dllm_emu::smem_opt_in[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}
