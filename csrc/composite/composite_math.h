// NeRF emission-absorption compositing of one ray: the math shared by the CPU and CUDA kernels.
//
// For samples i = 0..S-1 with density sigma_i over [t_start_i, t_end_i]:
//   tau_i   = sigma_i * (t_end_i - t_start_i)          optical depth of the sample
//   alpha_i = 1 - exp(-tau_i) = -expm1(-tau_i)
//   T_i     = prod_{j<i} (1 - alpha_j)                  transmittance before the sample
//   w_i     = alpha_i * T_i   if T_i >= eps, else 0     (samples past the cut-off get no weight)
//   color   = sum_i w_i rgb_i + (1 - opacity) * bg,   opacity = sum_i w_i,
//   depth   = sum_i w_i (t_start_i + t_end_i) / 2.
//
// Backward. Let g_i = dL/dw_i, gathering every output that reads w_i:
//   g_i = <dcolor, rgb_i> + (dopacity - <dcolor, bg>) + ddepth * mid_i + dweights_i.
// Since w_i = T_i - T_{i+1} and dT_i/dtau_k = -T_i for k < i:
//   dw_i/dtau_k = -w_i (k < i),  T_{k+1} (k = i),  0 (k > i)
// so dL/dtau_k = g_k T_{k+1} - sum_{i>k} g_i w_i.  The suffix sum is the total G = sum_i g_i w_i
// (first pass) minus the running prefix (second pass): two passes over the ray, nothing stored.
// The cut-off mask is piecewise constant, so it carries no gradient; t_start/t_end are constants.
//
// alpha is computed as -expm1(-tau), never as 1 - exp(-tau): for a thin sample (tau << 1) the
// subtraction cancels, leaving the error of exp(-tau) near 1 (half an ulp of 1, 3e-8 in float32,
// more with a fast exp such as __expf under --use_fast_math) against an alpha of size tau: 0.3% of
// alpha at tau = 1e-5 with an exact exp, ~2% with __expf. expm1 keeps alpha to a few ulps of itself.
#pragma once

#include "common/hd.h"

namespace fast3d {

// alpha of a sample of optical depth tau >= 0, accurate for thin samples (see above).
template <typename T>
FAST3D_HD T sample_alpha(T tau) {
  return -expm1_(-tau);
}

// Pointers are to one ray: sigma, t0, t1 [S]; rgb [S, D]; bg [D] or null; out_color [D];
// out_weights [S]. All contiguous.
template <typename T>
FAST3D_HD void composite_ray_forward(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int S, int D,
                                     T eps, T* out_color, T* out_opacity, T* out_depth, T* out_weights) {
  for (int d = 0; d < D; ++d) out_color[d] = T(0);
  T trans = T(1), opacity = T(0), depth = T(0);
  int i = 0;
  for (; i < S && trans >= eps; ++i) {
    const T alpha = sample_alpha(sigma[i] * (t1[i] - t0[i]));
    const T w = alpha * trans;
    out_weights[i] = w;
    opacity += w;
    depth += w * T(0.5) * (t0[i] + t1[i]);
    for (int d = 0; d < D; ++d) out_color[d] += w * rgb[i * D + d];
    trans *= T(1) - alpha;
  }
  for (; i < S; ++i) out_weights[i] = T(0);
  if (bg != nullptr)
    for (int d = 0; d < D; ++d) out_color[d] += (T(1) - opacity) * bg[d];
  *out_opacity = opacity;
  *out_depth = depth;
}

// Gradients of one ray. g_color [D], g_weights [S] (or null: zero); writes g_sigma [S],
// g_rgb [S, D], and this ray's background gradient g_bg_ray [D] when bg is given (the caller
// reduces it over rays that share a background). `opacity` is the forward's output for this ray.
template <typename T>
FAST3D_HD void composite_ray_backward(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int S, int D,
                                      T eps, T opacity, const T* g_color, T g_opacity, T g_depth, const T* g_weights,
                                      T* g_sigma, T* g_rgb, T* g_bg_ray) {
  T g_open = g_opacity;  // dL/dw_i shared by every sample: opacity minus the background it hides
  if (bg != nullptr)
    for (int d = 0; d < D; ++d) g_open -= g_color[d] * bg[d];

  // Pass 1: G = sum_i g_i w_i over the live samples.
  T trans = T(1), total = T(0);
  for (int i = 0; i < S && trans >= eps; ++i) {
    const T alpha = sample_alpha(sigma[i] * (t1[i] - t0[i]));
    T g = g_open + g_depth * T(0.5) * (t0[i] + t1[i]) + (g_weights ? g_weights[i] : T(0));
    for (int d = 0; d < D; ++d) g += g_color[d] * rgb[i * D + d];
    total += g * alpha * trans;
    trans *= T(1) - alpha;
  }
  // Pass 2: dL/dtau_k = g_k T_{k+1} - (G - prefix_k - g_k w_k).
  trans = T(1);
  T prefix = T(0);
  int k = 0;
  for (; k < S && trans >= eps; ++k) {
    const T dt = t1[k] - t0[k];
    const T alpha = sample_alpha(sigma[k] * dt);
    const T w = alpha * trans;
    T g = g_open + g_depth * T(0.5) * (t0[k] + t1[k]) + (g_weights ? g_weights[k] : T(0));
    for (int d = 0; d < D; ++d) {
      g += g_color[d] * rgb[k * D + d];
      g_rgb[k * D + d] = g_color[d] * w;
    }
    prefix += g * w;
    trans *= T(1) - alpha;
    g_sigma[k] = (g * trans - (total - prefix)) * dt;
  }
  for (; k < S; ++k) {
    g_sigma[k] = T(0);
    for (int d = 0; d < D; ++d) g_rgb[k * D + d] = T(0);
  }
  if (bg != nullptr)
    for (int d = 0; d < D; ++d) g_bg_ray[d] = g_color[d] * (T(1) - opacity);
}

}  // namespace fast3d
