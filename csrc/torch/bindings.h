// Thin torch bindings of the framework-free kernels: turn tensors into raw pointers and strides,
// allocate outputs, pick the stream. Each op's file registers its kernel for the CPU and CUDA dispatch
// keys (fast_path.h) and a `<op>_run` function for the Python providers; the argument checks and their
// messages live in Python (dllm_kernels/ops).
#pragma once

#include <torch/extension.h>

#include "common/types.h"

namespace dllm::bindings {

// The DllmDtype of a float tensor (the ops' Python checks admit no other dtype).
inline int dtype_code(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DLLM_FLOAT32;
    case at::kHalf:
      return DLLM_FLOAT16;
    case at::kBFloat16:
      return DLLM_BFLOAT16;
    default:
      TORCH_CHECK(false, "dllm::", op, ": internal: unsupported dtype ", t.scalar_type());
  }
}

void register_logits_to_confidence(pybind11::module_& m);
void register_credit_confidence(pybind11::module_& m);
void register_select_unmask(pybind11::module_& m);
void register_sparse24_mm(pybind11::module_& m);
void register_block_attention(pybind11::module_& m);
void register_attention_mass(pybind11::module_& m);
void register_fast_path(pybind11::module_& m);

}  // namespace dllm::bindings
