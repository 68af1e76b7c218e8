// How the kernels address the rows of logits [..., V] (unit last stride), shared by the bindings that scan
// logits (logits_to_confidence, credit_confidence).
#pragma once

#include <torch/extension.h>

namespace dllm::bindings {

// Row (o, i) starts at o * stride_outer + i * stride_inner, in row-major order of the leading dims. The
// leading dims merge into two when they can (dllm_kernels.ops._common.rows_view is the same rule for
// Triton); otherwise `copy` holds them gathered.
struct Rows {
  at::Tensor copy;  // defined when the leading dims needed a gather
  const void* data;
  int64_t n_outer = 1, n_inner = 1, stride_outer = 0, stride_inner = 0;

  explicit Rows(const at::Tensor& logits) : data(logits.data_ptr()) {
    int64_t sizes[2], strides[2];
    int n = 0;
    for (int64_t d = 0; d + 1 < logits.dim(); ++d) {
      const int64_t size = logits.size(d), stride = logits.stride(d);
      if (size == 1) continue;
      if (n > 0 && strides[n - 1] == stride * size) {
        sizes[n - 1] *= size;
        strides[n - 1] = stride;
      } else if (n == 2) {
        copy = logits.reshape({-1, logits.size(-1)});
        data = copy.data_ptr();
        n_outer = 1;
        n_inner = copy.size(0);
        stride_inner = copy.stride(0);
        return;
      } else {
        sizes[n] = size;
        strides[n++] = stride;
      }
    }
    if (n == 2) {
      n_outer = sizes[0];
      stride_outer = strides[0];
    }
    if (n >= 1) {
      n_inner = sizes[n - 1];
      stride_inner = strides[n - 1];
    }
  }
};

}  // namespace dllm::bindings
