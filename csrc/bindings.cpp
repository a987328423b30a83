// The one place that binds fast3d's native kernels to Python (module fast3d._C).
// Python-side APIs validate inputs with user-facing messages; the checks here are the last guard
// against a pointer of the wrong kind reaching a kernel.
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "composite/composite.h"

#ifdef FAST3D_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace {

using torch::Tensor;

void check(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
}

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// sigmas, t_starts, t_ends [R, S]; rgbs [R, S, D]; background [R, D] or [D] or None.
// Returns color [R, D], opacity [R], depth [R], weights [R, S].
std::tuple<Tensor, Tensor, Tensor, Tensor> composite_forward(
    const Tensor& sigmas, const Tensor& rgbs, const Tensor& t_starts, const Tensor& t_ends,
    const std::optional<Tensor>& background, double eps) {
  check(sigmas, "sigmas", sigmas);
  check(rgbs, "rgbs", sigmas);
  check(t_starts, "t_starts", sigmas);
  check(t_ends, "t_ends", sigmas);
  if (background) check(*background, "background", sigmas);
  TORCH_CHECK(sigmas.dim() == 2 && rgbs.dim() == 3, "sigmas must be [R, S] and rgbs [R, S, D]");
  const int64_t R = sigmas.size(0), S = sigmas.size(1), D = rgbs.size(2);
  const int64_t bg_stride = (background && background->dim() == 2) ? D : 0;
  auto color = torch::empty({R, D}, sigmas.options());
  auto opacity = torch::empty({R}, sigmas.options());
  auto depth = torch::empty({R}, sigmas.options());
  auto weights = torch::empty({R, S}, sigmas.options());
  if (sigmas.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(sigmas.scalar_type() == torch::kFloat32, "the CUDA compositor takes float32");
    const c10::cuda::CUDAGuard guard(sigmas.device());
    const char* err = fast3d::composite_forward_cuda(
        sigmas.data_ptr<float>(), rgbs.data_ptr<float>(), t_starts.data_ptr<float>(),
        t_ends.data_ptr<float>(), ptr_or_null<float>(background), bg_stride, R, S, D,
        static_cast<float>(eps), color.data_ptr<float>(), opacity.data_ptr<float>(),
        depth.data_ptr<float>(), weights.data_ptr<float>(),
        c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "composite_forward_cuda: ", err);
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_forward_cpu", [&] {
      fast3d::composite_forward_cpu<scalar_t>(
          sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), t_starts.data_ptr<scalar_t>(),
          t_ends.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(background), bg_stride, R, S, D,
          static_cast<scalar_t>(eps), color.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
          depth.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>());
    });
  }
  return {color, opacity, depth, weights};
}

// opacity [R]; g_color [R, D]; g_opacity, g_depth [R]; g_weights [R, S] or None.
// Returns g_sigmas [R, S], g_rgbs [R, S, D], g_background [R, D] (per ray; empty without one).
std::tuple<Tensor, Tensor, Tensor> composite_backward(
    const Tensor& sigmas, const Tensor& rgbs, const Tensor& t_starts, const Tensor& t_ends,
    const std::optional<Tensor>& background, double eps, const Tensor& opacity,
    const Tensor& g_color, const Tensor& g_opacity, const Tensor& g_depth,
    const std::optional<Tensor>& g_weights) {
  for (auto [t, name] : {std::pair{&rgbs, "rgbs"}, {&t_starts, "t_starts"}, {&t_ends, "t_ends"},
                         {&opacity, "opacity"}, {&g_color, "g_color"}, {&g_opacity, "g_opacity"},
                         {&g_depth, "g_depth"}})
    check(*t, name, sigmas);
  if (background) check(*background, "background", sigmas);
  if (g_weights) check(*g_weights, "g_weights", sigmas);
  const int64_t R = sigmas.size(0), S = sigmas.size(1), D = rgbs.size(2);
  const int64_t bg_stride = (background && background->dim() == 2) ? D : 0;
  auto g_sigmas = torch::empty_like(sigmas);
  auto g_rgbs = torch::empty_like(rgbs);
  auto g_bg = background ? torch::empty({R, D}, sigmas.options()) : torch::empty({0}, sigmas.options());
  if (sigmas.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(sigmas.scalar_type() == torch::kFloat32, "the CUDA compositor takes float32");
    const c10::cuda::CUDAGuard guard(sigmas.device());
    const char* err = fast3d::composite_backward_cuda(
        sigmas.data_ptr<float>(), rgbs.data_ptr<float>(), t_starts.data_ptr<float>(),
        t_ends.data_ptr<float>(), ptr_or_null<float>(background), bg_stride, R, S, D,
        static_cast<float>(eps), opacity.data_ptr<float>(), g_color.data_ptr<float>(),
        g_opacity.data_ptr<float>(), g_depth.data_ptr<float>(), ptr_or_null<float>(g_weights),
        g_sigmas.data_ptr<float>(), g_rgbs.data_ptr<float>(),
        background ? g_bg.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "composite_backward_cuda: ", err);
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_backward_cpu", [&] {
      fast3d::composite_backward_cpu<scalar_t>(
          sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), t_starts.data_ptr<scalar_t>(),
          t_ends.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(background), bg_stride, R, S, D,
          static_cast<scalar_t>(eps), opacity.data_ptr<scalar_t>(), g_color.data_ptr<scalar_t>(),
          g_opacity.data_ptr<scalar_t>(), g_depth.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(g_weights), g_sigmas.data_ptr<scalar_t>(),
          g_rgbs.data_ptr<scalar_t>(), background ? g_bg.data_ptr<scalar_t>() : nullptr);
    });
  }
  return {g_sigmas, g_rgbs, g_bg};
}

bool with_cuda() {
#ifdef FAST3D_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fast3d native kernels (C++ CPU and CUDA)";
  m.def("with_cuda", &with_cuda, "whether the CUDA kernels were compiled in");
  m.def("composite_forward", &composite_forward, "NeRF compositing, forward (CPU or CUDA)");
  m.def("composite_backward", &composite_backward, "NeRF compositing, backward (CPU or CUDA)");
}
