// LayerNorm and RMSNorm on the CPU: raw pointers only, so this compiles without torch headers.
#pragma once
#include <cstdint>

#include "types.h"

namespace fastcore {
namespace cpu {

// y = (x - mean) * rstd * w + b over the last dim; `centered == false` is RMSNorm
// (no mean, no bias; `mean` and `b` are ignored). w and b may be null.
template <typename T>
void norm_fwd(const T* x, int64_t x_stride, const T* w, const T* b, T* y,
              acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N, double eps,
              bool centered, int num_threads);

// dx (contiguous), plus dw/db summed over rows (null to skip). dW/dB partial sums
// are per fixed row chunk (a function of M and N only), so results do not depend
// on the thread count.
template <typename T>
void norm_bwd(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const T* w,
              const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, acc_t<T>* dw, acc_t<T>* db,
              int64_t M, int64_t N, bool centered, int num_threads);

}  // namespace cpu
}  // namespace fastcore
