#include "common/sparse24_mm.h"

#include <ATen/Parallel.h>

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

constexpr const char* kOp = "sparse24_mm";

// x2d [M, K] with unit last stride; values, meta, bias (undefined: none) contiguous.
struct Sparse24Launch {
  DllmSparse24Params params;
  Tensor out;

  Sparse24Launch(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias) {
    out = at::empty({x2d.size(0), values.size(0)}, x2d.options());
    params = DllmSparse24Params{
        x2d.data_ptr(),
        x2d.size(0),
        x2d.size(1),
        x2d.stride(0),
        values.data_ptr(),
        meta.data_ptr<int16_t>(),
        values.size(0),
        bias.defined() ? bias.data_ptr() : nullptr,
        out.data_ptr(),
        dtype_code(values, kOp),
        dtype_code(x2d, kOp),
    };
  }
};

// The product of x [..., K] on its device: out [..., N]. x may be fp32 beside a 16-bit weight on the CPU
// (armor_linear's fp32 inner product).
Tensor run(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  Tensor x2d = x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
  if (x2d.stride(1) != 1 && x2d.size(1) > 1) x2d = x2d.contiguous();
  const Tensor values_c = values.contiguous(), meta_c = meta.contiguous();
  Sparse24Launch launch(x2d, values_c, meta_c, bias ? bias->contiguous() : Tensor());
  auto shape = x.sizes().vec();
  shape.back() = values.size(0);
  if (x.is_cpu()) {
    dllm_sparse24_mm_cpu(&launch.params, at::get_num_threads());
#ifdef DLLM_WITH_CUDA
  } else if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    if (launch.out.numel() == 0) return launch.out.view(shape);
    const size_t bytes = dllm_sparse24_mm_cuda_workspace(&launch.params);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    const int err = dllm_sparse24_mm_cuda(&launch.params, bytes ? workspace.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "dllm::sparse24_mm: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::sparse24_mm: internal: no compiled kernel for ", x.device());
  }
  return launch.out.view(shape);
}

// A call the Python checks accept (a subset of them is enough: anything else goes to Python).
bool accepts(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  if (!is_float(values) || values.dim() != 2 || values.size(1) % 8 != 0) return false;
  const int64_t n = values.size(0), k = 2 * values.size(1);
  const auto device = values.device();
  if (meta.scalar_type() != at::kShort || meta.dim() != 2 || meta.size(0) != n || meta.size(1) != k / 16 ||
      meta.device() != device)
    return false;
  if (x.scalar_type() != values.scalar_type() || x.dim() < 1 || x.size(-1) != k || x.device() != device) return false;
  return !bias || (bias->scalar_type() == values.scalar_type() && bias->dim() == 1 && bias->size(0) == n &&
                   bias->device() == device);
}

// The op's kernel for the CPU and CUDA dispatch keys.
Tensor op(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  if (fast_path_enabled() && accepts(x, values, meta, bias)) return run(x, values, meta, bias);
  namespace py = pybind11;
  const py::gil_scoped_acquire gil;
  return python_impl(kOp, py::make_tuple(x, values, meta, bias), py::dict()).cast<Tensor>();
}

}  // namespace

void register_sparse24_mm(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same kernel behind use_backend.
  m.def("sparse24_mm_run", &run);
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("sparse24_mm", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("sparse24_mm", TORCH_FN(dllm::bindings::op)); }
#endif
