#include "common/select_unmask.h"

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

constexpr const char* kOp = "select_unmask";

// score, eligible (and token, x): [B, L] with unit last stride (checked: by Python, or by accepts below).
struct SelectLaunch {
  DllmSelectParams params;
  Tensor selected, count, k;  // k: [B], made contiguous (tiny)

  SelectLaunch(const Tensor& score, const Tensor& eligible, int64_t policy, const std::optional<Tensor>& k_in,
               double threshold, bool inclusive, double factor, int64_t min_per_row, double low_threshold,
               int64_t radius, double margin, const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
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
        low_threshold,
        radius,
        margin,
        token ? token->data_ptr<int64_t>() : nullptr,
        x ? x->data_ptr<int64_t>() : nullptr,
        token ? token->stride(0) : 0,
        x ? x->stride(0) : 0,
        selected.data_ptr<bool>(),
        count.data_ptr<int32_t>(),
    };
  }
};

// The kernel on score's device.
std::tuple<Tensor, Tensor> run(const Tensor& score, const Tensor& eligible, int64_t policy,
                               const std::optional<Tensor>& k, double threshold, bool inclusive, double factor,
                               int64_t min_per_row, double low_threshold, int64_t radius, double margin,
                               const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
  SelectLaunch launch(score, eligible, policy, k, threshold, inclusive, factor, min_per_row, low_threshold, radius,
                      margin, token, x);
  if (score.is_cpu()) {
    dllm_select_unmask_cpu(&launch.params, at::get_num_threads());
#ifdef DLLM_WITH_CUDA
  } else if (score.is_cuda()) {
    const c10::cuda::CUDAGuard guard(score.device());
    if (score.size(0) == 0) return {launch.selected, launch.count};
    const int err = dllm_select_unmask_cuda(&launch.params, c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "dllm::select_unmask: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::select_unmask: internal: no compiled kernel for ", score.device());
  }
  return {launch.selected, launch.count};
}

bool needs_k(int policy) { return policy == DLLM_POLICY_TOPK || policy == DLLM_POLICY_TOPK_OR_THRESHOLD; }

// A call the Python checks accept (a subset of them is enough: anything else goes to Python).
bool accepts(const Tensor& score, const Tensor& eligible, int policy, const std::optional<Tensor>& k,
             double threshold, double factor, int64_t min_per_row, double low_threshold, int64_t radius,
             double margin, const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
  if (score.dim() != 2 || score.size(1) >= (int64_t{1} << 31)) return false;
  if (score.is_cuda() && score.size(1) > kSelectCudaMaxLength) return false;
  const int64_t rows = score.size(0), length = score.size(1);
  const auto device = score.device();
  if (!is_matrix(score, at::kFloat, rows, length, device) || !is_matrix(eligible, at::kBool, rows, length, device))
    return false;
  if (k ? (k->scalar_type() != at::kInt && k->scalar_type() != at::kLong) || k->dim() != 1 || k->size(0) != rows ||
              k->device() != device
        : needs_k(policy))
    return false;
  if (token.has_value() != x.has_value()) return false;
  if (x && (!is_matrix(*x, at::kLong, rows, length, device) || !is_matrix(*token, at::kLong, rows, length, device) ||
            !rows_disjoint(*x)))
    return false;
  return min_per_row >= 0 && radius >= 0 && std::isfinite(threshold) && std::isfinite(factor) &&
         std::isfinite(low_threshold) && std::isfinite(margin);
}

// The op's kernel for the CPU and CUDA dispatch keys.
std::tuple<Tensor, Tensor> op(const Tensor& score, const Tensor& eligible, c10::string_view policy_name,
                              const std::optional<Tensor>& k, double threshold, bool inclusive, double factor,
                              int64_t min_per_row, double low_threshold, int64_t radius, double margin,
                              const std::optional<Tensor>& token, const std::optional<Tensor>& x) {
  const int policy = choice_index(kOp, policy_name);
  if (fast_path_enabled() && policy >= 0 &&
      accepts(score, eligible, policy, k, threshold, factor, min_per_row, low_threshold, radius, margin, token, x))
    return run(score, eligible, policy, k, threshold, inclusive, factor, min_per_row, low_threshold, radius, margin,
               token, x);
  namespace py = pybind11;
  using namespace pybind11::literals;
  const py::gil_scoped_acquire gil;
  const py::dict kwargs("policy"_a = std::string(policy_name), "k"_a = k, "threshold"_a = threshold,
                        "inclusive"_a = inclusive, "factor"_a = factor, "min_per_row"_a = min_per_row,
                        "low_threshold"_a = low_threshold, "radius"_a = radius, "margin"_a = margin,
                        "token"_a = token, "x"_a = x);
  return python_impl(kOp, py::make_tuple(score, eligible), kwargs).cast<std::tuple<Tensor, Tensor>>();
}

}  // namespace

void register_select_unmask(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same kernel behind use_backend.
  m.def("select_unmask_run", &run);
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("select_unmask", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("select_unmask", TORCH_FN(dllm::bindings::op)); }
#endif
