// Launch-geometry helpers shared by the CUDA kernels (host side, framework-free).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cstdint>

#include "common/macros.h"

namespace dllm {

DLLM_HD DLLM_INLINE int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
DLLM_HD DLLM_INLINE int64_t max_i64(int64_t a, int64_t b) { return a < b ? b : a; }
DLLM_HD DLLM_INLINE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A 1-D grid of `blocks` CTAs, capped at what gridDim.x holds (the kernels stride over the rest).
inline int grid_size(int64_t blocks) { return static_cast<int>(blocks < INT_MAX ? blocks : INT_MAX); }

// Devices whose per-device facts the launchers cache (beyond it they ask every time).
constexpr int kMaxDevices = 64;

// Multiprocessor count of the current device, cached per device (the query is not free).
inline cudaError_t sm_count(int* out) {
  static std::atomic<int> cache[kMaxDevices];
  int dev = 0;
  if (const cudaError_t err = cudaGetDevice(&dev)) return err;
  *out = dev < kMaxDevices ? cache[dev].load(std::memory_order_relaxed) : 0;
  if (*out > 0) return cudaSuccess;
  if (const cudaError_t err = cudaDeviceGetAttribute(out, cudaDevAttrMultiProcessorCount, dev)) return err;
  if (dev < kMaxDevices) cache[dev].store(*out, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace dllm
