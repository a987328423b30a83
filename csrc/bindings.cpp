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
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using torch::Tensor;

template <typename T>
const T* ptr_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

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
// fixes the device and the floating dtype of the others; `cuda_kernel` names the float32-only CUDA
// kernels in the dtype message.
constexpr const char* kRasterizer = "the CUDA rasterizer";

class Args {
 public:
  Args(const char* op, const Tensor& ref, const char* ref_name, const char* cuda_kernel)
      : op_(op), ref_(ref), ref_name_(ref_name) {
    TORCH_CHECK(ref.is_cpu() || ref.is_cuda(), op, ": ", ref_name, " is on ", ref.device(),
                ", expected a CPU or CUDA tensor");
    const auto dt = ref.scalar_type();
    if (ref.is_cuda()) {
      TORCH_CHECK(dt == torch::kFloat32, op, ": ", ref_name, " has dtype ", dt, ", expected Float (", cuda_kernel,
                  " takes float32)");
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
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), op_, ": ", name, " must have shape ", desc, " = ",
                shape_str(shape), "; got ", t.sizes());
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
    TORCH_CHECK(far_plane > near_plane, op_, ": far_plane must exceed near_plane = ", near_plane, "; got ", far_plane);
  }

  const char* op() const { return op_; }

 private:
  const char* op_;
  const Tensor& ref_;
  const char* ref_name_;
};

// --- NeRF compositing (csrc/composite) ------------------------------------------------------------

// The checked compositing inputs: sigmas, t_starts, t_ends [R, S]; rgbs [R, S, D]; background
// [R, D] (bg_stride = D), [D] (bg_stride = 0) or none.
struct CompositeRays {
  Tensor sigmas, rgbs, t_starts, t_ends;
  std::optional<Tensor> background;
  int64_t R, S, D, bg_stride;
};

CompositeRays composite_rays(const Args& a, const Tensor& sigmas, const Tensor& rgbs, const Tensor& t_starts,
                             const Tensor& t_ends, const std::optional<Tensor>& background) {
  a.rank(sigmas, "sigmas", 2, "[R, S]");
  a.rank(rgbs, "rgbs", 3, "[R, S, D]");
  const int64_t R = sigmas.size(0), S = sigmas.size(1), D = rgbs.size(2);
  TORCH_CHECK(S <= INT32_MAX && D <= INT32_MAX, a.op(), ": rgbs has shape ", rgbs.sizes(),
              "; the kernels take at most ", INT32_MAX, " samples S and channels D");
  CompositeRays c{a(sigmas, "sigmas", {R, S}, "[R, S]"),
                  a(rgbs, "rgbs", {R, S, D}, "[R, S, D]"),
                  a(t_starts, "t_starts", {R, S}, "[R, S]"),
                  a(t_ends, "t_ends", {R, S}, "[R, S]"),
                  std::nullopt,
                  R,
                  S,
                  D,
                  0};
  if (background) {
    const bool per_ray = background->dim() == 2;
    TORCH_CHECK(per_ray || background->dim() == 1, a.op(), ": background must have shape [R, D] = ", shape_str({R, D}),
                " or [D] = ", shape_str({D}), "; got ", background->sizes());
    c.background = per_ray ? a(*background, "background", {R, D}, "[R, D]") : a(*background, "background", {D}, "[D]");
    c.bg_stride = per_ray ? D : 0;
  }
  return c;
}

