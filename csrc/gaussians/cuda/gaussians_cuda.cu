// Gaussian rasterization on the GPU, with the math of gaussian_math.h (shared with the CPU path).
//
// Forward: project (one thread per camera x Gaussian) -> count tiles per Gaussian -> emit one
// (key, value) per (Gaussian, tile) with key = image | tile | depth bits -> cub radix sort over
// only the bits the key needs -> per-tile ranges -> blend: one kTile x kTile block per (image,
// tile), the tile's Gaussians staged through shared memory in batches, each thread one pixel front
// to back, the block leaving as soon as every pixel is done. The binning buffers have a capacity
// fixed by the host (the true count, or the caller's bound); the kernels read the true count from
// the prefix sum on the device, so nothing here synchronises with the host (see gaussians.h).
// Backward: the same tiles back to front; per Gaussian, the 32 pixels of a warp reduce their
// gradient by shuffles before one atomic add per warp, or (deterministic) write per-warp partials
// to shared memory that are summed in warp order into one row per intersection, then summed per
// Gaussian in intersection order, in passes over the sorted intersections that bound the rows'
// memory (isect_rows.h).
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/device/device_radix_sort.cuh>
#include <mutex>
#include <type_traits>

#include "gaussians/gaussian_math.h"
#include "gaussians/gaussians.h"

namespace fast3d {
namespace {

using gs::kTile;
using gs::tiles_along;
constexpr float kAlphaMin = float(gs::kAlphaMin), kAlphaMax = float(gs::kAlphaMax), kTransMin = float(gs::kTransMin);

constexpr int kThreads = 256;               // block size of the one-thread-per-item kernels
constexpr int kTilePixels = kTile * kTile;  // block size of the blend kernels: a thread per pixel
constexpr int kWarps = kTilePixels / 32;
constexpr int kBwdBatch = 32;  // Gaussians per shared-memory batch in the backward

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

__device__ void load_camera(const float* vm, const float* K, float R[3][3], float t[3], float& fx, float& fy, float& cx,
                            float& cy) {
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) R[i][j] = vm[i * 4 + j];
    t[i] = vm[i * 4 + 3];
  }
  fx = K[0];
  fy = K[4];
  cx = K[2];
  cy = K[5];
}

// One thread per (camera, Gaussian): means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N],
// viewmats [B,C,4,4], Ks [B,C,3,3] -> means2d [B,C,N,2], conics [B,C,N,3], depths, opac [B,C,N],
// radii [B,C,N,2].
__global__ void project_forward_kernel(const float* __restrict__ means, const float* __restrict__ quats,
                                       const float* __restrict__ scales, const float* __restrict__ opacities,
                                       const float* __restrict__ viewmats, const float* __restrict__ Ks, int64_t B,
                                       int64_t C, int64_t N, int width, int height, float near_plane, float far_plane,
                                       float eps2d, bool antialiased, bool ortho, float* means2d, float* conics,
                                       float* depths, float* opac, int32_t* radii) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= B * C * N) return;
  const int64_t n = idx % N, bc = idx / N, b = bc / C, g = b * N + n;
  float R[3][3], t[3], fx, fy, cx, cy;
  load_camera(viewmats + bc * 16, Ks + bc * 9, R, t, fx, fy, cx, cy);
  gs::Projected<float> pr;
  gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], R, t, fx, fy, cx, cy, width, height,
                      near_plane, far_plane, eps2d, antialiased, ortho, pr);
  int r[2];
  gs::screen_radii(pr, r);
  depths[idx] = pr.p[2];
  means2d[idx * 2] = pr.valid ? pr.mean2d[0] : 0.f;
  means2d[idx * 2 + 1] = pr.valid ? pr.mean2d[1] : 0.f;
  conics[idx * 3] = pr.valid ? pr.conic[0] : 1.f;
  conics[idx * 3 + 1] = pr.valid ? pr.conic[1] : 0.f;
  conics[idx * 3 + 2] = pr.valid ? pr.conic[2] : 1.f;
  opac[idx] = pr.valid ? pr.opacity : 0.f;
  radii[idx * 2] = r[0];
  radii[idx * 2 + 1] = r[1];
}

