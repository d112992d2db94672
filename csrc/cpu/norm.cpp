// LayerNorm / RMSNorm forward and backward on the CPU.
//
// One row at a time per thread (OpenMP over rows). A row is converted to the
// accumulator type once into a thread-local buffer (skipped for float/double),
// then every pass is a contiguous loop the compiler vectorises. The forward makes
// one statistics pass over data shifted by the row's first element (accurate for
// rows far from zero) and one output pass; y subtracts the shift and the small
// mean correction separately. The backward fuses the dW/dB partials into its
// row-sum pass.
#include "norm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastcore {
namespace cpu {
namespace {

inline float to_acc(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_acc(f16 v) {
  uint32_t sign = uint32_t(v.bits & 0x8000u) << 16, exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal half: renormalise
    exp = 113;
    while (!(man & 0x400u)) { man <<= 1; --exp; }
    u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

template <typename T> inline T from_acc(acc_t<T> v);
template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }

template <> inline bf16 from_acc<bf16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{uint16_t(u >> 16)};
}

template <> inline f16 from_acc<f16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (u >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds past 65504: inf
  if (u >= 0x38800000u) {  // normal half: rebias the exponent, round to nearest even
    const uint32_t h = ((u + 0xfffu + ((u >> 13) & 1u)) >> 13) - (112u << 10);
    return f16{uint16_t(sign | h)};
  }
  if (u < 0x33000000u) return f16{sign};  // rounds to zero
  // subnormal half: shift the implicit-one mantissa into place, round to nearest even
  const uint32_t e = u >> 23, m = (u & 0x7fffffu) | 0x800000u, shift = 126u - e;
  uint32_t h = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return f16{uint16_t(sign | h)};
}

// The row as accumulator values: the row itself when T is the accumulator type.
template <typename T>
inline const acc_t<T>* as_acc(const T* row, acc_t<T>* buf, int64_t N) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return row;
  } else {
    for (int64_t j = 0; j < N; ++j) buf[j] = to_acc(row[j]);
    return buf;
  }
}

template <typename T>
std::vector<acc_t<T>> vector_or_empty(const T* p, int64_t N) {
  std::vector<acc_t<T>> out;
  if (p) {
    out.resize(N);
    for (int64_t j = 0; j < N; ++j) out[j] = to_acc(p[j]);
  }
  return out;
}

// Rows per dW/dB partial: enough chunks to keep threads busy, few enough to keep the buffer small.
inline int64_t partial_chunks(int64_t M, int64_t N) {
  const int64_t by_memory = std::max<int64_t>(1, (int64_t(1) << 22) / N);
  return std::max<int64_t>(1, std::min<int64_t>({M, 128, by_memory}));
}

}  // namespace

template <typename T>
void norm_fwd(const T* x, int64_t x_stride, const T* w, const T* b, T* y,
              acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N, double eps,
              bool centered, int num_threads) {
  using A = acc_t<T>;
  const std::vector<A> wv = vector_or_empty(w, N), bv = vector_or_empty(centered ? b : nullptr, N);
  const A* wa = w ? wv.data() : nullptr;
  const A* ba = (centered && b) ? bv.data() : nullptr;
  const A inv_n = A(1) / A(N);
#pragma omp parallel num_threads(num_threads) if (M * N > 16384)
  {
    std::vector<A> in(std::is_same_v<T, A> ? 0 : N), out(std::is_same_v<T, A> ? 0 : N);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const A* xr = as_acc(x + i * x_stride, in.data(), N);
      // One pass over data shifted by the row's first element: sums of x - K stay small
      // when the row sits far from zero, so var = E[t^2] - E[t]^2 loses about one bit.
      const A K = centered ? xr[0] : A(0);
      A s = 0, ss = 0;
#pragma omp simd reduction(+ : s, ss)
      for (int64_t j = 0; j < N; ++j) {
        const A t = xr[j] - K;
        s += t;
        ss += t * t;
      }
      const A mu = K, delta = centered ? s * inv_n : A(0);  // the mean is mu + delta
      ss -= s * delta;
      const A r = A(1) / std::sqrt(std::max(ss * inv_n, A(0)) + A(eps));
      if (centered) mean[i] = mu + delta;
      rstd[i] = r;
      A* yr = std::is_same_v<T, A> ? reinterpret_cast<A*>(y + i * N) : out.data();
      if (wa && ba) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yr[j] = ((xr[j] - mu) - delta) * r * wa[j] + ba[j];
      } else if (wa) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yr[j] = ((xr[j] - mu) - delta) * r * wa[j];
      } else if (ba) {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yr[j] = ((xr[j] - mu) - delta) * r + ba[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) yr[j] = ((xr[j] - mu) - delta) * r;
      }
      if constexpr (!std::is_same_v<T, A>) {
        T* dst = y + i * N;
        for (int64_t j = 0; j < N; ++j) dst[j] = from_acc<T>(yr[j]);
      }
    }
  }
}

