// block_attention's bindings: the cuda backend's thin call of csrc/cuda/block_attention.cu, and the cpu
// backend, chunked ATen: every run of queries that sees the same key prefix is one call of torch's CPU flash
// kernel over exactly that prefix, so invisible key blocks are never touched and no mask is built; the GQA
// group is folded into the query axis, so each KV head is read once for all its query heads. Registered for
// the CPU and CUDA dispatch keys like the other ops (fast_path.h).
#include <algorithm>
#include <cmath>
#include <limits>

#include "common/block_attention.h"
#include "torch/bindings.h"
#include "torch/fast_path.h"

#ifdef DLLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace dllm::bindings {
namespace {

using at::Tensor;

constexpr const char* kOp = "block_attention";

#ifdef DLLM_WITH_CUDA
// The CUDA kernel (csrc/cuda/block_attention.cu; Python has checked the arguments and that the kernel takes
// them: fp16 / bf16, D 64 or 128, 16-byte aligned rows). No host sync: q_start / kv_len stay on the device.
// num_splits > 0 forces the KV split count (tests); 0 lets the launcher choose.
std::tuple<Tensor, Tensor> run_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                                    const Tensor& q_start, const Tensor& kv_len, const std::optional<Tensor>& k_new,
                                    const std::optional<Tensor>& v_new, int64_t block_size,
                                    std::optional<double> scale, bool return_lse, int64_t num_splits) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t head_dim = q.size(3);
  const Tensor out = at::empty(q.sizes(), q.options());
  const Tensor lse = at::empty({return_lse ? q.size(0) : 0, return_lse ? q.size(2) : 0, return_lse ? q.size(1) : 0},
                               q.options().dtype(at::kFloat));
  const Tensor starts = q_start.contiguous(), lengths = kv_len.contiguous();
  const auto strides = [](const std::optional<Tensor>& t, int64_t (&out)[3]) {
    for (int i = 0; i < 3; ++i) out[i] = t ? t->stride(i) : 0;
  };
  DllmBlockAttentionParams p{};
  p.q = q.data_ptr();
  strides(q, p.q_stride);
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  strides(k_cache, p.k_stride);
  strides(v_cache, p.v_stride);
  p.k_new = k_new ? k_new->data_ptr() : nullptr;
  p.v_new = v_new ? v_new->data_ptr() : nullptr;
  strides(k_new, p.k_new_stride);
  strides(v_new, p.v_new_stride);
  p.q_start = starts.data_ptr<int32_t>();
  p.kv_len = lengths.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.batch = q.size(0);
  p.n_queries = q.size(1);
  p.s_max = k_cache.size(1);
  p.n_heads = q.size(2);
  p.n_kv_heads = k_cache.size(2);
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim)));
  p.dtype = dtype_code(q, kOp);
  p.num_splits = static_cast<int>(std::clamp<int64_t>(num_splits, 0, 65535));
  const size_t bytes = dllm_block_attention_cuda_workspace(&p);
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  const int err = dllm_block_attention_cuda(&p, bytes ? workspace.data_ptr() : nullptr,
                                            c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::block_attention: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {out, return_lse ? lse : lse.view({0})};
}
#endif

