// The C++ path of the dllm ops: kernels registered for the CPU (and CUDA) dispatch keys, so that the
// common call goes from torch's dispatcher straight to the kernel, with no Python in between.
//
// The Python implementation (dllm_kernels/_backends.py define_op) stays the one place that decides
// everything else: each C++ kernel first asks whether its call is one it takes on its own (nothing pinned
// with use_backend / DLLM_BACKEND on this thread, no DLLM_DEBUG_CHECKS, arguments that the op's Python
// checks accept and that the automatic choice would give to this kernel). Every other call, bad input
// included, goes to the Python implementation unchanged, which raises the op's messages or picks another
// backend. So the C++ checks only have to accept a subset of what Python accepts: they carry no messages.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <string>

namespace dllm::bindings {

// Whether the C++ kernels may take calls on this thread (see set_pinned / set_enabled in Python).
bool fast_path_enabled();

// The Python implementation of op, called with the schema's arguments (the GIL is taken here).
pybind11::object python_impl(const char* op, const pybind11::tuple& args, const pybind11::dict& kwargs);

// The index of name among the choices Python registered for op's string argument (SCORES, POLICIES: the
// order of the kernels' enums), or -1; always -1 while the fast path is off.
int choice_index(const char* op, c10::string_view name);

// A float dtype the kernels take (bf16, fp16, fp32).
bool is_float(const at::Tensor& t);

// t is a [rows, cols] tensor of dtype on device with unit stride along cols.
bool is_matrix(const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols, const at::Device& device);

// The rows of a matrix do not overlap (a write through it hits each element once).
bool rows_disjoint(const at::Tensor& matrix);

}  // namespace dllm::bindings
