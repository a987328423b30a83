// The one place that binds fast3d's native kernels to Python (module fast3d._C).
// Python-side APIs validate inputs with user-facing messages; the checks here are the last guard
// against a pointer of the wrong kind reaching a kernel.
#include <torch/extension.h>

#include <optional>
#include <tuple>

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

void check_all(std::initializer_list<std::pair<const Tensor*, const char*>> ts, const Tensor& like) {
  for (auto [t, name] : ts) check(*t, name, like);
}

Tensor i32(const Tensor& like, c10::IntArrayRef shape) {
  return torch::empty(shape, like.options().dtype(torch::kInt32));
}

Tensor i64(const Tensor& like, c10::IntArrayRef shape) {
  return torch::empty(shape, like.options().dtype(torch::kInt64));
}

constexpr int kGsTile = 16;

#ifdef FAST3D_WITH_CUDA
#define FAST3D_CUDA_CALL(expr)                          \
  do {                                                  \
    const char* err_ = (expr);                          \
    TORCH_CHECK(err_ == nullptr, #expr ": ", err_);     \
  } while (0)
#define FAST3D_STREAM c10::cuda::getCurrentCUDAStream().stream()
#endif

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_project_forward(
    const Tensor& means, const Tensor& quats, const Tensor& scales, const Tensor& opacities,
    const Tensor& viewmats, const Tensor& Ks, int64_t width, int64_t height, double near_plane,
    double far_plane, double eps2d, bool antialiased) {
  check_all({{&quats, "quats"}, {&scales, "scales"}, {&opacities, "opacities"}, {&viewmats, "viewmats"},
             {&Ks, "Ks"}}, means);
  check(means, "means", means);
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1);
  auto o = means.options();
  auto means2d = torch::empty({B, C, N, 2}, o), conics = torch::empty({B, C, N, 3}, o);
  auto depths = torch::empty({B, C, N}, o), opac = torch::empty({B, C, N}, o);
  auto radii = i32(means, {B, C, N, 2});
  if (means.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(means.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
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
    const Tensor& means, const Tensor& quats, const Tensor& scales, const Tensor& opacities,
    const Tensor& viewmats, const Tensor& Ks, int64_t width, int64_t height, double near_plane,
    double far_plane, double eps2d, bool antialiased, const Tensor& g_means2d, const Tensor& g_conics,
    const Tensor& g_depths, const Tensor& g_opac) {
  check_all({{&quats, "quats"}, {&scales, "scales"}, {&opacities, "opacities"}, {&viewmats, "viewmats"},
             {&Ks, "Ks"}, {&g_means2d, "g_means2d"}, {&g_conics, "g_conics"}, {&g_depths, "g_depths"},
             {&g_opac, "g_opac"}}, means);
  const int64_t B = means.size(0), N = means.size(1), C = viewmats.size(1);
  auto g_means = torch::empty_like(means), g_quats = torch::empty_like(quats);
  auto g_scales = torch::empty_like(scales), g_opacities = torch::empty_like(opacities);
  if (means.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(means.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
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

// sh [B,N,K,3] -> colors [B,C,N,3]
Tensor gs_sh_forward(const Tensor& sh, const Tensor& means, const Tensor& viewmats, int64_t degree) {
  check_all({{&means, "means"}, {&viewmats, "viewmats"}}, sh);
  const int64_t B = sh.size(0), N = sh.size(1), K = sh.size(2), C = viewmats.size(1);
  TORCH_CHECK(degree >= 0 && degree <= 3 && K >= (degree + 1) * (degree + 1), "bad sh degree / K");
  auto colors = torch::empty({B, C, N, 3}, sh.options());
  if (sh.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(sh.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
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

std::tuple<Tensor, Tensor> gs_sh_backward(const Tensor& sh, const Tensor& means, const Tensor& viewmats,
                                          int64_t degree, const Tensor& g_colors) {
  check_all({{&means, "means"}, {&viewmats, "viewmats"}, {&g_colors, "g_colors"}}, sh);
  const int64_t B = sh.size(0), N = sh.size(1), K = sh.size(2), C = viewmats.size(1);
  auto g_sh = torch::empty_like(sh), g_means = torch::empty_like(means);
  if (sh.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(sh.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
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

// means2d [I,N,2], conics [I,N,3], opac [I,N], feats [I,N,D], depths [I,N], radii [I,N,2].
// Returns image [I,H,W,D], alpha [I,H,W], last [I,H,W], and the binning the backward reuses:
// tile_offsets [I*T+1] (int64), flat_ids [total] (Gaussian index within its image, per tile in
// depth order), isect_src [total] (CUDA: pre-sort intersection index; CPU: empty),
// gauss_offsets [I*N+1] (CUDA: first intersection of each Gaussian; CPU: empty).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gs_rasterize_forward(
    const Tensor& means2d, const Tensor& conics, const Tensor& opac, const Tensor& feats, const Tensor& depths,
    const Tensor& radii, int64_t width, int64_t height) {
  check_all({{&means2d, "means2d"}, {&conics, "conics"}, {&opac, "opac"}, {&feats, "feats"},
             {&depths, "depths"}}, means2d);
  TORCH_CHECK(radii.is_contiguous() && radii.scalar_type() == torch::kInt32, "radii must be contiguous int32");
  const int64_t I = feats.size(0), N = feats.size(1), D = feats.size(2);
  const int W = int(width), H = int(height);
  const int64_t TT = int64_t((W + kGsTile - 1) / kGsTile) * ((H + kGsTile - 1) / kGsTile);
  auto image = torch::empty({I, H, W, D}, feats.options()), alpha = torch::empty({I, H, W}, feats.options());
  auto last = i32(feats, {I, H, W});
  auto tile_offsets = i64(feats, {I * TT + 1});
  if (feats.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(feats.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
    const c10::cuda::CUDAGuard guard(feats.device());
    auto stream = FAST3D_STREAM;
    auto counts = i64(feats, {I * N});
    FAST3D_CUDA_CALL(fast3d::gs_tiles_per_gaussian_cuda(means2d.data_ptr<float>(), radii.data_ptr<int32_t>(), I,
                                                        N, W, H, counts.data_ptr<int64_t>(), stream));
    auto gauss_offsets = torch::cat({torch::zeros({1}, counts.options()), counts.cumsum(0)});
    const int64_t total = gauss_offsets[I * N].item<int64_t>();  // the one host synchronisation
    auto keys = torch::empty({total}, feats.options().dtype(torch::kInt64));
    auto vals = i32(feats, {total});
    FAST3D_CUDA_CALL(fast3d::gs_emit_isects_cuda(means2d.data_ptr<float>(), depths.data_ptr<float>(),
                                                 radii.data_ptr<int32_t>(), gauss_offsets.data_ptr<int64_t>(), I, N,
                                                 W, H, reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
                                                 vals.data_ptr<int32_t>(), stream));
    const int end_bit = fast3d::gs_sort_end_bit(I, TT);
    auto keys_sorted = torch::empty_like(keys);
    auto isect_src = torch::empty_like(vals);
    auto temp = torch::empty({int64_t(fast3d::gs_sort_temp_bytes_cuda(total, end_bit))},
                             feats.options().dtype(torch::kUInt8));
    FAST3D_CUDA_CALL(fast3d::gs_sort_isects_cuda(
        temp.data_ptr<uint8_t>(), size_t(temp.numel()), reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()),
        reinterpret_cast<uint64_t*>(keys_sorted.data_ptr<int64_t>()), vals.data_ptr<int32_t>(),
        isect_src.data_ptr<int32_t>(), total, end_bit, stream));
    auto flat_ids = i32(feats, {total});
    FAST3D_CUDA_CALL(fast3d::gs_tile_ranges_cuda(
        reinterpret_cast<const uint64_t*>(keys_sorted.data_ptr<int64_t>()), isect_src.data_ptr<int32_t>(),
        gauss_offsets.data_ptr<int64_t>(), total, I, N, TT, tile_offsets.data_ptr<int64_t>(),
        flat_ids.data_ptr<int32_t>(), stream));
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_forward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), I, N, int(D), W, H,
        image.data_ptr<float>(), alpha.data_ptr<float>(), last.data_ptr<int32_t>(), stream));
    return {image, alpha, last, tile_offsets, flat_ids, isect_src, gauss_offsets};
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
  tile_offsets[0] = 0;
  tile_offsets.slice(0, 1).copy_(tile_counts.cumsum(0));
  const int64_t total = tile_offsets[I * TT].item<int64_t>();
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
  return {image, alpha, last, tile_offsets, flat_ids, i32(feats, {0}), i64(feats, {0})};
}

// Returns g_means2d [I,N,2], g_conics [I,N,3], g_opac [I,N], g_feats [I,N,D], absgrad [I,N,2].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gs_rasterize_backward(
    const Tensor& means2d, const Tensor& conics, const Tensor& opac, const Tensor& feats, const Tensor& radii,
    const Tensor& tile_offsets, const Tensor& flat_ids, const Tensor& isect_src, const Tensor& gauss_offsets,
    const Tensor& alpha, const Tensor& last, const Tensor& g_image, const Tensor& g_alpha, int64_t width,
    int64_t height, bool deterministic) {
  check_all({{&means2d, "means2d"}, {&conics, "conics"}, {&opac, "opac"}, {&alpha, "alpha"},
             {&g_image, "g_image"}, {&g_alpha, "g_alpha"}}, feats);
  const int64_t I = feats.size(0), N = feats.size(1), D = feats.size(2);
  const int W = int(width), H = int(height);
  auto g_means2d = torch::empty_like(means2d), g_conics = torch::empty_like(conics);
  auto g_opac = torch::empty_like(opac), g_feats = torch::empty_like(feats), absgrad = torch::empty_like(means2d);
  if (feats.is_cuda()) {
#ifdef FAST3D_WITH_CUDA
    TORCH_CHECK(feats.scalar_type() == torch::kFloat32, "the CUDA rasterizer takes float32");
    const c10::cuda::CUDAGuard guard(feats.device());
    const int64_t total = flat_ids.numel();
    // Deterministic: one gradient row per intersection (zero where no pixel used it), summed per
    // Gaussian in a fixed order.
    auto isect_grads = deterministic ? torch::zeros({total, 8 + D}, feats.options())
                                     : torch::empty({0}, feats.options());
    FAST3D_CUDA_CALL(fast3d::gs_rasterize_backward_cuda(
        means2d.data_ptr<float>(), conics.data_ptr<float>(), opac.data_ptr<float>(), feats.data_ptr<float>(),
        tile_offsets.data_ptr<int64_t>(), flat_ids.data_ptr<int32_t>(), isect_src.data_ptr<int32_t>(),
        gauss_offsets.data_ptr<int64_t>(), alpha.data_ptr<float>(), last.data_ptr<int32_t>(),
        g_image.data_ptr<float>(), g_alpha.data_ptr<float>(), I, N, int(D), W, H, deterministic,
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
}
