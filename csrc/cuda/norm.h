#pragma once
// LayerNorm / RMSNorm forward and backward CUDA kernels (see norm.cu for the design).
//
// Workspace contract for the backward: dweight/dbias are reduced deterministically
// through fp32 partial rows.  Pass has_weight = (dweight != nullptr) and
// has_bias = (dbias != nullptr) to norm_bwd_workspace_floats; the dweight region
// comes first, then the dbias region, each norm_bwd_partial_rows(M, N) * N floats.
#include <cstdint>
#include <cstddef>
#include <cuda_runtime.h>
namespace fastcore { namespace cuda {
enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// Number of float partial rows the backward uses for dW/dB; the caller allocates
// a float workspace of norm_bwd_workspace_floats(M, N) elements (may be 0 when no weight).
int64_t norm_bwd_partial_rows(int64_t M, int64_t N);
int64_t norm_bwd_workspace_floats(int64_t M, int64_t N, bool has_weight, bool has_bias);

cudaError_t layer_norm_fwd(DType dt, const void* x, int64_t x_row_stride,
                           const void* weight /*nullable*/, const void* bias /*nullable*/,
                           void* y /*contiguous M x N*/, float* mean, float* rstd,
                           int64_t M, int64_t N, float eps, cudaStream_t stream);
cudaError_t layer_norm_bwd(DType dt, const void* dy, int64_t dy_row_stride,
                           const void* x, int64_t x_row_stride, const void* weight /*nullable*/,
                           const float* mean, const float* rstd,
                           void* dx /*contiguous M x N*/, float* dweight /*nullable, N*/, float* dbias /*nullable, N*/,
                           float* workspace, int64_t M, int64_t N, cudaStream_t stream);
cudaError_t rms_norm_fwd(DType dt, const void* x, int64_t x_row_stride, const void* weight /*nullable*/,
                         void* y, float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream);
cudaError_t rms_norm_bwd(DType dt, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                         const void* weight /*nullable*/, const float* rstd, void* dx, float* dweight /*nullable*/,
                         float* workspace, int64_t M, int64_t N, cudaStream_t stream);
}}
