// Multi-tensor pack / unpack: dst = DST(float(src) * scale), fp32 / fp16 / bf16 on either side.
//
// One launch moves a whole gradient list into (or out of) a flat bucket.  The
// caller's chunk table has one row (t, k) per chunk_size elements of every
// tensor; block b owns row b.  Every thread reads its block's table rows
// itself (the same addresses across the block, so they are broadcast loads)
// and there is no shared memory and no barrier.  Blocks never talk to each
// other, so many small tensors and a few huge ones balance in one launch.
//
// Vectorisation.  When the chunk's source and destination pointers are both
// 16-byte aligned, a "vector" is 16 bytes of the wider of the two element
// types: N = 16 / max(sizeof(S), sizeof(D)) elements, i.e. a float4 on the
// fp32 side and 8 bytes on the 16-bit side of a cast, or 16 bytes on both
// sides when the types have the same width.  Thread j of a block owns vectors
// j, j + kBlock, j + 2*kBlock, ..., so every load and store instruction of a
// warp covers one contiguous span: no half-used sectors on either side.  Each
// thread issues kUnroll vector loads (16 elements) before any math or store,
// which keeps 32 to 64 bytes per thread in flight.  The elements after the
// last whole vector (fewer than N), and whole chunks of tensors whose pointers
// are not 16-byte aligned, take a scalar path with the same arithmetic.
// Alignment is a per-chunk (block-uniform) test.
//
// Indexing.  Tensors may hold more than 2^31 elements, so chunk offsets
// (k * chunk_size) and every element index are int64.
//
// Arithmetic.  float(src) * scale in fp32 (x * 1.0f is exact, so there is no
// special case for scale == 1), then round-to-nearest-even on store
// (__float2half_rn / __float2bfloat16_rn); fp32 -> fp32 is a plain multiply.

#include "pack.h"

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
constexpr int kMinBlocksPerSM = 8;  // caps registers at 32 (no spills): 2048 threads per SM
constexpr int kElemsPerIter = 16;   // elements per thread per unrolled iteration
constexpr int64_t kMaxGridX = 2147483647;

// Columns of a meta row.
enum MetaCol : int { kSrc = 0, kDst = 1, kNumel = 2, kMetaCols = 3 };

// ---------------------------------------------------------------------------
// Element access
// ---------------------------------------------------------------------------

// to_float / from_float: convert.h

// Elements per vector: 16 bytes of the wider type.
template <typename S, typename D>
constexpr int kVec = static_cast<int>(16 / (sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D)));

// Vectors per thread per unrolled iteration: 4 when fp32 is involved, else 2.
template <typename S, typename D>
constexpr int kUnroll = kElemsPerIter / kVec<S, D>;

// Pack, load_f, store_f: convert.h

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---------------------------------------------------------------------------
// The copy
// ---------------------------------------------------------------------------

// U vectors of kVec<S, D> elements: vector indices j, j + kBlock, ...,
// relative to the chunk start.  All loads are issued before any store.
template <typename S, typename D, int U>
__device__ __forceinline__ void convert_vectors(const S* src, D* dst, int64_t j, float scale) {
  constexpr int N = kVec<S, D>;
  float x[U][N];
#pragma unroll
  for (int u = 0; u < U; ++u) load_f<S, N>(src + (j + static_cast<int64_t>(u) * kBlock) * N, x[u]);
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int i = 0; i < N; ++i) x[u][i] = x[u][i] * scale;
  }
#pragma unroll
  for (int u = 0; u < U; ++u) store_f<D, N>(dst + (j + static_cast<int64_t>(u) * kBlock) * N, x[u]);
}

template <typename S, typename D>
__global__ void __launch_bounds__(kBlock, kMinBlocksPerSM)
    pack_kernel(const int64_t* meta, const int32_t* chunks, int64_t chunk_size, float scale) {
  const int64_t row = blockIdx.x;
  const int64_t t = chunks[2 * row];
  const int64_t k = chunks[2 * row + 1];
  const int64_t* m = meta + t * kMetaCols;
  const int64_t numel = m[kNumel];
  const int64_t start = k * chunk_size;
  if (start >= numel) return;  // empty chunk (block-uniform; there is no barrier)
  // min(chunk_size, numel - start) without forming start + chunk_size.
  const int64_t n = numel - start < chunk_size ? numel - start : chunk_size;
  const S* src = reinterpret_cast<const S*>(m[kSrc]) + start;
  D* dst = reinterpret_cast<D*>(m[kDst]) + start;
  // Table addresses are device-global memory; saying so turns generic
  // LD / ST into LDG / STG.
  __builtin_assume(__isGlobal(src));
  __builtin_assume(__isGlobal(dst));

  constexpr int N = kVec<S, D>;
  constexpr int U = kUnroll<S, D>;
  const int64_t nvec = (aligned16(src) && aligned16(dst)) ? n / N : 0;
  int64_t j = threadIdx.x;
  // Whole tiles of U vectors per thread without bounds checks, then this
  // thread's remaining vectors one at a time.
  for (; j + (U - 1) * kBlock < nvec; j += U * kBlock) convert_vectors<S, D, U>(src, dst, j, scale);
  for (; j < nvec; j += kBlock) convert_vectors<S, D, 1>(src, dst, j, scale);
  // Elements after the last whole vector (fewer than N), or the whole chunk
  // when a pointer is not 16-byte aligned.
  for (int64_t i = nvec * N + threadIdx.x; i < n; i += kBlock) dst[i] = from_float<D>(to_float(src[i]) * scale);
}

// ---------------------------------------------------------------------------
// Host dispatch
// ---------------------------------------------------------------------------

template <typename S, typename D>
cudaError_t launch(const int64_t* meta, const int32_t* chunks, int64_t n_chunks, int64_t chunk_size, float scale,
                   cudaStream_t stream) {
  pack_kernel<S, D><<<static_cast<unsigned>(n_chunks), kBlock, 0, stream>>>(meta, chunks, chunk_size, scale);
  return cudaGetLastError();
}

template <typename S>
cudaError_t dispatch_dst(DType dst_dtype, const int64_t* meta, const int32_t* chunks, int64_t n_chunks,
                         int64_t chunk_size, float scale, cudaStream_t stream) {
  switch (dst_dtype) {
    case DType::f32:
      return launch<S, float>(meta, chunks, n_chunks, chunk_size, scale, stream);
    case DType::f16:
      return launch<S, __half>(meta, chunks, n_chunks, chunk_size, scale, stream);
    case DType::bf16:
      return launch<S, __nv_bfloat16>(meta, chunks, n_chunks, chunk_size, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

// ---------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------

cudaError_t pack(DType src_dtype, DType dst_dtype, const int64_t* meta, const int32_t* chunks, int64_t n_chunks,
                 int64_t chunk_size, float scale, cudaStream_t stream) {
  if (n_chunks < 0 || n_chunks > kMaxGridX || chunk_size <= 0) return cudaErrorInvalidValue;
  if (n_chunks == 0) return cudaSuccess;
  if (meta == nullptr || chunks == nullptr) return cudaErrorInvalidValue;

  switch (src_dtype) {
    case DType::f32:
      return dispatch_dst<float>(dst_dtype, meta, chunks, n_chunks, chunk_size, scale, stream);
    case DType::f16:
      return dispatch_dst<__half>(dst_dtype, meta, chunks, n_chunks, chunk_size, scale, stream);
    case DType::bf16:
      return dispatch_dst<__nv_bfloat16>(dst_dtype, meta, chunks, n_chunks, chunk_size, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastcore
