#include "common/select_unmask.h"

#include <ATen/Parallel.h>

#include "torch/bindings.h"

#ifdef DLLM_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

namespace dllm::bindings {
namespace {

using at::Tensor;

// score, eligible (and token, x): [B, L] with unit last stride (checked in dllm_kernels/ops).
struct SelectLaunch {
  DllmSelectParams params;
  Tensor selected, count, k;  // k: [B], made contiguous (tiny)

  SelectLaunch(const Tensor& score, const Tensor& eligible, int64_t policy, const std::optional<Tensor>& k_in,
               double threshold, bool inclusive, double factor, int64_t min_per_row,
               const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
    TORCH_CHECK(score.dim() == 2 && eligible.sizes() == score.sizes(),
                "dllm::select_unmask: internal: unchecked arguments");
    if (k_in) k = k_in->contiguous();
    selected = at::empty(score.sizes(), score.options().dtype(at::kBool));
    count = at::empty({score.size(0)}, score.options().dtype(at::kInt));
    params = DllmSelectParams{
        score.data_ptr<float>(),
        eligible.data_ptr<bool>(),
        score.size(0),
        score.size(1),
        score.stride(0),
        eligible.stride(0),
        static_cast<int>(policy),
        k.defined() ? k.data_ptr() : nullptr,
        k.defined() && k.scalar_type() == at::kLong,
        threshold,
        inclusive,
        factor,
        min_per_row,
        token ? token->data_ptr<int64_t>() : nullptr,
        x ? x->data_ptr<int64_t>() : nullptr,
        token ? token->stride(0) : 0,
        x ? x->stride(0) : 0,
        selected.data_ptr<bool>(),
        count.data_ptr<int32_t>(),
    };
  }
};

std::tuple<Tensor, Tensor> select_unmask_cpu(const Tensor& score, const Tensor& eligible, int64_t policy,
                                             const std::optional<Tensor>& k, double threshold, bool inclusive,
                                             double factor, int64_t min_per_row, const std::optional<Tensor>& token,
                                             const std::optional<Tensor>& x) {
  SelectLaunch launch(score, eligible, policy, k, threshold, inclusive, factor, min_per_row, token, x);
  dllm_select_unmask_cpu(&launch.params, at::get_num_threads());
  return {launch.selected, launch.count};
}

#ifdef DLLM_WITH_CUDA
std::tuple<Tensor, Tensor> select_unmask_cuda(const Tensor& score, const Tensor& eligible, int64_t policy,
                                              const std::optional<Tensor>& k, double threshold, bool inclusive,
                                              double factor, int64_t min_per_row,
                                              const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
  const c10::cuda::CUDAGuard guard(score.device());
  SelectLaunch launch(score, eligible, policy, k, threshold, inclusive, factor, min_per_row, token, x);
  if (score.size(0) == 0) return {launch.selected, launch.count};
  const int err = dllm_select_unmask_cuda(&launch.params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::select_unmask: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {launch.selected, launch.count};
}
#endif

}  // namespace

void register_select_unmask(pybind11::module_& m) {
  m.def("select_unmask_cpu", &select_unmask_cpu);
#ifdef DLLM_WITH_CUDA
  m.def("select_unmask_cuda", &select_unmask_cuda);
#endif
}

}  // namespace dllm::bindings
