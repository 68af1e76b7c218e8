// Host emulation of csrc/cuda/ptx.cuh, written from the PTX ISA ("Warp-level matrix fragments for
// mma.m16n8k16", "... for sparse mma.m16n8k32 with .f16 and .bf16", "Sparse matrix storage", "ldmatrix",
// "cp.async"). Each collective gathers every lane's registers, rebuilds the matrices the ISA describes and
// hands each lane its part of the result. The harness refuses to build when csrc/cuda/ptx.cuh no longer
// has this fingerprint (update both together):
// emulates csrc/cuda/ptx.cuh sha256 8a3592cb2efd0fdf2dc0f88693de2c4abf421121d544d8b5578575f21cc2d4ae
#pragma once

#include <cstdint>

#include "emulator.h"

namespace dllm::ptx {
namespace detail {

using dllm_emu::kSlotWords;

template <bool kBf16>
inline float element(uint32_t word, int high) {
  const uint16_t bits = static_cast<uint16_t>(word >> (16 * high));
  return kBf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__ushort_as_half(bits));
}

// d (row g, cols 2t, 2t + 1; row g + 8, the same cols) += A[16][K] . B[K][8] for this lane, over the k
// that `used` marks in A's row (mma.sp reads only the B rows its metadata names: a pruned position is absent).
template <int K>
inline void accumulate(float (&d)[4], const float (&a)[16][K], const float (&b)[K][8], const bool (*used)[K] = nullptr) {
  const int lane = dllm_emu::lane_id(), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
    float sum = d[i];
    for (int k = 0; k < K; ++k)
      if (used == nullptr || used[row][k]) sum = std::fma(a[row][k], b[k][col], sum);
    d[i] = sum;
  }
}

}  // namespace detail

// m16n8k16 .row.col: lane 4 g + t holds A (g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..) and
// B (k = 2t..2t+1, n = g), (k = 2t+8.., n = g); the low half is the lower index.
template <bool kBf16>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const uint32_t words[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  const uint32_t* all = dllm_emu::exchange(words, 6);
  float am[16][16], bm[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* w = all + lane * detail::kSlotWords;
    const int g = lane / 4, t = lane % 4;
    for (int h = 0; h < 2; ++h) {
      am[g][2 * t + h] = detail::element<kBf16>(w[0], h);
      am[g + 8][2 * t + h] = detail::element<kBf16>(w[1], h);
      am[g][2 * t + 8 + h] = detail::element<kBf16>(w[2], h);
      am[g + 8][2 * t + 8 + h] = detail::element<kBf16>(w[3], h);
      bm[2 * t + h][g] = detail::element<kBf16>(w[4], h);
      bm[2 * t + 8 + h][g] = detail::element<kBf16>(w[5], h);
    }
  }
  detail::accumulate<16>(d, am, bm);
}

// Sparse m16n8k32 with ordered metadata: A is 16 x 32 with 2 of every 4 kept; lane 4 g + t holds the kept
// pairs of row g, chunk t (a0), row g+8 chunk t (a1), row g chunk 4+t (a2), row g+8 chunk 4+t (a3), chunk c
// = columns 4c..4c+3. The metadata comes from lanes 4 g + 2 kSel (chunks 0..3) and 4 g + 2 kSel + 1
// (chunks 4..7): nibble c % 4 of the low half for row g, of the high half for row g + 8, each nibble
// i0 | i1 << 2 with i0 < i1 the kept positions. B: lane 4 g + t holds k = 8 j + 2t..2t+1, n = g in b_j.
template <bool kBf16, int kSel>
inline void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  static_assert(kSel == 0 || kSel == 1, "m16n8k32 takes sparsity selectors 0 and 1");
  const uint32_t words[9] = {a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], e};
  const uint32_t* all = dllm_emu::exchange(words, 9);
  float am[16][32] = {}, bm[32][8];
  bool kept[16][32] = {};
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* w = all + lane * detail::kSlotWords;
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h) bm[8 * j + 2 * t + h][g] = detail::element<kBf16>(w[4 + j], h);
  }
  for (int row = 0; row < 16; ++row) {
    for (int chunk = 0; chunk < 8; ++chunk) {
      const int supplier = 4 * (row % 8) + 2 * kSel + chunk / 4;
      const uint32_t code = all[supplier * detail::kSlotWords + 8] >> (16 * (row / 8) + 4 * (chunk % 4)) & 0xF;
      const int i0 = code & 3, i1 = code >> 2;
      if (i0 >= i1) dllm_emu::fail("mma.sp::ordered_metadata: a metadata nibble with i0 >= i1");
      const int holder = 4 * (row % 8) + chunk % 4, reg = row / 8 + 2 * (chunk / 4);
      const uint32_t pair = all[holder * detail::kSlotWords + reg];
      am[row][4 * chunk + i0] = detail::element<kBf16>(pair, 0);
      am[row][4 * chunk + i1] = detail::element<kBf16>(pair, 1);
      kept[row][4 * chunk + i0] = kept[row][4 * chunk + i1] = true;
    }
  }
  detail::accumulate<32>(d, am, bm, kept);
}

// ldmatrix .x4 (.trans): lanes 8 j .. 8 j + 7 give the 16-byte rows of matrix j; lane 4 g + t receives
// row g, elements 2t..2t+1 of each matrix, or with .trans elements (2t, g) and (2t + 1, g).
template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto p = reinterpret_cast<uintptr_t>(row);
  if (p % 16) dllm_emu::fail("ldmatrix: a row address that is not 16-byte aligned");
  const uint32_t words[2] = {static_cast<uint32_t>(p), static_cast<uint32_t>(uint64_t{p} >> 32)};
  const uint32_t* all = dllm_emu::exchange(words, 2);
  const auto address = [&](int lane) {
    const uint32_t* w = all + lane * detail::kSlotWords;
    return reinterpret_cast<const uint16_t*>(uint64_t{w[0]} | uint64_t{w[1]} << 32);
  };
  const int lane = dllm_emu::lane_id(), g = lane / 4, t = lane % 4;
  for (int j = 0; j < 4; ++j) {
    if constexpr (kTrans) {
      r[j] = uint32_t{address(8 * j + 2 * t)[g]} | uint32_t{address(8 * j + 2 * t + 1)[g]} << 16;
    } else {
      const uint16_t* src = address(8 * j + g) + 2 * t;
      r[j] = uint32_t{src[0]} | uint32_t{src[1]} << 16;
    }
  }
}

inline void cp_async8(void* smem, const void* gmem) { dllm_emu::async_copy(smem, gmem, 8, 8); }
inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
  if (src_bytes != 0 && src_bytes != 16) dllm_emu::fail("cp_async16: src_bytes must be 0 or 16");
  dllm_emu::async_copy(smem, gmem, 16, src_bytes);
}
inline void cp_async_commit() { dllm_emu::async_commit(); }
template <int kPending>
inline void cp_async_wait() {
  dllm_emu::async_wait(kPending);
}
inline void cp_async_wait_all() { dllm_emu::async_wait_all(); }

// ex2.approx.ftz: subnormal inputs and results flushed to zero (the approximation error is not modelled).
inline float exp2_approx(float x) {
  const float y = std::exp2(std::fpclassify(x) == FP_SUBNORMAL ? 0.f : x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

inline unsigned char* dynamic_smem() { return dllm_emu::cta.dynamic_smem.data(); }

}  // namespace dllm::ptx
