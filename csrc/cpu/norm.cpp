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
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

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

// Outputs this large are written with non-temporal stores: they will not be re-read
// from cache soon, and bypassing it saves the read-for-ownership of every line.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

inline void stream_store(float* dst, const float* src, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j < n && reinterpret_cast<uintptr_t>(dst + j) % 64; ++j) dst[j] = src[j];
  for (; j + 16 <= n; j += 16) _mm512_stream_ps(dst + j, _mm512_loadu_ps(src + j));
#elif defined(__AVX__)
  for (; j < n && reinterpret_cast<uintptr_t>(dst + j) % 32; ++j) dst[j] = src[j];
  for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
#endif
  for (; j < n; ++j) dst[j] = src[j];
}

inline void stream_store(double* dst, const double* src, int64_t n) { std::memcpy(dst, src, n * sizeof(double)); }

// Writes a finished row from the thread's row buffer: streamed for float/double, converted otherwise.
template <typename T>
inline void store_row(T* dst, const acc_t<T>* src, int64_t N) {
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    stream_store(dst, src, N);
  } else {
    for (int64_t j = 0; j < N; ++j) dst[j] = from_acc<T>(src[j]);
  }
}

inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();  // make this thread's streamed rows visible before the parallel region ends
#endif
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
    constexpr bool same = std::is_same_v<T, A>;
    const bool direct = same && M * N * int64_t(sizeof(T)) < kStreamBytes;  // write y in place
    std::vector<A> in(same ? 0 : N), out(direct ? 0 : N);
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
      A* yr = direct ? reinterpret_cast<A*>(y + i * N) : out.data();
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
      if (!direct) store_row(y + i * N, yr, N);
    }
    stream_fence();
  }
}

// One row of the backward. Pass 1: the row sums sum(wdy*xhat), sum(wdy), fused with the
// dW partial. Pass 2: dx and the dB partial. Both re-read the row from L1 instead of staging temporaries.
template <bool DW, bool DB, typename A>
inline void norm_bwd_row(const A* xr, const A* dyr, const A* wa, A mu, A r, A inv_n, bool centered,
                         A* dxr, A* cdw, A* cdb, int64_t N) {
  A s_gx = 0, s_g = 0;
#pragma omp simd reduction(+ : s_gx, s_g)
  for (int64_t j = 0; j < N; ++j) {
    const A xh = (xr[j] - mu) * r, g = dyr[j] * wa[j];
    s_gx += g * xh;
    s_g += g;
    if constexpr (DW) cdw[j] += dyr[j] * xh;
  }
  const A c1 = s_gx * inv_n, c2 = centered ? s_g * inv_n : A(0);
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    dxr[j] = r * (dyr[j] * wa[j] - ((xr[j] - mu) * r * c1 + c2));
    if constexpr (DB) cdb[j] += dyr[j];  // here, to balance the two passes' memory streams
  }
}

template <typename T>
void norm_bwd(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const T* w,
              const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, acc_t<T>* dw, acc_t<T>* db,
              int64_t M, int64_t N, bool centered, int num_threads) {
  using A = acc_t<T>;
  constexpr bool same = std::is_same_v<T, A>;
  std::vector<A> wv = vector_or_empty(w, N);
  if (!w) wv.assign(N, A(1));
  const A* wa = wv.data();
  const A inv_n = A(1) / A(N);
  if (!centered) db = nullptr;
  const int64_t chunks = (dw || db) ? partial_chunks(M, N) : std::max<int64_t>(M, 1);
  const int64_t rows_per_chunk = (M + chunks - 1) / chunks;
  // Per chunk: [dW partial | pad | dB partial | pad]; the pad keeps the two rows from
  // sharing 4 KiB-aliased addresses, which stalls the fused update loop.
  const int64_t db_off = N + 40, stride = 2 * db_off;
  std::vector<A> partial((dw || db) ? chunks * stride : 0, A(0));
#pragma omp parallel num_threads(num_threads) if (M * N > 16384)
  {
    const bool direct = same && M * N * int64_t(sizeof(T)) < kStreamBytes;  // write dx in place
    std::vector<A> xin(same ? 0 : N), dyin(same ? 0 : N), out(direct ? 0 : N);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      A* cdw = dw ? partial.data() + c * stride : nullptr;
      A* cdb = db ? partial.data() + c * stride + db_off : nullptr;
      const int64_t end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; ++i) {
        const A* xr = as_acc(x + i * x_stride, xin.data(), N);
        const A* dyr = as_acc(dy + i * dy_stride, dyin.data(), N);
        const A mu = centered ? mean[i] : A(0), r = rstd[i];
        A* dxr = direct ? reinterpret_cast<A*>(dx + i * N) : out.data();
        if (cdw && cdb) {
          norm_bwd_row<true, true>(xr, dyr, wa, mu, r, inv_n, centered, dxr, cdw, cdb, N);
        } else if (cdw) {
          norm_bwd_row<true, false>(xr, dyr, wa, mu, r, inv_n, centered, dxr, cdw, cdb, N);
        } else if (cdb) {
          norm_bwd_row<false, true>(xr, dyr, wa, mu, r, inv_n, centered, dxr, cdw, cdb, N);
        } else {
          norm_bwd_row<false, false>(xr, dyr, wa, mu, r, inv_n, centered, dxr, cdw, cdb, N);
        }
        if (!direct) store_row(dx + i * N, dxr, N);
      }
    }
    stream_fence();
  }
  if (!dw && !db) return;
  // Second pass: sum the chunk partials in a fixed order, parallel over column blocks.
  constexpr int64_t kCols = 256;
  const int64_t blocks = (N + kCols - 1) / kCols;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (chunks * N > 16384)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo = blk * kCols, hi = std::min(N, lo + kCols);
    for (int64_t k = 0; k < 2; ++k) {
      A* dst = k == 0 ? dw : db;
      if (!dst) continue;
      std::fill(dst + lo, dst + hi, A(0));
      for (int64_t c = 0; c < chunks; ++c) {
        const A* p = partial.data() + c * stride + k * db_off;
#pragma omp simd
        for (int64_t j = lo; j < hi; ++j) dst[j] += p[j];
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
