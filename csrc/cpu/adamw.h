// Fused multi-tensor AdamW / Adam step on the CPU: raw pointers only, so this compiles without torch headers.
//
// The launch tables (built by fastcore/ops/adamw.py, the same for every backend):
//   meta    int64  (n_tensors, 8): addresses of param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq (0 without
//           amsgrad), fp32 master (0 without), the float32 step count, then numel.
//   hparams double (n_tensors, 2): lr and weight_decay of each tensor.
//   chunks  int32  (n_chunks, 2): (tensor, chunk k), covering elements [k*chunk_size, (k+1)*chunk_size).
#pragma once
#include <cstdint>

#include "types.h"

namespace fastcore {
namespace cpu {

// Elements per OpenMP work item: small tensors stay one item, large ones spread over the threads.
constexpr int64_t kAdamWChunk = 32768;

struct AdamWOptions {
  double beta1, beta2, eps;
  bool amsgrad, has_master, maximize, decoupled;
  const float* grad_scale;  // null, or g is divided by it
  const float* found_inf;   // null, or nonzero skips the whole step
};

// T is the parameter (and gradient) type; the state is acc_t<T>. Unlike the GPU launchers, this one
// adds 1 to each tensor's step first (the GPU ones read steps a foreach already counted).
template <typename T>
void adamw_step(const int64_t* meta, int64_t n_tensors, const double* hparams, const int32_t* chunks,
                int64_t n_chunks, int64_t chunk_size, const AdamWOptions& opt, int num_threads);

}  // namespace cpu
}  // namespace fastcore
