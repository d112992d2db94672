// LayerNorm and RMSNorm, forward and backward, for fp32 / fp16 / bf16 storage.
//
// Both norms share every kernel; the template flag CENTERED selects LayerNorm
// (subtract the mean, optional bias) over RMSNorm.  All math is fp32.
//
// Work decomposition.  A "row group" of G threads owns one row at a time:
//   * G == 32 (one warp per row, ROWS rows per block) for narrow rows, so the
//     row reductions are pure register shuffles with no __syncthreads;
//   * G in {128, 512, 1024} with ROWS == 1 (one block per row) for wide rows;
//     warps reduce by shuffle, then every thread folds the per-warp results
//     from shared memory in the same fixed order.
// Each thread owns the chunks c = tid, tid + G, ... of VEC contiguous elements.
// VEC is 16 bytes worth of elements when all base pointers are 16-byte aligned
// and N and the row strides are multiples of VEC, else 1 (scalar path).
//
// Forward.  LayerNorm works on x - x[row, 0] so that a large common offset
// costs no digits.  When the row fits in CPT chunks per thread it is held in
// registers and the variance is an exact two-pass mean((x - mean)^2) over the
// registers.  Wider rows are streamed: each thread builds a Welford/Chan
// (count, mean, M2) state from per-chunk two-pass statistics, the states are
// merged across the group, and a second read of the row writes y.  Neither
// path forms E[x^2] - E[x]^2.
//
// Backward.  Block b of the dx kernel owns the contiguous rows
// [b*M/P, (b+1)*M/P) with P = norm_bwd_partial_rows(M, N), a function of M and
// N only.  It writes dx for those rows and the fp32 column sums of dy*xhat and
// dy over them into partial row b of the workspace, accumulated in registers
// (narrow rows) or directly in that block-private workspace row (wide rows).
// A second kernel sums the P partial rows of every column in a fixed order.
// With no atomics anywhere, dweight/dbias are bitwise reproducible.

#include "norm.h"

#include <cstddef>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.h"

namespace fastcore {
namespace cuda {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x limit; kernels grid-stride past it

// ---------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------

// to_float / from_float: convert.h

// Pack, load_f, store_f: convert.h

// ---------------------------------------------------------------------------
// Row-group reductions
// ---------------------------------------------------------------------------

template <int K>
struct SumState {
  static constexpr bool kCommutative = true;  // a + b == b + a bitwise
  float v[K];
  __device__ __forceinline__ void combine(const SumState& o) {
#pragma unroll
    for (int i = 0; i < K; ++i) v[i] += o.v[i];
  }
  __device__ __forceinline__ SumState shfl_xor(int lane_mask) const {
    SumState r;
#pragma unroll
    for (int i = 0; i < K; ++i) r.v[i] = __shfl_xor_sync(kFullMask, v[i], lane_mask);
    return r;
  }
};

// Chan's parallel merge of (count, mean, M2) states.  The update is written
// as a small correction to `mean`, which keeps the rounding error at about an
// ulp of the mean per merge even for rows with a large offset.
struct WelfordState {
  static constexpr bool kCommutative = false;  // merge(a, b) and merge(b, a) may differ in the last bit
  float n, mean, m2;
  __device__ __forceinline__ void combine(const WelfordState& o) {
    const float n_ab = n + o.n;
    if (n_ab == 0.f) return;  // both empty (threads with no chunks)
    // frac only scales a correction term, so the ~2 ulp fast division is
    // ample and avoids the IEEE division subroutine in the streaming loop.
    const float frac = __fdividef(o.n, n_ab);
    const float d = o.mean - mean;
    mean += d * frac;
    m2 += o.m2 + d * d * n * frac;
    n = n_ab;
  }
  __device__ __forceinline__ WelfordState shfl_xor(int lane_mask) const {
    return WelfordState{__shfl_xor_sync(kFullMask, n, lane_mask),
                        __shfl_xor_sync(kFullMask, mean, lane_mask),
                        __shfl_xor_sync(kFullMask, m2, lane_mask)};
  }
};

// All-reduce over a row group of G threads; every thread gets the result.
// G is a multiple of 32 (static_assert in the kernels), so every warp is full
// and the full-mask shuffles are valid.  For G > 32 the group is the whole
// block (ROWS == 1) and `smem` holds G/32 states.
template <int G, class S>
__device__ __forceinline__ S row_allreduce(S s, S* smem) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) s.combine(s.shfl_xor(m));
  // With a commutative merge the butterfly leaves bitwise identical values in
  // all lanes.  A non-commutative one may leave last-bit differences between
  // lanes, which is harmless only when a single lane's value is used next,
  // as in the block-wide fold below.
  static_assert(S::kCommutative || G > 32, "warp-only groups need a commutative merge");
  if constexpr (G > 32) {
    constexpr int kWarps = G / 32;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    if ((threadIdx.x & 31) == 0) smem[warp] = s;
    __syncthreads();
    S r = smem[0];
#pragma unroll
    for (int i = 1; i < kWarps; ++i) r.combine(smem[i]);
    // The caller may reduce again right away into the same buffer.
    __syncthreads();
    return r;
  }
  return s;
}

