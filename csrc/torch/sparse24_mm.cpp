#include "common/sparse24_mm.h"

#include <ATen/Parallel.h>

#include "torch/bindings.h"

#ifdef DLLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace dllm::bindings {
namespace {

using at::Tensor;

// x2d [M, K] with unit last stride; values, meta, bias contiguous (dllm_kernels/ops/sparse24.py).
struct Sparse24Launch {
  DllmSparse24Params params;
  Tensor out;

  Sparse24Launch(const Tensor& x2d, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
    TORCH_CHECK(x2d.dim() == 2 && (x2d.stride(1) == 1 || x2d.size(1) <= 1) && values.is_contiguous() &&
                    meta.is_contiguous() && x2d.size(1) == 2 * values.size(1) && (!bias || bias->is_contiguous()),
                "dllm::sparse24_mm: internal: unchecked arguments");
    out = at::empty({x2d.size(0), values.size(0)}, x2d.options());
    params = DllmSparse24Params{
        x2d.data_ptr(),
        x2d.size(0),
        x2d.size(1),
        x2d.stride(0),
        values.data_ptr(),
        meta.data_ptr<int16_t>(),
        values.size(0),
        bias ? bias->data_ptr() : nullptr,
        out.data_ptr(),
        dtype_code(values, "sparse24_mm"),
        dtype_code(x2d, "sparse24_mm"),
    };
  }
};

Tensor sparse24_mm_cpu(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                       const std::optional<Tensor>& bias) {
  Sparse24Launch launch(x2d, values, meta, bias);
  dllm_sparse24_mm_cpu(&launch.params, at::get_num_threads());
  return launch.out;
}

#ifdef DLLM_WITH_CUDA
Tensor sparse24_mm_cuda(const Tensor& x2d, const Tensor& values, const Tensor& meta,
                        const std::optional<Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x2d.device());
  Sparse24Launch launch(x2d, values, meta, bias);
  if (launch.out.numel() == 0) return launch.out;
  const size_t bytes = dllm_sparse24_mm_cuda_workspace(&launch.params);
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x2d.options().dtype(at::kByte));
  const int err = dllm_sparse24_mm_cuda(&launch.params, bytes ? workspace.data_ptr() : nullptr,
                                        c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::sparse24_mm: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return launch.out;
}
#endif

}  // namespace

void register_sparse24_mm(pybind11::module_& m) {
  m.def("sparse24_mm_cpu", &sparse24_mm_cpu);
#ifdef DLLM_WITH_CUDA
  m.def("sparse24_mm_cuda", &sparse24_mm_cuda);
#endif
}

}  // namespace dllm::bindings
