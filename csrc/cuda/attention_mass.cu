// attention_mass on CUDA (csrc/common/attention_mass.h): each key's attention mass from block_attention's
// lse, on mma.sync tensor cores. Framework-free: raw pointers in, launches on the caller's stream, no host
// sync, no allocation, no atomics. dllm_kernels/reference/attention_mass.py is the readable statement.
//
// One CTA per (row b, tile of 64 keys), 4 warps, each warp owning 16 keys (two n8 tiles of the
// instruction): no shared memory and no barrier. Per KV head a warp loads the B fragments of its 16 keys
// for all of D once (32-bit loads straight from the cache rows) and keeps them in registers while it walks
// the R = Sq * G query rows that read that head (query i, group head g, r = i * G + g as in block_attention)
// in m16 steps: S = Q K^T by mma.m16n8k16 with fp32 accumulation, p = 2^((S * scale - lse) * log2 e) for
// each (row, key) whose query counts and sees the key, added to the lane's two columns of each n8 tile.
// After the last head the 8 lanes that share a column sum their parts in a fixed shuffle tree: one store
// per key, deterministic. Rows that do not count (query_mask, lse = -inf, past the last row) load no query
// and add nothing; keys at or past the row's largest visible end are never loaded (their mass is 0); with
// a block size the m16 steps start at the first query that sees the warp's first key.
//
// mma.m16n8k16 fragments (PTX ISA; lane = 4 g + t): A a0 = (row g, cols 2t, 2t+1), a1 = (g+8, 2t..),
// a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B b0 = (k = 2t, 2t+1; n = g), b1 = (k = 2t+8..; n = g);
// C c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, the same cols). Every fragment register is two
// consecutive elements of one query or key row: one 32-bit load.
//
// top: a second kernel, one CTA per row, scans the row's masses in the order of mass_before (a NaN first,
// then the larger value, then the lower index) and reduces in a fixed tree.
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "common/attention_mass.h"
#include "cuda/dtypes.cuh"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace dllm {
namespace {

constexpr int kWarps = 4;
constexpr int kWarpKeys = 16;                  // two n8 tiles
constexpr int kTileKeys = kWarps * kWarpKeys;  // keys per CTA
constexpr int kTopThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;

// Two consecutive 16-bit elements, or 0 where not ok (nothing is read then).
__device__ __forceinline__ uint32_t load2(const uint16_t* p, bool ok) {
  return ok ? *reinterpret_cast<const uint32_t*>(p) : 0u;
}

// Grid: batch * n_tiles CTAs of kWarps warps.
template <class Tr, int D>
__global__ void __launch_bounds__(32 * kWarps) mass_kernel(const DllmAttentionMassParams p, int64_t n_tiles) {
  constexpr int kKSteps = D / 16;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t b = blockIdx.x / n_tiles, tile = blockIdx.x % n_tiles;
  const int64_t group = p.n_heads / p.n_kv_heads, n_rows = p.n_queries * group;
  const int64_t j0 = tile * kTileKeys + warp * kWarpKeys;  // this warp's first key
  const int64_t kv = max_i64(0, min_i64(p.kv_len[b], p.s_max)), q_start = p.q_start[b];
  const int64_t hi = p.n_queries > 0 ? mass_visible_end(p.block_size, q_start, p.n_queries - 1, kv) : 0;
  float col[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // keys j0 + 8 nt + 2 t + c: this lane's rows' part
  if (j0 < hi) {
    const int64_t r_first = mass_first_query(p.block_size, q_start, j0) * group;
    const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0];
    for (int64_t h = 0; h < p.n_kv_heads; ++h) {
      const auto* k = static_cast<const uint16_t*>(p.k_cache) + b * p.k_stride[0] + h * p.k_stride[2];
      uint32_t kb[kKSteps][2][2];  // [k16 step][n8 tile][b0, b1]
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int64_t key = j0 + 8 * nt + g;
        const bool ok = key < hi;
        const uint16_t* row = k + (ok ? key : 0) * p.k_stride[1] + 2 * t;
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          kb[kk][nt][0] = load2(row + 16 * kk, ok);
          kb[kk][nt][1] = load2(row + 16 * kk + 8, ok);
        }
      }
      for (int64_t r0 = r_first; r0 < n_rows; r0 += 16) {
        const uint16_t* q_row[2];
        float lse[2];
        int64_t lim[2];  // 0 for a row that adds nothing
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int64_t r = r0 + g + 8 * hh;
          const bool ok = r < n_rows;
          const int64_t i = ok ? r / group : 0, head = h * group + (ok ? r % group : 0);
          lse[hh] = ok ? p.lse[b * p.lse_stride[0] + head * p.lse_stride[1] + i * p.lse_stride[2]] : 0.f;
          const bool counted =
              ok && lse[hh] != -INFINITY &&
              (p.query_mask == nullptr || p.query_mask[b * p.query_mask_stride[0] + i * p.query_mask_stride[1]]);
          lim[hh] = counted ? mass_visible_end(p.block_size, q_start, i, kv) : 0;
          q_row[hh] = q + i * p.q_stride[1] + head * p.q_stride[2] + 2 * t;
        }
        const bool read[2] = {lim[0] > 0, lim[1] > 0};
        float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < kKSteps; ++kk) {
          const uint32_t a[4] = {load2(q_row[0] + 16 * kk, read[0]), load2(q_row[1] + 16 * kk, read[1]),
                                 load2(q_row[0] + 16 * kk + 8, read[0]), load2(q_row[1] + 16 * kk + 8, read[1])};
          ptx::mma_16816<Tr::kBf16>(s[0], a, kb[kk][0]);
          ptx::mma_16816<Tr::kBf16>(s[1], a, kb[kk][1]);
        }
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int hh = e / 2;
            const float x = ptx::exp2_approx(fmaf(s[nt][e], p.scale, -lse[hh]) * kLog2e);
            if (j0 + 8 * nt + 2 * t + e % 2 < lim[hh]) col[nt][e % 2] += x;
          }
        }
      }
    }
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2) col[nt][c] += __shfl_xor_sync(kFullMask, col[nt][c], offset);
    }
  }
  if (g != 0) return;
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int64_t key = j0 + 8 * nt + 2 * t + c;
      if (key >= p.s_max) continue;
      const bool excluded =
          p.key_mask != nullptr && p.key_mask[b * p.key_mask_stride[0] + key * p.key_mask_stride[1]];
      p.mass[b * p.s_max + key] = excluded ? 0.f : col[nt][c];
    }
  }
}