// ---------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------

template <typename T>
struct FwdParams {
  const T* x;
  int64_t x_stride;
  const T* w;  // nullable
  const T* b;  // nullable
  T* y;
  float* mean;  // nullable
  float* rstd;  // nullable
  int64_t M;
  int64_t N;
  float inv_n;  // 1/N from the host: keeps the IEEE division subroutine out of the kernels
  float eps;
};

// y, w, b point at this thread's first chunk (w, b may be null); `off` is
// the chunk's element offset from there.
template <typename T, int VEC>
__device__ __forceinline__ void write_normalized(T* y, const T* w, const T* b, int64_t off,
                                                 const float (&v)[VEC], float mu, float r) {
  float o[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = (v[i] - mu) * r;
  if (w != nullptr) {
    float wv[VEC];
    load_f<T, VEC>(w + off, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] *= wv[i];
  }
  if (b != nullptr) {
    float bv[VEC];
    load_f<T, VEC>(b + off, bv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] += bv[i];
  }
  store_f<T, VEC>(y + off, o);
}

// CPT > 0: the row must fit in CPT chunks per thread (host guarantees
// N <= G * CPT * VEC, which also keeps in-row offsets well inside int).
// CPT == 0: streamed rows of any length.
template <typename T, int VEC, int G, int ROWS, int CPT, bool CENTERED>
__global__ void __launch_bounds__(G * ROWS) norm_fwd_kernel(const FwdParams<T> p) {
  static_assert(G % 32 == 0 && G <= 1024, "row group must be whole warps");
  static_assert(G == 32 || ROWS == 1, "block-wide groups own the whole block");
  __shared__ SumState<1> red_sum[G / 32];
  __shared__ WelfordState red_wf[G / 32];

  const int tid = static_cast<int>(threadIdx.x) % G;
  const int64_t nchunks = p.N / VEC;
  const float inv_n = p.inv_n;
  // Per-thread base pointers: chunk k of the cached path is then a
  // compile-time offset k*G*VEC, i.e. an immediate in the load instruction
  // instead of a 64-bit address register per chunk.
  const T* wt = p.w != nullptr ? p.w + tid * VEC : nullptr;
  const T* bt = p.b != nullptr ? p.b + tid * VEC : nullptr;

  // For G > 32 the trip count is block-uniform, which the __syncthreads in
  // row_allreduce relies on.
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * ROWS + threadIdx.x / G; row < p.M;
       row += static_cast<int64_t>(gridDim.x) * ROWS) {
    const T* xr = p.x + row * p.x_stride;
    T* yr = p.y + row * p.N;
    // LayerNorm statistics are taken of x - shift with shift = x[row, 0]:
    // values then carry the row's spread rather than its offset, so neither
    // the mean nor the variance loses digits to a large common offset.
    const float shift = CENTERED ? to_float(xr[0]) : 0.f;
    float mu = 0.f;  // mean of x - shift
    float var;
    if constexpr (CPT > 0) {
      const int rem = static_cast<int>(nchunks) - tid;  // chunks k with k*G < rem are in the row
      const T* xt = xr + tid * VEC;
      float v[CPT][VEC];
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (k * G < rem) {
          load_f<T, VEC>(xt + k * G * VEC, v[k]);
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            if constexpr (CENTERED) {
              v[k][i] -= shift;
              s += v[k][i];
            } else {
              s += v[k][i] * v[k][i];
            }
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[k][i] = 0.f;
        }
      }
      s = row_allreduce<G>(SumState<1>{{s}}, red_sum).v[0];
      if constexpr (CENTERED) {
        mu = s * inv_n;
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < CPT; ++k) {
          // Padding chunks must not contribute (0 - mu)^2.
          if (k * G < rem) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float d = v[k][i] - mu;
              ss += d * d;
            }
          }
        }
        var = row_allreduce<G>(SumState<1>{{ss}}, red_sum).v[0] * inv_n;
      } else {
        var = s * inv_n;
      }
      const float r = rsqrtf(var + p.eps);
      if (tid == 0) {
        if (p.mean != nullptr) p.mean[row] = shift + mu;
        if (p.rstd != nullptr) p.rstd[row] = r;
      }
      T* yt = yr + tid * VEC;
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (k * G < rem) write_normalized<T, VEC>(yt, wt, bt, k * G * VEC, v[k], mu, r);
      }
    } else {
      if constexpr (CENTERED) {
        WelfordState st{0.f, 0.f, 0.f};
        for (int64_t c = tid; c < nchunks; c += G) {
          float v[VEC];
          load_f<T, VEC>(xr + c * VEC, v);
          float cs = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            v[i] -= shift;
            cs += v[i];
          }
          const float cm = cs * (1.f / VEC);  // VEC is a power of two: exact
          float cm2 = 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float d = v[i] - cm;
            cm2 += d * d;
          }
          st.combine(WelfordState{static_cast<float>(VEC), cm, cm2});
        }
        st = row_allreduce<G>(st, red_wf);
        mu = st.mean;
        var = st.m2 * inv_n;
      } else {
        float ss = 0.f;
        for (int64_t c = tid; c < nchunks; c += G) {
          float v[VEC];
          load_f<T, VEC>(xr + c * VEC, v);
#pragma unroll
          for (int i = 0; i < VEC; ++i) ss += v[i] * v[i];
        }
        var = row_allreduce<G>(SumState<1>{{ss}}, red_sum).v[0] * inv_n;
      }
      const float r = rsqrtf(var + p.eps);
      if (tid == 0) {
        if (p.mean != nullptr) p.mean[row] = shift + mu;
        if (p.rstd != nullptr) p.rstd[row] = r;
      }
      // Offsets relative to this thread's first chunk, as write_normalized expects.
      T* yt = yr + tid * VEC;
      const T* xt = xr + tid * VEC;
      for (int64_t off = 0; off < (nchunks - tid) * VEC; off += static_cast<int64_t>(G) * VEC) {
        float v[VEC];
        load_f<T, VEC>(xt + off, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] -= shift;
        write_normalized<T, VEC>(yt, wt, bt, off, v, mu, r);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------

template <typename T>
struct BwdParams {
  const T* dy;
  int64_t dy_stride;
  const T* x;
  int64_t x_stride;
  const T* w;         // nullable
  const float* mean;  // unused (may be null) for RMSNorm
  const float* rstd;
  T* dx;
  float* ws_dw;  // nullable: P x N partial rows of sum(dy * xhat)
  float* ws_db;  // nullable: P x N partial rows of sum(dy)
  int64_t M;
  int64_t N;
  float inv_n;  // 1/N, see FwdParams
};

// Pointers are per-thread bases (see norm_fwd_kernel); w may be null.
template <typename T, int VEC>
__device__ __forceinline__ void bwd_load(const T* x, const T* dy, const T* w, int64_t off, float mu, float r,
                                         float (&xh)[VEC], float (&g)[VEC], float (&d)[VEC]) {
  float xv[VEC];
  load_f<T, VEC>(x + off, xv);
  load_f<T, VEC>(dy + off, d);
#pragma unroll
  for (int i = 0; i < VEC; ++i) xh[i] = (xv[i] - mu) * r;
  if (w != nullptr) {
    float wv[VEC];
    load_f<T, VEC>(w + off, wv);
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = d[i] * wv[i];
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) g[i] = d[i];
  }
}

template <int NS, int VEC>
__device__ __forceinline__ void add_row_sums(SumState<NS>& s, const float (&xh)[VEC], const float (&g)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    s.v[0] += g[i] * xh[i];
    if constexpr (NS > 1) s.v[1] += g[i];
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void write_dx(T* dx, int64_t off, const float (&xh)[VEC], const float (&g)[VEC],
                                         float r, float c1, float c2) {
  float o[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) o[i] = r * (g[i] - (xh[i] * c1 + c2));
  store_f<T, VEC>(dx + off, o);
}

// dst[i] = v[i] (overwrite) or dst[i] += v[i].  dst is only ever touched by
// the calling thread, so the read-modify-write needs no synchronisation.
// `vec_ok`: dst is 16-byte aligned (workspace base aligned and N % VEC == 0).
template <int VEC>
__device__ __forceinline__ void partial_update(float* dst, const float (&v)[VEC], bool overwrite, bool vec_ok) {
  if constexpr (VEC % 4 == 0) {
    if (vec_ok) {
      float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
      for (int q = 0; q < VEC / 4; ++q) {
        float4 t = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
        if (!overwrite) {
          const float4 o = d4[q];
          t.x += o.x;
          t.y += o.y;
          t.z += o.z;
          t.w += o.w;
        }
        d4[q] = t;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) dst[i] = overwrite ? v[i] : dst[i] + v[i];
}

// Warp-per-row blocks: fold the ROWS per-warp register partials through
// shared memory (ROWS * N floats) in warp order and store the block's row.
template <int VEC, int CPT, int ROWS>
__device__ __forceinline__ void flush_warp_partials(float* part, const float (&acc)[CPT][VEC], float* dst,
                                                    int sub, int lane, int64_t nchunks, int64_t N) {
  if (dst == nullptr) return;  // block-uniform, so skipping the barriers is safe
  float* mine = part + sub * N + lane * VEC;
  const int rem = static_cast<int>(nchunks) - lane;
#pragma unroll
  for (int k = 0; k < CPT; ++k) {
    if (k * 32 < rem) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) mine[k * 32 * VEC + i] = acc[k][i];
    }
  }
  __syncthreads();
  for (int64_t col = threadIdx.x; col < N; col += blockDim.x) {
    float s = part[col];
#pragma unroll
    for (int j = 1; j < ROWS; ++j) s += part[j * N + col];
    dst[col] = s;
  }
  __syncthreads();  // `part` is reused for the next region
}

// Chunks k < CPT of a row (chunk index tid + k*G) are cached in registers
// between the row-sum pass and the dx pass.
// ACC_REG: the dw/db partials also live in registers, which requires the
// whole row to be cached (host guarantees N <= G * CPT * VEC).  Otherwise
// they accumulate in the block's own workspace row, and chunks beyond the
// cached ones are re-read from global memory (L2) for the dx pass.
template <typename T, int VEC, int G, int ROWS, int CPT, bool ACC_REG, bool CENTERED>
__global__ void __launch_bounds__(G * ROWS) norm_bwd_kernel(const BwdParams<T> p) {
  static_assert(G % 32 == 0 && G <= 1024, "row group must be whole warps");
  static_assert(G == 32 || ROWS == 1, "block-wide groups own the whole block");
  static_assert(ACC_REG || ROWS == 1, "workspace accumulation assumes one row group per block");
  static_assert(CPT > 0, "at least one cached chunk per thread");
  constexpr int NS = CENTERED ? 2 : 1;
  constexpr int NA = ACC_REG ? CPT : 1;
  __shared__ SumState<NS> red[G / 32];

  const int tid = static_cast<int>(threadIdx.x) % G;
  const int sub = static_cast<int>(threadIdx.x) / G;
  const int64_t N = p.N;
  const int64_t nchunks = N / VEC;
  const float inv_n = p.inv_n;
  // Cached chunks are those with k*G < rem; in-row offsets of cached chunks
  // fit in int because G * CPT * VEC is small.
  constexpr int64_t kCached = static_cast<int64_t>(CPT) * G;
  const int rem = static_cast<int>(nchunks < kCached ? nchunks : kCached) - tid;
  const int64_t P = gridDim.x;
  // Even split: every block owns >= 1 row because P <= M.
  const int64_t row_begin = static_cast<int64_t>(blockIdx.x) * p.M / P;
  const int64_t row_end = (static_cast<int64_t>(blockIdx.x) + 1) * p.M / P;
  const int64_t ws_off = static_cast<int64_t>(blockIdx.x) * N + tid * VEC;
  float* ws_dw = p.ws_dw != nullptr ? p.ws_dw + ws_off : nullptr;
  float* ws_db = (CENTERED && p.ws_db != nullptr) ? p.ws_db + ws_off : nullptr;
  const bool ws_vec_ok = (reinterpret_cast<uintptr_t>(p.ws_dw) & 15) == 0 &&
                         (reinterpret_cast<uintptr_t>(p.ws_db) & 15) == 0;
  const T* wt = p.w != nullptr ? p.w + tid * VEC : nullptr;

  float dw_acc[NA][VEC];
  float db_acc[NA][VEC];
#pragma unroll
  for (int k = 0; k < NA; ++k) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dw_acc[k][i] = 0.f;
      db_acc[k][i] = 0.f;
    }
  }

  // Each row group visits its rows in increasing order; that fixes the
  // summation order of the partials.  For G > 32 the trip count is
  // block-uniform (row_allreduce synchronises the block).
  for (int64_t row = row_begin + sub; row < row_end; row += ROWS) {
    const bool first = row == row_begin;
    const float mu = CENTERED ? p.mean[row] : 0.f;
    const float r = p.rstd[row];
    const T* xt = p.x + row * p.x_stride + tid * VEC;
    const T* dyt = p.dy + row * p.dy_stride + tid * VEC;
    T* dxt = p.dx + row * N + tid * VEC;

    float xh[CPT][VEC];
    float g[CPT][VEC];
    SumState<NS> s{};

    auto add_partials = [&](int64_t off, const float (&d)[VEC], const float (&xhat)[VEC]) {
      float t[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) t[i] = d[i] * xhat[i];
      if (ws_dw != nullptr) partial_update<VEC>(ws_dw + off, t, first, ws_vec_ok);
      if (ws_db != nullptr) partial_update<VEC>(ws_db + off, d, first, ws_vec_ok);
    };

    // Pass 1: row sums (and dw/db partials).
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      if (k * G < rem) {
        float d[VEC];
        bwd_load<T, VEC>(xt, dyt, wt, k * G * VEC, mu, r, xh[k], g[k], d);
        add_row_sums<NS, VEC>(s, xh[k], g[k]);
        if constexpr (ACC_REG) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            dw_acc[k][i] += d[i] * xh[k][i];
            if constexpr (CENTERED) db_acc[k][i] += d[i];
          }
        } else {
          add_partials(k * G * VEC, d, xh[k]);
        }
      }
    }
    // Uncached tail; off is relative to this thread's first chunk.
    constexpr int64_t kStep = static_cast<int64_t>(G) * VEC;
    const int64_t tail_end = (nchunks - tid) * VEC;
    if constexpr (!ACC_REG) {
      for (int64_t off = CPT * kStep; off < tail_end; off += kStep) {
        float a[VEC], gg[VEC], d[VEC];
        bwd_load<T, VEC>(xt, dyt, wt, off, mu, r, a, gg, d);
        add_row_sums<NS, VEC>(s, a, gg);
        add_partials(off, d, a);
      }
    }

    s = row_allreduce<G>(s, red);
    const float c1 = s.v[0] * inv_n;
    const float c2 = CENTERED ? s.v[NS - 1] * inv_n : 0.f;

    // Pass 2: dx.
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
      if (k * G < rem) write_dx<T, VEC>(dxt, k * G * VEC, xh[k], g[k], r, c1, c2);
    }
    if constexpr (!ACC_REG) {
      for (int64_t off = CPT * kStep; off < tail_end; off += kStep) {
        float a[VEC], gg[VEC], d[VEC];
        bwd_load<T, VEC>(xt, dyt, wt, off, mu, r, a, gg, d);
        write_dx<T, VEC>(dxt, off, a, gg, r, c1, c2);
      }
    }
  }

  if constexpr (ACC_REG) {
    if constexpr (ROWS == 1) {
#pragma unroll
      for (int k = 0; k < CPT; ++k) {
        if (k * G < rem) {
          if (ws_dw != nullptr) partial_update<VEC>(ws_dw + k * G * VEC, dw_acc[k], true, ws_vec_ok);
          if constexpr (CENTERED) {
            if (ws_db != nullptr) partial_update<VEC>(ws_db + k * G * VEC, db_acc[k], true, ws_vec_ok);
          }
        }
      }
    } else {
      extern __shared__ float part[];  // ROWS * N floats
      float* dst_dw = p.ws_dw != nullptr ? p.ws_dw + static_cast<int64_t>(blockIdx.x) * N : nullptr;
      flush_warp_partials<VEC, CPT, ROWS>(part, dw_acc, dst_dw, sub, tid, nchunks, N);
      if constexpr (CENTERED) {
        float* dst_db = p.ws_db != nullptr ? p.ws_db + static_cast<int64_t>(blockIdx.x) * N : nullptr;
        flush_warp_partials<VEC, CPT, ROWS>(part, db_acc, dst_db, sub, tid, nchunks, N);
      }
    }
  }
}