// One thread per Gaussian, looping over its cameras: the per-scene gradients need no atomics.
// The forward's inputs, g_means2d [B,C,N,2], g_conics [B,C,N,3], g_depths, g_opac [B,C,N] ->
// g_means [B,N,3], g_quats [B,N,4], g_scales [B,N,3], g_opacities [B,N].
__global__ void project_backward_kernel(const float* __restrict__ means, const float* __restrict__ quats,
                                        const float* __restrict__ scales, const float* __restrict__ opacities,
                                        const float* __restrict__ viewmats, const float* __restrict__ Ks, int64_t B,
                                        int64_t C, int64_t N, int width, int height, float near_plane, float far_plane,
                                        float eps2d, bool antialiased, bool ortho, const float* __restrict__ g_means2d,
                                        const float* __restrict__ g_conics, const float* __restrict__ g_depths,
                                        const float* __restrict__ g_opac, float* g_means, float* g_quats,
                                        float* g_scales, float* g_opacities) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= B * N) return;
  const int64_t b = g / N, n = g % N;
  float gm[3] = {0, 0, 0}, gq[4] = {0, 0, 0, 0}, gsc[3] = {0, 0, 0}, go = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t bc = b * C + c, idx = bc * N + n;
    float R[3][3], t[3], fx, fy, cx, cy;
    load_camera(viewmats + bc * 16, Ks + bc * 9, R, t, fx, fy, cx, cy);
    gs::Projected<float> pr;
    gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], R, t, fx, fy, cx, cy, width, height,
                        near_plane, far_plane, eps2d, antialiased, ortho, pr);
    if (!pr.valid) {  // constant stand-in values; depth = z still reads the mean
      for (int k = 0; k < 3; ++k) gm[k] += R[2][k] * g_depths[idx];
      continue;
    }
    gs::project_backward(pr, scales + g * 3, opacities[g], R, fx, fy, eps2d, antialiased, g_means2d + idx * 2,
                         g_conics + idx * 3, g_depths[idx], g_opac[idx], gm, gq, gsc, &go);
  }
  for (int k = 0; k < 3; ++k) g_means[g * 3 + k] = gm[k];
  for (int k = 0; k < 4; ++k) g_quats[g * 4 + k] = gq[k];
  for (int k = 0; k < 3; ++k) g_scales[g * 3 + k] = gsc[k];
  g_opacities[g] = go;
}

__device__ void camera_centre(const float* vm, float c[3]) {
  for (int k = 0; k < 3; ++k) c[k] = -(vm[k] * vm[3] + vm[4 + k] * vm[7] + vm[8 + k] * vm[11]);
}

// One thread per (camera, Gaussian): sh [B,N,K,3], means [B,N,3], viewmats [B,C,4,4] -> colors
// [B,C,N,3].
__global__ void sh_forward_kernel(const float* __restrict__ sh, const float* __restrict__ means,
                                  const float* __restrict__ viewmats, int64_t B, int64_t C, int64_t N, int K,
                                  int degree, float* colors) {
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= B * C * N) return;
  const int64_t n = idx % N, bc = idx / N, g = (bc / C) * N + n;
  float campos[3];
  camera_centre(viewmats + bc * 16, campos);
  gs::sh_forward(degree, sh + g * K * 3, means + g * 3, campos, colors + idx * 3);
}

// One thread per Gaussian: the forward's inputs, g_colors [B,C,N,3] -> g_sh [B,N,K,3], g_means
// [B,N,3].
__global__ void sh_backward_kernel(const float* __restrict__ sh, const float* __restrict__ means,
                                   const float* __restrict__ viewmats, int64_t B, int64_t C, int64_t N, int K,
                                   int degree, const float* __restrict__ g_colors, float* g_sh, float* g_means) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= B * N) return;
  const int64_t b = g / N, n = g % N;
  for (int k = 0; k < K * 3; ++k) g_sh[g * K * 3 + k] = 0.f;
  float gm[3] = {0, 0, 0};
  for (int64_t c = 0; c < C; ++c) {
    const int64_t bc = b * C + c;
    float campos[3];
    camera_centre(viewmats + bc * 16, campos);
    gs::sh_backward(degree, sh + g * K * 3, means + g * 3, campos, g_colors + (bc * N + n) * 3, g_sh + g * K * 3, gm);
  }
  for (int k = 0; k < 3; ++k) g_means[g * 3 + k] = gm[k];
}

// One thread per Gaussian: means2d [I,N,2], radii [I,N,2] -> counts [I*N].
__global__ void tiles_per_gaussian_kernel(const float* __restrict__ means2d, const int32_t* __restrict__ radii,
                                          int64_t total, int width, int height, int64_t* counts) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= total) return;
  int tr[4];
  counts[g] =
      gs::tile_rect(means2d + g * 2, radii + g * 2, width, height, tr) ? int64_t(tr[1] - tr[0]) * (tr[3] - tr[2]) : 0;
}

// Intersections binned: the true count n = gauss_offsets[n_gauss], capped at the buffers' capacity.
__device__ __forceinline__ int64_t binned_count(const int64_t* gauss_offsets, int64_t n_gauss, int64_t capacity) {
  return min(gauss_offsets[n_gauss], capacity);
}

