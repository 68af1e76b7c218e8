#include "torch/fast_path.h"

#include <pybind11/stl.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace dllm::bindings {
namespace {

std::atomic<bool> enabled{false};         // set by dllm_kernels once its Python side is ready
std::atomic<bool> pinned_default{false};  // DLLM_BACKEND, read once by Python at import
thread_local int pinned = -1;             // use_backend on this thread: -1 unset (the default), 0 or 1

struct PythonOp {
  PyObject* impl = nullptr;  // leaked on purpose: it must outlive every static destructor
  std::vector<std::string> choices;
};

std::mutex ops_mutex;
std::unordered_map<std::string, PythonOp>& ops() {
  static auto* map = new std::unordered_map<std::string, PythonOp>();  // never destroyed, as above
  return *map;
}

}  // namespace

bool fast_path_enabled() {
  if (!enabled.load(std::memory_order_relaxed)) return false;
  return pinned < 0 ? !pinned_default.load(std::memory_order_relaxed) : pinned == 0;
}

pybind11::object python_impl(const char* op, const pybind11::tuple& args, const pybind11::dict& kwargs) {
  PyObject* impl = nullptr;
  {
    const std::lock_guard<std::mutex> lock(ops_mutex);
    const auto it = ops().find(op);
    if (it != ops().end()) impl = it->second.impl;
  }
  TORCH_CHECK(impl != nullptr, "dllm::", op, ": internal: no Python implementation was registered");
  return pybind11::reinterpret_borrow<pybind11::object>(impl)(*args, **kwargs);
}

int choice_index(const char* op, c10::string_view name) {
  // Registration happens at import, before the fast path is enabled, and the ops' entries never change
  // after it: with the path on they are read without the lock.
  if (!enabled.load(std::memory_order_acquire)) return -1;
  const auto it = ops().find(op);
  if (it == ops().end()) return -1;
  const auto& choices = it->second.choices;
  for (size_t i = 0; i < choices.size(); ++i)
    if (c10::string_view(choices[i]) == name) return static_cast<int>(i);
  return -1;
}

bool is_float(const at::Tensor& t) {
  const auto dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

bool is_matrix(const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols, const at::Device& device) {
  return t.scalar_type() == dtype && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
         t.device() == device && (t.stride(1) == 1 || cols < 2);
}

bool rows_disjoint(const at::Tensor& matrix) {
  return matrix.size(0) < 2 || matrix.size(1) == 0 || matrix.stride(0) >= matrix.size(1);
}

void register_fast_path(pybind11::module_& m) {
  m.def(
      "set_python_impl",
      [](const std::string& op, pybind11::object impl, std::vector<std::string> choices) {
        const std::lock_guard<std::mutex> lock(ops_mutex);
        PythonOp& entry = ops()[op];
        Py_XDECREF(entry.impl);
        entry.impl = impl.release().ptr();
        entry.choices = std::move(choices);
      },
      "The Python implementation that op's C++ kernels hand every call they do not take, and the choices "
      "of its string argument in the order of the kernels' enum.");
  m.def(
      "set_fast_path",
      [](bool on, bool pinned_by_default) {
        pinned_default.store(pinned_by_default);
        enabled.store(on);
      },
      "Whether the C++ kernels take calls at all, and whether a backend is pinned by default (DLLM_BACKEND).");
  m.def(
      "set_pinned", [](int state) { pinned = state; },
      "use_backend's state on this thread: -1 the default, 0 automatic choice, 1 a backend is pinned.");
  m.def("get_pinned", []() { return pinned; });
}

}  // namespace dllm::bindings
