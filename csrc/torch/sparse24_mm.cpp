#include "common/sparse24_mm.h"

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

constexpr const char* kOp = "sparse24_mm";

// x2d [M, K] with unit last stride; values, meta, bias (undefined: none) contiguous.
struct Sparse24Launch {
  DllmSparse24Params params;
  Tensor out;

  Sparse24Launch(const Tensor& x2d, const Tensor& values, const Tensor& meta, const Tensor& bias) {
    out = at::empty({x2d.size(0), values.size(0)}, x2d.options());
    params = DllmSparse24Params{
        x2d.data_ptr(),
        x2d.size(0),
        x2d.size(1),
        x2d.stride(0),
        values.data_ptr(),
        meta.data_ptr<int16_t>(),
        values.size(0),
        bias.defined() ? bias.data_ptr() : nullptr,
        out.data_ptr(),
        dtype_code(values, kOp),
        dtype_code(x2d, kOp),
    };
  }
};

// The product of x [..., K] on its device: out [..., N]. x may be fp32 beside a 16-bit weight on the CPU
// (armor_linear's fp32 inner product).
Tensor run(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  Tensor x2d = x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
  if (x2d.stride(1) != 1 && x2d.size(1) > 1) x2d = x2d.contiguous();
  const Tensor values_c = values.contiguous(), meta_c = meta.contiguous();
  Sparse24Launch launch(x2d, values_c, meta_c, bias ? bias->contiguous() : Tensor());
  auto shape = x.sizes().vec();
  shape.back() = values.size(0);
  if (x.is_cpu()) {
    dllm_sparse24_mm_cpu(&launch.params, at::get_num_threads());
#ifdef DLLM_WITH_CUDA
  } else if (x.is_cuda()) {
    const c10::cuda::CUDAGuard guard(x.device());
    if (launch.out.numel() == 0) return launch.out.view(shape);
    const size_t bytes = dllm_sparse24_mm_cuda_workspace(&launch.params);
    const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
    const int err = dllm_sparse24_mm_cuda(&launch.params, bytes ? workspace.data_ptr() : nullptr,
                                          c10::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == 0, "dllm::sparse24_mm: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
#endif
  } else {
    TORCH_CHECK(false, "dllm::sparse24_mm: internal: no compiled kernel for ", x.device());
  }
  return launch.out.view(shape);
}

// A call the Python checks accept (a subset of them is enough: anything else goes to Python).
bool accepts(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  if (!is_float(values) || values.dim() != 2 || values.size(1) % 8 != 0) return false;
  const int64_t n = values.size(0), k = 2 * values.size(1);
  const auto device = values.device();
  if (meta.scalar_type() != at::kShort || meta.dim() != 2 || meta.size(0) != n || meta.size(1) != k / 16 ||
      meta.device() != device)
    return false;
  if (x.scalar_type() != values.scalar_type() || x.dim() < 1 || x.size(-1) != k || x.device() != device) return false;
  return !bias || (bias->scalar_type() == values.scalar_type() && bias->dim() == 1 && bias->size(0) == n &&
                   bias->device() == device);
}

// blockdiag(blocks) applied to the last dim of v [M, n] (fp32): each block of v times its block's
// transpose, one batched product.
Tensor block_diagonal_apply(const Tensor& blocks, const Tensor& v) {
  const int64_t n_blocks = blocks.size(0), size = blocks.size(1), rows = v.size(0);
  const Tensor by_block = v.view({rows, n_blocks, size}).transpose(0, 1);  // [G, M, bs]
  return at::bmm(by_block, blocks.to(at::kFloat).transpose(1, 2)).transpose(0, 1).reshape({rows, n_blocks * size});
}

#ifdef DLLM_WITH_CUDA
// armor_linear on CUDA (csrc/cuda/sparse24_mm.cu): wrap_in kernel, the mma.sp product with wrap_out fused in
// its epilogue (or applied after a split K), all on the current stream into one workspace.
Tensor armor_cuda_run(const Tensor& x, const Tensor& wrap_in, const Tensor& values, const Tensor& meta,
                      const Tensor& wrap_out, const std::optional<Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor x2d = x.reshape({c10::multiply_integers(x.sizes().slice(0, x.dim() - 1)), x.size(-1)});
  if (x2d.stride(1) != 1 && x2d.size(1) > 1) x2d = x2d.contiguous();
  const Tensor values_c = values.contiguous(), meta_c = meta.contiguous();
  const Tensor wrap_in_c = wrap_in.contiguous(), wrap_out_c = wrap_out.contiguous();
  Sparse24Launch launch(x2d, values_c, meta_c, bias ? bias->contiguous() : Tensor());
  auto shape = x.sizes().vec();
  shape.back() = values.size(0);
  const DllmArmorParams params{launch.params, wrap_in_c.data_ptr(), wrap_in_c.size(1), wrap_out_c.data_ptr(),
                               wrap_out_c.size(1)};
  if (launch.out.numel() == 0) return launch.out.view(shape);
  const size_t bytes = dllm_armor_linear_cuda_workspace(&params);
  const Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
  const int err = dllm_armor_linear_cuda(&params, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "dllm::armor_linear: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return launch.out.view(shape);
}

// A wrap_out block size the CUDA kernel takes: a power of two up to 256.
bool cuda_wrap_out(int64_t bs) { return bs > 0 && (bs & (bs - 1)) == 0 && bs <= 256; }
#endif

// armor_linear on the CPU: the reference's fp32 composition (dllm_kernels/reference/sparse24.py) with the
// sparse kernel on the fp32 inner product (it takes an fp32 x beside a 16-bit weight: nothing is rounded
// between the three products).
Tensor armor_run(const Tensor& x, const Tensor& wrap_in, const Tensor& values, const Tensor& meta,
                 const Tensor& wrap_out, const std::optional<Tensor>& bias) {
  TORCH_CHECK(x.is_cpu(), "dllm::armor_linear: internal: the compiled armor_linear runs CPU tensors");
  const int64_t k = x.size(-1), rows = c10::multiply_integers(x.sizes().slice(0, x.dim() - 1));
  const Tensor inner = block_diagonal_apply(wrap_in, x.reshape({rows, k}).to(at::kFloat));
  Tensor out = block_diagonal_apply(wrap_out, run(inner, values, meta, std::nullopt));
  if (bias) out = out + bias->to(at::kFloat);
  auto shape = x.sizes().vec();
  shape.back() = values.size(0);
  return out.to(x.scalar_type()).view(shape);
}

// wrap_in / wrap_out: [size / bs, bs, bs] blocks in x's dtype and device.
bool is_wrap(const Tensor& blocks, int64_t size, const Tensor& x) {
  return blocks.dim() == 3 && blocks.size(1) == blocks.size(2) && blocks.size(1) > 0 &&
         blocks.size(0) * blocks.size(1) == size && blocks.scalar_type() == x.scalar_type() &&
         blocks.device() == x.device();
}

// The op's kernel for the CPU and CUDA dispatch keys.
Tensor op(const Tensor& x, const Tensor& values, const Tensor& meta, const std::optional<Tensor>& bias) {
  if (fast_path_enabled() && accepts(x, values, meta, bias)) return run(x, values, meta, bias);
  namespace py = pybind11;
  const py::gil_scoped_acquire gil;
  return python_impl(kOp, py::make_tuple(x, values, meta, bias), py::dict()).cast<Tensor>();
}

// armor_linear's kernel for the CPU and CUDA dispatch keys.
Tensor armor_op(const Tensor& x, const Tensor& wrap_in, const Tensor& values, const Tensor& meta,
                const Tensor& wrap_out, const std::optional<Tensor>& bias) {
  if (fast_path_enabled() && accepts(x, values, meta, bias) && is_wrap(wrap_in, 2 * values.size(1), x) &&
      is_wrap(wrap_out, values.size(0), x)) {
    if (x.is_cpu()) return armor_run(x, wrap_in, values, meta, wrap_out, bias);
#ifdef DLLM_WITH_CUDA
    if (x.is_cuda() && cuda_wrap_out(wrap_out.size(1))) return armor_cuda_run(x, wrap_in, values, meta, wrap_out, bias);
#endif
  }
  namespace py = pybind11;
  const py::gil_scoped_acquire gil;
  return python_impl("armor_linear", py::make_tuple(x, wrap_in, values, meta, wrap_out, bias), py::dict())
      .cast<Tensor>();
}

}  // namespace

void register_sparse24_mm(pybind11::module_& m) {
  // The cpu and cuda providers (Python has chosen and checked): the same kernels behind use_backend.
  m.def("sparse24_mm_run", &run);
  m.def("armor_linear_run", &armor_run);
#ifdef DLLM_WITH_CUDA
  m.def("armor_linear_cuda_run", &armor_cuda_run);
#endif
}

}  // namespace dllm::bindings

TORCH_LIBRARY_IMPL(dllm, CPU, m) {
  m.impl("sparse24_mm", TORCH_FN(dllm::bindings::op));
  m.impl("armor_linear", TORCH_FN(dllm::bindings::armor_op));
}
#ifdef DLLM_WITH_CUDA
TORCH_LIBRARY_IMPL(dllm, CUDA, m) {
  m.impl("sparse24_mm", TORCH_FN(dllm::bindings::op));
  m.impl("armor_linear", TORCH_FN(dllm::bindings::armor_op));
}
#endif
