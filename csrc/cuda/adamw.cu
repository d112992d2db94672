// Multi-tensor fused Adam / AdamW step: fp32 / fp16 / bf16 parameters, fp32 state.
//
// One launch updates a whole parameter list.  The caller's chunk table has one
// row (t, k) per chunk_size elements of every tensor; block b owns row b.
// Thread 0 reads the meta row of tensor t, its lr, weight decay and step
// count, and turns them into a few per-block scalars in shared memory; after
// one __syncthreads the block streams through its chunk.  Blocks never talk
// to each other, so one block per chunk needs no other synchronisation and
// balances many small tensors and a few huge ones in the same launch.
//
// Vectorisation.  When every pointer of the chunk (param, grad, m, v, and
// max_v / master when used) is 16-byte aligned, each thread moves 16-byte
// vectors: one vector of param or grad is 16 / sizeof(P) elements, whose fp32
// state is then one float4 (f32) or two float4 (f16 / bf16).  Each thread
// takes 8 elements per iteration (kUnroll: two vectors for f32, one for f16 /
// bf16) and issues all their loads before any math, so 6 to 10 16-byte
// requests are in flight per thread; __launch_bounds__ keeps registers at 64
// or fewer so 1024 threads per SM stream at once.  The elements after
// the last whole vector, and whole chunks of unaligned tensors, take a scalar
// path with the same arithmetic.  Alignment is a per-chunk (block-uniform)
// test; amsgrad and has_master are template flags, so the inner loops carry
// no branch on them.
//
// Indexing.  Tensors may hold more than 2^31 elements, so chunk offsets
// (k * chunk_size) and every element index are int64.
//
// Bias correction.  beta2^step is close to 1 (0.999 at step 1), so
// 1 - beta2^step from a float pow would keep only about 4 of float's ~7
// significant digits.  Thread 0 computes pow(beta, step) in double once per
// block (cheap next to a chunk's streaming), forms lr / bc1 and sqrt(bc2) in
// double and rounds each to float once.
//
// All per-element math is fp32 in the order of the spec; the new parameter is
// rounded to nearest-even (__float2half_rn / __float2bfloat16_rn).

#include "adamw.h"

#include <cstddef>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "convert.h"

