// Launchers of the Gaussian rasterization kernels. No torch types: raw pointers to contiguous
// buffers and sizes. B scenes, C cameras each, I = B*C images, N Gaussians per scene, D feature
// channels, K SH coefficients per Gaussian; T tiles per image (kTile x kTile pixels each).
#pragma once

#include <cstdint>
#include <string>

#include "gaussians/gaussian_math.h"
#include "gaussians/isect_rows.h"

namespace fast3d {

// --- limits (host code both builds compile; the bindings check them before allocating) -------

// Gaussian-tile intersections one call can bin: the CUDA radix sort counts its items in int and
// the intersection indices (vals, isect_src) are int32. The CPU binning keeps the same limit, so a
// scene renders on both native backends or fails on both with the same message.
constexpr int64_t kGsMaxIntersections = 2147483647;
constexpr int kGsMaxCudaChannels = 64;  // D of the CUDA blend kernels (per-thread registers)
// Bytes of the deterministic CUDA backward's per-intersection gradient rows held at once: the
// intersections are reduced in passes of at most this many bytes of rows (isect_rows.h).
constexpr int64_t kGsDeterministicRowBytes = int64_t(512) << 20;
constexpr int64_t kGsMaxCudaImages = 65535;  // images are grid axis y of the CUDA launches

// Tiles of one width x height image.
inline int64_t gs_tiles(int width, int height) { return int64_t(gs::tiles_along(width)) * gs::tiles_along(height); }

// "I images of W x H pixels = T tiles of kTile x kTile each" for the messages below.
inline std::string gs_images_str(int64_t I, int width, int height) {
  return std::to_string(I) + (I == 1 ? " image" : " images") + " of " + std::to_string(width) + "x" +
         std::to_string(height) + " pixels = " + std::to_string(gs_tiles(width, height)) + " tiles of " +
         std::to_string(gs::kTile) + "x" + std::to_string(gs::kTile) + " each";
}

// "" when `count` Gaussian-tile intersections of I images of width x height, N Gaussians each,
// fit the int32 index range; otherwise the error, naming the count, the images and the Gaussians.
inline std::string gs_intersections_error(int64_t count, int64_t I, int64_t N, int width, int height) {
  if (count <= kGsMaxIntersections) return "";
  return std::to_string(count) + " Gaussian-tile intersections (" + gs_images_str(I, width, height) + ", " +
         std::to_string(N) + " Gaussians per image) exceed the limit of " + std::to_string(kGsMaxIntersections) +
         " (int32 intersection indices); use fewer or smaller Gaussians, a smaller image, or fewer cameras per call";
}

// Sorted intersections per pass of the deterministic CUDA backward: as many (8 + D)-float rows as
// fit in row_bytes, at least 1 and at most the n intersections (0 when there are none).
inline int64_t gs_deterministic_pass_rows(int64_t n, int D, int64_t row_bytes = kGsDeterministicRowBytes) {
  const int64_t per_row = int64_t(gs::isect_row_size(D)) * int64_t(sizeof(float));
  const int64_t rows = row_bytes / per_row;
  return n <= 0 ? 0 : (rows < 1 ? 1 : (rows < n ? rows : n));
}

// ceil(log2 n), at least 1.
inline int gs_bits_for(int64_t n) {
  int b = 1;
  while (b < 63 && (int64_t(1) << b) < n) ++b;
  return b;
}

// Bits of the CUDA sort key image | tile | depth: ceil(log2 I) + ceil(log2 tiles) + 32 (the
// depth's float bits).
inline int gs_sort_end_bit(int64_t I, int64_t tiles) { return gs_bits_for(I) + gs_bits_for(tiles) + 32; }

// "" when the image and tile indices fit the 32 bits of the 64-bit sort key above the depth;
// otherwise the error.
inline std::string gs_sort_key_error(int64_t I, int width, int height) {
  const int64_t tiles = gs_tiles(width, height);
  const int bits = gs_sort_end_bit(I, tiles);
  if (bits <= 64) return "";
  return "the sort key image | tile | depth needs " + std::to_string(gs_bits_for(I)) + " + " +
         std::to_string(gs_bits_for(tiles)) + " + 32 = " + std::to_string(bits) + " bits for " +
         gs_images_str(I, width, height) + "; at most 64 fit: render fewer cameras per call or a smaller image";
}

// --- CPU (float, double) ------------------------------------------------------------------------

// means [B,N,3], quats [B,N,4], scales [B,N,3], opacities [B,N], viewmats [B,C,4,4], Ks [B,C,3,3]
// -> means2d [B,C,N,2], conics [B,C,N,3], depths [B,C,N], opac [B,C,N], radii [B,C,N,2] (0: culled);
// ortho: orthographic cameras (gs::project_forward), else pinhole
template <typename T>
void gs_project_forward_cpu(const T* means, const T* quats, const T* scales, const T* opacities, const T* viewmats,
                            const T* Ks, int64_t B, int64_t C, int64_t N, int width, int height, T near_plane,
                            T far_plane, T eps2d, bool antialiased, bool ortho, T* means2d, T* conics, T* depths,
                            T* opac, int32_t* radii);

// g_means2d [B,C,N,2], g_conics [B,C,N,3], g_depths [B,C,N], g_opac [B,C,N]
// -> g_means [B,N,3], g_quats [B,N,4], g_scales [B,N,3], g_opacities [B,N] (overwritten)
template <typename T>
void gs_project_backward_cpu(const T* means, const T* quats, const T* scales, const T* opacities, const T* viewmats,
                             const T* Ks, int64_t B, int64_t C, int64_t N, int width, int height, T near_plane,
                             T far_plane, T eps2d, bool antialiased, bool ortho, const T* g_means2d, const T* g_conics,
                             const T* g_depths, const T* g_opac, T* g_means, T* g_quats, T* g_scales, T* g_opacities);

// sh [B,N,K,3], means [B,N,3], viewmats [B,C,4,4] -> colors [B,C,N,3]
template <typename T>
void gs_sh_forward_cpu(const T* sh, const T* means, const T* viewmats, int64_t B, int64_t C, int64_t N, int K,
                       int degree, T* colors);

// g_colors [B,C,N,3] -> g_sh [B,N,K,3], g_means [B,N,3] (overwritten)
template <typename T>
void gs_sh_backward_cpu(const T* sh, const T* means, const T* viewmats, int64_t B, int64_t C, int64_t N, int K,
                        int degree, const T* g_colors, T* g_sh, T* g_means);

// Binning, pass 1: means2d [I,N,2], depths [I,N], radii [I,N,2] -> per image the Gaussians with a
// non-empty pixel rect in depth order (order [I,N], the first n_valid[i] entries used; n_valid
// [I]) and per-tile counts tile_counts [I,T].
template <typename T>
void gs_bin_count_cpu(const T* means2d, const T* depths, const int32_t* radii, int64_t I, int64_t N, int width,
                      int height, int32_t* order, int64_t* n_valid, int64_t* tile_counts);

// Binning, pass 2: means2d [I,N,2], radii [I,N,2], order [I,N], n_valid [I] from pass 1,
// tile_offsets [I*T+1] (exclusive prefix sum of tile_counts) -> ids [total]: each tile's Gaussians
// (index within the image) in depth order.
template <typename T>
void gs_bin_fill_cpu(const T* means2d, const int32_t* radii, const int32_t* order, const int64_t* n_valid,
                     const int64_t* tile_offsets, int64_t I, int64_t N, int width, int height, int32_t* ids);

// means2d [I,N,2], conics [I,N,3], opac [I,N], feats [I,N,D], radii [I,N,2], tile_offsets
// [I*T+1], ids [total] -> image [I,H,W,D], alpha [I,H,W], last [I,H,W] (entries of the pixel's
// tile list processed, up to the last used)
template <typename T>
void gs_rasterize_forward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats, const int32_t* radii,
                              const int64_t* tile_offsets, const int32_t* ids, int64_t I, int64_t N, int D, int width,
                              int height, T* image, T* alpha, int32_t* last);

