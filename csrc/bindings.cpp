// fastcore._C: checks the tensors, then calls the raw-pointer launchers in cpu/ and cuda/.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "cpu/norm.h"

#ifdef FASTCORE_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/norm.h"
#endif

namespace {

using Opt = std::optional<torch::Tensor>;
using fastcore::cpu::acc_t;
using fastcore::binding::dispatch_cpu;
#ifdef FASTCORE_WITH_CUDA
using fastcore::binding::check_cuda;
using fastcore::binding::cuda_dtype;
#endif

void check_row_major(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, hidden), got ", t.dim(), "-D");
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, name, " must have unit stride in its last dim");
}

void check_vector(const Opt& v, const torch::Tensor& x, const char* name) {
  if (!v) return;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == x.size(1), name, " must have shape (", x.size(1), ",)");
  TORCH_CHECK(v->is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(v->scalar_type() == x.scalar_type(), name, " must have the dtype of x");
  TORCH_CHECK(v->device() == x.device(), name, " must be on the device of x");
}

template <typename T>
const T* ptr_or_null(const Opt& t) {
  return t ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

at::ScalarType stat_dtype(const torch::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}


// Returns (y, mean, rstd); mean is empty for RMSNorm (centered == false).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> norm_fwd(
    const torch::Tensor& x, const Opt& weight, const Opt& bias, double eps, bool centered) {
  check_row_major(x, "x");
  check_vector(weight, x, "weight");
  check_vector(bias, x, "bias");
  TORCH_CHECK(eps >= 0, "eps must be >= 0");
  const int64_t M = x.size(0), N = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  auto stats = x.options().dtype(stat_dtype(x));
  auto mean = torch::empty({centered ? M : 0}, stats), rstd = torch::empty({M}, stats);
  if (M == 0 || N == 0) return {y, mean, rstd};
  if (x.is_cpu()) {
    dispatch_cpu(x.scalar_type(), "norms", [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      fastcore::cpu::norm_fwd<T>(reinterpret_cast<const T*>(x.data_ptr()), x.stride(0),
                                 ptr_or_null<T>(weight), ptr_or_null<T>(bias), reinterpret_cast<T*>(y.data_ptr()),
                                 centered ? mean.data_ptr<A>() : nullptr, rstd.data_ptr<A>(), M, N, eps,
                                 centered, at::get_num_threads());
    });
    return {y, mean, rstd};
  }
#ifdef FASTCORE_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "x must be a CPU or CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const auto dt = cuda_dtype(x.scalar_type(), "norms");
  const void* w = weight ? weight->data_ptr() : nullptr;
  if (centered) {
    check_cuda(fastcore::cuda::layer_norm_fwd(dt, x.data_ptr(), x.stride(0), w, bias ? bias->data_ptr() : nullptr,
                                              y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                                              float(eps), stream),
               "layer_norm_fwd");
  } else {
    check_cuda(fastcore::cuda::rms_norm_fwd(dt, x.data_ptr(), x.stride(0), w, y.data_ptr(), rstd.data_ptr<float>(),
                                            M, N, float(eps), stream),
               "rms_norm_fwd");
  }
  return {y, mean, rstd};
#else
  TORCH_CHECK(false, "fastcore._C was built without CUDA; got a tensor on ", x.device());
#endif
}

// Returns (dx, dweight, dbias); dweight/dbias are float32 (float64 for float64 x), or empty.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> norm_bwd(
    const torch::Tensor& dy, const torch::Tensor& x, const Opt& weight, const torch::Tensor& mean,
    const torch::Tensor& rstd, bool has_bias, bool centered) {
  check_row_major(x, "x");
  check_row_major(dy, "dy");
  check_vector(weight, x, "weight");
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && dy.device() == x.device(),
              "dy must match x in shape, dtype and device");
  const int64_t M = x.size(0), N = x.size(1);
  auto stats = x.options().dtype(stat_dtype(x));
  TORCH_CHECK(rstd.scalar_type() == stat_dtype(x) && rstd.numel() == M && rstd.is_contiguous(), "rstd is malformed");
  TORCH_CHECK(!centered || (mean.scalar_type() == stat_dtype(x) && mean.numel() == M && mean.is_contiguous()),
              "mean is malformed");
  auto dx = torch::empty({M, N}, x.options());
  auto dw = torch::zeros({weight ? N : 0}, stats);
  auto db = torch::zeros({(centered && has_bias) ? N : 0}, stats);
  if (M == 0 || N == 0) return {dx, dw, db};
  if (x.is_cpu()) {
    dispatch_cpu(x.scalar_type(), "norms", [&](auto tag) {
      using T = decltype(tag);
      using A = acc_t<T>;
      fastcore::cpu::norm_bwd<T>(reinterpret_cast<const T*>(dy.data_ptr()), dy.stride(0),
                                 reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), ptr_or_null<T>(weight),
                                 centered ? mean.data_ptr<A>() : nullptr, rstd.data_ptr<A>(),
                                 reinterpret_cast<T*>(dx.data_ptr()), weight ? dw.data_ptr<A>() : nullptr,
                                 db.numel() ? db.data_ptr<A>() : nullptr, M, N, centered, at::get_num_threads());
    });
    return {dx, dw, db};
  }
#ifdef FASTCORE_WITH_CUDA
  TORCH_CHECK(x.is_cuda(), "x must be a CPU or CUDA tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  const auto dt = cuda_dtype(x.scalar_type(), "norms");
  const bool want_db = db.numel() > 0;
  auto workspace = torch::empty({fastcore::cuda::norm_bwd_workspace_floats(M, N, weight.has_value(), want_db)},
                                x.options().dtype(at::kFloat));
  const void* w = weight ? weight->data_ptr() : nullptr;
  float* dwp = weight ? dw.data_ptr<float>() : nullptr;
  if (centered) {
    check_cuda(fastcore::cuda::layer_norm_bwd(dt, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), w,
                                              mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(), dwp,
                                              want_db ? db.data_ptr<float>() : nullptr, workspace.data_ptr<float>(),
                                              M, N, stream),
               "layer_norm_bwd");
  } else {
    check_cuda(fastcore::cuda::rms_norm_bwd(dt, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), w,
                                            rstd.data_ptr<float>(), dx.data_ptr(), dwp, workspace.data_ptr<float>(),
                                            M, N, stream),
               "rms_norm_bwd");
  }
  return {dx, dw, db};
#else
  TORCH_CHECK(false, "fastcore._C was built without CUDA; got a tensor on ", x.device());
#endif
}

}  // namespace

void bind_adamw(py::module_& m);  // adamw_binding.cpp
void bind_pack(py::module_& m);   // pack_binding.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcore C++/CUDA kernels";
#ifdef FASTCORE_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  m.def("norm_fwd", &norm_fwd, "LayerNorm (centered) / RMSNorm forward over the last dim of a 2-D tensor",
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("centered"));
  m.def("norm_bwd", &norm_bwd, "LayerNorm (centered) / RMSNorm backward", py::arg("dy"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"), py::arg("centered"));
  bind_adamw(m);
  bind_pack(m);
}
