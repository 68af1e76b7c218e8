#include "common/logits_to_confidence.h"

#include <ATen/Parallel.h>

#include <atomic>

#include "torch/bindings.h"
#include "torch/fast_path.h"
#include "torch/rows.h"

#ifdef DLLM_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace dllm::bindings {
namespace {

using at::Tensor;

constexpr const char* kOp = "logits_to_confidence";
std::atomic<double> min_temperature{0}, max_temperature{0};  // the op's range, set by Python at import

// The kernel on logits' device (arguments checked: by Python, or by accepts below): token and score, or
// (with_state) the rows' states for a merge. Outputs are logits.shape[:-1] (then [8] for states),
// contiguous: the kernels write row r at r.
std::vector<Tensor> launch(const Tensor& logits, const std::optional<Tensor>& eligible_in,
                           const std::optional<Tensor>& banned_in, double temperature, int64_t score_kind,
                           bool tempered_score, int64_t seed, int64_t offset, int64_t vocab_start, bool with_state) {
  const Rows rows(logits);
  const auto shape = logits.sizes().slice(0, logits.dim() - 1);
  std::vector<Tensor> out;
  if (with_state) {
    std::vector<int64_t> state_shape(shape.begin(), shape.end());
    state_shape.push_back(DLLM_STATE_FIELDS);
    out.push_back(at::empty(state_shape, logits.options().dtype(at::kDouble)));
  } else {
    out.push_back(at::empty(shape, logits.options().dtype(at::kLong)));
    out.push_back(at::empty(shape, logits.options().dtype(at::kFloat)));
  }
  const Tensor eligible = eligible_in ? eligible_in->contiguous() : Tensor();
  const Tensor banned = banned_in ? banned_in->contiguous() : Tensor();
  const DllmConfidenceParams params{
      rows.data,
      dtype_code(logits, kOp),
      rows.n_outer,
      rows.n_inner,
      logits.size(-1),
      rows.stride_outer,
      rows.stride_inner,
      eligible.defined() ? eligible.data_ptr<bool>() : nullptr,
      banned.defined() ? banned.data_ptr<int64_t>() : nullptr,
      banned.defined() ? banned.numel() : 0,
      vocab_start,
      static_cast<float>(temperature),
      static_cast<int>(score_kind),
      tempered_score ? 1 : 0,
      static_cast<uint64_t>(seed),
      static_cast<uint64_t>(offset),
      with_state ? nullptr : out[0].data_ptr<int64_t>(),
      with_state ? nullptr : out[1].data_ptr<float>(),
      with_state ? out[0].data_ptr<double>() : nullptr,
  };
  if (out[0].numel() == 0) return out;
  if (logits.is_cpu()) {
    dllm_logits_to_confidence_cpu(&params, at::get_num_threads());
#ifdef DLLM_WITH_CUDA
  } else if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    const size_t bytes = dllm_logits_to_confidence_cuda_workspace(&params);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
    const int err = dllm_logits_to_confidence_cuda(&params, bytes ? workspace.data_ptr() : nullptr,
                                                   c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "dllm::logits_to_confidence: CUDA launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::logits_to_confidence: internal: no compiled kernel for ", logits.device());
  }
  return out;
}

std::tuple<Tensor, Tensor> run(const Tensor& logits, const std::optional<Tensor>& eligible,
                               const std::optional<Tensor>& banned, double temperature, int64_t score_kind,
                               bool tempered_score, int64_t seed, int64_t offset) {
  auto out = launch(logits, eligible, banned, temperature, score_kind, tempered_score, seed, offset, 0, false);
  return {out[0], out[1]};
}

// logits_to_confidence_partial: the rows' states of a vocabulary shard starting at global id vocab_start.
Tensor partial_run(const Tensor& logits, const std::optional<Tensor>& eligible, int64_t vocab_start,
                   double temperature, int64_t score_kind, bool tempered_score, const std::optional<Tensor>& banned,
                   int64_t seed, int64_t offset) {
  return launch(logits, eligible, banned, temperature, score_kind, tempered_score, seed, offset, vocab_start, true)[0];
}

// logits_to_confidence_merge: states [parts, ..., 8] (checked by Python) -> token, score [...].
std::tuple<Tensor, Tensor> merge_run(const Tensor& states_in, int64_t vocab_size, double temperature,
                                     int64_t score_kind, bool tempered_score, int64_t seed, int64_t offset) {
  const Tensor states = states_in.contiguous();
  const auto shape = states.sizes().slice(1, states.dim() - 2);
  const Tensor token = at::empty(shape, states.options().dtype(at::kLong));
  const Tensor score = at::empty(shape, states.options().dtype(at::kFloat));
  DllmConfidenceParams params{};
  params.n_outer = 1;
  params.n_inner = token.numel();
  params.vocab = vocab_size;
  params.temperature = static_cast<float>(temperature);
  params.score_kind = static_cast<int>(score_kind);
  params.tempered_score = tempered_score ? 1 : 0;
  params.seed = static_cast<uint64_t>(seed);
  params.offset = static_cast<uint64_t>(offset);
  params.token = token.data_ptr<int64_t>();
  params.score = score.data_ptr<float>();
  if (token.numel() == 0) return {token, score};
  if (states.is_cpu()) {
    dllm_logits_to_confidence_merge_cpu(&params, states.data_ptr<double>(), states.size(0));
#ifdef DLLM_WITH_CUDA
  } else if (states.is_cuda()) {
    const c10::cuda::CUDAGuard guard(states.device());
    const int err = dllm_logits_to_confidence_merge_cuda(&params, states.data_ptr<double>(), states.size(0),
                                                         c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "dllm::logits_to_confidence_merge: CUDA launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::logits_to_confidence_merge: internal: no compiled kernel for ", states.device());
  }
  return {token, score};
}

// A call the Python checks accept (a subset of them is enough: anything else goes to Python).
bool accepts(const Tensor& logits, const std::optional<Tensor>& eligible, const std::optional<Tensor>& banned,
             double temperature) {
  if (!is_float(logits) || logits.dim() < 1 || logits.size(-1) < 1) return false;
  if (logits.stride(-1) != 1 && logits.size(-1) != 1) return false;
  if (eligible && (eligible->scalar_type() != at::kBool || eligible->device() != logits.device() ||
                   eligible->sizes() != logits.sizes().slice(0, logits.dim() - 1)))
    return false;
  if (banned && (banned->scalar_type() != at::kLong || banned->dim() != 1 || banned->device() != logits.device()))
    return false;
  return temperature == 0 || (temperature >= min_temperature.load() && temperature <= max_temperature.load());
}

// The op's kernel for the CPU and CUDA dispatch keys.
std::tuple<Tensor, Tensor> op(const Tensor& logits, const std::optional<Tensor>& eligible, double temperature,
                              c10::string_view score, bool tempered_score, const std::optional<Tensor>& banned,
                              int64_t seed, int64_t offset) {
  const int score_kind = choice_index(kOp, score);
  if (fast_path_enabled() && score_kind >= 0 && accepts(logits, eligible, banned, temperature))
    return run(logits, eligible, banned, temperature, score_kind, tempered_score, seed, offset);
  namespace py = pybind11;
  using namespace pybind11::literals;
  const py::gil_scoped_acquire gil;
  const py::dict kwargs("temperature"_a = temperature, "score"_a = std::string(score), "tempered_score"_a = tempered_score,
                        "banned"_a = banned, "seed"_a = seed, "offset"_a = offset);
  return python_impl(kOp, py::make_tuple(logits, eligible), kwargs).cast<std::tuple<Tensor, Tensor>>();
}

}  // namespace

void register_logits_to_confidence(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same kernel behind use_backend.
  m.def("logits_to_confidence_run", &run);
  m.def("logits_to_confidence_partial_run", &partial_run);
  m.def("logits_to_confidence_merge_run", &merge_run);
  m.def("set_temperature_range", [](double low, double high) {
    min_temperature.store(low);
    max_temperature.store(high);
  });
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("logits_to_confidence", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("logits_to_confidence", TORCH_FN(dllm::bindings::op)); }
#endif