// The kernel (arguments and values checked: by Python, or by accepts below). q_start / kv_len are read on
// the host: this backend runs CPU tensors only.
std::tuple<Tensor, Tensor> run(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& q_start,
                               const Tensor& kv_len, const std::optional<Tensor>& k_new,
                               const std::optional<Tensor>& v_new, int64_t block_size, std::optional<double> scale,
                               bool return_lse) {
  TORCH_CHECK(q.is_cpu(), "dllm::block_attention: internal: the cpu backend runs CPU tensors");
  const int64_t n_rows = q.size(0), n_queries = q.size(1), n_heads = q.size(2), head_dim = q.size(3);
  const int64_t n_kv_heads = k_cache.size(2), group = n_heads / n_kv_heads;
  const Tensor starts = q_start.contiguous(), lengths = kv_len.contiguous();
  const int32_t* start_of = starts.data_ptr<int32_t>();
  const int32_t* length_of = lengths.data_ptr<int32_t>();
  if (k_new) {
    for (int64_t b = 0; b < n_rows; ++b) {
      k_cache[b].narrow(0, start_of[b], n_queries).copy_((*k_new)[b]);
      v_cache[b].narrow(0, start_of[b], n_queries).copy_((*v_new)[b]);
    }
  }
  // Queries that see no key keep out 0 and lse -inf: filled only when some row has such queries.
  const Tensor out = at::empty({n_rows, n_queries, n_heads, head_dim}, q.options());
  const Tensor lse = at::empty({return_lse ? n_rows : 0, n_heads, n_queries}, q.options().dtype(at::kFloat));
  bool all_seen = true;
  for (int64_t b = 0; b < n_rows && all_seen; ++b) {
    const int64_t start = start_of[b], length = length_of[b];
    // With blocks, the first query sees keys up to the end of its block (or kv_len): all see one if it does.
    all_seen = block_size > 0 ? std::min<int64_t>(length, (start / block_size + 1) * block_size) > 0 : length > 0;
  }
  if (!all_seen) {
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
  }
  for (int64_t b = 0; b < n_rows; ++b) {
    const Tensor queries = q[b].unflatten(1, {n_kv_heads, group}).permute({1, 0, 2, 3});  // [Hkv, Sq, G, D]
    const Tensor keys = k_cache[b].transpose(0, 1), values = v_cache[b].transpose(0, 1);  // [Hkv, S, D]
    const int64_t start = start_of[b], length = length_of[b];
    // Runs of queries that see the same keys: one run without blocks; else one per key block.
    const int64_t first_block = block_size > 0 ? start / block_size : 0;
    const int64_t last_block = block_size > 0 ? (start + n_queries - 1) / block_size : 0;
    for (int64_t block = first_block; block <= last_block; ++block) {
      const int64_t i0 = block_size > 0 ? std::max<int64_t>(0, block * block_size - start) : 0;
      const int64_t i1 = block_size > 0 ? std::min(n_queries, (block + 1) * block_size - start) : n_queries;
      const int64_t end = block_size > 0 ? std::min(length, (block + 1) * block_size) : length;
      if (end <= 0 || i1 <= i0) continue;
      const int64_t n = i1 - i0;
      const Tensor run_queries = queries.narrow(1, i0, n).reshape({1, n_kv_heads, n * group, head_dim});
      const auto [o, run_lse] = at::_scaled_dot_product_flash_attention_for_cpu(
          run_queries, keys.narrow(1, 0, end).unsqueeze(0), values.narrow(1, 0, end).unsqueeze(0), 0.0, false,
          std::nullopt, scale);
      out[b].narrow(0, i0, n).copy_(o[0].unflatten(1, {n, group}).permute({1, 0, 2, 3}).flatten(1, 2));
      if (return_lse)
        lse[b].narrow(1, i0, n).copy_(run_lse[0].unflatten(1, {n, group}).permute({0, 2, 1}).flatten(0, 1));
    }
  }
  return {out, return_lse ? lse : lse.view({0})};
}

bool is_4d(const Tensor& t, const Tensor& q) {
  return t.dim() == 4 && t.scalar_type() == q.scalar_type() && t.device() == q.device() &&
         (t.stride(3) == 1 || t.size(3) <= 1);
}

// What the CUDA kernel takes (ops/block_attention.py _cuda_supports says the same): fp16 / bf16, D 64 or
// 128, 16-byte aligned rows. Always false without CUDA.
bool cuda_takes(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const std::optional<Tensor>& k_new,
                const std::optional<Tensor>& v_new) {
#ifdef DLLM_WITH_CUDA
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if ((q.size(3) != 64 && q.size(3) != 128) || k_cache.size(2) > 65535) return false;
  const auto aligned = [](const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 &&
           t.stride(2) % 8 == 0;
  };
  return aligned(q) && aligned(k_cache) && aligned(v_cache) && (!k_new || (aligned(*k_new) && aligned(*v_new)));
#else
  (void)q, (void)k_cache, (void)v_cache, (void)k_new, (void)v_new;
  return false;
#endif
}