// Sums the P partial rows of each column in a fixed order: thread (tx, ty)
// adds rows ty, ty + 16, ... of column tx, then the 16 results are added in ty
// order.  blockIdx.y selects the region (dweight or dbias).
constexpr int kRedCols = 32;
constexpr int kRedRows = 16;

__global__ void __launch_bounds__(kRedCols * kRedRows)
reduce_partials_kernel(const float* src0, float* dst0, const float* src1, float* dst1, int64_t P, int64_t N) {
  __shared__ float tile[kRedRows][kRedCols + 1];
  const float* src = blockIdx.y == 0 ? src0 : src1;
  float* dst = blockIdx.y == 0 ? dst0 : dst1;
  const int tx = static_cast<int>(threadIdx.x) % kRedCols;
  const int ty = static_cast<int>(threadIdx.x) / kRedCols;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kRedCols + tx;
  float s = 0.f;
  if (col < N) {
    for (int64_t r = ty; r < P; r += kRedRows) s += src[r * N + col];
  }
  tile[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && col < N) {
    float t = tile[0][tx];
#pragma unroll
    for (int j = 1; j < kRedRows; ++j) t += tile[j][tx];
    dst[col] = t;
  }
}

// ---------------------------------------------------------------------------
// Host dispatch
// ---------------------------------------------------------------------------

