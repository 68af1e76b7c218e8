// attention_mass's bindings: the cpu backend (csrc/cpu/attention_mass.cpp) and the cuda backend
// (csrc/cuda/attention_mass.cu), thin calls of the framework-free kernels. Registered for the CPU and CUDA
// dispatch keys like the other ops (fast_path.h).
#include "common/attention_mass.h"

#include <ATen/Parallel.h>

#include <cmath>

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

constexpr const char* kOp = "attention_mass";

// The launch struct and the outputs (arguments checked: by Python, or by accepts below).
struct MassLaunch {
  DllmAttentionMassParams params{};
  Tensor mass, top, starts, lengths;

  MassLaunch(const Tensor& q, const Tensor& k_cache, const Tensor& lse, const Tensor& q_start, const Tensor& kv_len,
             const std::optional<Tensor>& query_mask, const std::optional<Tensor>& key_mask, int64_t block_size,
             std::optional<double> scale) {
    starts = q_start.contiguous();
    lengths = kv_len.contiguous();
    mass = at::empty({q.size(0), k_cache.size(1)}, q.options().dtype(at::kFloat));
    top = at::empty({q.size(0)}, q.options().dtype(at::kLong));
    DllmAttentionMassParams& p = params;
    p.q = q.data_ptr();
    p.k_cache = k_cache.data_ptr();
    p.lse = lse.data_ptr<float>();
    for (int i = 0; i < 3; ++i) {
      p.q_stride[i] = q.stride(i);
      p.k_stride[i] = k_cache.stride(i);
      p.lse_stride[i] = lse.stride(i);
    }
    p.q_start = starts.data_ptr<int32_t>();
    p.kv_len = lengths.data_ptr<int32_t>();
    p.query_mask = query_mask ? query_mask->data_ptr<bool>() : nullptr;
    p.key_mask = key_mask ? key_mask->data_ptr<bool>() : nullptr;
    for (int i = 0; i < 2; ++i) {
      p.query_mask_stride[i] = query_mask ? query_mask->stride(i) : 0;
      p.key_mask_stride[i] = key_mask ? key_mask->stride(i) : 0;
    }
    p.mass = mass.data_ptr<float>();
    p.top = top.data_ptr<int64_t>();
    p.batch = q.size(0);
    p.n_queries = q.size(1);
    p.s_max = k_cache.size(1);
    p.n_heads = q.size(2);
    p.n_kv_heads = k_cache.size(2);
    p.head_dim = q.size(3);
    p.block_size = block_size;
    p.scale = static_cast<float>(scale ? *scale : 1.0 / std::sqrt(static_cast<double>(q.size(3))));
    p.dtype = dtype_code(q, kOp);
  }
};

// The CPU kernel; q_start / kv_len are checked on the host first (by Python or accepts).
std::tuple<Tensor, Tensor> run(const Tensor& q, const Tensor& k_cache, const Tensor& lse, const Tensor& q_start,
                               const Tensor& kv_len, const std::optional<Tensor>& query_mask,
                               const std::optional<Tensor>& key_mask, int64_t block_size, std::optional<double> scale) {
  TORCH_CHECK(q.is_cpu(), "dllm::attention_mass: internal: the cpu backend runs CPU tensors");
  const MassLaunch launch(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale);
  dllm_attention_mass_cpu(&launch.params, at::get_num_threads());
  return {launch.mass, launch.top};
}

#ifdef DLLM_WITH_CUDA
// The CUDA kernels (Python has checked that they take the call: fp16 / bf16, D 64 or 128, 4-byte aligned
// rows). No host sync: q_start / kv_len stay on the device.
std::tuple<Tensor, Tensor> run_cuda(const Tensor& q, const Tensor& k_cache, const Tensor& lse, const Tensor& q_start,
                                    const Tensor& kv_len, const std::optional<Tensor>& query_mask,
                                    const std::optional<Tensor>& key_mask, int64_t block_size,
                                    std::optional<double> scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  const MassLaunch launch(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale);
  const int err = dllm_attention_mass_cuda(&launch.params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::attention_mass: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {launch.mass, launch.top};
}
#endif

bool is_4d(const Tensor& t, const Tensor& q) {
  return t.dim() == 4 && t.scalar_type() == q.scalar_type() && t.device() == q.device() &&
         (t.stride(3) == 1 || t.size(3) <= 1);
}

bool is_index(const Tensor& t, const Tensor& q) {
  return t.scalar_type() == at::kInt && t.dim() == 1 && t.size(0) == q.size(0) && t.device() == q.device();
}

bool is_mask(const std::optional<Tensor>& t, const Tensor& q, int64_t cols) {
  return !t || (t->scalar_type() == at::kBool && t->dim() == 2 && t->size(0) == q.size(0) && t->size(1) == cols &&
                t->device() == q.device());
}

// What the CUDA kernel takes (ops/attention_mass.py _cuda_supports says the same). Always false without CUDA.
bool cuda_takes(const Tensor& q, const Tensor& k_cache) {
#ifdef DLLM_WITH_CUDA
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) return false;
  if (q.size(3) != 64 && q.size(3) != 128) return false;
  const auto aligned = [](const Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0 && t.stride(0) % 2 == 0 && t.stride(1) % 2 == 0 &&
           t.stride(2) % 2 == 0;
  };
  return aligned(q) && aligned(k_cache);
#else
  (void)q, (void)k_cache;
  return false;
#endif
}

// A call the Python checks accept (a subset is enough), with, on the CPU, the value checks of q_start and
// kv_len (free there). On CUDA the call must be one the CUDA kernel takes, as the automatic choice would.
bool accepts(const Tensor& q, const Tensor& k_cache, const Tensor& lse, const Tensor& q_start, const Tensor& kv_len,
             const std::optional<Tensor>& query_mask, const std::optional<Tensor>& key_mask, int64_t block_size,
             std::optional<double> scale) {
  if (!is_float(q) || !is_4d(q, q) || !is_4d(k_cache, q)) return false;
  const int64_t n_heads = q.size(2), n_kv_heads = k_cache.size(2), s_max = k_cache.size(1);
  if (k_cache.size(0) != q.size(0) || k_cache.size(3) != q.size(3) || n_heads == 0 || n_kv_heads == 0 ||
      n_heads % n_kv_heads != 0 || q.size(3) == 0)
    return false;
  if (lse.scalar_type() != at::kFloat || lse.device() != q.device() ||
      lse.sizes() != at::IntArrayRef({q.size(0), n_heads, q.size(1)}))
    return false;
  if (!is_index(q_start, q) || !is_index(kv_len, q) || !is_mask(query_mask, q, q.size(1)) ||
      !is_mask(key_mask, q, s_max))
    return false;
  if (block_size < 0 || (scale && !std::isfinite(*scale))) return false;
  if (q.is_cuda()) return cuda_takes(q, k_cache);
  if (!q.is_cpu()) return false;
  const Tensor starts = q_start.contiguous(), lengths = kv_len.contiguous();
  for (int64_t b = 0; b < q.size(0); ++b) {
    const int64_t start = starts.data_ptr<int32_t>()[b], length = lengths.data_ptr<int32_t>()[b];
    if (start < 0 || length < 0 || length > s_max) return false;
  }
  return true;
}

// The op's kernel for the CPU and CUDA dispatch keys.
std::tuple<Tensor, Tensor> op(const Tensor& q, const Tensor& k_cache, const Tensor& lse, const Tensor& q_start,
                              const Tensor& kv_len, const std::optional<Tensor>& query_mask,
                              const std::optional<Tensor>& key_mask, int64_t block_size, std::optional<double> scale) {
  if (fast_path_enabled() && accepts(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale)) {
#ifdef DLLM_WITH_CUDA
    if (q.is_cuda()) return run_cuda(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale);
#endif
    return run(q, k_cache, lse, q_start, kv_len, query_mask, key_mask, block_size, scale);
  }
  namespace py = pybind11;
  using namespace pybind11::literals;
  const py::gil_scoped_acquire gil;
  const py::dict kwargs("query_mask"_a = query_mask, "key_mask"_a = key_mask, "block_size"_a = block_size,
                        "scale"_a = scale);
  return python_impl(kOp, py::make_tuple(q, k_cache, lse, q_start, kv_len), kwargs)
      .cast<std::tuple<Tensor, Tensor>>();
}

}  // namespace

void register_attention_mass(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same code behind use_backend.
  m.def("attention_mass_run", &run);
#ifdef DLLM_WITH_CUDA
  m.def("attention_mass_cuda_run", &run_cuda);
#endif
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("attention_mass", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("attention_mass", TORCH_FN(dllm::bindings::op)); }
#endif
