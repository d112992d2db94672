// Fused AdamW / Adam on the CPU: one OpenMP loop over the chunks of every tensor.
//
// The step is pure memory traffic (read p, g, m, v; write p, m, v), so the only goals are one pass
// over each byte, a vectorised inner loop, and no barrier per tensor: all chunks of all tensors are
// one static OpenMP schedule. Bias corrections are computed in double per chunk, as PyTorch does on
// the host. The launcher also counts the step of every tensor, unless found_inf skips it all.
// 16-bit parameters are widened and rounded to nearest even in the loop; their state is fp32.
#include "adamw.h"

#include <omp.h>

#include <cmath>
#include <type_traits>

#include "convert.h"

namespace fastcore {
namespace cpu {
namespace {

enum Col { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq, kMaster, kStep, kNumel, kCols };

template <typename P>
P* address(const int64_t* row, int col) {
  return reinterpret_cast<P*>(static_cast<intptr_t>(row[col]));
}

// Per-tensor constants of one step, folded so the inner loop is multiplies, one sqrt and one divide.
template <typename A>
struct Coefs {
  A grad_mul;     // 1/grad_scale, negated for maximize
  A decay;        // decoupled: 1 - lr*wd; else 1
  A l2;           // L2 (Adam): wd; else 0
  A beta1, one_minus_beta1, beta2, one_minus_beta2;
  A step_size;    // lr / (1 - beta1^step)
  A inv_bc2_sqrt; // 1 / sqrt(1 - beta2^step): a multiply, leaving one divide in the loop
  A eps;
};

template <typename A>
Coefs<A> coefs(const int64_t* row, const double* hp, const AdamWOptions& opt) {
  const double lr = hp[0], wd = hp[1];
  const double step = *address<const float>(row, kStep);
  double grad_mul = opt.grad_scale ? 1.0 / double(*opt.grad_scale) : 1.0;
  if (opt.maximize) grad_mul = -grad_mul;
  Coefs<A> c;
  c.grad_mul = A(grad_mul);
  c.decay = A(opt.decoupled ? 1.0 - lr * wd : 1.0);
  c.l2 = A(opt.decoupled ? 0.0 : wd);
  c.beta1 = A(opt.beta1);
  c.one_minus_beta1 = A(1.0 - opt.beta1);
  c.beta2 = A(opt.beta2);
  c.one_minus_beta2 = A(1.0 - opt.beta2);
  c.step_size = A(lr / (1.0 - std::pow(opt.beta1, step)));
  c.inv_bc2_sqrt = A(1.0 / std::sqrt(1.0 - std::pow(opt.beta2, step)));
  c.eps = A(opt.eps);
  return c;
}

template <typename T, bool AMSGRAD, bool MASTER>
void update(T* __restrict p, const T* __restrict g, acc_t<T>* __restrict m, acc_t<T>* __restrict v,
            acc_t<T>* __restrict vmax, float* __restrict master, int64_t n, const Coefs<acc_t<T>>& c) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    A gi = to_acc(g[i]) * c.grad_mul;
    A x = MASTER ? A(master[i]) : to_acc(p[i]);
    x *= c.decay;
    gi += c.l2 * x;
    const A mi = c.beta1 * m[i] + c.one_minus_beta1 * gi;
    const A vi = c.beta2 * v[i] + c.one_minus_beta2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    A vhat = vi;
    if constexpr (AMSGRAD) {
      vhat = vmax[i] > vi ? vmax[i] : vi;
      vmax[i] = vhat;
    }
    x -= c.step_size * mi / (std::sqrt(vhat) * c.inv_bc2_sqrt + c.eps);
    if constexpr (MASTER) master[i] = float(x);
    p[i] = from_acc<T>(x);
  }
}

template <typename T, bool AMSGRAD, bool MASTER>
void step_all(const int64_t* meta, const double* hparams, const int32_t* chunks, int64_t n_chunks,
              int64_t chunk_size, const AdamWOptions& opt, int num_threads) {
  using A = acc_t<T>;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t t = chunks[2 * c], k = chunks[2 * c + 1];
    const int64_t* row = meta + kCols * t;
    const int64_t begin = k * chunk_size, numel = row[kNumel];
    const int64_t n = numel - begin < chunk_size ? numel - begin : chunk_size;
    if (n <= 0) continue;
    const Coefs<A> co = coefs<A>(row, hparams + 2 * t, opt);
    update<T, AMSGRAD, MASTER>(address<T>(row, kParam) + begin, address<const T>(row, kGrad) + begin,
                               address<A>(row, kExpAvg) + begin, address<A>(row, kExpAvgSq) + begin,
                               AMSGRAD ? address<A>(row, kMaxExpAvgSq) + begin : nullptr,
                               MASTER ? address<float>(row, kMaster) + begin : nullptr, n, co);
  }
}

}  // namespace

template <typename T>
void adamw_step(const int64_t* meta, int64_t n_tensors, const double* hparams, const int32_t* chunks,
                int64_t n_chunks, int64_t chunk_size, const AdamWOptions& opt, int num_threads) {
  if (opt.found_inf && *opt.found_inf != 0.0f) return;
  for (int64_t t = 0; t < n_tensors; ++t) *address<float>(meta + kCols * t, kStep) += 1.0f;
  const auto run = [&](auto amsgrad, auto master) {
    step_all<T, decltype(amsgrad)::value, decltype(master)::value>(meta, hparams, chunks, n_chunks, chunk_size,
                                                                   opt, num_threads);
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (opt.amsgrad) {
    opt.has_master ? run(Y{}, Y{}) : run(Y{}, N{});
  } else {
    opt.has_master ? run(N{}, Y{}) : run(N{}, N{});
  }
}

#define FASTCORE_ADAMW(T)                                                                           \
  template void adamw_step<T>(const int64_t*, int64_t, const double*, const int32_t*, int64_t, int64_t, \
                              const AdamWOptions&, int);
FASTCORE_ADAMW(float)
FASTCORE_ADAMW(double)
FASTCORE_ADAMW(bf16)
FASTCORE_ADAMW(f16)
#undef FASTCORE_ADAMW

}  // namespace cpu
}  // namespace fastcore
