// Portable SIMD for the CPU kernels: GCC/Clang vector extensions of 16 lanes.
//
// Kernels include this and mark their entry points DLLM_CPU_MULTIVERSION: the compiler then builds
// one copy for AVX-512, one for AVX2+FMA+F16C and a baseline x86-64 copy, and the loader picks the
// best for the running CPU. Everything here is always_inline, so it is compiled once per copy.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && !defined(__clang__)
#define DLLM_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DLLM_CPU_MULTIVERSION
#endif

#define DLLM_SIMD_INLINE inline __attribute__((always_inline))

namespace dllm::simd {

constexpr int kLanes = 16;
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef uint64_t vuint64x8 __attribute__((vector_size(64)));  // the same register as 8 64-bit lanes
typedef uint16_t vhalf_bits __attribute__((vector_size(32)));

DLLM_SIMD_INLINE vfloat splat(float x) { return vfloat{} + x; }

DLLM_SIMD_INLINE vfloat select(vint mask, vfloat a, vfloat b) { return mask ? a : b; }

// Lane-wise max that ignores NaN in x (NaN > m is false).
DLLM_SIMD_INLINE vfloat max_ignore_nan(vfloat m, vfloat x) { return x > m ? x : m; }

static_assert(kLanes == 16, "reduce_max and any fold 16 lanes");

// Largest lane of a NaN-free v, folding halves in registers (a lane loop is a chain of 15 dependent maxes).
DLLM_SIMD_INLINE float reduce_max(vfloat v) {
  typedef float vfloat8 __attribute__((vector_size(32)));
  typedef float vfloat4 __attribute__((vector_size(16)));
  const vfloat8 lo8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  const vfloat8 hi8 = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vfloat8 m8 = hi8 > lo8 ? hi8 : lo8;
  const vfloat4 lo4 = __builtin_shufflevector(m8, m8, 0, 1, 2, 3), hi4 = __builtin_shufflevector(m8, m8, 4, 5, 6, 7);
  const vfloat4 m4 = hi4 > lo4 ? hi4 : lo4;
  const float a = m4[0] > m4[1] ? m4[0] : m4[1], b = m4[2] > m4[3] ? m4[2] : m4[3];
  return a > b ? a : b;
}

DLLM_SIMD_INLINE float reduce_sum(vfloat v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// OR-folds halves in registers: with a loop over lanes, GCC scalarizes the comparison feeding the mask
// too (16 scalar compares where one vector compare was written).
DLLM_SIMD_INLINE bool any(vint mask) {
  typedef int32_t vint8 __attribute__((vector_size(32)));
  typedef int64_t vlong2 __attribute__((vector_size(16)));
  const vint8 half = __builtin_shufflevector(mask, mask, 0, 1, 2, 3, 4, 5, 6, 7) |
                     __builtin_shufflevector(mask, mask, 8, 9, 10, 11, 12, 13, 14, 15);
  const vlong2 quarter = reinterpret_cast<vlong2>(__builtin_shufflevector(half, half, 0, 1, 2, 3) |
                                                  __builtin_shufflevector(half, half, 4, 5, 6, 7));
  return (quarter[0] | quarter[1]) != 0;
}

// Load 16 elements of float / half / bfloat16 (passed as their 16-bit pattern) as fp32.
DLLM_SIMD_INLINE vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// fp16 on the bits: GCC 12 scalarises a _Float16 vector conversion in the AVX-512 clone (no AVX512-FP16).
// The magnitude shifted into fp32's field and scaled by 2^(127 - 15) is exact for normals and subnormals
// (unless DAZ is on); the all-ones exponent (inf / NaN) is restored after the scaling.
DLLM_SIMD_INLINE vfloat load(const _Float16* p) {
  vhalf_bits h;
  std::memcpy(&h, p, sizeof h);
  const vuint bits = __builtin_convertvector(h, vuint);
  const vfloat scaled = reinterpret_cast<vfloat>((bits & 0x7fffu) << 13) * 0x1p112f;
  const vuint special = reinterpret_cast<vuint>((bits & 0x7c00u) == 0x7c00u) & 0x7f800000u;
  return reinterpret_cast<vfloat>(reinterpret_cast<vuint>(scaled) | special | (bits & 0x8000u) << 16);
}
struct bf16 {
  uint16_t bits;
};
DLLM_SIMD_INLINE vfloat load(const bf16* p) {
  vhalf_bits h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vuint) << 16);
}

DLLM_SIMD_INLINE void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }

DLLM_SIMD_INLINE float to_float(float x) { return x; }
DLLM_SIMD_INLINE float to_float(_Float16 x) { return static_cast<float>(x); }
DLLM_SIMD_INLINE float to_float(bf16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// fp32 to T (float / _Float16 / bf16), round to nearest even; NaN stays a (quiet) NaN.
DLLM_SIMD_INLINE bf16 to_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((bits >> 16) | 0x40)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return bf16{static_cast<uint16_t>(bits >> 16)};
}
template <class T>
DLLM_SIMD_INLINE T from_float(float x);
template <>
DLLM_SIMD_INLINE float from_float<float>(float x) { return x; }
template <>
DLLM_SIMD_INLINE _Float16 from_float<_Float16>(float x) { return static_cast<_Float16>(x); }
template <>
DLLM_SIMD_INLINE bf16 from_float<bf16>(float x) { return to_bf16(x); }

// Round to nearest integer for |x| < 2^22 (the 1.5 * 2^23 trick; this file is never built with
// -ffast-math, which would fold it away).
DLLM_SIMD_INLINE vfloat round_nearest(vfloat x) {
  const vfloat magic = splat(12582912.f);
  return (x + magic) - magic;
}

// 2^x for x <= 0 (relative error ~2e-7); 0 below -126; NaN stays NaN.
DLLM_SIMD_INLINE vfloat exp2(vfloat x) {
  const vint tiny = x < -126.f;
  x = select(tiny, splat(-126.f), x);
  const vfloat n = round_nearest(x);
  const vfloat f = x - n;  // in [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln 2) to degree 7: truncation error < 1e-9 on [-0.5, 0.5].
  vfloat p = splat(1.5252733804059840e-05f);
  p = p * f + 1.5403530393381606e-04f;
  p = p * f + 1.3333558146428443e-03f;
  p = p * f + 9.6181291076284770e-03f;
  p = p * f + 5.5504108664821580e-02f;
  p = p * f + 2.4022650695910071e-01f;
  p = p * f + 6.9314718055994531e-01f;
  p = p * f + 1.f;
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  return select(tiny, vfloat{}, p * reinterpret_cast<vfloat>(bits));
}

// Natural log for positive normal x (relative error ~1e-7), without a division: x = 2^e * m with m in
// [sqrt(1/2), sqrt(2)), and log m = f - f^2 / 2 + f^3 P(f), f = m - 1, P the degree-8 minimax polynomial
// of the Cephes library's logf.
DLLM_SIMD_INLINE vfloat log(vfloat x) {
  vint bits = reinterpret_cast<vint>(x);
  vint e = ((bits >> 23) & 0xff) - 127;
  vfloat m = reinterpret_cast<vfloat>((bits & 0x7fffff) | 0x3f800000);  // [1, 2)
  const vint big = m > 1.41421356f;
  m = select(big, m * 0.5f, m);
  e = e + (big & 1);
  const vfloat f = m - 1.f;
  const vfloat f2 = f * f;
  vfloat p = splat(7.0376836292e-2f);
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  return f + (p * f * f2 - 0.5f * f2) + __builtin_convertvector(e, vfloat) * 0.6931471805599453f;
}

}  // namespace dllm::simd
