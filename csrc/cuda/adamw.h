#pragma once
// Multi-tensor fused Adam / AdamW step (see adamw.cu for the design).
//
// One launch updates every tensor of a parameter list.  The caller builds the
// three device tables described in the project's AdamW spec:
//   meta    int64  (n_tensors, 8): PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, MAX_EXP_AVG_SQ (0 unless
//                  amsgrad), MASTER (0 unless has_master), STEP (f32 scalar, already
//                  incremented), NUMEL
//   hparams double (n_tensors, 2): lr, weight_decay
//   chunks  int32  (n_chunks, 2): (tensor index, chunk index); chunk k of tensor t covers
//                  elements [k*chunk_size, min((k+1)*chunk_size, numel_t))
// Parameters and gradients have dtype param_dtype; optimizer state and master copies are f32.
// grad_scale and found_inf are nullable device pointers to f32 scalars; a nonzero
// *found_inf turns the whole launch into a no-op.
#include <cstdint>
#include <cuda_runtime.h>

#include "norm.h"  // DType

namespace fastcore { namespace cuda {

// Chunk size in elements the launcher expects the chunk table to be built with.
// Any positive chunk_size is handled correctly; this one is what the kernel is tuned for.
constexpr int64_t kAdamWChunk = 16384;

cudaError_t adamw_step(DType param_dtype, const int64_t* meta, const double* hparams, const int32_t* chunks,
                       int64_t n_chunks, int64_t chunk_size, double beta1, double beta2, float eps,
                       bool amsgrad, bool has_master, bool maximize, bool decoupled,
                       const float* grad_scale /*nullable, device*/, const float* found_inf /*nullable, device*/,
                       cudaStream_t stream);
}}