// alpha, last from the forward; g_image [I,H,W,D], g_alpha [I,H,W] -> g_means2d [I,N,2],
// g_conics [I,N,3], g_opac [I,N], g_feats [I,N,D], absgrad [I,N,2] (all overwritten)
template <typename T>
void gs_rasterize_backward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats, const int32_t* radii,
                               const int64_t* tile_offsets, const int32_t* ids, const T* alpha, const int32_t* last,
                               const T* g_image, const T* g_alpha, int64_t I, int64_t N, int D, int width, int height,
                               T* g_means2d, T* g_conics, T* g_opac, T* g_feats, T* absgrad);

// The deterministic reduction of isect_rows.h, on the CPU (the CUDA backward's own, run here so
// that tests check it): rows [n, 8 + D] (row j: the gradients of sorted intersection j),
// isect_src [n] (pre-sort index of sorted j; a permutation of 0..n-1), gauss_offsets [G + 1] ->
// g_means2d [G,2], g_conics [G,3], g_opac [G], g_feats [G,D], absgrad [G,2] (overwritten), in
// passes of pass_rows sorted intersections as the CUDA backward makes them.
template <typename T>
void gs_reduce_isect_rows_cpu(const T* rows, const int32_t* isect_src, const int64_t* gauss_offsets, int64_t n,
                              int64_t G, int D, int64_t pass_rows, T* g_means2d, T* g_conics, T* g_opac, T* g_feats,
                              T* absgrad);

// --- CUDA (float32) ---------------------------------------------------------------------------------
// Same arguments as the CPU versions plus the stream; each returns nullptr on success or the CUDA
// error string. The forward pipeline: tiles per Gaussian -> prefix sum (gauss_offsets, on the
// device) -> emit one (key, value) per intersection, key = image | tile | depth bits -> radix sort
// over the needed bits -> tile ranges -> blend.
//
// The binning buffers hold `capacity` intersections. The caller either reads the true count n =
// gauss_offsets[I*N] back to the host and passes capacity = n, or passes a fixed capacity and
// never synchronises (CUDA graph capture): the kernels read n on the device, intersections past the
// capacity are dropped (their tiles render without them) and the slots past n hold sentinels.

