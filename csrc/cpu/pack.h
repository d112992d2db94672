// Copy, scale and cast many tensors in one call on the CPU: raw pointers only, so this compiles without torch.
//
//   meta   int64 (n_tensors, 3): src address, dst address, numel
//   chunks int32 (n_chunks, 2): (tensor, chunk k), covering elements [k*chunk_size, (k+1)*chunk_size)
#pragma once
#include <cstdint>

#include "types.h"

namespace fastcore {
namespace cpu {

constexpr int64_t kPackChunk = 32768;

// dst_t[i] = D(S(src_t[i]) * scale), in float (double when either type is double).
template <typename S, typename D>
void pack(const int64_t* meta, const int32_t* chunks, int64_t n_chunks, int64_t chunk_size, double scale,
          int num_threads);

}  // namespace cpu
}  // namespace fastcore
