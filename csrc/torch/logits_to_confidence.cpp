#include "common/logits_to_confidence.h"

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

// rows: [outer, inner, V] with unit last stride (dllm_kernels.ops._common.rows_view).
struct Launch {
  DllmConfidenceParams params;
  Tensor eligible, banned, token, score;  // keep the buffers the params point into alive

  Launch(const Tensor& rows, const std::optional<Tensor>& eligible_in, const std::optional<Tensor>& banned_in,
         double temperature, int64_t score_kind, bool tempered_score, int64_t seed, int64_t offset) {
    TORCH_CHECK(rows.dim() == 3 && (rows.stride(2) == 1 || rows.size(2) == 1),
                "dllm::logits_to_confidence: internal: expected [outer, inner, V] rows with unit last stride");
    const auto opts = rows.options();
    token = at::empty({rows.size(0), rows.size(1)}, opts.dtype(at::kLong));
    score = at::empty({rows.size(0), rows.size(1)}, opts.dtype(at::kFloat));
    if (eligible_in) eligible = eligible_in->contiguous();
    if (banned_in) banned = banned_in->contiguous();
    params = DllmConfidenceParams{
        rows.data_ptr(),
        dtype_code(rows, "logits_to_confidence"),
        rows.size(0),
        rows.size(1),
        rows.size(2),
        rows.stride(0),
        rows.stride(1),
        eligible.defined() ? eligible.data_ptr<bool>() : nullptr,
        banned.defined() ? banned.data_ptr<int64_t>() : nullptr,
        banned.defined() ? banned.numel() : 0,
        static_cast<float>(temperature),
        static_cast<int>(score_kind),
        tempered_score ? 1 : 0,
        static_cast<uint64_t>(seed),
        static_cast<uint64_t>(offset),
        token.data_ptr<int64_t>(),
        score.data_ptr<float>(),
    };
  }
};

std::tuple<Tensor, Tensor> logits_to_confidence_cpu(const Tensor& rows, const std::optional<Tensor>& eligible,
                                                    const std::optional<Tensor>& banned, double temperature,
                                                    int64_t score_kind, bool tempered_score, int64_t seed,
                                                    int64_t offset) {
  Launch launch(rows, eligible, banned, temperature, score_kind, tempered_score, seed, offset);
  if (rows.size(0) * rows.size(1) > 0) dllm_logits_to_confidence_cpu(&launch.params, at::get_num_threads());
  return {launch.token, launch.score};
}

#ifdef DLLM_WITH_CUDA
std::tuple<Tensor, Tensor> logits_to_confidence_cuda(const Tensor& rows, const std::optional<Tensor>& eligible,
                                                     const std::optional<Tensor>& banned, double temperature,
                                                     int64_t score_kind, bool tempered_score, int64_t seed,
                                                     int64_t offset) {
  const c10::cuda::CUDAGuard guard(rows.device());
  Launch launch(rows, eligible, banned, temperature, score_kind, tempered_score, seed, offset);
  if (rows.size(0) * rows.size(1) == 0) return {launch.token, launch.score};
  const size_t bytes = dllm_logits_to_confidence_cuda_workspace(&launch.params);
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, rows.options().dtype(at::kByte));
  const int err = dllm_logits_to_confidence_cuda(&launch.params, bytes ? workspace.data_ptr() : nullptr,
                                                 c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::logits_to_confidence: CUDA launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {launch.token, launch.score};
}
#endif

}  // namespace

void register_logits_to_confidence(pybind11::module_& m) {
  m.def("logits_to_confidence_cpu", &logits_to_confidence_cpu);
#ifdef DLLM_WITH_CUDA
  m.def("logits_to_confidence_cuda", &logits_to_confidence_cuda);
#endif
}

}  // namespace dllm::bindings