// sigmas, t_starts, t_ends [R, S]; rgbs [R, S, D]; background [R, D] or [D] or None.
// Returns color [R, D], opacity [R], depth [R], weights [R, S].
std::tuple<Tensor, Tensor, Tensor, Tensor> composite_forward(const Tensor& sigmas_, const Tensor& rgbs_,
                                                             const Tensor& t_starts_, const Tensor& t_ends_,
                                                             const std::optional<Tensor>& background_, double eps) {
  const Args a("composite_forward", sigmas_, "sigmas", "the CUDA compositor");
  const auto [sigmas, rgbs, t_starts, t_ends, background, R, S, D, bg_stride] =
      composite_rays(a, sigmas_, rgbs_, t_starts_, t_ends_, background_);
  auto color = torch::empty({R, D}, sigmas.options());
  auto opacity = torch::empty({R}, sigmas.options());
  auto depth = torch::empty({R}, sigmas.options());
  auto weights = torch::empty({R, S}, sigmas.options());
  if (sigmas.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(sigmas.device());
    const char* err = fast3d::composite_forward_cuda(
        sigmas.data_ptr<float>(), rgbs.data_ptr<float>(), t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
        ptr_or_null<float>(background), bg_stride, R, int(S), int(D), static_cast<float>(eps), color.data_ptr<float>(),
        opacity.data_ptr<float>(), depth.data_ptr<float>(), weights.data_ptr<float>(),
        c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "composite_forward_cuda: ", err);
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_forward_cpu", [&] {
      fast3d::composite_forward_cpu<scalar_t>(
          sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), t_starts.data_ptr<scalar_t>(),
          t_ends.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(background), bg_stride, R, int(S), int(D),
          static_cast<scalar_t>(eps), color.data_ptr<scalar_t>(), opacity.data_ptr<scalar_t>(),
          depth.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>());
    });
  }
  return {color, opacity, depth, weights};
}