namespace fastcore {
namespace cuda {
namespace {

constexpr int kBlock = 256;        // threads per block (one block per chunk)
constexpr int kMinBlocksPerSM = 4;  // caps registers at 64: 1024 threads per SM keep loads in flight
constexpr int64_t kMaxGridX = 2147483647;

// Columns of a meta row.
enum MetaCol : int {
  kParam = 0,
  kGrad = 1,
  kExpAvg = 2,
  kExpAvgSq = 3,
  kMaxExpAvgSq = 4,
  kMaster = 5,
  kStep = 6,
  kNumel = 7,
  kMetaCols = 8
};

enum WeightDecay : int { kNoDecay = 0, kDecoupled = 1, kL2 = 2 };

// ---------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------

// to_float / from_float: convert.h

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVec = static_cast<int>(16 / sizeof(T));

// 16-byte param vectors per thread per iteration: 8 elements, i.e. 6 (f16 /
// bf16) or 8 (f32) 16-byte loads in flight per thread, more with amsgrad or
// a master copy.  More would push f16 / bf16 past 64 registers.
template <typename P>
constexpr int kUnroll = kVec<P> >= 8 ? 1 : 8 / kVec<P>;

// The alignment makes the compiler emit a single 16-byte access.
template <typename T>
struct alignas(16) Vec16 {
  T v[kVec<T>];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec<T>]) {
  const Vec16<T> pk = *reinterpret_cast<const Vec16<T>*>(p);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_float(pk.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec<T>]) {
  Vec16<T> pk;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec16<T>*>(p) = pk;
}

// N fp32 values (N a multiple of 4) as N / 4 float4 accesses.
template <int N>
__device__ __forceinline__ void load_f32(const float* p, float (&out)[N]) {
  static_assert(N % 4 == 0, "fp32 vectors are whole float4s");
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    const float4 f = reinterpret_cast<const float4*>(p)[q];
    out[4 * q] = f.x;
    out[4 * q + 1] = f.y;
    out[4 * q + 2] = f.z;
    out[4 * q + 3] = f.w;
  }
}

template <int N>
__device__ __forceinline__ void store_f32(float* p, const float (&in)[N]) {
  static_assert(N % 4 == 0, "fp32 vectors are whole float4s");
#pragma unroll
  for (int q = 0; q < N / 4; ++q) {
    reinterpret_cast<float4*>(p)[q] = make_float4(in[4 * q], in[4 * q + 1], in[4 * q + 2], in[4 * q + 3]);
  }
}

// ---------------------------------------------------------------------------
// Per-launch and per-chunk scalars
// ---------------------------------------------------------------------------

// Launch-wide arguments; they live in the constant bank, not in registers.
struct Args {
  const int64_t* meta;
  const double* hparams;
  const int32_t* chunks;
  int64_t chunk_size;
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  double beta1_d, beta2_d;  // for the bias corrections
  float eps;
  bool maximize;
  bool decoupled;
  const float* grad_scale;  // nullable
  const float* found_inf;   // nullable
};

// What a block needs about its chunk, prepared once by thread 0.  The
// pointers already point at the chunk's first element.
template <typename P>
struct Chunk {
  P* param;
  const P* grad;
  float* exp_avg;
  float* exp_avg_sq;
  float* max_exp_avg_sq;  // null unless amsgrad
  float* master;          // null unless has_master
  int64_t n;              // elements in this chunk
  float grad_scale;       // *grad_scale, or 1 (unused) when there is none
  float step_size;        // lr / bc1
  float bc2_sqrt;         // sqrt(bc2)
  float decay;            // 1 - lr * weight_decay (decoupled)
  float weight_decay;     // (L2)
  int wd_mode;            // WeightDecay
  bool vec_ok;            // every pointer above is 16-byte aligned
};

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename P, bool AMSGRAD, bool MASTER>
__device__ Chunk<P> prepare_chunk(const Args& a, int64_t row) {
  const int64_t t = a.chunks[2 * row];
  const int64_t k = a.chunks[2 * row + 1];
  const int64_t* meta = a.meta + t * kMetaCols;
  const int64_t numel = meta[kNumel];
  const int64_t start = k * a.chunk_size;
  const int64_t end = numel - start < a.chunk_size ? numel : start + a.chunk_size;

  Chunk<P> c;
  c.n = end > start ? end - start : 0;
  c.param = reinterpret_cast<P*>(meta[kParam]) + start;
  c.grad = reinterpret_cast<const P*>(meta[kGrad]) + start;
  c.exp_avg = reinterpret_cast<float*>(meta[kExpAvg]) + start;
  c.exp_avg_sq = reinterpret_cast<float*>(meta[kExpAvgSq]) + start;
  c.max_exp_avg_sq = AMSGRAD ? reinterpret_cast<float*>(meta[kMaxExpAvgSq]) + start : nullptr;
  c.master = MASTER ? reinterpret_cast<float*>(meta[kMaster]) + start : nullptr;
  c.vec_ok = aligned16(c.param) && aligned16(c.grad) && aligned16(c.exp_avg) && aligned16(c.exp_avg_sq) &&
             (!AMSGRAD || aligned16(c.max_exp_avg_sq)) && (!MASTER || aligned16(c.master));
  c.grad_scale = a.grad_scale != nullptr ? *a.grad_scale : 1.f;

  // See the header comment: double keeps the digits of 1 - beta2^step.
  const double step = static_cast<double>(*reinterpret_cast<const float*>(meta[kStep]));
  const double lr = a.hparams[2 * t];
  const double wd = a.hparams[2 * t + 1];
  const double bc1 = 1.0 - pow(a.beta1_d, step);
  const double bc2 = 1.0 - pow(a.beta2_d, step);
  c.step_size = static_cast<float>(lr / bc1);
  c.bc2_sqrt = static_cast<float>(sqrt(bc2));
  c.decay = static_cast<float>(1.0 - lr * wd);
  c.weight_decay = static_cast<float>(wd);
  c.wd_mode = wd == 0.0 ? kNoDecay : (a.decoupled ? kDecoupled : kL2);
  return c;
}

// ---------------------------------------------------------------------------
// The update
// ---------------------------------------------------------------------------

// One element, in the spec's order.  g and x (master or param) come in as
// float; m, v, vmax are updated in place; returns the new parameter value.
// The branches are on block-uniform values.
template <bool AMSGRAD, typename P>
__device__ __forceinline__ float adam_element(const Args& a, const Chunk<P>& c, float g, float x, float& m,
                                              float& v, float& vmax) {
  if (a.grad_scale != nullptr) g = g / c.grad_scale;
  if (a.maximize) g = -g;
  if (c.wd_mode == kDecoupled) {
    x = x * c.decay;
  } else if (c.wd_mode == kL2) {
    g = g + c.weight_decay * x;
  }
  m = a.beta1 * m + a.one_minus_beta1 * g;
  v = a.beta2 * v + a.one_minus_beta2 * g * g;
  float s = v;
  if constexpr (AMSGRAD) {
    // NaN-propagating like torch.maximum (fmaxf would drop a NaN v).
    vmax = (v > vmax || v != v) ? v : vmax;
    s = vmax;
  }
  const float denom = sqrtf(s) / c.bc2_sqrt + a.eps;
  return x - c.step_size * m / denom;
}

// U vectors of kVec<P> elements: vector indices j, j + kBlock, ..., relative
// to the chunk start.  All loads are issued before the math.
template <typename P, bool AMSGRAD, bool MASTER, int U>
__device__ __forceinline__ void update_vectors(const Args& a, const Chunk<P>& c, int64_t j) {
  constexpr int V = kVec<P>;
  float g[U][V], x[U][V], m[U][V], v[U][V];
  float vm[U][AMSGRAD ? V : 1];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t off = (j + static_cast<int64_t>(u) * kBlock) * V;
    load_vec<P>(c.grad + off, g[u]);
    if constexpr (MASTER) {
      load_f32<V>(c.master + off, x[u]);
    } else {
      load_vec<P>(c.param + off, x[u]);
    }
    load_f32<V>(c.exp_avg + off, m[u]);
    load_f32<V>(c.exp_avg_sq + off, v[u]);
    if constexpr (AMSGRAD) load_f32<V>(c.max_exp_avg_sq + off, vm[u]);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      x[u][i] = adam_element<AMSGRAD>(a, c, g[u][i], x[u][i], m[u][i], v[u][i], vm[u][AMSGRAD ? i : 0]);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int64_t off = (j + static_cast<int64_t>(u) * kBlock) * V;
    store_f32<V>(c.exp_avg + off, m[u]);
    store_f32<V>(c.exp_avg_sq + off, v[u]);
    if constexpr (AMSGRAD) store_f32<V>(c.max_exp_avg_sq + off, vm[u]);
    if constexpr (MASTER) store_f32<V>(c.master + off, x[u]);
    store_vec<P>(c.param + off, x[u]);
  }
}

