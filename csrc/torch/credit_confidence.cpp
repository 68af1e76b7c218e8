#include "common/credit_confidence.h"

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>

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

constexpr const char* kOp = "credit_confidence";
constexpr int64_t kMaxVocab = (int64_t{1} << 31) - 1;  // the scan's token ids are int32 in Triton
std::atomic<double> max_alpha{0};                       // the op's ALPHA_MAX, set by Python at import

// The stride between the rows of a slot tensor [..., S] whose leading dims merge into one; -1 if they do not.
int64_t row_stride(const Tensor& t) {
  int64_t stride = -1, span = 1;  // the innermost non-trivial leading dim's stride; the rows it spans
  for (int64_t d = t.dim() - 2; d >= 0; --d) {
    if (t.size(d) == 1) continue;
    if (stride < 0) {
      stride = t.stride(d);
    } else if (t.stride(d) != stride * span) {
      return -1;
    }
    span *= t.size(d);
  }
  return stride < 0 ? t.size(-1) : stride;  // a single row: any stride
}

// A slot tensor as rows: in place when its leading dims merge, else a contiguous copy written back after
// the kernels (enqueued on the same stream: no sync).
struct SlotRows {
  Tensor work;
  int64_t stride;
  bool copied;

  explicit SlotRows(const Tensor& t) : work(t), stride(row_stride(t)), copied(stride < 0) {
    if (copied) {
      work = t.contiguous();
      stride = t.size(-1);
    }
  }
  void write_back(const Tensor& t) const {
    if (copied) t.copy_(work);
  }
};

// The scan (logits_to_confidence's row states at vocab_start 0) and the epilogue on logits' device
// (arguments checked: by Python, or by accepts below). The slots are updated in place.
std::tuple<Tensor, Tensor> run(const Tensor& logits, const Tensor& eligible_in, const Tensor& credit_token,
                               const Tensor& credit_value, double alpha, double beta, double gamma,
                               const std::optional<Tensor>& banned_in) {
  const auto shape = logits.sizes().slice(0, logits.dim() - 1);
  const Tensor token = at::empty(shape, logits.options().dtype(at::kLong));
  const Tensor score = at::empty(shape, logits.options().dtype(at::kFloat));
  const int64_t n_rows = token.numel();
  if (n_rows == 0) return {token, score};
  const Rows rows(logits);
  const Tensor eligible = eligible_in.contiguous();
  const Tensor banned = banned_in ? banned_in->contiguous() : Tensor();
  const Tensor states = at::empty({n_rows, DLLM_STATE_FIELDS}, logits.options().dtype(at::kDouble));

  DllmConfidenceParams scan{};
  scan.logits = rows.data;
  scan.dtype = dtype_code(logits, kOp);
  scan.n_outer = rows.n_outer;
  scan.n_inner = rows.n_inner;
  scan.vocab = logits.size(-1);
  scan.stride_outer = rows.stride_outer;
  scan.stride_inner = rows.stride_inner;
  scan.eligible = eligible.data_ptr<bool>();
  scan.banned = banned.defined() ? banned.data_ptr<int64_t>() : nullptr;
  scan.n_banned = banned.defined() ? banned.numel() : 0;
  scan.score_kind = DLLM_SCORE_PROB;
  scan.state = states.data_ptr<double>();

  const SlotRows tokens(credit_token), values(credit_value);
  const DllmCreditParams params{
      states.data_ptr<double>(),
      rows.data,
      scan.dtype,
      rows.n_outer,
      rows.n_inner,
      scan.vocab,
      rows.stride_outer,
      rows.stride_inner,
      scan.banned,
      scan.n_banned,
      tokens.work.data_ptr<int64_t>(),
      values.work.data_ptr<float>(),
      credit_token.size(-1),
      tokens.stride,
      values.stride,
      static_cast<float>(alpha),
      static_cast<float>(beta),
      static_cast<float>(gamma),
      token.data_ptr<int64_t>(),
      score.data_ptr<float>(),
  };
  if (logits.is_cpu()) {
    dllm_logits_to_confidence_cpu(&scan, at::get_num_threads());
    dllm_credit_confidence_cpu(&params, at::get_num_threads());
#ifdef DLLM_WITH_CUDA
  } else if (logits.is_cuda()) {
    const c10::cuda::CUDAGuard guard(logits.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const size_t bytes = dllm_logits_to_confidence_cuda_workspace(&scan);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, logits.options().dtype(at::kByte));
    int err = dllm_logits_to_confidence_cuda(&scan, bytes ? workspace.data_ptr() : nullptr, stream);
    if (err == 0) err = dllm_credit_confidence_cuda(&params, stream);
    TORCH_CHECK(err == 0, "dllm::credit_confidence: CUDA launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::credit_confidence: internal: no compiled kernel for ", logits.device());
  }
  tokens.write_back(credit_token);
  values.write_back(credit_value);
  return {token, score};
}