bool is_index(const Tensor& t, const Tensor& q) {
  return t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == q.size(0) && t.device() == q.device();
}

// A call the Python checks accept (a subset of them is enough), with, on the CPU, the value checks of q_start
// and kv_len (free there). On CUDA, Python checks no values either (they would need a host sync), and the
// call must be one the CUDA kernel takes, so that the automatic choice would give it to this kernel too.
bool accepts(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& q_start,
             const Tensor& kv_len, const std::optional<Tensor>& k_new, const std::optional<Tensor>& v_new,
             int64_t block_size, std::optional<double> scale) {
  if (!is_float(q) || !is_4d(q, q) || !is_4d(k_cache, q) || !is_4d(v_cache, q)) return false;
  const int64_t n_heads = q.size(2), n_kv_heads = k_cache.size(2), s_max = k_cache.size(1);
  if (k_cache.sizes() != v_cache.sizes() || k_cache.size(0) != q.size(0) || k_cache.size(3) != q.size(3) ||
      n_heads == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 || q.size(3) == 0)
    return false;
  if (!is_index(q_start, q) || !is_index(kv_len, q) || k_new.has_value() != v_new.has_value()) return false;
  if (block_size < 0 || (scale && !std::isfinite(*scale))) return false;
  const auto new_shape = std::vector<int64_t>{q.size(0), q.size(1), n_kv_heads, q.size(3)};
  if (k_new && (!is_4d(*k_new, q) || !is_4d(*v_new, q) || k_new->sizes() != new_shape || v_new->sizes() != new_shape ||
                at::has_internal_overlap(k_cache) != at::MemOverlap::No ||
                at::has_internal_overlap(v_cache) != at::MemOverlap::No || k_cache.is_alias_of(v_cache)))
    return false;
  if (q.is_cuda()) return cuda_takes(q, k_cache, v_cache, k_new, v_new);
  if (!q.is_cpu()) return false;
  const Tensor starts = q_start.contiguous(), lengths = kv_len.contiguous();
  for (int64_t b = 0; b < q.size(0); ++b) {
    const int64_t start = starts.data_ptr<int32_t>()[b], length = lengths.data_ptr<int32_t>()[b];
    if (start < 0 || length < 0 || length > s_max || (k_new && start + q.size(1) > s_max)) return false;
  }
  return true;
}

// The op's kernel for the CPU and CUDA dispatch keys.
std::tuple<Tensor, Tensor> op(const Tensor& q, Tensor& k_cache, Tensor& v_cache, const Tensor& q_start,
                              const Tensor& kv_len, const std::optional<Tensor>& k_new,
                              const std::optional<Tensor>& v_new, int64_t block_size, std::optional<double> scale,
                              bool return_lse) {
  if (fast_path_enabled() && accepts(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale)) {
#ifdef DLLM_WITH_CUDA
    if (q.is_cuda())
      return run_cuda(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse, 0);
#endif
    return run(q, k_cache, v_cache, q_start, kv_len, k_new, v_new, block_size, scale, return_lse);
  }
  namespace py = pybind11;
  using namespace pybind11::literals;
  const py::gil_scoped_acquire gil;
  const py::dict kwargs("k_new"_a = k_new, "v_new"_a = v_new, "block_size"_a = block_size, "scale"_a = scale,
                        "return_lse"_a = return_lse);
  return python_impl(kOp, py::make_tuple(q, k_cache, v_cache, q_start, kv_len), kwargs)
      .cast<std::tuple<Tensor, Tensor>>();
}

}  // namespace

void register_block_attention(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same code behind use_backend.
  m.def("block_attention_run", &run);
#ifdef DLLM_WITH_CUDA
  m.def("block_attention_cuda_run", &run_cuda);
#endif
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("block_attention", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("block_attention", TORCH_FN(dllm::bindings::op)); }
#endif
