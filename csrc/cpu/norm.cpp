// LayerNorm / RMSNorm forward and backward on the CPU.
//
// One row at a time per thread (OpenMP over rows); every pass is a contiguous
// loop the compiler vectorises, widening 16-bit inputs on the fly so a row stays
// small in cache. The forward takes the mean, then the variance around it (two
// passes, exact for rows far from zero or with an outlier), then writes y. The backward
// fuses the dW/dB partials into its two passes. float/double outputs are written
// in place; 16-bit ones are staged by L1-sized tiles, then narrowed.
#include "norm.h"

#include "convert.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fastcore {
namespace cpu {
namespace {

// Writes a finished tile of a 16-bit output row from the thread's L1 staging buffer.
template <typename T>
inline void store_row(T* dst, const acc_t<T>* src, int64_t N) {
  if constexpr (std::is_same_v<T, bf16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
    for (int64_t j = 0; j < N; ++j) bits[j] = bf16_bits(src[j]);
  } else {
    for (int64_t j = 0; j < N; ++j) dst[j] = from_acc<T>(src[j]);
  }
}


// Weight or bias in the accumulator type, or `fill` when absent.
template <typename T>
std::vector<acc_t<T>> vector_or(const T* p, int64_t N, acc_t<T> fill) {
  std::vector<acc_t<T>> out(N, fill);
  if (p) {
    for (int64_t j = 0; j < N; ++j) out[j] = to_acc(p[j]);
  }
  return out;
}

// Columns staged per tile when a 16-bit output row is narrowed.
constexpr int64_t kTile = 512;

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
  // A missing weight is ones and a missing bias zeros: one loop, two cheap L1 loads.
  const std::vector<A> wa = vector_or(w, N, A(1)), ba = vector_or(centered ? b : nullptr, N, A(0));
  const A inv_n = A(1) / A(N);
#pragma omp parallel num_threads(num_threads) if (M * N > 16384)
  {
    constexpr bool same = std::is_same_v<T, A>;
    constexpr bool direct = same;  // float/double outputs are written in place
    std::vector<A> out(direct ? 0 : kTile);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      const T* xr = x + i * x_stride;  // 16-bit rows are widened on the fly in every pass
      // Two passes, the mean then mean((x - mean)^2), re-reading the row from cache: a one-pass
      // E[x^2] - E[x]^2 cancels catastrophically when one element (an outlier channel) dominates.
      A mu = 0;
      if (centered) {
        A s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < N; ++j) s += to_acc(xr[j]);
        mu = s * inv_n;
      }
      A ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < N; ++j) {
        const A t = to_acc(xr[j]) - mu;
        ss += t * t;
      }
      const A r = A(1) / std::sqrt(ss * inv_n + A(eps));
      if (centered) mean[i] = mu;
      rstd[i] = r;
      for (int64_t j0 = 0; j0 < N; j0 += kTile) {  // tiles keep the staging buffer in L1
        const int64_t n = std::min(kTile, N - j0);
        const T* xt = xr + j0;
        const A *wt = wa.data() + j0, *bt = ba.data() + j0;
        A* yt = direct ? reinterpret_cast<A*>(y + i * N + j0) : out.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) yt[j] = (to_acc(xt[j]) - mu) * r * wt[j] + bt[j];
        if constexpr (!direct) store_row(y + i * N + j0, yt, n);
      }
    }
  }
}

// One row of the backward. Pass 1: the row sums sum(wdy*xhat), sum(wdy), fused with the
// dW partial. Pass 2, by tiles: dx and the dB partial. Both re-read the row from L1
// instead of staging temporaries; 16-bit dx goes through the `tile` buffer.
template <bool DW, bool DB, typename T, typename A>
inline void norm_bwd_row(const T* xr, const T* dyr, const A* wa, A mu, A r, A inv_n, bool centered,
                         T* dx, A* tile, A* cdw, A* cdb, int64_t N) {
  constexpr bool direct = std::is_same_v<T, A>;
  A s_gx = 0, s_g = 0;
#pragma omp simd reduction(+ : s_gx, s_g)
  for (int64_t j = 0; j < N; ++j) {
    const A xh = (to_acc(xr[j]) - mu) * r, dyj = to_acc(dyr[j]), g = dyj * wa[j];
    s_gx += g * xh;
    s_g += g;
    if constexpr (DW) cdw[j] += dyj * xh;
  }
  const A c1 = s_gx * inv_n, c2 = centered ? s_g * inv_n : A(0);
  for (int64_t j0 = 0; j0 < N; j0 += kTile) {
    const int64_t n = std::min(kTile, N - j0);
    const T *xt = xr + j0, *dyt = dyr + j0;
    const A* wt = wa + j0;
    A* dxt = direct ? reinterpret_cast<A*>(dx + j0) : tile;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const A dyj = to_acc(dyt[j]);
      dxt[j] = r * (dyj * wt[j] - ((to_acc(xt[j]) - mu) * r * c1 + c2));
      if constexpr (DB) cdb[j0 + j] += dyj;  // here, to balance the two passes' memory streams
    }
    if constexpr (!direct) store_row(dx + j0, dxt, n);
  }
}

template <typename T>
void norm_bwd(const T* dy, int64_t dy_stride, const T* x, int64_t x_stride, const T* w,
              const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, acc_t<T>* dw, acc_t<T>* db,
              int64_t M, int64_t N, bool centered, int num_threads) {
  using A = acc_t<T>;
  constexpr bool same = std::is_same_v<T, A>;
  const std::vector<A> wv = vector_or(w, N, A(1));
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
    std::vector<A> out(same ? 0 : kTile);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      A* cdw = dw ? partial.data() + c * stride : nullptr;
      A* cdb = db ? partial.data() + c * stride + db_off : nullptr;
      const int64_t end = std::min(M, (c + 1) * rows_per_chunk);
      for (int64_t i = c * rows_per_chunk; i < end; ++i) {
        const T* xr = x + i * x_stride;
        const T* dyr = dy + i * dy_stride;
        const A mu = centered ? mean[i] : A(0), r = rstd[i];
        T* dxr = dx + i * N;
        if (cdw && cdb) {
          norm_bwd_row<true, true>(xr, dyr, wa, mu, r, inv_n, centered, dxr, out.data(), cdw, cdb, N);
        } else if (cdw) {
          norm_bwd_row<true, false>(xr, dyr, wa, mu, r, inv_n, centered, dxr, out.data(), cdw, cdb, N);
        } else if (cdb) {
          norm_bwd_row<false, true>(xr, dyr, wa, mu, r, inv_n, centered, dxr, out.data(), cdw, cdb, N);
        } else {
          norm_bwd_row<false, false>(xr, dyr, wa, mu, r, inv_n, centered, dxr, out.data(), cdw, cdb, N);
        }
      }
    }
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