template <typename T>
void norm_bwd(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const T* w,
              const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, acc_t<T>* dw, acc_t<T>* db,
              int64_t M, int64_t N, bool centered, int num_threads) {
  using A = acc_t<T>;
  const std::vector<A> wv = vector_or_empty(w, N);
  const A* wa = w ? wv.data() : nullptr;
  const A inv_n = A(1) / A(N);
  const bool partials = dw || (centered && db);
  const int64_t chunks = partials ? partial_chunks(M, N) : std::max<int64_t>(M, 1);
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  std::vector<A> pdw(dw ? chunks * N : 0, A(0)), pdb((centered && db) ? chunks * N : 0, A(0));
#pragma omp parallel num_threads(num_threads) if (M * N > 16384)
  {
    constexpr bool same = std::is_same_v<T, A>;
    std::vector<A> xin(same ? 0 : N), dyin(same ? 0 : N), out(same ? 0 : N);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      A* cdw = dw ? pdw.data() + c * N : nullptr;
      A* cdb = (centered && db) ? pdb.data() + c * N : nullptr;
      const int64_t end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; ++i) {
        const A* xr = as_acc(x + i * x_stride, xin.data(), N);
        const A* dyr = as_acc(dy + i * dy_stride, dyin.data(), N);
        const A mu = centered ? mean[i] : A(0), r = rstd[i];
        A s_gx = 0, s_g = 0;  // sum(wdy * xhat), sum(wdy)
        // Pass 1: the row sums, fused with the dW/dB partials. Pass 2: dx.
        // Both re-read the row from L1 instead of staging xhat and wdy.
        if (wa && cdw && cdb) {
#pragma omp simd reduction(+ : s_gx, s_g)
          for (int64_t j = 0; j < N; ++j) {
            const A xh = (xr[j] - mu) * r, g = dyr[j] * wa[j];
            s_gx += g * xh;
            s_g += g;
            cdw[j] += dyr[j] * xh;
            cdb[j] += dyr[j];
          }
        } else if (wa && cdw) {
#pragma omp simd reduction(+ : s_gx, s_g)
          for (int64_t j = 0; j < N; ++j) {
            const A xh = (xr[j] - mu) * r, g = dyr[j] * wa[j];
            s_gx += g * xh;
            s_g += g;
            cdw[j] += dyr[j] * xh;
          }
        } else {
#pragma omp simd reduction(+ : s_gx, s_g)
          for (int64_t j = 0; j < N; ++j) {
            const A g = wa ? dyr[j] * wa[j] : dyr[j];
            s_gx += g * (xr[j] - mu) * r;
            s_g += g;
          }
          if (cdb) {
#pragma omp simd
            for (int64_t j = 0; j < N; ++j) cdb[j] += dyr[j];
          }
        }
        const A c1 = s_gx * inv_n, c2 = centered ? s_g * inv_n : A(0);
        A* dxr = same ? reinterpret_cast<A*>(dx + i * N) : out.data();
        if (wa) {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) dxr[j] = r * (dyr[j] * wa[j] - ((xr[j] - mu) * r * c1 + c2));
        } else {
#pragma omp simd
          for (int64_t j = 0; j < N; ++j) dxr[j] = r * (dyr[j] - ((xr[j] - mu) * r * c1 + c2));
        }
        if constexpr (!same) {
          T* dst = dx + i * N;
          for (int64_t j = 0; j < N; ++j) dst[j] = from_acc<T>(dxr[j]);
        }
      }
    }
  }
  if (!partials) return;
  // Second pass: sum the chunk partials in a fixed order, parallel over column blocks.
  constexpr int64_t kCols = 256;
  const int64_t blocks = (N + kCols - 1) / kCols;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks * N > 16384)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kCols, hi = std::min(N, lo + kCols);
    for (int64_t j = lo; j < hi; ++j) {
      if (dw) dw[j] = 0;
      if (centered && db) db[j] = 0;
    }
    for (int64_t c = 0; c < chunks; ++c) {
      if (dw) {
        const A* p = pdw.data() + c * N;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) dw[j] += p[j];
      }
      if (centered && db) {
        const A* p = pdb.data() + c * N;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) db[j] += p[j];
      }
    }
  }
}

#define FASTCORE_INSTANTIATE(T)                                                                   \
  template void norm_fwd<T>(const T*, int64_t, const T*, const T*, T*, acc_t<T>*, acc_t<T>*,       \
                            int64_t, int64_t, double, bool, int);                                  \
  template void norm_bwd<T>(const T*, int64_t, const T*, int64_t, const T*, const acc_t<T>*,       \
                            const acc_t<T>*, T*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, bool, int);
FASTCORE_INSTANTIATE(float)
FASTCORE_INSTANTIATE(double)
FASTCORE_INSTANTIATE(bf16)
FASTCORE_INSTANTIATE(f16)
#undef FASTCORE_INSTANTIATE

}  // namespace cpu
}  // namespace fastcore
