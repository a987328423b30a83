// Compositing on the GPU: one thread per ray running the per-ray math of composite_math.h.
// A simple baseline with the same numerics as the CPU path; the fused Triton ray marcher is the
// fast path for full renders.
#include <cuda_runtime.h>

#include "composite/composite.h"
#include "composite/composite_math.h"

namespace fast3d {
namespace {

constexpr int kThreads = 128;

// One thread per ray r: sigma, t0, t1 [R, S]; rgb [R, S, D]; bg [R, D] (bg_stride D) or [D]
// (bg_stride 0) or null -> color [R, D], opacity, depth [R], weights [R, S].
__global__ void forward_kernel(const float* __restrict__ sigma, const float* __restrict__ rgb,
                               const float* __restrict__ t0, const float* __restrict__ t1, const float* __restrict__ bg,
                               int64_t bg_stride, int64_t R, int S, int D, float eps, float* color, float* opacity,
                               float* depth, float* weights) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  const int64_t o = r * S;
  composite_ray_forward(sigma + o, rgb + o * D, t0 + o, t1 + o, bg ? bg + r * bg_stride : nullptr, S, D, eps,
                        color + r * D, opacity + r, depth + r, weights + o);
}

// One thread per ray r: the forward's inputs, opacity [R], g_color [R, D], g_opacity, g_depth [R],
// g_weights [R, S] or null -> g_sigma [R, S], g_rgb [R, S, D], g_bg [R, D] (per ray, when bg is
// given).
__global__ void backward_kernel(const float* __restrict__ sigma, const float* __restrict__ rgb,
                                const float* __restrict__ t0, const float* __restrict__ t1,
                                const float* __restrict__ bg, int64_t bg_stride, int64_t R, int S, int D, float eps,
                                const float* __restrict__ opacity, const float* __restrict__ g_color,
                                const float* __restrict__ g_opacity, const float* __restrict__ g_depth,
                                const float* __restrict__ g_weights, float* g_sigma, float* g_rgb, float* g_bg) {
  const int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (r >= R) return;
  const int64_t o = r * S;
  composite_ray_backward(sigma + o, rgb + o * D, t0 + o, t1 + o, bg ? bg + r * bg_stride : nullptr, S, D, eps,
                         opacity[r], g_color + r * D, g_opacity[r], g_depth[r], g_weights ? g_weights + o : nullptr,
                         g_sigma + o, g_rgb + o * D, bg ? g_bg + r * D : nullptr);
}

unsigned blocks_for(int64_t R) { return static_cast<unsigned>((R + kThreads - 1) / kThreads); }

}  // namespace

const char* composite_forward_cuda(const float* sigma, const float* rgb, const float* t0, const float* t1,
                                   const float* bg, int64_t bg_stride, int64_t R, int S, int D, float eps, float* color,
                                   float* opacity, float* depth, float* weights, void* stream) {
  if (R == 0) return nullptr;
  forward_kernel<<<blocks_for(R), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      sigma, rgb, t0, t1, bg, bg_stride, R, S, D, eps, color, opacity, depth, weights);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* composite_backward_cuda(const float* sigma, const float* rgb, const float* t0, const float* t1,
                                    const float* bg, int64_t bg_stride, int64_t R, int S, int D, float eps,
                                    const float* opacity, const float* g_color, const float* g_opacity,
                                    const float* g_depth, const float* g_weights, float* g_sigma, float* g_rgb,
                                    float* g_bg, void* stream) {
  if (R == 0) return nullptr;
  backward_kernel<<<blocks_for(R), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      sigma, rgb, t0, t1, bg, bg_stride, R, S, D, eps, opacity, g_color, g_opacity, g_depth, g_weights, g_sigma, g_rgb,
      g_bg);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace fast3d
