// The one place that binds fast3d's native kernels to Python (module fast3d._C).
// Python-side APIs validate inputs with user-facing messages; the checks here are the last guard
// against a pointer of the wrong kind reaching a kernel.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "composite/composite.h"
#include "gaussians/gaussians.h"

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

// --- Gaussian rasterization (csrc/gaussians) -----------------------------------------------------
// Shapes: means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N], viewmats [B,C,4,4],
// Ks [B,C,3,3]; per image (I = B*C) tensors are [B,C,N,...] = [I,N,...].
//
// These functions are reachable directly (fast3d._C, and the fast3d::gs_* torch ops), so each one
// checks every tensor's rank, sizes (consistent with each other), dtype and device before reading
// a pointer, and makes its inputs contiguous. The contents of the binning tensors the backward
// takes (tile_offsets, flat_ids, isect_src, gauss_offsets) are trusted: pass what
// gs_rasterize_forward returned for the same inputs.

Tensor i32(const Tensor& like, c10::IntArrayRef shape) {
  return torch::empty(shape, like.options().dtype(torch::kInt32));
}

Tensor i64(const Tensor& like, c10::IntArrayRef shape) {
  return torch::empty(shape, like.options().dtype(torch::kInt64));
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + std::to_string(shape[k]);
  return s + "]";
}

// The argument checks of one call: `op` starts every message; the tensor `ref` (named ref_name)
// fixes the device and the floating dtype of the others.
class GsArgs {
 public:
  GsArgs(const char* op, const Tensor& ref, const char* ref_name) : op_(op), ref_(ref), ref_name_(ref_name) {
    TORCH_CHECK(ref.is_cpu() || ref.is_cuda(), op, ": ", ref_name, " is on ", ref.device(),
                ", expected a CPU or CUDA tensor");
    const auto dt = ref.scalar_type();
    if (ref.is_cuda()) {
      TORCH_CHECK(dt == torch::kFloat32, op, ": ", ref_name, " has dtype ", dt,
                  ", expected Float (the CUDA rasterizer takes float32)");
    } else {
      TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kFloat64, op, ": ", ref_name, " has dtype ", dt,
                  ", expected Float or Double");
    }
  }

  // t must have `dims` dimensions (desc names them) before its sizes are read.
  void rank(const Tensor& t, const char* name, int64_t dims, const char* desc) const {
    TORCH_CHECK(t.dim() == dims, op_, ": ", name, " must have shape ", desc, " (", dims, " dims); got ", t.sizes());
  }

  // t must have `shape` (desc names its sizes), ref's device, and `dtype` (default: ref's).
  // Returns t contiguous.
  Tensor operator()(const Tensor& t, const char* name, const std::vector<int64_t>& shape, const char* desc,
                    std::optional<c10::ScalarType> dtype = std::nullopt) const {
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), op_, ": ", name, " must have shape ", desc, " = ", shape_str(shape), "; got ", t.sizes());
    TORCH_CHECK(t.device() == ref_.device(), op_, ": ", name, " is on ", t.device(), ", expected ", ref_.device(),
                " (the device of ", ref_name_, ")");
    const auto want = dtype.value_or(ref_.scalar_type());
    TORCH_CHECK(t.scalar_type() == want, op_, ": ", name, " has dtype ", t.scalar_type(), ", expected ", want);
    return t.contiguous();
  }

  // width and height: positive, and few enough tiles per image for the int tile indices.
  void image(int64_t width, int64_t height) const {
    TORCH_CHECK(width > 0 && width <= INT32_MAX, op_, ": width must be a positive int32; got ", width);
    TORCH_CHECK(height > 0 && height <= INT32_MAX, op_, ": height must be a positive int32; got ", height);
    const int64_t tiles = fast3d::gs_tiles(int(width), int(height));
    TORCH_CHECK(tiles <= INT32_MAX, op_, ": a ", width, "x", height, " image has ", tiles, " tiles of ",
                fast3d::gs::kTile, "x", fast3d::gs::kTile, " pixels; at most ", INT32_MAX, " fit");
  }

  void planes(double near_plane, double far_plane) const {
    // The CUDA sort orders depths by their float bits, which needs every kept depth > 0.
    TORCH_CHECK(near_plane > 0, op_, ": near_plane must be > 0; got ", near_plane);
    TORCH_CHECK(far_plane > near_plane, op_, ": far_plane must exceed near_plane = ", near_plane, "; got ",
                far_plane);
  }

  const char* op() const { return op_; }

 private:
  const char* op_;
  const Tensor& ref_;
  const char* ref_name_;
};

