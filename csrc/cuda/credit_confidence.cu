// credit_confidence's epilogue on CUDA. Framework-free: raw pointers in, one launch on the caller's stream,
// no host sync and no allocation. One thread per row (grid-stride), each row the shared math of
// common/credit_confidence.h: S slots and S gathered logits, so a warp's rows are a few hundred bytes.
// The binding first enqueues logits_to_confidence's scan, which writes the rows' states.
#include <cuda_runtime.h>

#include <cstdint>

#include "common/credit_confidence.h"
#include "cuda/dtypes.cuh"
#include "cuda/launch.cuh"

namespace dllm {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 65536;  // more rows: grid-stride

template <class Tr>
struct RowLoad {
  const typename Tr::Storage* row;
  __device__ __forceinline__ float operator()(int64_t v) const { return Tr::to_float(row[v]); }
};

template <class Tr>
__global__ void __launch_bounds__(kThreads) credit_kernel(const DllmCreditParams p) {
  const int64_t rows = p.n_outer * p.n_inner;
  const auto* logits = static_cast<const typename Tr::Storage*>(p.logits);
  for (int64_t r = blockIdx.x * int64_t{kThreads} + threadIdx.x; r < rows; r += int64_t{gridDim.x} * kThreads) {
    const auto* row = logits + (r / p.n_inner) * p.stride_outer + (r % p.n_inner) * p.stride_inner;
    credit_row(p, r, RowLoad<Tr>{row});
  }
}

}  // namespace
}  // namespace dllm

extern "C" int dllm_credit_confidence_cuda(const DllmCreditParams* params, cudaStream_t stream) {
  using namespace dllm;
  const DllmCreditParams& p = *params;
  const int64_t rows = p.n_outer * p.n_inner;
  if (rows == 0) return cudaSuccess;
  const int grid = grid_size(min_i64(ceil_div(rows, kThreads), kMaxGrid));
  switch (p.dtype) {
    case DLLM_FLOAT32:
      credit_kernel<F32><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DLLM_FLOAT16:
      credit_kernel<F16><<<grid, kThreads, 0, stream>>>(p);
      break;
    case DLLM_BFLOAT16:
      credit_kernel<BF16><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
