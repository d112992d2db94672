#pragma once
// Multi-tensor pack / unpack of gradient buckets (see pack.cu for the design).
//
// One launch copies every tensor of a list, scaling by `scale` (1 / world_size)
// and optionally casting between fp32, fp16 and bf16.  The caller builds two
// device tables:
//   meta   int64 (n_tensors, 3): SRC address, DST address, NUMEL
//   chunks int32 (n_chunks, 2):  (tensor index t, chunk index k); chunk k of tensor t
//                                covers elements [k*chunk_size, min((k+1)*chunk_size, numel_t))
// Every source has dtype src_dtype and every destination dst_dtype; both are
// contiguous.  Packing points dst at slices of the flat bucket, unpacking points
// src at them.  Source and destination of one tensor must not overlap, except
// src == dst with src_dtype == dst_dtype (in-place scaling).
#include <cstdint>
#include <cuda_runtime.h>

#include "norm.h"  // DType

namespace fastcore { namespace cuda {

// Chunk size in elements the launcher expects the chunk table to be built with.
// Any positive chunk_size is handled correctly; this one is what the kernel is tuned for.
constexpr int64_t kPackChunk = 16384;

// dst_t[i] = DST(float(src_t[i]) * scale) for every tensor t of the table; fp32 math,
// round-to-nearest-even stores.
cudaError_t pack(DType src_dtype, DType dst_dtype, const int64_t* meta, const int32_t* chunks, int64_t n_chunks,
                 int64_t chunk_size, float scale, cudaStream_t stream);
}}
