// fastcore._C.pack: checks the launch tables, then runs the CPU or CUDA copy-scale-cast launcher.
// The table holds raw addresses; fastcore/ops/pack.py builds it from tensors it has checked.
#include <torch/extension.h>

#include "binding_utils.h"
#include "cpu/pack.h"

#ifdef FASTCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/pack.h"
#endif

namespace {

void pack(const torch::Tensor& meta, const torch::Tensor& chunks, int64_t chunk_size, at::ScalarType src_dtype,
          at::ScalarType dst_dtype, double scale) {
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(1) == 3 && meta.is_contiguous(),
              "meta must be a contiguous int64 (n, 3) table");
  TORCH_CHECK(chunks.scalar_type() == at::kInt && chunks.dim() == 2 && chunks.size(1) == 2 && chunks.is_contiguous(),
              "chunks must be a contiguous int32 (n, 2) table");
  TORCH_CHECK(chunks.device() == meta.device(), "chunks must be on the device of meta");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be > 0");
  const int64_t n_chunks = chunks.size(0);
  if (meta.is_cpu()) {
    const pybind11::gil_scoped_release no_gil;
    fastcore::binding::dispatch_cpu(src_dtype, "pack", [&](auto src) {
      fastcore::binding::dispatch_cpu(dst_dtype, "pack", [&](auto dst) {
        fastcore::cpu::pack<decltype(src), decltype(dst)>(meta.data_ptr<int64_t>(), chunks.data_ptr<int32_t>(),
                                                          n_chunks, chunk_size, scale, at::get_num_threads());
      });
    });
    return;
  }
#ifdef FASTCORE_WITH_CUDA
  TORCH_CHECK(meta.is_cuda(), "meta must be a CPU or CUDA tensor");
  const c10::cuda::CUDAGuard guard(meta.device());
  fastcore::binding::check_cuda(
      fastcore::cuda::pack(fastcore::binding::cuda_dtype(src_dtype, "pack"),
                           fastcore::binding::cuda_dtype(dst_dtype, "pack"), meta.data_ptr<int64_t>(),
                           chunks.data_ptr<int32_t>(), n_chunks, chunk_size, float(scale),
                           c10::cuda::getCurrentCUDAStream(meta.device().index())),
      "pack");
#else
  TORCH_CHECK(false, "fastcore._C was built without CUDA; got tables on ", meta.device());
#endif
}

}  // namespace

void bind_pack(py::module_& m) {
  m.attr("PACK_CHUNK_CPU") = fastcore::cpu::kPackChunk;
#ifdef FASTCORE_WITH_CUDA
  m.attr("PACK_CHUNK_CUDA") = fastcore::cuda::kPackChunk;
#endif
  m.def("pack", &pack, "dst_t = cast(src_t * scale) for every tensor of a launch table", py::arg("meta"),
        py::arg("chunks"), py::arg("chunk_size"), py::arg("src_dtype"), py::arg("dst_dtype"), py::arg("scale"));
}