// One element at index i of the chunk (tails and unaligned tensors).
template <typename P, bool AMSGRAD, bool MASTER>
__device__ __forceinline__ void update_scalar(const Args& a, const Chunk<P>& c, int64_t i) {
  const float g = to_float(c.grad[i]);
  const float x0 = MASTER ? c.master[i] : to_float(c.param[i]);
  float m = c.exp_avg[i];
  float v = c.exp_avg_sq[i];
  float vm = AMSGRAD ? c.max_exp_avg_sq[i] : 0.f;
  const float x = adam_element<AMSGRAD>(a, c, g, x0, m, v, vm);
  c.exp_avg[i] = m;
  c.exp_avg_sq[i] = v;
  if constexpr (AMSGRAD) c.max_exp_avg_sq[i] = vm;
  if constexpr (MASTER) c.master[i] = x;
  c.param[i] = from_float<P>(x);
}

template <typename P, bool AMSGRAD, bool MASTER>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM) adamw_kernel(const Args a) {
  // A nonzero found_inf makes the launch a no-op.  Every thread reads the
  // flag (one broadcast load), so whole blocks leave before the barrier.
  if (a.found_inf != nullptr && *a.found_inf != 0.f) return;

  __shared__ Chunk<P> s_chunk;
  if (threadIdx.x == 0) s_chunk = prepare_chunk<P, AMSGRAD, MASTER>(a, static_cast<int64_t>(blockIdx.x));
  __syncthreads();
  const Chunk<P> c = s_chunk;
  // Table addresses are device-global memory; saying so turns generic LD / ST into LDG / STG.
  __builtin_assume(__isGlobal(c.param));
  __builtin_assume(__isGlobal(c.grad));
  __builtin_assume(__isGlobal(c.exp_avg));
  __builtin_assume(__isGlobal(c.exp_avg_sq));
  if constexpr (AMSGRAD) __builtin_assume(__isGlobal(c.max_exp_avg_sq));
  if constexpr (MASTER) __builtin_assume(__isGlobal(c.master));

  constexpr int V = kVec<P>;
  const int64_t nvec = c.vec_ok ? c.n / V : 0;
  constexpr int U = kUnroll<P>;
  int64_t j = threadIdx.x;
  // Whole tiles of U vectors per thread without bounds checks, then this
  // thread's remaining vectors one at a time.
  for (; j + (U - 1) * kBlock < nvec; j += U * kBlock) update_vectors<P, AMSGRAD, MASTER, U>(a, c, j);
  for (; j < nvec; j += kBlock) update_vectors<P, AMSGRAD, MASTER, 1>(a, c, j);
  // Elements after the last whole vector (fewer than V), or the whole chunk
  // when some pointer is not 16-byte aligned.
  for (int64_t i = nvec * V + threadIdx.x; i < c.n; i += kBlock) update_scalar<P, AMSGRAD, MASTER>(a, c, i);
}

