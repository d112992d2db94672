// Helpers shared by the pybind11 binding files: dtype dispatch and CUDA error checks.
#pragma once
#include <torch/extension.h>

#include "cpu/types.h"

#ifdef FASTCORE_WITH_CUDA
#include <cuda_runtime.h>

#include "cuda/norm.h"
#endif

namespace fastcore {
namespace binding {

// Runs `fn` with the C++ element type of a CPU tensor; `op` names the caller in the error.
template <typename Fn>
void dispatch_cpu(at::ScalarType st, const char* op, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kDouble: fn(double{}); break;
    case at::kBFloat16: fn(fastcore::cpu::bf16{}); break;
    case at::kHalf: fn(fastcore::cpu::f16{}); break;
    default: TORCH_CHECK(false, "fastcore cpu ", op, " supports float32, float64, bfloat16 and float16, got ", st);
  }
}

#ifdef FASTCORE_WITH_CUDA
inline fastcore::cuda::DType cuda_dtype(at::ScalarType st, const char* op) {
  switch (st) {
    case at::kFloat: return fastcore::cuda::DType::f32;
    case at::kHalf: return fastcore::cuda::DType::f16;
    case at::kBFloat16: return fastcore::cuda::DType::bf16;
    default: TORCH_CHECK(false, "fastcore cuda ", op, " supports float32, bfloat16 and float16, got ", st);
  }
}

inline void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace binding
}  // namespace fastcore