// The checked (contiguous) scene inputs of the projection, and their sizes.
struct GsScene {
  Tensor means, quats, scales, opacities, viewmats, Ks;  // [B,N,3], [B,N,4], [B,N,3], [B,N], [B,C,4,4], [B,C,3,3]
  int64_t B, C, N;
};

GsScene gs_scene(const GsArgs& a, const Tensor& means, const Tensor& quats, const Tensor& scales,
                 const Tensor& opacities, const Tensor& viewmats, const Tensor& Ks) {
  a.rank(means, "means", 3, "[B, N, 3]");
  a.rank(viewmats, "viewmats", 4, "[B, C, 4, 4]");
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1);
  return {a(means, "means", {B, N, 3}, "[B, N, 3]"),
          a(quats, "quats", {B, N, 4}, "[B, N, 4]"),
          a(scales, "scales", {B, N, 3}, "[B, N, 3]"),
          a(opacities, "opacities", {B, N}, "[B, N]"),
          a(viewmats, "viewmats", {B, C, 4, 4}, "[B, C, 4, 4]"),
          a(Ks, "Ks", {B, C, 3, 3}, "[B, C, 3, 3]"),
          B, C, N};
}

// I images with D channels: the limits of the CUDA kernels.
void check_cuda_sizes(const GsArgs& a, int64_t I, int64_t D) {
  TORCH_CHECK(D <= fast3d::kGsMaxCudaChannels, a.op(), ": feats has D = ", D,
              " channels; the CUDA rasterizer takes at most ", fast3d::kGsMaxCudaChannels);
  TORCH_CHECK(I <= fast3d::kGsMaxCudaImages, a.op(), ": ", I, " images (B x C); the CUDA rasterizer takes at most ",
              fast3d::kGsMaxCudaImages, " per call");
}