// ---------------------------------------------------------------------------
// Host dispatch
// ---------------------------------------------------------------------------

template <typename P, bool AMSGRAD, bool MASTER>
cudaError_t launch(const Args& a, int64_t n_chunks, cudaStream_t stream) {
  adamw_kernel<P, AMSGRAD, MASTER><<<static_cast<unsigned>(n_chunks), kBlock, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename P>
cudaError_t dispatch_flags(const Args& a, int64_t n_chunks, bool amsgrad, bool has_master, cudaStream_t stream) {
  if (amsgrad) {
    return has_master ? launch<P, true, true>(a, n_chunks, stream) : launch<P, true, false>(a, n_chunks, stream);
  }
  return has_master ? launch<P, false, true>(a, n_chunks, stream) : launch<P, false, false>(a, n_chunks, stream);
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

cudaError_t adamw_step(DType param_dtype, const int64_t* meta, const double* hparams, const int32_t* chunks,
                       int64_t n_chunks, int64_t chunk_size, double beta1, double beta2, float eps, bool amsgrad,
                       bool has_master, bool maximize, bool decoupled, const float* grad_scale,
                       const float* found_inf, cudaStream_t stream) {
  if (n_chunks < 0 || n_chunks > kMaxGridX || chunk_size <= 0) return cudaErrorInvalidValue;
  if (n_chunks == 0) return cudaSuccess;
  if (meta == nullptr || hparams == nullptr || chunks == nullptr) return cudaErrorInvalidValue;

  // 1 - beta in double: from a float-rounded 0.999 it would be off by 1e-5 relative.
  const Args a{meta,  hparams, chunks, chunk_size, float(beta1), float(beta2), float(1.0 - beta1),
               float(1.0 - beta2), beta1, beta2, eps, maximize, decoupled, grad_scale, found_inf};
  switch (param_dtype) {
    case DType::f32:
      return dispatch_flags<float>(a, n_chunks, amsgrad, has_master, stream);
    case DType::f16:
      return dispatch_flags<__half>(a, n_chunks, amsgrad, has_master, stream);
    case DType::bf16:
      return dispatch_flags<__nv_bfloat16>(a, n_chunks, amsgrad, has_master, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastcore
