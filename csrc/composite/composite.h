// Launchers of the compositing kernels. No torch types: raw pointers to contiguous buffers, sizes,
// and for the background a per-ray stride (D for one background per ray, 0 for one shared [D]).
#pragma once

#include <cstdint>

namespace fast3d {

// sigma, t0, t1 [R, S]; rgb [R, S, D]; bg [R, D] (bg_stride D) or [D] (bg_stride 0) or null;
// color [R, D]; opacity, depth [R]; weights [R, S].
template <typename T>
void composite_forward_cpu(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int64_t bg_stride,
                           int64_t R, int S, int D, T eps, T* color, T* opacity, T* depth, T* weights);

// opacity [R]; g_color [R, D]; g_opacity, g_depth [R]; g_weights [R, S] or null;
// g_sigma [R, S]; g_rgb [R, S, D]; g_bg [R, D] when bg is given (per-ray; the caller reduces).
template <typename T>
void composite_backward_cpu(const T* sigma, const T* rgb, const T* t0, const T* t1, const T* bg, int64_t bg_stride,
                            int64_t R, int S, int D, T eps, const T* opacity, const T* g_color, const T* g_opacity,
                            const T* g_depth, const T* g_weights, T* g_sigma, T* g_rgb, T* g_bg);

// CUDA versions (float32): same arguments plus the stream; they return nullptr on success or the
// CUDA error string of the launch.
const char* composite_forward_cuda(const float* sigma, const float* rgb, const float* t0, const float* t1,
                                   const float* bg, int64_t bg_stride, int64_t R, int S, int D, float eps, float* color,
                                   float* opacity, float* depth, float* weights, void* stream);

const char* composite_backward_cuda(const float* sigma, const float* rgb, const float* t0, const float* t1,
                                    const float* bg, int64_t bg_stride, int64_t R, int S, int D, float eps,
                                    const float* opacity, const float* g_color, const float* g_opacity,
                                    const float* g_depth, const float* g_weights, float* g_sigma, float* g_rgb,
                                    float* g_bg, void* stream);

}  // namespace fast3d
