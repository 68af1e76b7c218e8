// block_attention on CUDA (csrc/common/block_attention.h): FlashAttention-2 on mma.sync tensor cores.
// Framework-free: raw pointers in, launches on the caller's stream, no host sync, no allocation.
// dllm_kernels/reference/block_attention.py is the readable statement of the op.
//
// Rows. For one (row b, KV head), the R = Sq * G query rows that read that KV head (query i, group head g,
// G = Hq / Hkv) are flattened as r = i * G + g and cut into tiles of 64 or 128: one CTA (4 or 8 warps,
// 16 rows each) owns a tile, so every K / V tile it loads serves all the query heads of the group (no K / V
// expansion) and an 8-token sub-block of a 28 / 4-head model still fills the tile. The grid walks the
// (row, KV head) pairs fastest and the query tiles from the last: under a block-causal mask the last tile
// sees the most keys, so the longest CTAs start first.
//
// Visible range. Row r at position p = q_start[b] + i sees keys j < lim(p) = kv_len[b], or with a block
// size min(kv_len[b], (p / block_size + 1) * block_size): a prefix of the cache, growing with r. A CTA
// visits keys [0, lim of its last row) only; tiles below the lim of its first row are visible to every row
// and run without a mask, the rest compare each key with its row's lim. kv_len is clamped to S_max.
// K / V rows at or past the CTA's range are zero-filled by cp.async, never read: a stale NaN there never
// meets a zero probability.
//
// Per KV tile (64 keys): cp.async brings the next tile into the other half of a double buffer while the
// warps compute S = Q K^T with mma.m16n8k16 (Q fragments held in registers for the whole loop, K fragments
// by ldmatrix), the online softmax in fp32 registers in base 2 (scale * log2(e) folded into one multiply;
// a row's max and sum over the 4 lanes that share it), P rounded to the input dtype in registers (the
// accumulator layout of two n8 tiles is the A layout of one k16 step) and O += P V with V fragments by
// ldmatrix.trans. Shared tiles are rows of 16-byte chunks XOR-swizzled by (row % 8): the 8 rows an
// ldmatrix reads at one logical chunk land in 8 distinct bank groups.
//
// mma.m16n8k16 fragments (PTX ISA; lane = 4 g + t): A a0 = (row g, cols 2t, 2t+1), a1 = (g+8, 2t..),
// a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B b0 = (k = 2t, 2t+1; n = g), b1 = (k = 2t+8..; n = g);
// C c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, the same cols). ldmatrix .x4: lanes 8j..8j+7
// address the rows of matrix j; lane 4g + t receives row g, elements 2t..2t+1 (.trans: elements (2t, g),
// (2t+1, g)).
//
// Split KV. When the tile CTAs cannot fill the GPU (an 8-32 token block over a long cache), grid.y splits
// each tile's visible range into equal whole-tile chunks; each split writes its normalised output and
// log2-sum-exp to an fp32 workspace and merge_kernel combines them in split order (weights
// 2^(lse_s - max lse)): deterministic. The split count comes from metadata only (CTAs vs SMs, S_max).
//
// Fused KV write. write_kv_kernel copies k_new / v_new into the caches at q_start[b] + i (positions outside
// [0, S_max) dropped), launched first on the same stream: stream order is the grid-wide barrier that makes
// every attention CTA see the new keys, with no host sync.
//
// Rows that see no key keep l = 0: out 0, lse -inf. A NaN query makes l NaN (fmaxf ignores NaN, so the
// running max stays finite and the NaN reaches l and acc): out and lse NaN, as the reference says.
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "common/block_attention.h"
#include "cuda/dtypes.cuh"
#include "cuda/launch.cuh"
#include "cuda/ptx.cuh"

namespace dllm {
namespace {

// A CTA has kWarps warps of 16 query rows (the instruction's m): 4 (64 rows, 2 CTAs per SM) for up to 64
// rows per (row, KV head), else 8 (128 rows, 1 CTA per SM: the register file) so that every K / V byte
// brought into shared memory serves twice the rows. Either way 8 warps per SM.
template <int kWarps>
constexpr int kBlockM = 16 * kWarps;
template <int kWarps>
constexpr int kCtasPerSm = kWarps == 4 ? 2 : 1;
constexpr int kBlockN = 64;  // keys per tile
constexpr int kWriteThreads = 128;
// A split should cover at least this many KV tiles: each adds R * D fp32 of workspace traffic.
constexpr int64_t kMinTilesPerSplit = 4;
constexpr int64_t kMaxSplits = 64;
constexpr int kMergeWarps = 4;  // rows per merge CTA, one warp each
constexpr int kDefaultSmem = 48 * 1024;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// Launch geometry, from metadata only (make_plan): shared by the workspace query and the launch.
struct Plan {
  int64_t group;    // query heads per KV head
  int64_t n_rows;   // query rows per (row, KV head): Sq * group
  int64_t n_tiles;  // kBlockM<warps> tiles of them
  int64_t n_bh;     // (row, KV head) pairs
  int64_t splits;   // KV splits per tile (1: no workspace, no merge)
  int warps;        // per CTA: 4 or 8
};

Plan make_plan(const DllmBlockAttentionParams& p, int sms) {
  Plan plan{};
  plan.group = p.n_heads / p.n_kv_heads;
  plan.n_rows = p.n_queries * plan.group;
  plan.warps = plan.n_rows > kBlockM<4> ? 8 : 4;
  plan.n_tiles = ceil_div(plan.n_rows, 16 * plan.warps);
  plan.n_bh = p.batch * p.n_kv_heads;
  const int64_t ctas = plan.n_tiles * plan.n_bh;
  const int64_t target = int64_t{plan.warps == 4 ? kCtasPerSm<4> : kCtasPerSm<8>} * sms;
  plan.splits = 1;
  if (p.num_splits > 0) {
    plan.splits = min_i64(p.num_splits, 65535);
  } else if (ctas > 0 && ctas < target) {
    const int64_t by_cache = ceil_div(p.s_max, kBlockN) / kMinTilesPerSplit;
    plan.splits = max_i64(1, min_i64(min_i64(target / ctas, by_cache), kMaxSplits));
  }
  return plan;
}

// Index of 16-byte chunk c of row `row` in a shared tile of D-wide rows, XOR-swizzled by row.
template <int D>
__device__ __forceinline__ int swizzle(int row, int c) {
  return row * (D / 8) + (c ^ (row & 7));
}

// The end of the keys that row r sees: kv, or with blocks the end of its query's block (rows past the last
// act as the last query). Written so that a huge block_size cannot overflow.
__device__ __forceinline__ int64_t visible_end(const DllmBlockAttentionParams& p, int64_t b, int64_t r,
                                               int64_t group, int64_t kv) {
  if (p.block_size == 0) return kv;
  const int64_t pos = int64_t{p.q_start[b]} + min_i64(r / group, p.n_queries - 1);
  if (pos < 0) return 0;
  const int64_t block_start = pos - pos % p.block_size;
  return kv - block_start <= p.block_size ? kv : block_start + p.block_size;
}

// Keys [start, start + kBlockN) of (b, KV head) into a K and a V tile; keys at or past `end` zero-filled.
template <int D, int kThreads>
__device__ __forceinline__ void load_kv_tile(const DllmBlockAttentionParams& p, int64_t b, int64_t kv_head,
                                             int64_t start, int64_t end, uint4* k_tile, uint4* v_tile) {
  constexpr int kChunks = D / 8;
  const auto* k = static_cast<const uint16_t*>(p.k_cache) + b * p.k_stride[0] + kv_head * p.k_stride[2];
  const auto* v = static_cast<const uint16_t*>(p.v_cache) + b * p.v_stride[0] + kv_head * p.v_stride[2];
  for (int i = threadIdx.x; i < kBlockN * kChunks; i += kThreads) {
    const int key = i / kChunks, c = i % kChunks;
    const int64_t j = start + key;
    const bool ok = j < end;
    const int64_t src = ok ? j : 0;
    ptx::cp_async16(k_tile + swizzle<D>(key, c), k + src * p.k_stride[1] + 8 * c, ok ? 16 : 0);
    ptx::cp_async16(v_tile + swizzle<D>(key, c), v + src * p.v_stride[1] + 8 * c, ok ? 16 : 0);
  }
}

// Grid: (n_tiles * n_bh, splits). Dynamic shared memory: the Q tile (later the output tile) and two K and
// two V tiles, kBlockM + 4 kBlockN rows of D 16-bit elements (80 / 96 KB at D = 128).
template <class Tr, int D, int kWarps>
__global__ void __launch_bounds__(32 * kWarps, kCtasPerSm<kWarps>)
    attention_kernel(const DllmBlockAttentionParams p, const Plan plan, float* __restrict__ ws_o,
                     float* __restrict__ ws_lse) {
  constexpr int kChunks = D / 8;     // 16-byte chunks per row; also the n8 tiles over D
  constexpr int kKSteps = D / 16;    // k16 steps over D (S = Q K^T)
  constexpr int kKeyTiles = kBlockN / 8;
  constexpr int kThreads = 32 * kWarps, kRows = 16 * kWarps;
  uint4* const q_tile = reinterpret_cast<uint4*>(ptx::dynamic_smem());
  uint4* const k_tiles = q_tile + kRows * kChunks;  // [2][kBlockN * kChunks]
  uint4* const v_tiles = k_tiles + 2 * kBlockN * kChunks;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const int64_t pid = blockIdx.x;
  const int64_t tile = plan.n_tiles - 1 - pid / plan.n_bh;  // last (longest) tiles first
  const int64_t bh = pid % plan.n_bh, b = bh / p.n_kv_heads, kv_head = bh % p.n_kv_heads;
  const int64_t row0 = tile * kRows;
  const int64_t kv = max_i64(0, min_i64(p.kv_len[b], p.s_max));
  const int64_t lim_min = visible_end(p, b, row0, plan.group, kv);
  const int64_t lim_max = visible_end(p, b, min_i64(row0 + kRows, plan.n_rows) - 1, plan.group, kv);
  int64_t lim[2];  // this lane's rows: 16 warp + g and + 8
#pragma unroll
  for (int h = 0; h < 2; ++h) lim[h] = visible_end(p, b, row0 + 16 * warp + g + 8 * h, plan.group, kv);
  int64_t lo = 0, hi = lim_max;
  if (plan.splits > 1) {  // whole tiles per split, so interior tiles stay interior
    const int64_t chunk = ceil_div(ceil_div(lim_max, kBlockN), plan.splits) * kBlockN;
    lo = blockIdx.y * chunk;
    hi = min_i64(lo + chunk, lim_max);
  }
  const int64_t full_end = lo + max_i64(0, min_i64(hi, lim_min) - lo) / kBlockN * kBlockN;
  const int64_t n_kv_tiles = hi > lo ? ceil_div(hi - lo, kBlockN) : 0;

  // Q tile (zeros past the last row) and the first K / V tile, in two cp.async groups.
  const auto* q = static_cast<const uint16_t*>(p.q) + b * p.q_stride[0];
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const int64_t r = row0 + row;
    const bool ok = r < plan.n_rows;
    const int64_t qi = ok ? r / plan.group : 0, head = kv_head * plan.group + (ok ? r % plan.group : 0);
    ptx::cp_async16(q_tile + swizzle<D>(row, c), q + qi * p.q_stride[1] + head * p.q_stride[2] + 8 * c,
                    ok ? 16 : 0);
  }
  ptx::cp_async_commit();
  if (n_kv_tiles > 0) load_kv_tile<D, kThreads>(p, b, kv_head, lo, hi, k_tiles, v_tiles);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[kKSteps][4];
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const int row = 16 * warp + lane % 8 + 8 * (lane / 8 % 2);
    ptx::ldmatrix_x4<false>(qf[kk], q_tile + swizzle<D>(row, 2 * kk + lane / 16));
  }

  float acc[kChunks][4];
#pragma unroll
  for (int dt = 0; dt < kChunks; ++dt) acc[dt][0] = acc[dt][1] = acc[dt][2] = acc[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's part of the row sum
  const float scale_log2 = p.scale * kLog2e;

  for (int64_t it = 0; it < n_kv_tiles; ++it) {
    const int64_t start = lo + it * kBlockN;
    if (it + 1 < n_kv_tiles) {
      const int next = static_cast<int>((it + 1) & 1) * kBlockN * kChunks;
      load_kv_tile<D, kThreads>(p, b, kv_head, start + kBlockN, hi, k_tiles + next, v_tiles + next);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // all but the newest group: tile `it` has landed
    __syncthreads();
    const uint4* k_tile = k_tiles + (it & 1) * kBlockN * kChunks;
    const uint4* v_tile = v_tiles + (it & 1) * kBlockN * kChunks;

    float s[kKeyTiles][4];
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kp = 0; kp < kKSteps / 2; ++kp) {
        uint32_t kb[4];  // k16 steps 2 kp and 2 kp + 1 of keys 8 nt ..
        ptx::ldmatrix_x4<false>(kb, k_tile + swizzle<D>(8 * nt + lane % 8, 4 * kp + lane / 8));
        ptx::mma_16816<Tr::kBf16>(s[nt], qf[2 * kp], {kb[0], kb[1]});
        ptx::mma_16816<Tr::kBf16>(s[nt], qf[2 * kp + 1], {kb[2], kb[3]});
      }
    }

    const bool masked = start + kBlockN > full_end;
    int visible[2];  // keys of this tile the lane's rows see (32-bit compares in the loop below)
#pragma unroll
    for (int h = 0; h < 2; ++h) visible[h] = static_cast<int>(max_i64(0, min_i64(lim[h] - start, kBlockN)));
    float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2;
        float x = s[nt][i] * scale_log2;
        if (masked && 8 * nt + 2 * t + i % 2 >= visible[h]) x = -INFINITY;
        s[nt][i] = x;
        row_max[h] = fmaxf(row_max[h], x);
      }
    }
    float m_use[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(kFullMask, row_max[h], 1));
      row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(kFullMask, row_max[h], 2));
      const float m_new = fmaxf(m[h], row_max[h]);
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;  // no visible key yet: exp2(-inf) = 0, no NaN
      const float alpha = ptx::exp2_approx(m[h] - m_use[h]);
      m[h] = m_new;
      l[h] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kChunks; ++dt) {
        acc[dt][2 * h] *= alpha;
        acc[dt][2 * h + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[nt][i] = ptx::exp2_approx(s[nt][i] - m_use[i / 2]);
        l[i / 2] += s[nt][i];
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t pa[4] = {pack<Tr>(s[2 * kk][0], s[2 * kk][1]), pack<Tr>(s[2 * kk][2], s[2 * kk][3]),
                              pack<Tr>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack<Tr>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kChunks / 2; ++dp) {
        uint32_t vb[4];  // d tiles 2 dp and 2 dp + 1 of keys 16 kk ..
        ptx::ldmatrix_x4<true>(vb, v_tile + swizzle<D>(16 * kk + lane % 8 + 8 * (lane / 8 % 2), 2 * dp + lane / 16));
        ptx::mma_16816<Tr::kBf16>(acc[2 * dp], pa, {vb[0], vb[1]});
        ptx::mma_16816<Tr::kBf16>(acc[2 * dp + 1], pa, {vb[2], vb[3]});
      }
    }
    __syncthreads();  // every warp is done with this buffer before the next tile's copy overwrites it
  }

  float inv[2], lse2[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(kFullMask, l[h], 1);
    l[h] += __shfl_xor_sync(kFullMask, l[h], 2);
    // l >= 1 once the row saw a key (its max contributes 2^0); NaN from a NaN query stays NaN in both.
    const bool unseen = l[h] == 0.f;
    inv[h] = 1.f / (unseen ? 1.f : l[h]);
    lse2[h] = unseen ? -INFINITY : m[h] + log2f(l[h]);
  }

  if (plan.splits > 1) {  // every split writes every row (an empty one: out 0, lse -inf)
    const int64_t item0 = (int64_t{blockIdx.y} * plan.n_bh + bh) * plan.n_rows;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = row0 + 16 * warp + g + 8 * h;
      if (r >= plan.n_rows) continue;
      float* dst = ws_o + (item0 + r) * D + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kChunks; ++dt)
        *reinterpret_cast<float2*>(dst + 8 * dt) = make_float2(acc[dt][2 * h] * inv[h], acc[dt][2 * h + 1] * inv[h]);
      if (t == 0) ws_lse[item0 + r] = lse2[h];
    }
    return;
  }

  // The output tile goes through shared memory (the Q tile's place) for 16-byte stores.
  __syncthreads();  // every warp has read its Q fragments
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = 16 * warp + g + 8 * h;
#pragma unroll
    for (int dt = 0; dt < kChunks; ++dt)
      reinterpret_cast<uint32_t*>(q_tile + swizzle<D>(row, dt))[t] =
          pack<Tr>(acc[dt][2 * h] * inv[h], acc[dt][2 * h + 1] * inv[h]);
    const int64_t r = row0 + row;
    if (p.lse != nullptr && t == 0 && r < plan.n_rows) {
      const int64_t head = kv_head * plan.group + r % plan.group;
      p.lse[(b * p.n_heads + head) * p.n_queries + r / plan.group] = lse2[h] * kLn2;
    }
  }
  __syncthreads();
  auto* out = static_cast<uint4*>(p.out);
  for (int i = threadIdx.x; i < kRows * kChunks; i += kThreads) {
    const int row = i / kChunks, c = i % kChunks;
    const int64_t r = row0 + row;
    if (r >= plan.n_rows) continue;
    const int64_t head = kv_head * plan.group + r % plan.group;
    out[((b * p.n_queries + r / plan.group) * p.n_heads + head) * kChunks + c] = q_tile[swizzle<D>(row, c)];
  }
}

// One row of merge_kernel, by one warp.
template <class Tr, int D>
__device__ __forceinline__ void merge_row(const DllmBlockAttentionParams& p, const Plan& plan,
                                          const float* __restrict__ ws_o, const float* __restrict__ ws_lse,
                                          int64_t bh, int64_t r) {
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x % 32;
  float top = -INFINITY;
  for (int64_t s = 0; s < plan.splits; ++s) top = fmaxf(top, ws_lse[(s * plan.n_bh + bh) * plan.n_rows + r]);
  const float top_use = top == -INFINITY ? 0.f : top;
  float acc[kPerLane] = {}, den = 0.f;
  for (int64_t s = 0; s < plan.splits; ++s) {
    const int64_t item = (s * plan.n_bh + bh) * plan.n_rows + r;
    const float w = ptx::exp2_approx(ws_lse[item] - top_use);
    den += w;
    const float* part = ws_o + item * D + lane * kPerLane;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] += w * part[e];
  }
  const bool unseen = den == 0.f;  // as in attention_kernel: NaN stays NaN
  const float inv = 1.f / (unseen ? 1.f : den);
  const int64_t b = bh / p.n_kv_heads, head = bh % p.n_kv_heads * plan.group + r % plan.group;
  const int64_t qi = r / plan.group;
  auto* out = static_cast<uint32_t*>(p.out) + (((b * p.n_queries + qi) * p.n_heads + head) * D + lane * kPerLane) / 2;
#pragma unroll
  for (int e = 0; e < kPerLane; e += 2) out[e / 2] = pack<Tr>(acc[e] * inv, acc[e + 1] * inv);
  if (p.lse != nullptr && lane == 0)
    p.lse[(b * p.n_heads + head) * p.n_queries + qi] = unseen ? -INFINITY : (top + log2f(den)) * kLn2;
}

// out = sum_s w_s out_s / sum_s w_s, w_s = 2^(lse_s - max lse), in split order. Grid: (n_bh, row blocks
// strided past 65535); one warp per row, D / 32 columns per lane.
template <class Tr, int D>
__global__ void __launch_bounds__(32 * kMergeWarps)
    merge_kernel(const DllmBlockAttentionParams p, const Plan plan, const float* __restrict__ ws_o,
                 const float* __restrict__ ws_lse) {
  const int64_t bh = blockIdx.x;
  for (int64_t r = int64_t{blockIdx.y} * kMergeWarps + threadIdx.x / 32; r < plan.n_rows;
       r += int64_t{gridDim.y} * kMergeWarps)
    merge_row<Tr, D>(p, plan, ws_o, ws_lse, bh, r);
}
// cache[b, q_start[b] + i, h] = new[b, i, h], 16 bytes per thread. Grid: (position blocks, Hkv, batch
// (strided past 65535)).
template <int D>
__global__ void __launch_bounds__(kWriteThreads) write_kv_kernel(const DllmBlockAttentionParams p) {
  constexpr int kChunks = D / 8, kPositions = kWriteThreads / kChunks;
  const int64_t i = int64_t{blockIdx.x} * kPositions + threadIdx.x / kChunks, h = blockIdx.y;
  const int c = threadIdx.x % kChunks;
  if (i >= p.n_queries) return;
  for (int64_t b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const int64_t pos = int64_t{p.q_start[b]} + i;
    if (pos < 0 || pos >= p.s_max) continue;
    const auto* k_new = static_cast<const uint16_t*>(p.k_new);
    const auto* v_new = static_cast<const uint16_t*>(p.v_new);
    auto* k = static_cast<uint16_t*>(p.k_cache);
    auto* v = static_cast<uint16_t*>(p.v_cache);
    *reinterpret_cast<uint4*>(k + b * p.k_stride[0] + pos * p.k_stride[1] + h * p.k_stride[2] + 8 * c) =
        *reinterpret_cast<const uint4*>(k_new + b * p.k_new_stride[0] + i * p.k_new_stride[1] +
                                        h * p.k_new_stride[2] + 8 * c);
    *reinterpret_cast<uint4*>(v + b * p.v_stride[0] + pos * p.v_stride[1] + h * p.v_stride[2] + 8 * c) =
        *reinterpret_cast<const uint4*>(v_new + b * p.v_new_stride[0] + i * p.v_new_stride[1] +
                                        h * p.v_new_stride[2] + 8 * c);
  }
}

template <class Tr, int D, int kWarps>
cudaError_t launch_attention(const DllmBlockAttentionParams& p, const Plan& plan, float* ws_o, float* ws_lse,
                             cudaStream_t stream) {
  constexpr int kSmem = (kBlockM<kWarps> + 4 * kBlockN) * D * 2;
  auto* kernel = attention_kernel<Tr, D, kWarps>;
  if (kSmem > kDefaultSmem) {  // the opt-in, once per device: a driver call kept off the per-step path
    static std::atomic<bool> opted_in[kMaxDevices];
    int dev = 0;
    if (const cudaError_t err = cudaGetDevice(&dev)) return err;
    if (dev >= kMaxDevices || !opted_in[dev].load(std::memory_order_acquire)) {
      if (const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem))
        return err;
      if (dev < kMaxDevices) opted_in[dev].store(true, std::memory_order_release);
    }
  }
  const dim3 grid(static_cast<unsigned>(plan.n_tiles * plan.n_bh), static_cast<unsigned>(plan.splits));
  kernel<<<grid, 32 * kWarps, kSmem, stream>>>(p, plan, ws_o, ws_lse);
  return cudaGetLastError();
}

template <class Tr, int D>
cudaError_t launch(const DllmBlockAttentionParams& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  if (p.k_new != nullptr && p.n_queries > 0 && p.batch > 0) {
    constexpr int kPositions = kWriteThreads / (D / 8);
    const dim3 grid(static_cast<unsigned>(ceil_div(p.n_queries, kPositions)), static_cast<unsigned>(p.n_kv_heads),
                    static_cast<unsigned>(min_i64(p.batch, 65535)));
    write_kv_kernel<D><<<grid, kWriteThreads, 0, stream>>>(p);
    if (const cudaError_t err = cudaGetLastError()) return err;
  }
  if (plan.n_rows == 0 || plan.n_bh == 0) return cudaSuccess;
  float* ws_o = plan.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  float* ws_lse = plan.splits > 1 ? ws_o + plan.splits * plan.n_bh * plan.n_rows * D : nullptr;
  const cudaError_t err = plan.warps == 8 ? launch_attention<Tr, D, 8>(p, plan, ws_o, ws_lse, stream)
                                          : launch_attention<Tr, D, 4>(p, plan, ws_o, ws_lse, stream);
  if (err != cudaSuccess) return err;
  if (plan.splits == 1) return cudaSuccess;
  const dim3 merge_grid(static_cast<unsigned>(plan.n_bh),
                        static_cast<unsigned>(min_i64(ceil_div(plan.n_rows, kMergeWarps), 65535)));
  merge_kernel<Tr, D><<<merge_grid, 32 * kMergeWarps, 0, stream>>>(p, plan, ws_o, ws_lse);
  return cudaGetLastError();
}

