// credit_confidence's epilogue on the CPU: OpenMP over rows, each row the shared math of
// common/credit_confidence.h. The binding runs logits_to_confidence's scan (the rows' states) first.
#include "common/credit_confidence.h"

#include "cpu/simd.h"

namespace {

// A row's epilogue is ~S transcendentals: below this many slots in a call (every decode step's [B, L]), one
// thread beats a fork / join.
constexpr int64_t kMinParallelSlots = 1 << 16;

template <class T>
struct RowLoad {
  const T* row;
  float operator()(int64_t v) const { return dllm::simd::to_float(row[v]); }
};

template <class T>
void credit_rows(const DllmCreditParams& p, int num_threads) {
  const int64_t rows = p.n_outer * p.n_inner;
  const T* logits = static_cast<const T*>(p.logits);
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * p.slots >= kMinParallelSlots)
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = logits + (r / p.n_inner) * p.stride_outer + (r % p.n_inner) * p.stride_inner;
    dllm::credit_row(p, r, RowLoad<T>{row});
  }
}

}  // namespace

extern "C" void dllm_credit_confidence_cpu(const DllmCreditParams* params, int num_threads) {
  switch (params->dtype) {
    case DLLM_FLOAT32:
      credit_rows<float>(*params, num_threads);
      break;
    case DLLM_FLOAT16:
      credit_rows<_Float16>(*params, num_threads);
      break;
    case DLLM_BFLOAT16:
      credit_rows<dllm::simd::bf16>(*params, num_threads);
      break;
  }
}
