// fastcore._C.adamw_step: checks the launch tables, then runs the CPU or CUDA multi-tensor AdamW launcher.
// The tables hold raw addresses; fastcore/ops/adamw.py builds them from tensors it has checked.
#include <torch/extension.h>

#include <optional>
#include <string>

#include "binding_utils.h"
#include "cpu/adamw.h"

#ifdef FASTCORE_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/adamw.h"
#endif

namespace {

using Opt = std::optional<torch::Tensor>;

void check_table(const torch::Tensor& t, const torch::Tensor& meta, at::ScalarType dtype, int64_t cols,
                 const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(1) == cols && t.is_contiguous(), name, " must be a contiguous (n, ", cols,
              ") table, got shape ", t.sizes());
  TORCH_CHECK(t.device() == meta.device(), name, " must be on the device of meta");
}

const float* scalar_or_null(const Opt& t, const torch::Tensor& meta, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1, name, " must be a one-element float32 tensor");
  TORCH_CHECK(t->device() == meta.device(), name, " must be on the device of the parameters");
  return t->data_ptr<float>();
}

void adamw_step(const torch::Tensor& meta, const torch::Tensor& hparams, const torch::Tensor& chunks,
                int64_t chunk_size, at::ScalarType param_dtype, double beta1, double beta2, double eps,
                bool amsgrad, bool has_master, bool maximize, bool decoupled, const Opt& grad_scale,
                const Opt& found_inf) {
  check_table(meta, meta, at::kLong, 8, "meta");
  check_table(hparams, meta, at::kDouble, 2, "hparams");
  check_table(chunks, meta, at::kInt, 2, "chunks");
  TORCH_CHECK(hparams.size(0) == meta.size(0), "hparams must have one row per row of meta");
  TORCH_CHECK(chunk_size > 0, "chunk_size must be > 0");
  const float* scale = scalar_or_null(grad_scale, meta, "grad_scale");
  const float* inf = scalar_or_null(found_inf, meta, "found_inf");
  const int64_t n_chunks = chunks.size(0);
  if (meta.is_cpu()) {
    const fastcore::cpu::AdamWOptions opt{beta1, beta2, eps, amsgrad, has_master, maximize, decoupled, scale, inf};
    const pybind11::gil_scoped_release no_gil;  // other Python threads run while OpenMP streams
    fastcore::binding::dispatch_cpu(param_dtype, "adamw", [&](auto tag) {
      fastcore::cpu::adamw_step<decltype(tag)>(meta.data_ptr<int64_t>(), meta.size(0), hparams.data_ptr<double>(),
                                               chunks.data_ptr<int32_t>(), n_chunks, chunk_size, opt,
                                               at::get_num_threads());
    });
    return;
  }
#ifdef FASTCORE_WITH_CUDA
  TORCH_CHECK(meta.is_cuda(), "meta must be a CPU or CUDA tensor");
  const c10::cuda::CUDAGuard guard(meta.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(meta.device().index());
  fastcore::binding::check_cuda(
      fastcore::cuda::adamw_step(fastcore::binding::cuda_dtype(param_dtype, "adamw"), meta.data_ptr<int64_t>(),
                                 hparams.data_ptr<double>(), chunks.data_ptr<int32_t>(), n_chunks, chunk_size,
                                 beta1, beta2, float(eps), amsgrad, has_master, maximize, decoupled,
                                 scale, inf, stream),
      "adamw_step");
#else
  TORCH_CHECK(false, "fastcore._C was built without CUDA; got tables on ", meta.device());
#endif
}

}  // namespace

void bind_adamw(py::module_& m) {
  m.attr("ADAMW_CHUNK_CPU") = fastcore::cpu::kAdamWChunk;
#ifdef FASTCORE_WITH_CUDA
  m.attr("ADAMW_CHUNK_CUDA") = fastcore::cuda::kAdamWChunk;
#endif
  m.def("adamw_step", &adamw_step, "One fused AdamW/Adam step over the tensors of a launch table, in place",
        py::arg("meta"), py::arg("hparams"), py::arg("chunks"), py::arg("chunk_size"), py::arg("param_dtype"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("amsgrad"), py::arg("has_master"),
        py::arg("maximize"), py::arg("decoupled"), py::arg("grad_scale"), py::arg("found_inf"));
}