// Every slot token is -1 or an id in [0, V) (a contiguous CPU tensor: the check the op makes in Python).
bool tokens_in_range(const Tensor& credit_token, int64_t vocab) {
  const int64_t* t = credit_token.data_ptr<int64_t>();
  for (int64_t i = 0; i < credit_token.numel(); ++i)
    if (t[i] < -1 || t[i] >= vocab) return false;
  return true;
}

// A call the Python checks accept (a subset of them is enough: anything else goes to Python).
bool accepts(const Tensor& logits, const Tensor& eligible, const Tensor& credit_token, const Tensor& credit_value,
             double alpha, double beta, double gamma, const std::optional<Tensor>& banned) {
  if (!is_float(logits) || logits.dim() < 1 || logits.size(-1) < 1 || logits.size(-1) > kMaxVocab) return false;
  if (logits.stride(-1) != 1 && logits.size(-1) != 1) return false;
  const auto leading = logits.sizes().slice(0, logits.dim() - 1);
  const auto device = logits.device();
  if (eligible.scalar_type() != at::kBool || eligible.device() != device || eligible.sizes() != leading) return false;
  if (banned && (banned->scalar_type() != at::kLong || banned->dim() != 1 || banned->device() != device)) return false;
  if (credit_token.scalar_type() != at::kLong || credit_value.scalar_type() != at::kFloat) return false;
  if (credit_token.dim() != logits.dim() || credit_token.size(-1) < 1 ||
      credit_token.sizes().slice(0, logits.dim() - 1) != leading || credit_value.sizes() != credit_token.sizes())
    return false;
  if (credit_token.device() != device || credit_value.device() != device) return false;
  // Contiguous: neither overlaps itself; distinct storages: not each other (Python decides the rest).
  if (!credit_token.is_contiguous() || !credit_value.is_contiguous() || credit_token.is_alias_of(credit_value))
    return false;
  if (!(alpha >= 0 && alpha <= max_alpha.load()) || !(beta >= 0 && beta <= 1) || !(gamma >= 0 && std::isfinite(gamma)))
    return false;
  return !credit_token.is_cpu() || tokens_in_range(credit_token, logits.size(-1));
}

// The op's kernel for the CPU and CUDA dispatch keys.
std::tuple<Tensor, Tensor> op(const Tensor& logits, const Tensor& eligible, Tensor& credit_token, Tensor& credit_value,
                              double alpha, double beta, double gamma, const std::optional<Tensor>& banned) {
  if (fast_path_enabled() && accepts(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned))
    return run(logits, eligible, credit_token, credit_value, alpha, beta, gamma, banned);
  namespace py = pybind11;
  using namespace pybind11::literals;
  const py::gil_scoped_acquire gil;
  const py::dict kwargs("alpha"_a = alpha, "beta"_a = beta, "gamma"_a = gamma, "banned"_a = banned);
  return python_impl(kOp, py::make_tuple(logits, eligible, credit_token, credit_value), kwargs)
      .cast<std::tuple<Tensor, Tensor>>();
}

}  // namespace

void register_credit_confidence(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same code behind use_backend.
  m.def("credit_confidence_run", &run);
  m.def("set_credit_alpha_max", [](double value) { max_alpha.store(value); });
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) { m.impl("credit_confidence", TORCH_FN(dllm::bindings::op)); }
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) { m.impl("credit_confidence", TORCH_FN(dllm::bindings::op)); }
#endif