// One thread per Gaussian: its intersections k = gauss_offsets[g] ... in row-major tile order,
// those with k >= capacity dropped. means2d [I,N,2], depths [I,N], radii [I,N,2], gauss_offsets
// [I*N+1] -> keys, vals [capacity].
__global__ void emit_isects_kernel(const float* __restrict__ means2d, const float* __restrict__ depths,
                                   const int32_t* __restrict__ radii, const int64_t* __restrict__ gauss_offsets,
                                   int64_t I, int64_t N, int width, int height, int tile_bits, int64_t capacity,
                                   uint64_t* keys, int32_t* vals) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= I * N) return;
  int tr[4];
  if (!gs::tile_rect(means2d + g * 2, radii + g * 2, width, height, tr)) return;
  const int tx_count = tiles_along(width);
  // Valid depths are >= near_plane > 0: their float bits sort as the floats do.
  const uint64_t head = (uint64_t(g / N) << (32 + tile_bits)) | uint64_t(__float_as_uint(depths[g]));
  int64_t k = gauss_offsets[g];
  for (int ty = tr[2]; ty < tr[3]; ++ty)
    for (int tx = tr[0]; tx < tr[1]; ++tx, ++k) {
      if (k >= capacity) return;
      keys[k] = head | (uint64_t(ty * tx_count + tx) << 32);
      vals[k] = int32_t(k);
    }
}

// Slots [n, capacity) of a buffer larger than the count: all key bits set, which sorts after every
// real key (a real key's depth field is the bit pattern of a positive finite float, < 0xffffffff).
__global__ void pad_isects_kernel(const int64_t* __restrict__ gauss_offsets, int64_t n_gauss, int64_t capacity,
                                  uint64_t* keys, int32_t* vals) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= capacity || k < binned_count(gauss_offsets, n_gauss, capacity)) return;
  keys[k] = ~uint64_t(0);
  vals[k] = int32_t(k);
}

// tile_offsets[t] = n for every global tile t (= image * tiles + tile): the end of the list,
// before tile_ranges_kernel writes the starts of the tiles that have intersections.
__global__ void fill_tile_offsets_kernel(const int64_t* __restrict__ gauss_offsets, int64_t n_gauss, int64_t capacity,
                                         int64_t n_tiles, int64_t* tile_offsets) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t <= n_tiles) tile_offsets[t] = binned_count(gauss_offsets, n_gauss, capacity);
}

// Per sorted intersection j < n: tile_offsets[t] = j for the tiles t in (tile of j - 1, tile of j]
// (so empty tiles get empty ranges); flat_ids[j] = the Gaussian (within its image) of j.
__global__ void tile_ranges_kernel(const uint64_t* __restrict__ keys, const int32_t* __restrict__ isect_src,
                                   const int64_t* __restrict__ gauss_offsets, int64_t capacity, int64_t n_gauss,
                                   int64_t N, int64_t tiles, int tile_bits, int64_t* tile_offsets, int32_t* flat_ids) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j >= binned_count(gauss_offsets, n_gauss, capacity)) return;
  const uint64_t mask = (uint64_t(1) << tile_bits) - 1;
  const uint64_t hi_j = keys[j] >> 32;
  const int64_t cur = int64_t(hi_j >> tile_bits) * tiles + int64_t(hi_j & mask);
  int64_t prev = -1;
  if (j > 0) {
    const uint64_t hi_p = keys[j - 1] >> 32;
    prev = int64_t(hi_p >> tile_bits) * tiles + int64_t(hi_p & mask);
  }
  for (int64_t t = prev + 1; t <= cur; ++t) tile_offsets[t] = j;
  // The Gaussian of this intersection: the last g with gauss_offsets[g] <= src (upper bound - 1).
  const int64_t src = isect_src[j];
  int64_t lo = 0, hi = n_gauss + 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (gauss_offsets[mid] <= src)
      lo = mid + 1;
    else
      hi = mid;
  }
  flat_ids[j] = int32_t((lo - 1) % N);
}

// Blend one (image, tile): blockIdx.x = tile, blockIdx.y = image; thread = pixel. DMAX >= D
// bounds the per-thread accumulator so it stays in registers. means2d [I,N,2], conics [I,N,3],
// opac [I,N], feats [I,N,D], tile_offsets [I*tiles+1], flat_ids [capacity] -> image [I,H,W,D],
// alpha [I,H,W], last [I,H,W].
template <int DMAX>
__global__ void __launch_bounds__(kTilePixels)
    rasterize_forward_kernel(const float* __restrict__ means2d, const float* __restrict__ conics,
                             const float* __restrict__ opac, const float* __restrict__ feats,
                             const int64_t* __restrict__ tile_offsets, const int32_t* __restrict__ flat_ids, int64_t N,
                             int D, int width, int height, float* image, float* alpha, int32_t* last) {
  const int tiles_x = tiles_along(width);
  const int64_t i = blockIdx.y;
  const int64_t it = i * gridDim.x + blockIdx.x;
  const int x = (blockIdx.x % tiles_x) * kTile + threadIdx.x % kTile;
  const int y = (blockIdx.x / tiles_x) * kTile + threadIdx.x / kTile;
  const bool inside = x < width && y < height;
  const float px = float(x) + 0.5f, py = float(y) + 0.5f;
  const int64_t s = tile_offsets[it], e = tile_offsets[it + 1];

  __shared__ int32_t s_id[kTilePixels];
  __shared__ float2 s_m2[kTilePixels];
  __shared__ float3 s_con[kTilePixels];
  __shared__ float s_op[kTilePixels];

  float trans = 1.f, acc[DMAX];
#pragma unroll
  for (int d = 0; d < DMAX; ++d) acc[d] = 0.f;
  int32_t lst = 0;
  bool done = !inside;
  for (int64_t base = s; base < e; base += kTilePixels) {
    // Every pixel of the block done: stop loading (the count is block-wide, so all leave together).
    if (__syncthreads_count(done) == kTilePixels) break;
    const int64_t j = base + threadIdx.x;
    if (j < e) {
      const int64_t g = i * N + flat_ids[j];
      s_id[threadIdx.x] = int32_t(g - i * N);
      s_m2[threadIdx.x] = make_float2(means2d[g * 2], means2d[g * 2 + 1]);
      s_con[threadIdx.x] = make_float3(conics[g * 3], conics[g * 3 + 1], conics[g * 3 + 2]);
      s_op[threadIdx.x] = opac[g];
    }
    __syncthreads();
    const int count = int(min(int64_t(kTilePixels), e - base));
    for (int k = 0; k < count && !done; ++k) {
      const float m2[2] = {s_m2[k].x, s_m2[k].y};
      const float con[3] = {s_con[k].x, s_con[k].y, s_con[k].z};
      float dx, dy, vis;
      const float raw = gs::gaussian_raw_alpha(m2, con, s_op[k], px, py, dx, dy, vis);
      if (raw < kAlphaMin) continue;
      const float a = fminf(raw, kAlphaMax);
      const float next = trans * (1.f - a);
      if (next < kTransMin) {
        done = true;
        break;
      }
      const float w = a * trans;
      const float* f = feats + (i * N + s_id[k]) * D;
#pragma unroll
      for (int d = 0; d < DMAX; ++d)
        if (d < D) acc[d] += w * f[d];
      trans = next;
      lst = int32_t(base + k - s + 1);
    }
  }
  if (!inside) return;
  const int64_t pix = (i * height + y) * width + x;
#pragma unroll
  for (int d = 0; d < DMAX; ++d)
    if (d < D) image[pix * D + d] = acc[d];
  alpha[pix] = 1.f - trans;
  last[pix] = lst;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Backward of the blend over one (image, tile): blockIdx.x = tile, blockIdx.y = image; thread =
// pixel, walking the tile's Gaussians back to front (the CPU twin, backward_tile in
// gaussians_cpu.cpp, uses the same names for the same quantities).
//
// The forward blended, over the Gaussians j = 0, 1, ... of the pixel's list (front to back),
//   C = sum_j w_j f_j,   w_j = a_j T_j,   T_j = prod_{k<j} (1 - a_k),   A = 1 - T_final,
// with a_j = min(0.99, o_j exp(-q_j / 2)) (0 for the Gaussians it skipped: a_j < 1/255, or
// j >= n_blended, the pixel's `last`). With g = dL/dC (g_image [D]) and g_A = dL/dA (g_alpha):
//   dC/da_j = T_j f_j - sum_{k>j} w_k f_k / (1 - a_j)    (T_k for k > j holds the factor 1 - a_j)
//   dA/da_j = T_final / (1 - a_j)
// so  dL/da_j = T_j <g, f_j> - (later_color + alpha_share) / (1 - a_j),  where
//   later_color = sum_{k>j} w_k <g, f_k>   (the Gaussians behind j: summed as the walk passes them)
//   alpha_share = -g_A T_final             (the alpha output's share, constant per pixel)
// and dL/df_j = w_j g. Walking back to front, T_j = T_{j+1} / (1 - a_j) is recovered from
// T_final = 1 - A by division (t_after holds T_{j+1} when Gaussian j comes); dL/da_j then goes
// through gs::gaussian_alpha_backward to the 2D mean, conic and opacity.
//
// Per Gaussian of a batch, each pixel's gradient row (means2d x, y; conic A, B, C; opacity;
// |means2d| x, y; then w_j g, the D feature gradients) is warp-reduced; lane 0 either adds it
// atomically into the Gaussian's gradients, or (deterministic) stores the warp's partial in shared
// memory, and the partials are summed in warp order into the intersection's row of the pass's
// buffer (only the sorted intersections [j0, j1) of the pass; see isect_rows.h).
template <int DMAX>
__global__ void __launch_bounds__(kTilePixels)
    rasterize_backward_kernel(const float* __restrict__ means2d,         // [I, N, 2]
                              const float* __restrict__ conics,          // [I, N, 3]
                              const float* __restrict__ opac,            // [I, N]
                              const float* __restrict__ feats,           // [I, N, D]
                              const int64_t* __restrict__ tile_offsets,  // [I * tiles + 1]
                              const int32_t* __restrict__ flat_ids,      // [capacity]
                              const float* __restrict__ alpha,           // [I, H, W]
                              const int32_t* __restrict__ last,          // [I, H, W]
                              const float* __restrict__ g_image,         // [I, H, W, D]
                              const float* __restrict__ g_alpha,         // [I, H, W]
                              int64_t N, int D, int width, int height, bool deterministic, int64_t j0, int64_t j1,
                              float* rows,       // deterministic: [j1 - j0, 8 + D]
                              float* g_means2d,  // [I, N, 2]  (atomics; deterministic: unused)
                              float* g_conics,   // [I, N, 3]
                              float* g_opac,     // [I, N]
                              float* g_feats,    // [I, N, D]
                              float* absgrad) {  // [I, N, 2]
  extern __shared__ float s_partial[];           // deterministic: [kBwdBatch][kWarps][8 + D]
  __shared__ int32_t s_id[kBwdBatch];
  __shared__ float2 s_m2[kBwdBatch];
  __shared__ float3 s_con[kBwdBatch];
  __shared__ float s_op[kBwdBatch];
  __shared__ int s_max_blended;

  const int tiles_x = tiles_along(width);
  const int64_t i = blockIdx.y;
  const int64_t it = i * gridDim.x + blockIdx.x;
  const int64_t s = tile_offsets[it];
  // A deterministic pass only needs the tiles with intersections in [j0, j1) (block-uniform exit).
  if (deterministic && (tile_offsets[it + 1] <= j0 || s >= j1)) return;
  const int x = (blockIdx.x % tiles_x) * kTile + threadIdx.x % kTile;
  const int y = (blockIdx.x / tiles_x) * kTile + threadIdx.x / kTile;
  const bool inside = x < width && y < height;
  const float px = float(x) + 0.5f, py = float(y) + 0.5f;
  const int64_t pix = (i * height + y) * width + x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int R = gs::isect_row_size(D);

  float t_after = 1.f, later_color = 0.f, alpha_share = 0.f, g_img[DMAX];
  int32_t n_blended = 0;
  if (inside) {
    t_after = 1.f - alpha[pix];  // T_final
    alpha_share = -g_alpha[pix] * t_after;
    n_blended = last[pix];
  }
#pragma unroll
  for (int d = 0; d < DMAX; ++d) g_img[d] = (inside && d < D) ? g_image[pix * D + d] : 0.f;
  if (threadIdx.x == 0) s_max_blended = 0;
  __syncthreads();
  atomicMax(&s_max_blended, int(n_blended));
  __syncthreads();
  const int64_t end = s + s_max_blended;

  for (int64_t top = end; top > s; top -= kBwdBatch) {
    const int count = int(min(int64_t(kBwdBatch), top - s));
    __syncthreads();  // the previous batch's shared data is no longer read
    if (threadIdx.x < count) {
      const int64_t j = top - 1 - threadIdx.x;  // k-th entry of the batch = j, descending
      const int64_t g = i * N + flat_ids[j];
      s_id[threadIdx.x] = int32_t(g - i * N);
      s_m2[threadIdx.x] = make_float2(means2d[g * 2], means2d[g * 2 + 1]);
      s_con[threadIdx.x] = make_float3(conics[g * 3], conics[g * 3 + 1], conics[g * 3 + 2]);
      s_op[threadIdx.x] = opac[g];
    }
    __syncthreads();
    for (int k = 0; k < count; ++k) {
      const int64_t j = top - 1 - k;
      const float m2[2] = {s_m2[k].x, s_m2[k].y};
      const float con[3] = {s_con[k].x, s_con[k].y, s_con[k].z};
      const float* f = feats + (i * N + s_id[k]) * D;
      float row[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      float w = 0.f;  // w_j = a_j T_j, 0 where the pixel did not blend Gaussian j
      if (inside && j - s < n_blended) {
        float dx, dy, vis;
        const float raw = gs::gaussian_raw_alpha(m2, con, s_op[k], px, py, dx, dy, vis);
        if (raw >= kAlphaMin) {
          const float a = fminf(raw, kAlphaMax);
          const float t_j = t_after / (1.f - a);
          float g_dot_f = 0.f;  // <g, f_j>
#pragma unroll
          for (int d = 0; d < DMAX; ++d)
            if (d < D) g_dot_f += g_img[d] * f[d];
          w = a * t_j;
          const float g_a = t_j * g_dot_f - (later_color + alpha_share) / (1.f - a);  // dL/da_j
          later_color += w * g_dot_f;
          t_after = t_j;
          float gm[2] = {0.f, 0.f}, gc[3] = {0.f, 0.f, 0.f}, go = 0.f;
          gs::gaussian_alpha_backward(con, s_op[k], dx, dy, vis, g_a, gm, gc, go);
          row[0] = gm[0];
          row[1] = gm[1];
          row[2] = gc[0];
          row[3] = gc[1];
          row[4] = gc[2];
          row[5] = go;
          row[6] = fabsf(gm[0]);
          row[7] = fabsf(gm[1]);
        }
      }
      if (deterministic) {
        if (j >= j0 && j < j1) {  // block-uniform
          float* part = s_partial + (k * kWarps + warp) * R;
#pragma unroll
          for (int r = 0; r < 8; ++r) {
            const float v = warp_sum(row[r]);
            if (lane == 0) part[r] = v;
          }
#pragma unroll
          for (int d = 0; d < DMAX; ++d)
            if (d < D) {
              const float v = warp_sum(w * g_img[d]);
              if (lane == 0) part[8 + d] = v;
            }
        }
      } else if (__any_sync(0xffffffffu, w != 0.f)) {
        const int64_t g = i * N + s_id[k];
        float v[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) v[r] = warp_sum(row[r]);
        if (lane == 0) {
          atomicAdd(g_means2d + g * 2, v[0]);
          atomicAdd(g_means2d + g * 2 + 1, v[1]);
          atomicAdd(g_conics + g * 3, v[2]);
          atomicAdd(g_conics + g * 3 + 1, v[3]);
          atomicAdd(g_conics + g * 3 + 2, v[4]);
          atomicAdd(g_opac + g, v[5]);
          atomicAdd(absgrad + g * 2, v[6]);
          atomicAdd(absgrad + g * 2 + 1, v[7]);
        }
#pragma unroll
        for (int d = 0; d < DMAX; ++d)
          if (d < D) {
            const float vd = warp_sum(w * g_img[d]);
            if (lane == 0) atomicAdd(g_feats + g * D + d, vd);
          }
      }
    }
    if (deterministic) {
      __syncthreads();
      // Row of sorted intersection j (in the pass) = the warps' partials summed in warp order.
      for (int e = threadIdx.x; e < count * R; e += kTilePixels) {
        const int k = e / R, r = e % R;
        const int64_t j = top - 1 - k;
        if (j < j0 || j >= j1) continue;
        float v = 0.f;
        for (int wp = 0; wp < kWarps; ++wp) v += s_partial[(k * kWarps + wp) * R + r];
        rows[(j - j0) * R + r] = v;
      }
    }
  }
}

// Deterministic mode: sorted_of [capacity] = the inverse of isect_src (pre-sort index -> sorted
// position).
__global__ void invert_isect_src_kernel(const int32_t* __restrict__ isect_src, int64_t capacity, int32_t* sorted_of) {
  const int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (j < capacity) sorted_of[isect_src[j]] = int32_t(j);
}

// Deterministic mode, one pass: each Gaussian adds its rows of the sorted intersections [j0, j1)
// (isect_rows.h).
__global__ void reduce_isect_rows_kernel(const float* __restrict__ rows, const int32_t* __restrict__ sorted_of,
                                         const int64_t* __restrict__ gauss_offsets, int64_t n_gauss, int D,
                                         int64_t capacity, int64_t j0, int64_t j1, float* g_means2d, float* g_conics,
                                         float* g_opac, float* g_feats, float* absgrad) {
  const int64_t g = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (g >= n_gauss) return;
  gs::reduce_isect_rows_pass(rows, sorted_of, gauss_offsets, capacity, g, D, j0, j1, g_means2d, g_conics, g_opac,
                             g_feats, absgrad);
}

}  // namespace

const char* gs_project_forward_cuda(const float* means, const float* quats, const float* scales, const float* opacities,
                                    const float* viewmats, const float* Ks, int64_t B, int64_t C, int64_t N, int width,
                                    int height, float near_plane, float far_plane, float eps2d, bool antialiased,
                                    bool ortho, float* means2d, float* conics, float* depths, float* opac,
                                    int32_t* radii, void* stream) {
  if (B * C * N == 0) return nullptr;
  project_forward_kernel<<<blocks_for(B * C * N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      means, quats, scales, opacities, viewmats, Ks, B, C, N, width, height, near_plane, far_plane, eps2d, antialiased,
      ortho, means2d, conics, depths, opac, radii);
  return last_error();
}

const char* gs_project_backward_cuda(const float* means, const float* quats, const float* scales,
                                     const float* opacities, const float* viewmats, const float* Ks, int64_t B,
                                     int64_t C, int64_t N, int width, int height, float near_plane, float far_plane,
                                     float eps2d, bool antialiased, bool ortho, const float* g_means2d,
                                     const float* g_conics, const float* g_depths, const float* g_opac, float* g_means,
                                     float* g_quats, float* g_scales, float* g_opacities, void* stream) {
  if (B * N == 0) return nullptr;
  project_backward_kernel<<<blocks_for(B * N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      means, quats, scales, opacities, viewmats, Ks, B, C, N, width, height, near_plane, far_plane, eps2d, antialiased,
      ortho, g_means2d, g_conics, g_depths, g_opac, g_means, g_quats, g_scales, g_opacities);
  return last_error();
}

const char* gs_sh_forward_cuda(const float* sh, const float* means, const float* viewmats, int64_t B, int64_t C,
                               int64_t N, int K, int degree, float* colors, void* stream) {
  if (B * C * N == 0) return nullptr;
  sh_forward_kernel<<<blocks_for(B * C * N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(sh, means, viewmats, B,
                                                                                               C, N, K, degree, colors);
  return last_error();
}

const char* gs_sh_backward_cuda(const float* sh, const float* means, const float* viewmats, int64_t B, int64_t C,
                                int64_t N, int K, int degree, const float* g_colors, float* g_sh, float* g_means,
                                void* stream) {
  if (B * N == 0) return nullptr;
  sh_backward_kernel<<<blocks_for(B * N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      sh, means, viewmats, B, C, N, K, degree, g_colors, g_sh, g_means);
  return last_error();
}

const char* gs_tiles_per_gaussian_cuda(const float* means2d, const int32_t* radii, int64_t I, int64_t N, int width,
                                       int height, int64_t* counts, void* stream) {
  if (I * N == 0) return nullptr;
  tiles_per_gaussian_kernel<<<blocks_for(I * N), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      means2d, radii, I * N, width, height, counts);
  return last_error();
}

const char* gs_emit_isects_cuda(const float* means2d, const float* depths, const int32_t* radii,
                                const int64_t* gauss_offsets, int64_t I, int64_t N, int width, int height,
                                int64_t capacity, uint64_t* keys, int32_t* vals, void* stream) {
  if (gs_sort_end_bit(I, gs_tiles(width, height)) > 64) return "too many images x tiles for a 64-bit sort key";
  if (capacity > kGsMaxIntersections) return "capacity past the int32 intersection indices";
  auto st = static_cast<cudaStream_t>(stream);
  if (I * N > 0)
    emit_isects_kernel<<<blocks_for(I * N), kThreads, 0, st>>>(means2d, depths, radii, gauss_offsets, I, N, width,
                                                               height, gs_bits_for(gs_tiles(width, height)), capacity,
                                                               keys, vals);
  if (capacity > 0)
    pad_isects_kernel<<<blocks_for(capacity), kThreads, 0, st>>>(gauss_offsets, I * N, capacity, keys, vals);
  return last_error();
}

size_t gs_sort_temp_bytes_cuda(int64_t total, int end_bit) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const uint64_t*>(nullptr),
                                  static_cast<uint64_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(total), 0, end_bit);
  return bytes;
}