// The forward's inputs; opacity [R] (its output); g_color [R, D]; g_opacity, g_depth [R];
// g_weights [R, S] or None. Returns g_sigmas [R, S], g_rgbs [R, S, D], g_background [R, D] (per
// ray; [0] without a background).
std::tuple<Tensor, Tensor, Tensor> composite_backward(const Tensor& sigmas_, const Tensor& rgbs_,
                                                      const Tensor& t_starts_, const Tensor& t_ends_,
                                                      const std::optional<Tensor>& background_, double eps,
                                                      const Tensor& opacity_, const Tensor& g_color_,
                                                      const Tensor& g_opacity_, const Tensor& g_depth_,
                                                      const std::optional<Tensor>& g_weights_) {
  const Args a("composite_backward", sigmas_, "sigmas", "the CUDA compositor");
  const auto [sigmas, rgbs, t_starts, t_ends, background, R, S, D, bg_stride] =
      composite_rays(a, sigmas_, rgbs_, t_starts_, t_ends_, background_);
  const Tensor opacity = a(opacity_, "opacity", {R}, "[R]");
  const Tensor g_color = a(g_color_, "g_color", {R, D}, "[R, D]");
  const Tensor g_opacity = a(g_opacity_, "g_opacity", {R}, "[R]");
  const Tensor g_depth = a(g_depth_, "g_depth", {R}, "[R]");
  std::optional<Tensor> g_weights;
  if (g_weights_) g_weights = a(*g_weights_, "g_weights", {R, S}, "[R, S]");
  auto g_sigmas = torch::empty_like(sigmas);
  auto g_rgbs = torch::empty_like(rgbs);
  auto g_bg = background ? torch::empty({R, D}, sigmas.options()) : torch::empty({0}, sigmas.options());
  if (sigmas.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(sigmas.device());
    const char* err = fast3d::composite_backward_cuda(
        sigmas.data_ptr<float>(), rgbs.data_ptr<float>(), t_starts.data_ptr<float>(), t_ends.data_ptr<float>(),
        ptr_or_null<float>(background), bg_stride, R, int(S), int(D), static_cast<float>(eps),
        opacity.data_ptr<float>(), g_color.data_ptr<float>(), g_opacity.data_ptr<float>(), g_depth.data_ptr<float>(),
        ptr_or_null<float>(g_weights), g_sigmas.data_ptr<float>(), g_rgbs.data_ptr<float>(),
        background ? g_bg.data_ptr<float>() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == nullptr, "composite_backward_cuda: ", err);
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sigmas.scalar_type(), "composite_backward_cpu", [&] {
      fast3d::composite_backward_cpu<scalar_t>(
          sigmas.data_ptr<scalar_t>(), rgbs.data_ptr<scalar_t>(), t_starts.data_ptr<scalar_t>(),
          t_ends.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(background), bg_stride, R, int(S), int(D),
          static_cast<scalar_t>(eps), opacity.data_ptr<scalar_t>(), g_color.data_ptr<scalar_t>(),
          g_opacity.data_ptr<scalar_t>(), g_depth.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(g_weights),
          g_sigmas.data_ptr<scalar_t>(), g_rgbs.data_ptr<scalar_t>(), background ? g_bg.data_ptr<scalar_t>() : nullptr);
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

// The checked (contiguous) scene inputs of the projection, and their sizes.
struct GsScene {
  Tensor means, quats, scales, opacities, viewmats, Ks;  // [B,N,3], [B,N,4], [B,N,3], [B,N], [B,C,4,4], [B,C,3,3]
  int64_t B, C, N;
};

GsScene gs_scene(const Args& a, const Tensor& means, const Tensor& quats, const Tensor& scales, const Tensor& opacities,
                 const Tensor& viewmats, const Tensor& Ks) {
  a.rank(means, "means", 3, "[B, N, 3]");
  a.rank(viewmats, "viewmats", 4, "[B, C, 4, 4]");
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1);
  return {a(means, "means", {B, N, 3}, "[B, N, 3]"),
          a(quats, "quats", {B, N, 4}, "[B, N, 4]"),
          a(scales, "scales", {B, N, 3}, "[B, N, 3]"),
          a(opacities, "opacities", {B, N}, "[B, N]"),
          a(viewmats, "viewmats", {B, C, 4, 4}, "[B, C, 4, 4]"),
          a(Ks, "Ks", {B, C, 3, 3}, "[B, C, 3, 3]"),
          B,
          C,
          N};
}

// I images with D channels: the limits of the CUDA kernels.
void check_cuda_sizes(const Args& a, int64_t I, int64_t D) {
  TORCH_CHECK(D <= fast3d::kGsMaxCudaChannels, a.op(), ": feats has D = ", D,
              " channels; the CUDA rasterizer takes at most ", fast3d::kGsMaxCudaChannels);
  TORCH_CHECK(I <= fast3d::kGsMaxCudaImages, a.op(), ": ", I, " images (B x C); the CUDA rasterizer takes at most ",
              fast3d::kGsMaxCudaImages, " per call");
}

#ifdef FAST3D_WITH_CUDA
#define FAST3D_CUDA_CALL(expr)                      \
  do {                                              \
    const char* err_ = (expr);                      \
    TORCH_CHECK(err_ == nullptr, #expr ": ", err_); \
  } while (0)
#define FAST3D_STREAM c10::cuda::getCurrentCUDAStream().stream()
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_project_forward(const Tensor& means_, const Tensor& quats_,
                                                                      const Tensor& scales_, const Tensor& opacities_,
                                                                      const Tensor& viewmats_, const Tensor& Ks_,
                                                                      int64_t width, int64_t height, double near_plane,
                                                                      double far_plane, double eps2d, bool antialiased,
                                                                      bool ortho) {
  const Args a("gs_project_forward", means_, "means", kRasterizer);
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
        float(far_plane), float(eps2d), antialiased, ortho, means2d.data_ptr<float>(), conics.data_ptr<float>(),
        depths.data_ptr<float>(), opac.data_ptr<float>(), radii.data_ptr<int32_t>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "gs_project_forward_cpu", [&] {
      fast3d::gs_project_forward_cpu<scalar_t>(
          means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
          opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), B, C, N, int(width),
          int(height), scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), antialiased, ortho,
          means2d.data_ptr<scalar_t>(), conics.data_ptr<scalar_t>(), depths.data_ptr<scalar_t>(),
          opac.data_ptr<scalar_t>(), radii.data_ptr<int32_t>());
    });
  }
  return {means2d, conics, depths, opac, radii};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gs_project_backward(
    const Tensor& means_, const Tensor& quats_, const Tensor& scales_, const Tensor& opacities_,
    const Tensor& viewmats_, const Tensor& Ks_, int64_t width, int64_t height, double near_plane, double far_plane,
    double eps2d, bool antialiased, bool ortho, const Tensor& g_means2d_, const Tensor& g_conics_,
    const Tensor& g_depths_, const Tensor& g_opac_) {
  const Args a("gs_project_backward", means_, "means", kRasterizer);
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
        float(far_plane), float(eps2d), antialiased, ortho, g_means2d.data_ptr<float>(), g_conics.data_ptr<float>(),
        g_depths.data_ptr<float>(), g_opac.data_ptr<float>(), g_means.data_ptr<float>(), g_quats.data_ptr<float>(),
        g_scales.data_ptr<float>(), g_opacities.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(means.scalar_type(), "gs_project_backward_cpu", [&] {
      fast3d::gs_project_backward_cpu<scalar_t>(
          means.data_ptr<scalar_t>(), quats.data_ptr<scalar_t>(), scales.data_ptr<scalar_t>(),
          opacities.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), Ks.data_ptr<scalar_t>(), B, C, N, int(width),
          int(height), scalar_t(near_plane), scalar_t(far_plane), scalar_t(eps2d), antialiased, ortho,
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

GsSh gs_sh_args(const Args& a, const Tensor& sh, const Tensor& means, const Tensor& viewmats, int64_t degree) {
  a.rank(sh, "sh", 4, "[B, N, K, 3]");
  a.rank(viewmats, "viewmats", 4, "[B, C, 4, 4]");
  const int64_t B = sh.size(0), N = sh.size(1), K = sh.size(2), C = viewmats.size(1);
  TORCH_CHECK(degree >= 0 && degree <= 3, a.op(), ": degree must be in 0..3; got ", degree);
  TORCH_CHECK(K >= (degree + 1) * (degree + 1), a.op(), ": sh holds K = ", K, " coefficients per Gaussian; degree ",
              degree, " needs K >= ", (degree + 1) * (degree + 1));
  return {a(sh, "sh", {B, N, K, 3}, "[B, N, K, 3]"),
          a(means, "means", {B, N, 3}, "[B, N, 3]"),
          a(viewmats, "viewmats", {B, C, 4, 4}, "[B, C, 4, 4]"),
          B,
          C,
          N,
          K};
}

// sh [B,N,K,3] -> colors [B,C,N,3]
Tensor gs_sh_forward(const Tensor& sh_, const Tensor& means_, const Tensor& viewmats_, int64_t degree) {
  const Args a("gs_sh_forward", sh_, "sh", kRasterizer);
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
  const Args a("gs_sh_backward", sh_, "sh", kRasterizer);
  const auto [sh, means, viewmats, B, C, N, K] = gs_sh_args(a, sh_, means_, viewmats_, degree);
  const Tensor g_colors = a(g_colors_, "g_colors", {B, C, N, 3}, "[B, C, N, 3]");
  auto g_sh = torch::empty_like(sh), g_means = torch::empty_like(means);
  if (sh.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(sh.device());
    FAST3D_CUDA_CALL(fast3d::gs_sh_backward_cuda(
        sh.data_ptr<float>(), means.data_ptr<float>(), viewmats.data_ptr<float>(), B, C, N, int(K), int(degree),
        g_colors.data_ptr<float>(), g_sh.data_ptr<float>(), g_means.data_ptr<float>(), FAST3D_STREAM));
#else
    TORCH_CHECK(false, "fast3d._C was built without CUDA");
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES(sh.scalar_type(), "gs_sh_backward_cpu", [&] {
      fast3d::gs_sh_backward_cpu<scalar_t>(
          sh.data_ptr<scalar_t>(), means.data_ptr<scalar_t>(), viewmats.data_ptr<scalar_t>(), B, C, N, int(K),
          int(degree), g_colors.data_ptr<scalar_t>(), g_sh.data_ptr<scalar_t>(), g_means.data_ptr<scalar_t>());
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

GsImages gs_images(const Args& a, const Tensor& means2d, const Tensor& conics, const Tensor& opac, const Tensor& feats,
                   const Tensor& radii) {
  a.rank(feats, "feats", 3, "[I, N, D]");
  const int64_t I = feats.size(0), N = feats.size(1), D = feats.size(2);
  TORCH_CHECK(D >= 1, a.op(), ": feats must have at least one channel; got shape ", feats.sizes());
  TORCH_CHECK(N <= INT32_MAX, a.op(), ": ", N, " Gaussians per image; the int32 Gaussian indices take at most ",
              INT32_MAX);
  if (feats.is_cuda()) check_cuda_sizes(a, I, D);
  return {a(means2d, "means2d", {I, N, 2}, "[I, N, 2]"),
          a(conics, "conics", {I, N, 3}, "[I, N, 3]"),
          a(opac, "opac", {I, N}, "[I, N]"),
          a(feats, "feats", {I, N, D}, "[I, N, D]"),
          a(radii, "radii", {I, N, 2}, "[I, N, 2]", torch::kInt32),
          I,
          N,
          D};
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
  const Args a("gs_rasterize_forward", feats_, "feats", kRasterizer);
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
    FAST3D_CUDA_CALL(fast3d::gs_tiles_per_gaussian_cuda(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), I, N, W,
                                                        H, counts.data_ptr<int64_t>(), stream));
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
                                                 radii.data_ptr<int32_t>(), gauss_offsets.data_ptr<int64_t>(), I, N, W,
                                                 H, cap, reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                                                 vals.data_ptr<int32_t>(), stream));
    const int end_bit = fast3d::gs_sort_end_bit(I, TT);
    auto keys_sorted = torch::empty_like(keys);
    auto isect_src = torch::empty_like(vals);
    auto temp =
        torch::empty({int64_t(fast3d::gs_sort_temp_bytes_cuda(cap, end_bit))}, feats.options().dtype(torch::kUInt8));
    FAST3D_CUDA_CALL(fast3d::gs_sort_isects_cuda(
        temp.data_ptr<uint8_t>(), size_t(temp.numel()), reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
        reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>()), vals.data_ptr<int32_t>(),
        isect_src.data_ptr<int32_t>(), cap, end_bit, stream));
    auto flat_ids = i32(feats, {cap});
    FAST3D_CUDA_CALL(fast3d::gs_tile_ranges_cuda(reinterpret_cast<const uint64_t*>(keys_sorted.data_ptr<int64_t>()),
                                                 isect_src.data_ptr<int32_t>(), gauss_offsets.data_ptr<int64_t>(), cap,
                                                 I, N, TT, tile_offsets.data_ptr<int64_t>(),
                                                 flat_ids.data_ptr<int32_t>(), stream));
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_forward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), I, N, int(D), W, H, image.data_ptr<float>(),
        alpha.data_ptr<float>(), last.data_ptr<int32_t>(), stream));
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
// g_alpha [I,H,W]; pass_rows: None, or (CUDA, deterministic) the sorted intersections per pass of
// the reduction (default: as many as kGsDeterministicRowBytes of rows hold). Returns g_means2d [I,N,2], g_conics
// [I,N,3], g_opac [I,N], g_feats [I,N,D], absgrad [I,N,2].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_rasterize_backward(
    const Tensor& means2d_, const Tensor& conics_, const Tensor& opac_, const Tensor& feats_, const Tensor& radii_,
    const Tensor& tile_offsets_, const Tensor& flat_ids_, const Tensor& isect_src_, const Tensor& gauss_offsets_,
    const Tensor& alpha_, const Tensor& last_, const Tensor& g_image_, const Tensor& g_alpha_, int64_t width,
    int64_t height, bool deterministic, std::optional<int64_t> pass_rows_) {
  const Args a("gs_rasterize_backward", feats_, "feats", kRasterizer);
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
  const Tensor isect_src =
      a(isect_src_, "isect_src", {cuda ? n : 0}, cuda ? "[n] (n = flat_ids.numel())" : "[0]", torch::kInt32);
  const Tensor gauss_offsets =
      a(gauss_offsets_, "gauss_offsets", {cuda ? I * N + 1 : 0}, cuda ? "[I * N + 1]" : "[0]", torch::kInt64);
  const Tensor alpha = a(alpha_, "alpha", {I, H, W}, "[I, H, W]");
  const Tensor last = a(last_, "last", {I, H, W}, "[I, H, W]", torch::kInt32);
  const Tensor g_image = a(g_image_, "g_image", {I, H, W, D}, "[I, H, W, D]");
  const Tensor g_alpha = a(g_alpha_, "g_alpha", {I, H, W}, "[I, H, W]");
  TORCH_CHECK(!pass_rows_ || *pass_rows_ >= 1, a.op(), ": pass_rows must be None or >= 1; got ", *pass_rows_);
  auto g_means2d = torch::empty_like(means2d), g_conics = torch::empty_like(conics);
  auto g_opac = torch::empty_like(opac), g_feats = torch::empty_like(feats), absgrad = torch::empty_like(means2d);
  if (cuda) {
#ifdef FAST3D_WITH_CUDA
    const c10::cuda::CUDAGuard guard(feats.device());
    // Deterministic: the intersections' gradient rows are reduced per Gaussian in a fixed order,
    // in passes whose rows take at most kGsDeterministicRowBytes (isect_rows.h).
    const int64_t pass_rows =
        !deterministic ? 0 : std::min(n, pass_rows_.value_or(fast3d::gs_deterministic_pass_rows(n, int(D))));
    auto sorted_of = i32(feats, {deterministic ? n : 0});
    auto rows = torch::empty({pass_rows, fast3d::gs::isect_row_size(int(D))}, feats.options());
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_backward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), isect_src.data_ptr<int32_t>(),
        gauss_offsets.data_ptr<int64_t>(), alpha.data_ptr<float>(), last.data_ptr<int32_t>(), g_image.data_ptr<float>(),
        g_alpha.data_ptr<float>(), I, N, int(D), W, H, n, deterministic, pass_rows,
        deterministic ? sorted_of.data_ptr<int32_t>() : nullptr, deterministic ? rows.data_ptr<float>() : nullptr,
        g_means2d.data_ptr<float>(), g_conics.data_ptr<float>(), g_opac.data_ptr<float>(), g_feats.data_ptr<float>(),
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

// The deterministic CUDA backward's reduction (isect_rows.h), run on the CPU so that tests check
// it without a GPU: rows [n, 8 + D] (row j: the gradients of sorted intersection j), isect_src [n]
// (int32, pre-sort index of sorted j: a permutation of 0..n-1, each Gaussian's intersections in
// increasing sorted order), gauss_offsets [G + 1] (int64, non-decreasing, from 0 to n), pass_rows
// >= 1 (None: what the CUDA backward uses). Returns g_means2d [G, 2], g_conics [G, 3], g_opac [G],
// g_feats [G, D], absgrad [G, 2].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_reduce_isect_rows(const Tensor& rows_, const Tensor& isect_src_,
                                                                        const Tensor& gauss_offsets_,
                                                                        std::optional<int64_t> pass_rows) {
  const Args a("gs_reduce_isect_rows", rows_, "rows", kRasterizer);
  TORCH_CHECK(rows_.is_cpu(), a.op(), ": rows is on ", rows_.device(),
              ", expected cpu (the CUDA backward runs its own)");
  a.rank(rows_, "rows", 2, "[n, 8 + D]");
  a.rank(gauss_offsets_, "gauss_offsets", 1, "[G + 1]");
  const int64_t n = rows_.size(0), D = rows_.size(1) - 8, G = gauss_offsets_.size(0) - 1;
  TORCH_CHECK(D >= 0 && G >= 0 && n <= fast3d::kGsMaxIntersections, a.op(), ": rows must have shape [n, 8 + D] ",
              "with n <= ", fast3d::kGsMaxIntersections, " and gauss_offsets [G + 1]; got ", rows_.sizes(), " and ",
              gauss_offsets_.sizes());
  const Tensor rows = a(rows_, "rows", {n, 8 + D}, "[n, 8 + D]");
  const Tensor isect_src = a(isect_src_, "isect_src", {n}, "[n] (n = rows.size(0))", torch::kInt32);
  const Tensor gauss_offsets = a(gauss_offsets_, "gauss_offsets", {G + 1}, "[G + 1]", torch::kInt64);
  const int64_t pass = pass_rows.value_or(fast3d::gs_deterministic_pass_rows(n, int(D)));
  TORCH_CHECK(pass >= 1 || n == 0, a.op(), ": pass_rows must be >= 1; got ", pass);
  const auto sorted = std::get<0>(isect_src.sort());
  TORCH_CHECK(sorted.equal(torch::arange(n, isect_src.options())), a.op(), ": isect_src must be a permutation of 0..",
              n - 1);
  const int64_t* go = gauss_offsets.data_ptr<int64_t>();
  for (int64_t g = 0; g <= G; ++g)
    TORCH_CHECK((g == 0 ? go[0] == 0 : go[g] >= go[g - 1]) && (g < G || go[G] == n), a.op(),
                ": gauss_offsets must rise from 0 to n = ", n, "; got ", gauss_offsets.sizes(), " not so at ", g);
  const auto o = rows.options();
  auto g_means2d = torch::empty({G, 2}, o), g_conics = torch::empty({G, 3}, o), g_opac = torch::empty({G}, o);
  auto g_feats = torch::empty({G, D}, o), absgrad = torch::empty({G, 2}, o);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "gs_reduce_isect_rows_cpu", [&] {
    fast3d::gs_reduce_isect_rows_cpu<scalar_t>(rows.data_ptr<scalar_t>(), isect_src.data_ptr<int32_t>(), go, n, G,
                                               int(D), pass, g_means2d.data_ptr<scalar_t>(),
                                               g_conics.data_ptr<scalar_t>(), g_opac.data_ptr<scalar_t>(),
                                               g_feats.data_ptr<scalar_t>(), absgrad.data_ptr<scalar_t>());
  });
  return {g_means2d, g_conics, g_opac, g_feats, absgrad};
}

int64_t gs_deterministic_pass_rows(int64_t n, int64_t D) {
  TORCH_CHECK(n >= 0 && D >= 0 && D <= INT32_MAX, "gs_deterministic_pass_rows: n and D must be >= 0; got ", n, " and ",
              D);
  return fast3d::gs_deterministic_pass_rows(n, int(D));
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
  m.def("gs_reduce_isect_rows", &gs_reduce_isect_rows,
        "the deterministic CUDA backward's per-Gaussian reduction of intersection rows, on the CPU");
  m.def("gs_deterministic_pass_rows", &gs_deterministic_pass_rows,
        "sorted intersections per pass of the deterministic CUDA backward, for n intersections of D channels");
  m.attr("gs_deterministic_row_bytes") = fast3d::kGsDeterministicRowBytes;
  m.attr("gs_tile") = fast3d::gs::kTile;
  m.attr("gs_radius_max") = fast3d::gs::kRadiusMax;
  m.attr("gs_max_intersections") = fast3d::kGsMaxIntersections;
  m.attr("gs_max_cuda_channels") = fast3d::kGsMaxCudaChannels;
  m.attr("gs_max_cuda_images") = fast3d::kGsMaxCudaImages;
}