#ifdef FAST3D_WITH_CUDA
#define FAST3D_CUDA_CALL(expr)                          \
  do {                                                  \
    const char* err_ = (expr);                          \
    TORCH_CHECK(err_ == nullptr, #expr ": ", err_);     \
  } while (0)
#define FAST3D_STREAM c10::cuda::getCurrentCUDAStream().stream()
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_project_forward(
    const Tensor& means_, const Tensor& quats_, const Tensor& scales_, const Tensor& opacities_,
    const Tensor& viewmats_, const Tensor& Ks_, int64_t width, int64_t height, double near_plane,
    double far_plane, double eps2d, bool antialiased) {
  const GsArgs a("gs_project_forward", means_, "means");
  const auto [means, quats, scales, opacities, viewmats, Ks, B, C, N] =
      gs_scene(a, means_, quats_, scales_, opacities_, viewmats_, Ks_);
  a.image(width, height);
  a.planes(near_plane, far_plane);
  auto o = means.options();
  auto means2d = torch::empty({B, C, N, 2}, o), conics = torch::empty({B, C, N, 3}, o);
  auto depths = torch::empty({B, C, N}, o), opac = torch::empty({B, C, N}, o);
  auto radii = i32(means, {B, C, N, 2});
  if (means.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(means.device());
    FAST3D_CUDA_CALL(fast3d::gs_project_forward_cuda(
        means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(), opacities.data_ptr<float>(),
        viewmats.data_ptr<float>(), Ks.data_ptr<float>(), B, C, N, int(width), int(height), float(near_plane),
        float(far_plane), float(eps2d), antialiased, means2d.data_ptr<float>(), conics.data_ptr<float>(),
        depths.data_ptr<float>(), opac.data_ptr<float>(), radii.data_ptr<int32_t>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "gs_project_forward_cpu", [&] {
      fast3d::gs_project_forward_cpu<scalar_t>(
          means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
          opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), B, C, N,
          int(width), int(height), scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), antialiased,
          means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(),
          opac.data_ptr<scalar_t>(), radii.data_ptr<int32_t>());
    });
  }
  return {means2d, conics, depths, opac, radii};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gs_project_backward(
    const Tensor& means_, const Tensor& quats_, const Tensor& scales_, const Tensor& opacities_,
    const Tensor& viewmats_, const Tensor& Ks_, int64_t width, int64_t height, double near_plane,
    double far_plane, double eps2d, bool antialiased, const Tensor& g_means2d_, const Tensor& g_conics_,
    const Tensor& g_depths_, const Tensor& g_opac_) {
  const GsArgs a("gs_project_backward", means_, "means");
  const auto [means, quats, scales, opacities, viewmats, Ks, B, C, N] =
      gs_scene(a, means_, quats_, scales_, opacities_, viewmats_, Ks_);
  a.image(width, height);
  a.planes(near_plane, far_plane);
  const Tensor g_means2d = a(g_means2d_, "g_means2d", {B, C, N, 2}, "[B, C, N, 2]");
  const Tensor g_conics = a(g_conics_, "g_conics", {B, C, N, 3}, "[B, C, N, 3]");
  const Tensor g_depths = a(g_depths_, "g_depths", {B, C, N}, "[B, C, N]");
  const Tensor g_opac = a(g_opac_, "g_opac", {B, C, N}, "[B, C, N]");
  auto g_means = torch::empty_like(means), g_quats = torch::empty_like(quats);
  auto g_scales = torch::empty_like(scales), g_opacities = torch::empty_like(opacities);
  if (means.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(means.device());
    FAST3D_CUDA_CALL(fast3d::gs_project_backward_cuda(
        means.data_ptr<float>(), quats.data_ptr<float>(), scales.data_ptr<float>(), opacities.data_ptr<float>(),
        viewmats.data_ptr<float>(), Ks.data_ptr<float>(), B, C, N, int(width), int(height), float(near_plane),
        float(far_plane), float(eps2d), antialiased, g_means2d.data_ptr<float>(), g_conics.data_ptr<float>(),
        g_depths.data_ptr<float>(), g_opac.data_ptr<float>(), g_means.data_ptr<float>(),
        g_quats.data_ptr<float>(), g_scales.data_ptr<float>(), g_opacities.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "gs_project_backward_cpu", [&] {
      fast3d::gs_project_backward_cpu<scalar_t>(
          means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
          opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), B, C, N,
          int(width), int(height), scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), antialiased,
          g_means2d.data_ptr<scalar_t>(), g_conics.data_ptr<scalar_t>(), g_depths.data_ptr<scalar_t>(),
          g_opac.data_ptr<scalar_t>(), g_means.data_ptr<scalar_t>(), g_quats.data_ptr<scalar_t>(),
          g_scales.data_ptr<scalar_t>(), g_opacities.data_ptr<scalar_t>());
    });
  }
  return {g_means, g_quats, g_scales, g_opacities};
}

// The checked SH inputs: sh [B,N,K,3], means [B,N,3], viewmats [B,C,4,4]; degree 0..3 with
// (degree + 1)^2 <= K.
struct GsSh {
  Tensor sh, means, viewmats;
  int64_t B, C, N, K;
};

GsSh gs_sh_args(const GsArgs& a, const Tensor& sh, const Tensor& means, const Tensor& viewmats, int64_t degree) {
  a.rank(sh, "sh", 4, "[B, N, K, 3]");
  a.rank(viewmats, "viewmats", 4, "[B, C, 4, 4]");
  const int64_t B = sh.size(0), N = sh.size(1), K = sh.size(2), C = viewmats.size(1);
  TORCH_CHECK(degree >= 0 && degree <= 3, a.op(), ": degree must be in 0..3; got ", degree);
  TORCH_CHECK(K >= (degree + 1) * (degree + 1), a.op(), ": sh holds K = ", K, " coefficients per Gaussian; degree ",
              degree, " needs K >= ", (degree + 1) * (degree + 1));
  return {a(sh, "sh", {B, N, K, 3}, "[B, N, K, 3]"), a(means, "means", {B, N, 3}, "[B, N, 3]"),
          a(viewmats, "viewmats", {B, C, 4, 4}, "[B, C, 4, 4]"), B, C, N, K};
}

// sh [B,N,K,3] -> colors [B,C,N,3]
Tensor gs_sh_forward(const Tensor& sh_, const Tensor& means_, const Tensor& viewmats_, int64_t degree) {
  const GsArgs a("gs_sh_forward", sh_, "sh");
  const auto [sh, means, viewmats, B, C, N, K] = gs_sh_args(a, sh_, means_, viewmats_, degree);
  auto colors = torch::empty({B, C, N, 3}, sh.options());
  if (sh.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(sh.device());
    FAST3D_CUDA_CALL(fast3d::gs_sh_forward_cuda(sh.data_ptr<float>(), means.data_ptr<float>(),
                                                viewmats.data_ptr<float>(), B, C, N, int(K), int(degree),
                                                colors.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sh.scalar_type(), "gs_sh_forward_cpu", [&] {
      fast3d::gs_sh_forward_cpu<scalar_t>(sh.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
                                          viewmats.data_ptr<scalar_t>(), B, C, N, int(K), int(degree),
                                          colors.data_ptr<scalar_t>());
    });
  }
  return colors;
}

// g_colors [B,C,N,3] -> g_sh [B,N,K,3], g_means [B,N,3]
std::tuple<Tensor, Tensor> gs_sh_backward(const Tensor& sh_, const Tensor& means_, const Tensor& viewmats_,
                                          int64_t degree, const Tensor& g_colors_) {
  const GsArgs a("gs_sh_backward", sh_, "sh");
  const auto [sh, means, viewmats, B, C, N, K] = gs_sh_args(a, sh_, means_, viewmats_, degree);
  const Tensor g_colors = a(g_colors_, "g_colors", {B, C, N, 3}, "[B, C, N, 3]");
  auto g_sh = torch::empty_like(sh), g_means = torch::empty_like(means);
  if (sh.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(sh.device());
    FAST3D_CUDA_CALL(fast3d::gs_sh_backward_cuda(sh.data_ptr<float>(), means.data_ptr<float>(),
                                                 viewmats.data_ptr<float>(), B, C, N, int(K), int(degree),
                                                 g_colors.data_ptr<float>(), g_sh.data_ptr<float>(),
                                                 g_means.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sh.scalar_type(), "gs_sh_backward_cpu", [&] {
      fast3d::gs_sh_backward_cpu<scalar_t>(sh.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(),
                                           viewmats.data_ptr<scalar_t>(), B, C, N, int(K), int(degree),
                                           g_colors.data_ptr<scalar_t>(), g_sh.data_ptr<scalar_t>(),
                                           g_means.data_ptr<scalar_t>());
    });
  }
  return {g_sh, g_means};
}

// The checked per-image Gaussians: means2d [I,N,2], conics [I,N,3], opac [I,N], feats [I,N,D],
// radii [I,N,2] int32.
struct GsImages {
  Tensor means2d, conics, opac, feats, radii;
  int64_t I, N, D;
};

GsImages gs_images(const GsArgs& a, const Tensor& means2d, const Tensor& conics, const Tensor& opac,
                   const Tensor& feats, const Tensor& radii) {
  a.rank(feats, "feats", 3, "[I, N, D]");
  const int64_t I = feats.size(0), N = feats.size(1), D = feats.size(2);
  TORCH_CHECK(D >= 1, a.op(), ": feats must have at least one channel; got shape ", feats.sizes());
  TORCH_CHECK(N <= INT32_MAX, a.op(), ": ", N, " Gaussians per image; the int32 Gaussian indices take at most ",
              INT32_MAX);
  if (feats.is_cuda()) check_cuda_sizes(a, I, D);
  return {a(means2d, "means2d", {I, N, 2}, "[I, N, 2]"), a(conics, "conics", {I, N, 3}, "[I, N, 3]"),
          a(opac, "opac", {I, N}, "[I, N]"), a(feats, "feats", {I, N, D}, "[I, N, D]"),
          a(radii, "radii", {I, N, 2}, "[I, N, 2]", torch::kInt32), I, N, D};
}

// means2d [I,N,2], conics [I,N,3], opac [I,N], feats [I,N,D], depths [I,N], radii [I,N,2];
// capacity: None, or the number of intersections the CUDA binning buffers hold.
// Returns image [I,H,W,D], alpha [I,H,W], last [I,H,W], the binning the backward reuses:
// tile_offsets [I*T+1] (int64), flat_ids [n] (Gaussian index within its image, per tile in depth
// order), isect_src [n] (CUDA: pre-sort intersection index; CPU: empty), gauss_offsets [I*N+1]
// (CUDA: first intersection of each Gaussian; CPU: empty), and n_isect [] (int64, on the device:
// the true number of Gaussian-tile intersections). Without a capacity n is that count, read back
// to the host; with one (CUDA) n = capacity and nothing synchronises: intersections past it are
// not rendered, and n_isect > capacity tells. The CPU always bins every intersection.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gs_rasterize_forward(
    const Tensor& means2d_, const Tensor& conics_, const Tensor& opac_, const Tensor& feats_, const Tensor& depths_,
    const Tensor& radii_, int64_t width, int64_t height, std::optional<int64_t> capacity) {
  const GsArgs a("gs_rasterize_forward", feats_, "feats");
  const auto [means2d, conics, opac, feats, radii, I, N, D] = gs_images(a, means2d_, conics_, opac_, feats_, radii_);
  const Tensor depths = a(depths_, "depths", {I, N}, "[I, N]");
  a.image(width, height);
  TORCH_CHECK(!capacity || (*capacity >= 1 && *capacity <= fast3d::kGsMaxIntersections), a.op(),
              ": capacity must be None or in [1, ", fast3d::kGsMaxIntersections, "]; got ", *capacity);
  const int W = int(width), H = int(height);
  const int64_t TT = fast3d::gs_tiles(W, H);
  // Every count check comes before the per-intersection and per-pixel buffers are allocated.
  auto check_count = [&](int64_t count) {
    const std::string err = fast3d::gs_intersections_error(count, I, N, W, H);
    TORCH_CHECK(err.empty(), a.op(), ": ", err);
  };
  auto outputs = [&] {
    return std::make_tuple(torch::empty({I, H, W, D}, feats.options()), torch::empty({I, H, W}, feats.options()),
                           i32(feats, {I, H, W}));
  };
  if (feats.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const std::string key_err = fast3d::gs_sort_key_error(I, W, H);
    TORCH_CHECK(key_err.empty(), a.op(), ": ", key_err);
    const c10::cuda::CUDAGuard guard(feats.device());
    auto stream = FAST3D_STREAM;
    auto counts = i64(feats, {I * N});
    FAST3D_CUDA_CALL(fast3d::gs_tiles_per_gaussian_cuda(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), I,
                                                        N, W, H, counts.data_ptr<int64_t>(), stream));
    auto gauss_offsets = torch::cat({torch::zeros({1}, counts.options()), counts.cumsum(0)});  // [I*N+1]
    auto n_isect = gauss_offsets.select(0, I * N).clone();
    int64_t cap;
    if (capacity) {
      cap = *capacity;
    } else {
      cap = n_isect.item<int64_t>();  // the one host synchronisation, skipped with a capacity
      check_count(cap);
    }
    auto [image, alpha, last] = outputs();
    auto tile_offsets = i64(feats, {I * TT + 1});
    auto keys = i64(feats, {cap});
    auto vals = i32(feats, {cap});
    FAST3D_CUDA_CALL(fast3d::gs_emit_isects_cuda(means2d.data_ptr<float>(), depths.data_ptr<float>(),
                                                 radii.data_ptr<int32_t>(), gauss_offsets.data_ptr<int64_t>(), I, N,
                                                 W, H, cap, reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                                                 vals.data_ptr<int32_t>(), stream));
    const int end_bit = fast3d::gs_sort_end_bit(I, TT);
    auto keys_sorted = torch::empty_like(keys);
    auto isect_src = torch::empty_like(vals);
    auto temp = torch::empty({int64_t(fast3d::gs_sort_temp_bytes_cuda(cap, end_bit))},
                             feats.options().dtype(torch::kUInt8));
    FAST3D_CUDA_CALL(fast3d::gs_sort_isects_cuda(
        temp.data_ptr<uint8_t>(), size_t(temp.numel()), reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
        reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>()), vals.data_ptr<int32_t>(),
        isect_src.data_ptr<int32_t>(), cap, end_bit, stream));
    auto flat_ids = i32(feats, {cap});
    FAST3D_CUDA_CALL(fast3d::gs_tile_ranges_cuda(
        reinterpret_cast<const uint64_t*>(keys_sorted.data_ptr<int64_t>()), isect_src.data_ptr<int32_t>(),
        gauss_offsets.data_ptr<int64_t>(), cap, I, N, TT, tile_offsets.data_ptr<int64_t>(),
        flat_ids.data_ptr<int32_t>(), stream));
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_forward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), I, N, int(D), W, H,
        image.data_ptr<float>(), alpha.data_ptr<float>(), last.data_ptr<int32_t>(), stream));
    return {image, alpha, last, tile_offsets, flat_ids, isect_src, gauss_offsets, n_isect};
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  }
  auto order = i32(feats, {I, N});
  auto n_valid = i64(feats, {I});
  auto tile_counts = i64(feats, {I * TT});
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "gs_bin_count_cpu", [&] {
    fast3d::gs_bin_count_cpu<scalar_t>(means2d.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(),
                                       radii.data_ptr<int32_t>(), I, N, W, H, order.data_ptr<int32_t>(),
                                       n_valid.data_ptr<int64_t>(), tile_counts.data_ptr<int64_t>());
  });
  auto tile_offsets = torch::cat({torch::zeros({1}, tile_counts.options()), tile_counts.cumsum(0)});  // [I*T+1]
  auto n_isect = tile_offsets.select(0, I * TT).clone();
  const int64_t total = n_isect.item<int64_t>();
  check_count(total);
  auto [image, alpha, last] = outputs();
  auto flat_ids = i32(feats, {total});
  AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "gs_rasterize_forward_cpu", [&] {
    fast3d::gs_bin_fill_cpu<scalar_t>(means2d.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(),
                                      order.data_ptr<int32_t>(), n_valid.data_ptr<int64_t>(),
                                      tile_offsets.data_ptr<int64_t>(), I, N, W, H, flat_ids.data_ptr<int32_t>());
    fast3d::gs_rasterize_forward_cpu<scalar_t>(
        means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opac.data_ptr<scalar_t>(),
        feats.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), tile_offsets.data_ptr<int64_t>(),
        flat_ids.data_ptr<int32_t>(), I, N, int(D), W, H, image.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(),
        last.data_ptr<int32_t>());
  });
  return {image, alpha, last, tile_offsets, flat_ids, i32(feats, {0}), i64(feats, {0}), n_isect};
}

// The forward's inputs and binning, alpha [I,H,W], last [I,H,W], g_image [I,H,W,D],
// g_alpha [I,H,W]. Returns g_means2d [I,N,2], g_conics [I,N,3], g_opac [I,N], g_feats [I,N,D],
// absgrad [I,N,2].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_rasterize_backward(
    const Tensor& means2d_, const Tensor& conics_, const Tensor& opac_, const Tensor& feats_, const Tensor& radii_,
    const Tensor& tile_offsets_, const Tensor& flat_ids_, const Tensor& isect_src_, const Tensor& gauss_offsets_,
    const Tensor& alpha_, const Tensor& last_, const Tensor& g_image_, const Tensor& g_alpha_, int64_t width,
    int64_t height, bool deterministic) {
  const GsArgs a("gs_rasterize_backward", feats_, "feats");
  const auto [means2d, conics, opac, feats, radii, I, N, D] = gs_images(a, means2d_, conics_, opac_, feats_, radii_);
  a.image(width, height);
  const int W = int(width), H = int(height);
  const int64_t TT = fast3d::gs_tiles(W, H);
  const bool cuda = feats.is_cuda();
  const Tensor tile_offsets = a(tile_offsets_, "tile_offsets", {I * TT + 1}, "[I * tiles + 1]", torch::kInt64);
  a.rank(flat_ids_, "flat_ids", 1, "[n]");
  const int64_t n = flat_ids_.size(0);
  TORCH_CHECK(n <= fast3d::kGsMaxIntersections, a.op(), ": flat_ids holds ", n, " intersections; at most ",
              fast3d::kGsMaxIntersections);
  const Tensor flat_ids = a(flat_ids_, "flat_ids", {n}, "[n]", torch::kInt32);
  // CUDA reads them; the CPU binning has none (empty).
  const Tensor isect_src = a(isect_src_, "isect_src", {cuda ? n : 0}, cuda ? "[n] (n = flat_ids.numel())" : "[0]",
                             torch::kInt32);
  const Tensor gauss_offsets = a(gauss_offsets_, "gauss_offsets", {cuda ? I * N + 1 : 0},
                                 cuda ? "[I * N + 1]" : "[0]", torch::kInt64);
  const Tensor alpha = a(alpha_, "alpha", {I, H, W}, "[I, H, W]");
  const Tensor last = a(last_, "last", {I, H, W}, "[I, H, W]", torch::kInt32);
  const Tensor g_image = a(g_image_, "g_image", {I, H, W, D}, "[I, H, W, D]");
  const Tensor g_alpha = a(g_alpha_, "g_alpha", {I, H, W}, "[I, H, W]");
  auto g_means2d = torch::empty_like(means2d), g_conics = torch::empty_like(conics);
  auto g_opac = torch::empty_like(opac), g_feats = torch::empty_like(feats), absgrad = torch::empty_like(means2d);
  if (cuda) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(feats.device());
    // Deterministic: one gradient row per intersection (zero where no pixel used it), summed per
    // Gaussian in a fixed order.
    auto isect_grads = deterministic ? torch::zeros({n, 8 + D}, feats.options()) : torch::empty({0}, feats.options());
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_backward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), isect_src.data_ptr<int32_t>(),
        gauss_offsets.data_ptr<int64_t>(), alpha.data_ptr<float>(), last.data_ptr<int32_t>(),
        g_image.data_ptr<float>(), g_alpha.data_ptr<float>(), I, N, int(D), W, H, n, deterministic,
        deterministic ? isect_grads.data_ptr<float>() : nullptr, g_means2d.data_ptr<float>(),
        g_conics.data_ptr<float>(), g_opac.data_ptr<float>(), g_feats.data_ptr<float>(),
        absgrad.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(feats.scalar_type(), "gs_rasterize_backward_cpu", [&] {
      fast3d::gs_rasterize_backward_cpu<scalar_t>(
          means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), opac.data_ptr<scalar_t>(),
          feats.data_ptr<scalar_t>(), radii.data_ptr<int32_t>(), tile_offsets.data_ptr<int64_t>(),
          flat_ids.data_ptr<int32_t>(), alpha.data_ptr<scalar_t>(), last.data_ptr<int32_t>(),
          g_image.data_ptr<scalar_t>(), g_alpha.data_ptr<scalar_t>(), I, N, int(D), W, H,
          g_means2d.data_ptr<scalar_t>(), g_conics.data_ptr<scalar_t>(), g_opac.data_ptr<scalar_t>(),
          g_feats.data_ptr<scalar_t>(), absgrad.data_ptr<scalar_t>());
    });
  }
  return {g_means2d, g_conics, g_opac, g_feats, absgrad};
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
  m.def("gs_project_forward", &gs_project_forward, "Gaussian EWA projection, forward");
  m.def("gs_project_backward", &gs_project_backward, "Gaussian EWA projection, backward");
  m.def("gs_sh_forward", &gs_sh_forward, "spherical harmonics colours, forward");
  m.def("gs_sh_backward", &gs_sh_backward, "spherical harmonics colours, backward");
  m.def("gs_rasterize_forward", &gs_rasterize_forward, "tile binning and front-to-back blending");
  m.def("gs_rasterize_backward", &gs_rasterize_backward, "blending backward");
  m.attr("gs_tile") = fast3d::gs::kTile;
  m.attr("gs_radius_max") = fast3d::gs::kRadiusMax;
  m.attr("gs_max_intersections") = fast3d::kGsMaxIntersections;
  m.attr("gs_max_cuda_channels") = fast3d::kGsMaxCudaChannels;
  m.attr("gs_max_cuda_images") = fast3d::kGsMaxCudaImages;
}
