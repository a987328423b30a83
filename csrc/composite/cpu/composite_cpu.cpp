// Compositing on the CPU: one ray per OpenMP iteration, the per-ray math of composite_math.h.
#include "composite/composite.h"
#include "composite/composite_math.h"

namespace fast3d {

template <typename T>
void composite_forward_cpu(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int64_t bg_stride,
                           int64_t R, int S, int D, T eps, T* color, T* opacity, T* depth, T* weights) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * S;
    composite_ray_forward(sigma + o, rgb + o * D, t0 + o, t1 + o, bg ? bg + r * bg_stride : nullptr, S, D, eps,
                          color + r * D, opacity + r, depth + r, weights + o);
  }
}

template <typename T>
void composite_backward_cpu(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int64_t bg_stride,
                            int64_t R, int S, int D, T eps, const T* opacity, const T* g_color, const T* g_opacity,
                            const T* g_depth, const T* g_weights, T* g_sigma, T* g_rgb, T* g_bg) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = r * S;
    composite_ray_backward(sigma + o, rgb + o * D, t0 + o, t1 + o, bg ? bg + r * bg_stride : nullptr, S, D, eps,
                           opacity[r], g_color + r * D, g_opacity[r], g_depth[r], g_weights ? g_weights + o : nullptr,
                           g_sigma + o, g_rgb + o * D, bg ? g_bg + r * D : nullptr);
  }
}

#define FAST3D_INSTANTIATE(T)                                                                                          \
  template void composite_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int, int, \
                                         T, T*, T*, T*, T*);                                                           \
  template void composite_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, int64_t, int64_t, int,     \
                                          int, T, const T*, const T*, const T*, const T*, const T*, T*, T*, T*);
FAST3D_INSTANTIATE(float)
FAST3D_INSTANTIATE(double)
#undef FAST3D_INSTANTIATE

}  // namespace fast3d