const char* gs_sort_isects_cuda(void* temp, size_t temp_bytes, uint64_t* keys_in, uint64_t* keys_out, int32_t* vals_in,
                                int32_t* vals_out, int64_t total, int end_bit, void* stream) {
  if (total == 0) return nullptr;
  if (total > kGsMaxIntersections) return "more than 2^31 - 1 Gaussian-tile intersections";
  const cudaError_t err =
      cub::DeviceRadixSort::SortPairs(temp, temp_bytes, keys_in, keys_out, vals_in, vals_out, static_cast<int>(total),
                                      0, end_bit, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return cudaGetErrorString(err);
  return last_error();
}

const char* gs_tile_ranges_cuda(const uint64_t* keys, const int32_t* isect_src, const int64_t* gauss_offsets,
                                int64_t capacity, int64_t I, int64_t N, int64_t tiles, int64_t* tile_offsets,
                                int32_t* flat_ids, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  fill_tile_offsets_kernel<<<blocks_for(I * tiles + 1), kThreads, 0, st>>>(gauss_offsets, I * N, capacity, I * tiles,
                                                                           tile_offsets);
  if (capacity > 0)
    tile_ranges_kernel<<<blocks_for(capacity), kThreads, 0, st>>>(keys, isect_src, gauss_offsets, capacity, I * N, N,
                                                                  tiles, gs_bits_for(tiles), tile_offsets, flat_ids);
  return last_error();
}

namespace {

// Runs f(std::integral_constant<int, DMAX>) with the smallest channel bucket DMAX >= D: the blend
// kernels keep DMAX floats per thread in registers, so a small D must not pay for 64 (at D = 17..32,
// the 64 bucket's backward needs more than twice the registers of the 32 one). D <= 64.
template <typename F>
const char* with_channel_bucket(int D, F f) {
  if (D <= 4) return f(std::integral_constant<int, 4>{});
  if (D <= 16) return f(std::integral_constant<int, 16>{});
  if (D <= 32) return f(std::integral_constant<int, 32>{});
  if (D <= kGsMaxCudaChannels) return f(std::integral_constant<int, kGsMaxCudaChannels>{});
  return "the CUDA rasterizer takes at most 64 channels";
}

// Dynamic shared memory of the deterministic backward with D channels: the warps' partial rows.
constexpr size_t backward_shared_bytes(int D) { return size_t(kBwdBatch) * kWarps * (8 + D) * sizeof(float); }

// The deterministic backward may need more than the 48 KB of dynamic shared memory a kernel gets by
// default, so it opts in, once per device and bucket, to what the bucket's largest D needs. A
// per-call value (the call's D) would let two host threads race: one lowering the limit between
// the other's opt-in and launch.
template <int DMAX>
const char* opt_in_backward_shared_memory() {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static cudaError_t status[kMaxDevices];
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  if (device < 0 || device >= kMaxDevices) return "CUDA device index past 63";
  std::call_once(once[device], [device] {
    status[device] = cudaFuncSetAttribute(rasterize_backward_kernel<DMAX>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          int(backward_shared_bytes(DMAX)));
  });
  return status[device] == cudaSuccess ? nullptr : cudaGetErrorString(status[device]);
}

}  // namespace

const char* gs_rasterize_forward_cuda(const float* means2d, const float* conics, const float* opac, const float* feats,
                                      const int64_t* tile_offsets, const int32_t* flat_ids, int64_t I, int64_t N, int D,
                                      int width, int height, float* image, float* alpha, int32_t* last, void* stream) {
  if (I == 0) return nullptr;
  if (I > kGsMaxCudaImages) return "more than 65535 images in one call (grid y limit)";
  const auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(unsigned(gs_tiles(width, height)), unsigned(I));
  return with_channel_bucket(D, [&](auto bucket) {
    rasterize_forward_kernel<decltype(bucket)::value><<<grid, kTilePixels, 0, st>>>(
        means2d, conics, opac, feats, tile_offsets, flat_ids, N, D, width, height, image, alpha, last);
    return last_error();
  });
}

const char* gs_rasterize_backward_cuda(const float* means2d, const float* conics, const float* opac, const float* feats,
                                       const int64_t* tile_offsets, const int32_t* flat_ids, const int32_t* isect_src,
                                       const int64_t* gauss_offsets, const float* alpha, const int32_t* last,
                                       const float* g_image, const float* g_alpha, int64_t I, int64_t N, int D,
                                       int width, int height, int64_t capacity, bool deterministic, int64_t pass_rows,
                                       int32_t* sorted_of, float* rows, float* g_means2d, float* g_conics,
                                       float* g_opac, float* g_feats, float* absgrad, void* stream) {
  const auto st = static_cast<cudaStream_t>(stream);
  const int64_t G = I * N;
  if (G == 0) return nullptr;
  if (I > kGsMaxCudaImages) return "more than 65535 images in one call (grid y limit)";
  if (deterministic && capacity > 0 && pass_rows < 1) return "deterministic backward with pass_rows < 1";
  // Both modes accumulate into zeroed gradients (atomics, or the passes' ordered sums).
  cudaMemsetAsync(g_means2d, 0, G * 2 * sizeof(float), st);
  cudaMemsetAsync(g_conics, 0, G * 3 * sizeof(float), st);
  cudaMemsetAsync(g_opac, 0, G * sizeof(float), st);
  cudaMemsetAsync(g_feats, 0, G * D * sizeof(float), st);
  cudaMemsetAsync(absgrad, 0, G * 2 * sizeof(float), st);
  const dim3 grid(unsigned(gs_tiles(width, height)), unsigned(I));
  return with_channel_bucket(D, [&](auto bucket) -> const char* {
    constexpr int DMAX = decltype(bucket)::value;
    if (!deterministic) {
      rasterize_backward_kernel<DMAX><<<grid, kTilePixels, 0, st>>>(
          means2d, conics, opac, feats, tile_offsets, flat_ids, alpha, last, g_image, g_alpha, N, D, width, height,
          false, 0, 0, nullptr, g_means2d, g_conics, g_opac, g_feats, absgrad);
      return last_error();
    }
    if (capacity == 0) return last_error();
    if (const char* err = opt_in_backward_shared_memory<DMAX>()) return err;
    invert_isect_src_kernel<<<blocks_for(capacity), kThreads, 0, st>>>(isect_src, capacity, sorted_of);
    const int64_t R = gs::isect_row_size(D);
    for (int64_t j0 = 0; j0 < capacity; j0 += pass_rows) {
      const int64_t j1 = std::min(capacity, j0 + pass_rows);
      // Rows of intersections no pixel reached (past every pixel's last) stay zero.
      cudaMemsetAsync(rows, 0, (j1 - j0) * R * sizeof(float), st);
      rasterize_backward_kernel<DMAX><<<grid, kTilePixels, backward_shared_bytes(D), st>>>(
          means2d, conics, opac, feats, tile_offsets, flat_ids, alpha, last, g_image, g_alpha, N, D, width, height,
          true, j0, j1, rows, g_means2d, g_conics, g_opac, g_feats, absgrad);
      reduce_isect_rows_kernel<<<blocks_for(G), kThreads, 0, st>>>(rows, sorted_of, gauss_offsets, G, D, capacity, j0,
                                                                   j1, g_means2d, g_conics, g_opac, g_feats, absgrad);
      if (const char* err = last_error()) return err;
    }
    return last_error();
  });
}

}  // namespace fast3d
