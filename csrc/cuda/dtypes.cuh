// The element types of the CUDA kernels, as bits: conversions that round to nearest even, and the constants
// that depend on the format. Shared by every kernel that takes fp16 / bf16 (and, where noted, fp32).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace dllm {

// kLoScale: an fp32 value v split into hi = round(v) and lo = round((v - hi) * kLoScale), 2 to the number
// of significant bits of the format, keeps lo's relative precision (a small fp16 remainder would otherwise
// be subnormal): v = hi + lo / kLoScale to about 2^-22 (fp16), 2^-17 (bf16).
struct F16 {
  using Storage = uint16_t;
  static constexpr bool kBf16 = false;
  static constexpr float kLoScale = 2048.f;
  static __device__ __forceinline__ float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

struct BF16 {
  using Storage = uint16_t;
  static constexpr bool kBf16 = true;
  static constexpr float kLoScale = 256.f;
  static __device__ __forceinline__ float to_float(uint16_t b) { return __uint_as_float(uint32_t{b} << 16); }
  static __device__ __forceinline__ uint16_t from_float(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};

struct F32 {
  using Storage = float;
  static __device__ __forceinline__ float to_float(float f) { return f; }
  static __device__ __forceinline__ float from_float(float f) { return f; }
};

// Two values of a 16-bit format in one register, lo in the low half (the mma fragments' order).
template <class Tr>
__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  return uint32_t{Tr::from_float(lo)} | uint32_t{Tr::from_float(hi)} << 16;
}

}  // namespace dllm
