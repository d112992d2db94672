// Copy, scale and cast many tensors: one OpenMP loop over the chunks of every tensor, a contiguous
// inner loop the compiler vectorises. Data-parallel training uses it to pack gradients into a flat
// bucket (scaled by 1/world size, optionally narrowed to bf16/fp16) and to unpack them.
#include "pack.h"

#include <omp.h>

#include <type_traits>

#include "convert.h"

namespace fastcore {
namespace cpu {
namespace {

template <typename S, typename D>
using compute_t = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>, double, float>;

template <typename T, typename A>
inline T narrow(A v) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return T(v);
  } else {
    return from_acc<T>(float(v));
  }
}

}  // namespace

template <typename S, typename D>
void pack(const int64_t* meta, const int32_t* chunks, int64_t n_chunks, int64_t chunk_size, double scale,
          int num_threads) {
  using A = compute_t<S, D>;
  const A s = A(scale);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t* row = meta + 3 * int64_t(chunks[2 * c]);
    const int64_t begin = int64_t(chunks[2 * c + 1]) * chunk_size;
    const int64_t n = row[2] - begin < chunk_size ? row[2] - begin : chunk_size;
    const S* __restrict src = reinterpret_cast<const S*>(static_cast<intptr_t>(row[0])) + begin;
    D* __restrict dst = reinterpret_cast<D*>(static_cast<intptr_t>(row[1])) + begin;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = narrow<D>(A(to_acc(src[i])) * s);
  }
}

#define FASTCORE_PACK(S, D) \
  template void pack<S, D>(const int64_t*, const int32_t*, int64_t, int64_t, double, int);
#define FASTCORE_PACK_FROM(S) \
  FASTCORE_PACK(S, float) FASTCORE_PACK(S, double) FASTCORE_PACK(S, bf16) FASTCORE_PACK(S, f16)
FASTCORE_PACK_FROM(float)
FASTCORE_PACK_FROM(double)
FASTCORE_PACK_FROM(bf16)
FASTCORE_PACK_FROM(f16)
#undef FASTCORE_PACK_FROM
#undef FASTCORE_PACK

}  // namespace cpu
}  // namespace fastcore
