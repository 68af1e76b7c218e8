// attention_mass on the CPU (csrc/common/attention_mass.h): OpenMP over (row, 64-key tile).
//
// The counted queries are first converted to fp32 once, grouped by (row, KV head) as the flattened rows
// r = i * G + g of block_attention (uncounted queries and queries whose lse is -inf are left out: they are
// never read). A work item is a row's tile of 64 keys: per KV head its keys are transposed to fp32
// [D][64] (in L1), then every listed query row that sees the tile takes 64 dot products as 4 vectors of
// broadcast FMAs, exp2(s * scale * log2e - lse * log2e) masked past its visible end, added to the tile's 64
// fp32 sums in registers. One store per key, sums in a fixed order: independent of the thread count.
// Keys at or past the row's largest visible end are never read. top: one scan per row afterwards.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "common/attention_mass.h"
#include "cpu/simd.h"

namespace dllm {
namespace {

using simd::kLanes;
using simd::vfloat;
using simd::vint;

constexpr int64_t kTile = 64;  // keys per work item
constexpr int kVecs = kTile / kLanes;
constexpr float kLog2e = 1.4426950408889634f;
// Below this many multiply-adds a fork / join costs more than it saves.
constexpr int64_t kMinParallel = int64_t{1} << 18;

struct Row {
  int64_t b, i, head;  // where its query is
  float bias;          // lse * log2(e)
  int64_t lim;         // the end of its visible keys
};

struct Job {
  const DllmAttentionMassParams& p;
  const float* queries;      // fp32 [listed rows][D]
  const Row* rows;           // listed rows of (b, kv head) at [row_begin[b * Hkv + h], row_begin[... + 1])
  const int64_t* row_begin;  // [B * Hkv + 1]
  float c;                   // scale * log2(e)
};

int64_t clamped_kv(const DllmAttentionMassParams& p, int64_t b) {
  return std::max<int64_t>(0, std::min<int64_t>(p.kv_len[b], p.s_max));
}

// Keys [j0, j0 + n) of (b, kv head) as fp32 kt[d * kTile + j]; the rest of the tile zero.
template <class T>
DLLM_SIMD_INLINE void load_keys(const DllmAttentionMassParams& p, int64_t b, int64_t h, int64_t j0, int64_t n,
                                float* kt) {
  const T* k = static_cast<const T*>(p.k_cache) + b * p.k_stride[0] + h * p.k_stride[2];
  for (int64_t j = 0; j < kTile; ++j) {
    const T* key = k + (j0 + j) * p.k_stride[1];
    for (int64_t d = 0; d < p.head_dim; ++d) kt[d * kTile + j] = j < n ? simd::to_float(key[d]) : 0.f;
  }
}

template <class T>
DLLM_SIMD_INLINE void tile_typed(const Job& job, int64_t b, int64_t tile, float* kt) {
  const DllmAttentionMassParams& p = job.p;
  const int64_t j0 = tile * kTile, kv = clamped_kv(p, b);
  const int64_t hi = p.n_queries > 0 ? mass_visible_end(p.block_size, p.q_start[b], p.n_queries - 1, kv) : 0;
  const int64_t n = std::min(kTile, hi - j0);
  vfloat acc[kVecs] = {};
  vint lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = i;
  for (int64_t h = 0; n > 0 && h < p.n_kv_heads; ++h) {
    const int64_t begin = job.row_begin[b * p.n_kv_heads + h], end = job.row_begin[b * p.n_kv_heads + h + 1];
    if (begin == end) continue;
    load_keys<T>(p, b, h, j0, n, kt);
    for (int64_t r = begin; r < end; ++r) {
      const Row& row = job.rows[r];
      if (row.lim <= j0) continue;
      const float* q = job.queries + r * p.head_dim;
      vfloat s[kVecs] = {};
      for (int64_t d = 0; d < p.head_dim; ++d) {
        const vfloat x = simd::splat(q[d]);
        for (int v = 0; v < kVecs; ++v) s[v] += x * simd::load(kt + d * kTile + v * kLanes);
      }
      const int64_t visible = std::min(row.lim - j0, kTile);
      for (int v = 0; v < kVecs; ++v) {
        vfloat x = s[v] * job.c - row.bias;
        x = simd::select(x > 128.f, simd::splat(128.f), x);  // 2^128 = inf, as exp would overflow (NaN stays)
        acc[v] += simd::select(lane + v * kLanes < static_cast<int>(visible), simd::exp2(x), vfloat{});
      }
    }
  }
  float* mass = p.mass + b * p.s_max;
  for (int64_t j = 0; j < kTile && j0 + j < p.s_max; ++j) {
    const bool excluded = p.key_mask != nullptr && p.key_mask[b * p.key_mask_stride[0] + (j0 + j) * p.key_mask_stride[1]];
    mass[j0 + j] = excluded ? 0.f : acc[j / kLanes][j % kLanes];
  }
}

// One work item, compiled once per ISA (no lambdas here: they would be compiled for the baseline ISA only).
DLLM_CPU_MULTIVERSION
void mass_tile(const Job& job, int64_t b, int64_t tile, float* kt) {
  switch (job.p.dtype) {
    case DLLM_FLOAT32:
      return tile_typed<float>(job, b, tile, kt);
    case DLLM_FLOAT16:
      return tile_typed<_Float16>(job, b, tile, kt);
    default:
      return tile_typed<simd::bf16>(job, b, tile, kt);
  }
}

template <class T>
void convert_query(const DllmAttentionMassParams& p, int64_t b, int64_t i, int64_t head, float* dst) {
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + i * p.q_stride[1] + head * p.q_stride[2];
  for (int64_t d = 0; d < p.head_dim; ++d) dst[d] = simd::to_float(q[d]);
}

void convert(const DllmAttentionMassParams& p, int64_t b, int64_t i, int64_t head, float* dst) {
  switch (p.dtype) {
    case DLLM_FLOAT32:
      return convert_query<float>(p, b, i, head, dst);
    case DLLM_FLOAT16:
      return convert_query<_Float16>(p, b, i, head, dst);
    default:
      return convert_query<simd::bf16>(p, b, i, head, dst);
  }
}

void row_top(const DllmAttentionMassParams& p, int64_t b) {
  const float* mass = p.mass + b * p.s_max;
  float best = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  for (int64_t j = 0; j < p.s_max; ++j) {
    if (index < 0 || mass_before(mass[j], j, best, index)) best = mass[j], index = j;
  }
  p.top[b] = index >= 0 && (best > 0.f || best != best) ? index : -1;
}

}  // namespace
}  // namespace dllm

extern "C" void dllm_attention_mass_cpu(const DllmAttentionMassParams* params, int num_threads) {
  using namespace dllm;
  const DllmAttentionMassParams& p = *params;
  if (p.batch <= 0) return;
  const int64_t group = p.n_heads / p.n_kv_heads;
  // The listed rows: counted, lse not -inf, in the order r = i * G + g per (b, kv head).
  std::vector<Row> rows;
  std::vector<int64_t> row_begin(static_cast<size_t>(p.batch * p.n_kv_heads + 1), 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t kv = clamped_kv(p, b);
    for (int64_t h = 0; h < p.n_kv_heads; ++h) {
      row_begin[b * p.n_kv_heads + h] = static_cast<int64_t>(rows.size());
      for (int64_t i = 0; i < p.n_queries; ++i) {
        if (p.query_mask != nullptr && !p.query_mask[b * p.query_mask_stride[0] + i * p.query_mask_stride[1]]) continue;
        const int64_t lim = mass_visible_end(p.block_size, p.q_start[b], i, kv);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t head = h * group + g;
          const float lse = p.lse[b * p.lse_stride[0] + head * p.lse_stride[1] + i * p.lse_stride[2]];
          if (lse == -std::numeric_limits<float>::infinity() || lim <= 0) continue;
          rows.push_back(Row{b, i, head, lse * kLog2e, lim});
        }
      }
    }
  }
  row_begin.back() = static_cast<int64_t>(rows.size());
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  const std::unique_ptr<float[]> queries(new float[n_rows * p.head_dim + 1]);
  const Job job{p, queries.get(), rows.data(), row_begin.data(), p.scale * kLog2e};
  const int64_t n_tiles = (p.s_max + kTile - 1) / kTile;
  const int64_t work = n_rows * std::max<int64_t>(p.s_max, 1) * p.head_dim;
  const int threads = work < kMinParallel ? 1 : num_threads;

#pragma omp parallel num_threads(threads) if (threads > 1)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) {
      const Row& row = rows[r];
      convert(p, row.b, row.i, row.head, queries.get() + r * p.head_dim);
    }
    const std::unique_ptr<float[]> kt(new float[kTile * p.head_dim]);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < p.batch * n_tiles; ++item) mass_tile(job, item / n_tiles, item % n_tiles, kt.get());
#pragma omp for schedule(static)
    for (int64_t b = 0; b < p.batch; ++b) row_top(p, b);
  }
}