// (value, index) of a and b: the one first in mass_before's order, kept in a.
__device__ __forceinline__ void keep_first(float& value, long long& index, float other, long long other_index) {
  if (mass_before(other, other_index, value, index)) value = other, index = other_index;
}

// Grid: batch CTAs of kTopThreads threads (after mass_kernel on the same stream).
__global__ void __launch_bounds__(kTopThreads) top_kernel(const DllmAttentionMassParams p) {
  __shared__ float values[kTopThreads / 32];
  __shared__ long long indices[kTopThreads / 32];
  const int64_t b = blockIdx.x;
  const float* mass = p.mass + b * p.s_max;
  float value = -INFINITY;
  long long index = LLONG_MAX;  // after every key: any mass replaces it
  for (int64_t j = threadIdx.x; j < p.s_max; j += kTopThreads) keep_first(value, index, mass[j], j);
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFullMask, value, offset);
    const long long other_index = __shfl_xor_sync(kFullMask, index, offset);
    keep_first(value, index, other, other_index);
  }
  if (threadIdx.x % 32 == 0) values[threadIdx.x / 32] = value, indices[threadIdx.x / 32] = index;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kTopThreads / 32; ++w) keep_first(value, index, values[w], indices[w]);
  p.top[b] = index != LLONG_MAX && (value > 0.f || value != value) ? index : -1;
}

template <class Tr, int D>
cudaError_t launch(const DllmAttentionMassParams& p, int64_t n_tiles, cudaStream_t stream) {
  mass_kernel<Tr, D><<<static_cast<unsigned>(p.batch * n_tiles), 32 * kWarps, 0, stream>>>(p, n_tiles);
  return cudaGetLastError();
}

// What the kernels take (the op's Python checks come first; this guards the raw entry point).
bool supported(const DllmAttentionMassParams& p) {
  if (p.dtype != DLLM_FLOAT16 && p.dtype != DLLM_BFLOAT16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch < 0 || p.n_queries < 0 || p.s_max < 0 || p.block_size < 0 || p.n_kv_heads <= 0 ||
      p.n_heads % p.n_kv_heads != 0)
    return false;
  const auto aligned = [](const void* ptr, const int64_t (&strides)[3]) {
    return reinterpret_cast<uintptr_t>(ptr) % 4 == 0 && strides[0] % 2 == 0 && strides[1] % 2 == 0 &&
           strides[2] % 2 == 0;
  };
  return aligned(p.q, p.q_stride) && aligned(p.k_cache, p.k_stride);
}

}  // namespace
}  // namespace dllm

extern "C" int dllm_attention_mass_cuda(const DllmAttentionMassParams* params, cudaStream_t stream) {
  using namespace dllm;
  const DllmAttentionMassParams& p = *params;
  if (!supported(p)) return cudaErrorInvalidValue;
  if (p.batch == 0) return cudaSuccess;
  const int64_t n_tiles = ceil_div(p.s_max, kTileKeys);
  if (p.batch > INT_MAX || p.batch * n_tiles > INT_MAX) return cudaErrorInvalidValue;
  if (n_tiles > 0) {
    const bool bf16 = p.dtype == DLLM_BFLOAT16;
    const cudaError_t err = p.head_dim == 64 ? (bf16 ? launch<BF16, 64>(p, n_tiles, stream)
                                                     : launch<F16, 64>(p, n_tiles, stream))
                                             : (bf16 ? launch<BF16, 128>(p, n_tiles, stream)
                                                     : launch<F16, 128>(p, n_tiles, stream));
    if (err != cudaSuccess) return err;
  }
  top_kernel<<<static_cast<unsigned>(p.batch), kTopThreads, 0, stream>>>(p);
  return cudaGetLastError();
}