const char* gs_project_forward_cuda(const float* means, const float* quats, const float* scales, const float* opacities,
                                    const float* viewmats, const float* Ks, int64_t B, int64_t C, int64_t N, int width,
                                    int height, float near_plane, float far_plane, float eps2d, bool antialiased,
                                    bool ortho, float* means2d, float* conics, float* depths, float* opac,
                                    int32_t* radii, void* stream);

const char* gs_project_backward_cuda(const float* means, const float* quats, const float* scales,
                                     const float* opacities, const float* viewmats, const float* Ks, int64_t B,
                                     int64_t C, int64_t N, int width, int height, float near_plane, float far_plane,
                                     float eps2d, bool antialiased, bool ortho, const float* g_means2d,
                                     const float* g_conics, const float* g_depths, const float* g_opac, float* g_means,
                                     float* g_quats, float* g_scales, float* g_opacities, void* stream);

const char* gs_sh_forward_cuda(const float* sh, const float* means, const float* viewmats, int64_t B, int64_t C,
                               int64_t N, int K, int degree, float* colors, void* stream);

const char* gs_sh_backward_cuda(const float* sh, const float* means, const float* viewmats, int64_t B, int64_t C,
                                int64_t N, int K, int degree, const float* g_colors, float* g_sh, float* g_means,
                                void* stream);

// means2d [I,N,2], radii [I,N,2] -> counts [I*N]: tiles each Gaussian touches.
const char* gs_tiles_per_gaussian_cuda(const float* means2d, const int32_t* radii, int64_t I, int64_t N, int width,
                                       int height, int64_t* counts, void* stream);

// means2d [I,N,2], depths [I,N], radii [I,N,2], gauss_offsets [I*N+1] (exclusive prefix sum of
// counts) -> keys, vals [capacity]: vals = the intersection's own (pre-sort) index; slots
// [n, capacity) get keys that sort after every real one.
const char* gs_emit_isects_cuda(const float* means2d, const float* depths, const int32_t* radii,
                                const int64_t* gauss_offsets, int64_t I, int64_t N, int width, int height,
                                int64_t capacity, uint64_t* keys, int32_t* vals, void* stream);

// Bytes of cub's scratch for sorting `total` keys of end_bit bits.
size_t gs_sort_temp_bytes_cuda(int64_t total, int end_bit);

// temp [temp_bytes]; keys_in, vals_in [total] -> keys_out, vals_out [total], sorted by key.

const char* gs_sort_isects_cuda(void* temp, size_t temp_bytes, uint64_t* keys_in, uint64_t* keys_out, int32_t* vals_in,
                                int32_t* vals_out, int64_t total, int end_bit, void* stream);

// sorted keys / pre-sort indices [capacity] -> tile_offsets [I*tiles+1], flat_ids [capacity]
// (Gaussian index within its image; the first min(n, capacity) entries written).
const char* gs_tile_ranges_cuda(const uint64_t* keys, const int32_t* isect_src, const int64_t* gauss_offsets,
                                int64_t capacity, int64_t I, int64_t N, int64_t tiles, int64_t* tile_offsets,
                                int32_t* flat_ids, void* stream);

// The CPU version's arguments with flat_ids [capacity] for ids (no radii: the CUDA binning is
// exact); D <= kGsMaxCudaChannels, I <= kGsMaxCudaImages.
const char* gs_rasterize_forward_cuda(const float* means2d, const float* conics, const float* opac, const float* feats,
                                      const int64_t* tile_offsets, const int32_t* flat_ids, int64_t I, int64_t N, int D,
                                      int width, int height, float* image, float* alpha, int32_t* last, void* stream);

// The CPU version's arguments (flat_ids [capacity] for ids), isect_src [capacity] and
// gauss_offsets [I*N+1] from the binning. Not deterministic: warp-reduced atomics. Deterministic (isect_rows.h): in
// passes of pass_rows sorted intersections, with the scratch sorted_of [capacity] (int32) and rows [pass_rows, 8 + D]
// (pass_rows = gs_deterministic_pass_rows(capacity, D) bounds its memory); null otherwise.
const char* gs_rasterize_backward_cuda(const float* means2d, const float* conics, const float* opac, const float* feats,
                                       const int64_t* tile_offsets, const int32_t* flat_ids, const int32_t* isect_src,
                                       const int64_t* gauss_offsets, const float* alpha, const int32_t* last,
                                       const float* g_image, const float* g_alpha, int64_t I, int64_t N, int D,
                                       int width, int height, int64_t capacity, bool deterministic, int64_t pass_rows,
                                       int32_t* sorted_of, float* rows, float* g_means2d, float* g_conics,
                                       float* g_opac, float* g_feats, float* absgrad, void* stream);

}  // namespace fast3d
