#include "torch/bindings.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dllm-kernels compiled kernels (called through torch.ops.dllm.*, not directly)";
#ifdef DLLM_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
  dllm::bindings::register_logits_to_confidence(m);
  dllm::bindings::register_credit_confidence(m);
  dllm::bindings::register_select_unmask(m);
  dllm::bindings::register_sparse24_mm(m);
  dllm::bindings::register_block_attention(m);
  dllm::bindings::register_attention_mass(m);
  dllm::bindings::register_fast_path(m);
}