inline bool aligned16(const void* ptr) {
  return ptr == nullptr || (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

template <typename T>
constexpr int kVecWidth = static_cast<int>(16 / sizeof(T));

// Elements per thread held in registers = E; chunks per thread = E / VEC.
template <typename T, int VEC, bool CENTERED>
cudaError_t fwd_launch(const FwdParams<T>& p, cudaStream_t stream) {
  const int64_t M = p.M, N = p.N;
  auto go = [&](auto kernel, int g, int rows) {
    const int64_t blocks = (M + rows - 1) / rows;
    const unsigned grid = static_cast<unsigned>(blocks < kMaxGridX ? blocks : kMaxGridX);
    kernel<<<grid, g * rows, 0, stream>>>(p);
  };
  if (N <= 256) {
    go(norm_fwd_kernel<T, VEC, 32, 4, 8 / VEC, CENTERED>, 32, 4);
  } else if (N <= 1024) {
    go(norm_fwd_kernel<T, VEC, 32, 4, 32 / VEC, CENTERED>, 32, 4);
  } else if (N <= 4096) {
    go(norm_fwd_kernel<T, VEC, 128, 1, 32 / VEC, CENTERED>, 128, 1);
  } else if (N <= 16384) {
    go(norm_fwd_kernel<T, VEC, 512, 1, 32 / VEC, CENTERED>, 512, 1);
  } else {
    go(norm_fwd_kernel<T, VEC, 1024, 1, 0, CENTERED>, 1024, 1);
  }
  return cudaGetLastError();
}

template <typename T, bool CENTERED>
cudaError_t fwd_dispatch(const void* x, int64_t xs, const void* w, const void* b, void* y, float* mean,
                         float* rstd, int64_t M, int64_t N, float eps, cudaStream_t stream) {
  const FwdParams<T> p{static_cast<const T*>(x), xs, static_cast<const T*>(w), static_cast<const T*>(b),
                       static_cast<T*>(y), mean, rstd, M, N, 1.f / static_cast<float>(N), eps};
  constexpr int V = kVecWidth<T>;
  const bool vec = N % V == 0 && xs % V == 0 && aligned16(x) && aligned16(w) && aligned16(b) && aligned16(y);
  return vec ? fwd_launch<T, V, CENTERED>(p, stream) : fwd_launch<T, 1, CENTERED>(p, stream);
}

// The (G, ROWS) choice depends only on N, so the row -> (block, warp)
// assignment, and with it the dw/db summation order, is the same for every
// dtype and for the vector and scalar paths.
template <typename T, int VEC, bool CENTERED>
cudaError_t bwd_launch(const BwdParams<T>& p, int64_t P, cudaStream_t stream) {
  const int64_t N = p.N;
  const unsigned grid = static_cast<unsigned>(P);
  auto go = [&](auto kernel, int g, int rows) {
    const size_t smem = rows > 1 ? static_cast<size_t>(rows) * static_cast<size_t>(N) * sizeof(float) : 0;
    kernel<<<grid, g * rows, smem, stream>>>(p);
  };
  if (N <= 256) {
    go(norm_bwd_kernel<T, VEC, 32, 4, 8 / VEC, true, CENTERED>, 32, 4);
  } else if (N <= 512) {
    go(norm_bwd_kernel<T, VEC, 32, 4, 16 / VEC, true, CENTERED>, 32, 4);
  } else if (N <= 2048) {
    go(norm_bwd_kernel<T, VEC, 128, 1, 16 / VEC, true, CENTERED>, 128, 1);
  } else if (N <= 8192) {
    go(norm_bwd_kernel<T, VEC, 512, 1, 16 / VEC, true, CENTERED>, 512, 1);
  } else {
    go(norm_bwd_kernel<T, VEC, 512, 1, 32 / VEC, false, CENTERED>, 512, 1);
  }
  return cudaGetLastError();
}

template <typename T, bool CENTERED>
cudaError_t bwd_dispatch(const void* dy, int64_t dys, const void* x, int64_t xs, const void* w,
                         const float* mean, const float* rstd, void* dx, float* dweight, float* dbias,
                         float* workspace, int64_t M, int64_t N, cudaStream_t stream) {
  const int64_t P = norm_bwd_partial_rows(M, N);
  float* ws_dw = dweight != nullptr ? workspace : nullptr;
  float* ws_db = dbias != nullptr ? workspace + (dweight != nullptr ? P * N : 0) : nullptr;
  const BwdParams<T> p{static_cast<const T*>(dy), dys, static_cast<const T*>(x), xs, static_cast<const T*>(w),
                       mean, rstd, static_cast<T*>(dx), ws_dw, ws_db, M, N, 1.f / static_cast<float>(N)};
  constexpr int V = kVecWidth<T>;
  const bool vec = N % V == 0 && xs % V == 0 && dys % V == 0 && aligned16(dy) && aligned16(x) &&
                   aligned16(w) && aligned16(dx);
  cudaError_t err = vec ? bwd_launch<T, V, CENTERED>(p, P, stream) : bwd_launch<T, 1, CENTERED>(p, P, stream);
  if (err != cudaSuccess) return err;

  if (ws_dw != nullptr || ws_db != nullptr) {
    const float* src0 = ws_dw != nullptr ? ws_dw : ws_db;
    float* dst0 = ws_dw != nullptr ? dweight : dbias;
    const bool both = ws_dw != nullptr && ws_db != nullptr;
    const dim3 grid(static_cast<unsigned>((N + kRedCols - 1) / kRedCols), both ? 2u : 1u);
    reduce_partials_kernel<<<grid, kRedCols * kRedRows, 0, stream>>>(src0, dst0, ws_db, dbias, P, N);
    err = cudaGetLastError();
  }
  return err;
}

// With no rows the parameter gradients are exactly zero; leaving them
// unwritten would hand uninitialised memory back to the caller.
cudaError_t zero_grads(float* dweight, float* dbias, int64_t N, cudaStream_t stream) {
  const size_t bytes = static_cast<size_t>(N) * sizeof(float);
  if (dweight != nullptr) {
    const cudaError_t e = cudaMemsetAsync(dweight, 0, bytes, stream);
    if (e != cudaSuccess) return e;
  }
  if (dbias != nullptr) return cudaMemsetAsync(dbias, 0, bytes, stream);
  return cudaSuccess;
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

int64_t norm_bwd_partial_rows(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  // Aim for ~2M floats per workspace region (so the partial reduction stays
  // small next to the dx pass), with 32..1024 blocks for parallelism.
  int64_t p = (int64_t{1} << 21) / N;
  if (p < 32) p = 32;
  if (p > 1024) p = 1024;
  return p < M ? p : M;
}

int64_t norm_bwd_workspace_floats(int64_t M, int64_t N, bool has_weight, bool has_bias) {
  const int64_t regions = (has_weight ? 1 : 0) + (has_bias ? 1 : 0);
  return norm_bwd_partial_rows(M, N) * N * regions;
}

cudaError_t layer_norm_fwd(DType dt, const void* x, int64_t x_row_stride, const void* weight, const void* bias,
                           void* y, float* mean, float* rstd, int64_t M, int64_t N, float eps,
                           cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  switch (dt) {
    case DType::f32:
      return fwd_dispatch<float, true>(x, x_row_stride, weight, bias, y, mean, rstd, M, N, eps, stream);
    case DType::f16:
      return fwd_dispatch<__half, true>(x, x_row_stride, weight, bias, y, mean, rstd, M, N, eps, stream);
    case DType::bf16:
      return fwd_dispatch<__nv_bfloat16, true>(x, x_row_stride, weight, bias, y, mean, rstd, M, N, eps, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_fwd(DType dt, const void* x, int64_t x_row_stride, const void* weight, void* y, float* rstd,
                         int64_t M, int64_t N, float eps, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return cudaSuccess;
  switch (dt) {
    case DType::f32:
      return fwd_dispatch<float, false>(x, x_row_stride, weight, nullptr, y, nullptr, rstd, M, N, eps, stream);
    case DType::f16:
      return fwd_dispatch<__half, false>(x, x_row_stride, weight, nullptr, y, nullptr, rstd, M, N, eps, stream);
    case DType::bf16:
      return fwd_dispatch<__nv_bfloat16, false>(x, x_row_stride, weight, nullptr, y, nullptr, rstd, M, N, eps,
                                                stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t layer_norm_bwd(DType dt, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                           const void* weight, const float* mean, const float* rstd, void* dx, float* dweight,
                           float* dbias, float* workspace, int64_t M, int64_t N, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (M <= 0) return zero_grads(dweight, dbias, N, stream);
  switch (dt) {
    case DType::f32:
      return bwd_dispatch<float, true>(dy, dy_row_stride, x, x_row_stride, weight, mean, rstd, dx, dweight, dbias,
                                       workspace, M, N, stream);
    case DType::f16:
      return bwd_dispatch<__half, true>(dy, dy_row_stride, x, x_row_stride, weight, mean, rstd, dx, dweight, dbias,
                                        workspace, M, N, stream);
    case DType::bf16:
      return bwd_dispatch<__nv_bfloat16, true>(dy, dy_row_stride, x, x_row_stride, weight, mean, rstd, dx, dweight,
                                               dbias, workspace, M, N, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t rms_norm_bwd(DType dt, const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                         const void* weight, const float* rstd, void* dx, float* dweight, float* workspace,
                         int64_t M, int64_t N, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (M <= 0) return zero_grads(dweight, nullptr, N, stream);
  switch (dt) {
    case DType::f32:
      return bwd_dispatch<float, false>(dy, dy_row_stride, x, x_row_stride, weight, nullptr, rstd, dx, dweight,
                                        nullptr, workspace, M, N, stream);
    case DType::f16:
      return bwd_dispatch<__half, false>(dy, dy_row_stride, x, x_row_stride, weight, nullptr, rstd, dx, dweight,
                                         nullptr, workspace, M, N, stream);
    case DType::bf16:
      return bwd_dispatch<__nv_bfloat16, false>(dy, dy_row_stride, x, x_row_stride, weight, nullptr, rstd, dx,
                                                dweight, nullptr, workspace, M, N, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastcore
