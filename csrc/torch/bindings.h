// Thin torch bindings of the framework-free kernels: turn tensors into raw pointers and strides,
// allocate outputs, pick the stream. Argument checks live in Python (dllm_kernels/ops), which is the
// only caller; the TORCH_CHECKs here guard the internal contract.
#pragma once

#include <torch/extension.h>

namespace dllm::bindings {

void register_logits_to_confidence(pybind11::module_& m);
void register_select_unmask(pybind11::module_& m);

}  // namespace dllm::bindings