bool aligned16(const void* ptr, const int64_t (&strides)[3]) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && strides[0] % 8 == 0 && strides[1] % 8 == 0 &&
         strides[2] % 8 == 0;
}

// What the kernels take (the op's Python checks come first; this guards the raw entry point).
bool supported(const DllmBlockAttentionParams& p) {
  if (p.dtype != DLLM_FLOAT16 && p.dtype != DLLM_BFLOAT16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  if (p.batch < 0 || p.n_queries < 0 || p.s_max < 0 || p.block_size < 0 || p.n_kv_heads <= 0 ||
      p.n_heads % p.n_kv_heads != 0 || p.n_kv_heads > 65535)
    return false;
  if (!aligned16(p.q, p.q_stride) || !aligned16(p.k_cache, p.k_stride) || !aligned16(p.v_cache, p.v_stride) ||
      reinterpret_cast<uintptr_t>(p.out) % 16 != 0)
    return false;
  return p.k_new == nullptr ||
         (p.v_new != nullptr && aligned16(p.k_new, p.k_new_stride) && aligned16(p.v_new, p.v_new_stride));
}

}  // namespace
}  // namespace dllm

extern "C" size_t dllm_block_attention_cuda_workspace(const DllmBlockAttentionParams* params) {
  using namespace dllm;
  const DllmBlockAttentionParams& p = *params;
  int sms = 0;
  if (!supported(p) || sm_count(&sms) != cudaSuccess) return 0;
  const Plan plan = make_plan(p, sms);
  if (plan.splits == 1) return 0;
  return static_cast<size_t>(plan.splits * plan.n_bh * plan.n_rows * (p.head_dim + 1)) * sizeof(float);
}

extern "C" int dllm_block_attention_cuda(const DllmBlockAttentionParams* params, void* workspace,
                                         cudaStream_t stream) {
  using namespace dllm;
  const DllmBlockAttentionParams& p = *params;
  if (!supported(p)) return cudaErrorInvalidValue;
  int sms = 0;
  if (const cudaError_t err = sm_count(&sms)) return err;
  const Plan plan = make_plan(p, sms);
  if (plan.n_tiles * plan.n_bh > INT_MAX) return cudaErrorInvalidValue;
  if (plan.splits > 1 && plan.n_rows > 0 && plan.n_bh > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  const bool bf16 = p.dtype == DLLM_BFLOAT16;
  if (p.head_dim == 64) return bf16 ? launch<BF16, 64>(p, plan, workspace, stream) : launch<F16, 64>(p, plan, workspace, stream);
  return bf16 ? launch<BF16, 128>(p, plan, workspace, stream) : launch<F16, 128>(p, plan, workspace, stream);
}
