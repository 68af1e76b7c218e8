// Counter-based random numbers shared by every backend (framework-free, host and device).
//
// The random word of (seed, offset, row, col) is word col % 4 of Philox4x32-10 (Salmon et al., SC'11)
// with key (seed_lo, seed_hi) and counter (col / 4, row, offset_lo, offset_hi): one call serves four
// consecutive columns. Its uniform is ((x >> 9) + 0.5) * 2^-23, strictly inside (0, 1) and exact in fp32.
// dllm_kernels/reference/counter_rng.py is the same definition in PyTorch.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace dllm {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

// 32x32 -> 64-bit product split into halves. Specialised per word type, so the CPU kernels can
// run the same rounds on SIMD vectors of words.
template <class U>
struct MulHiLo;

template <>
struct MulHiLo<uint32_t> {
  static DLLM_HD DLLM_INLINE void run(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    hi = __umulhi(a, b);
    lo = a * b;
#else
    const uint64_t p = static_cast<uint64_t>(a) * b;
    hi = static_cast<uint32_t>(p >> 32);
    lo = static_cast<uint32_t>(p);
#endif
  }
};

// The four output words of Philox4x32-10 at counter (c0, c1, c2, c3) are left in c0..c3. Mul: the
// 32x32 -> 64-bit product of a word type (a kernel may pass a faster one for its instruction set).
template <class U, class Mul = MulHiLo<U>>
DLLM_HD DLLM_INLINE void philox4(U& c0, U& c1, U& c2, U& c3, uint64_t seed) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    U hi0, lo0, hi1, lo1;
    Mul::run(kPhiloxRoundA, c0, hi0, lo0);
    Mul::run(kPhiloxRoundB, c2, hi1, lo1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
}

DLLM_HD DLLM_INLINE float uniform_from_word(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 0x1p-23f;
}

// Uniform (0, 1) keyed by (seed, offset, row, col).
DLLM_HD DLLM_INLINE float counter_uniform(uint64_t seed, uint64_t offset, uint32_t row, uint32_t col) {
  uint32_t w[4] = {col / 4, row, static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)};
  philox4<uint32_t>(w[0], w[1], w[2], w[3], seed);
  return uniform_from_word(w[col % 4]);
}

}  // namespace dllm
