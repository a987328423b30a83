// Gaussian rasterization on the CPU (OpenMP), with the math of gaussian_math.h.
//
// Projection and SH: one (camera, Gaussian) per iteration forward; backward one Gaussian per
// iteration looping over its cameras, so the per-scene gradients need no atomics.
// Rasterization: per image, Gaussians sorted by depth are binned into 16x16 tiles by their exact
// alpha >= 1/255 extent. Each tile then walks its list front to back, Gaussian-outer: a Gaussian
// touches only the pixels of its rect inside the tile, each pixel keeps its own transmittance and
// stops for good before the Gaussian that would take it below 1e-4. The backward walks the same
// lists back to front (the INRIA way: T recovered by division, a running suffix of weighted
// colours), summing each Gaussian's gradient over its pixels before one write.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "gaussians/gaussian_math.h"
#include "gaussians/gaussians.h"

namespace fast3d {
namespace {

using gs::kAlphaMax;
using gs::kAlphaMin;
using gs::kTile;
using gs::kTransMin;

template <typename T>
struct Camera {
  T R[3][3], t[3], fx, fy, cx, cy;
  Camera(const T* viewmat, const T* K) {
    for (int i = 0; i < 3; ++i) {
      for (int j = 0; j < 3; ++j) R[i][j] = viewmat[i * 4 + j];
      t[i] = viewmat[i * 4 + 3];
    }
    fx = K[0];
    fy = K[4];
    cx = K[2];
    cy = K[5];
  }
  void centre(T c[3]) const {  // -R^T t
    for (int k = 0; k < 3; ++k) c[k] = -(R[0][k] * t[0] + R[1][k] * t[1] + R[2][k] * t[2]);
  }
};

// Loops shorter than this run on one thread: a parallel region costs a barrier, and on a busy
// machine a barrier can cost a scheduler tick (~4 ms), more than the loop itself.
constexpr int64_t kMinParallel = 1 << 14;

using gs::tiles_along;

}  // namespace

template <typename T>
void gs_project_forward_cpu(const T* means, const T* quats, const T* scales, const T* opacities,
                            const T* viewmats, const T* Ks, int64_t B, int64_t C, int64_t N, int width,
                            int height, T near_plane, T far_plane, T eps2d, bool antialiased, T* means2d,
                            T* conics, T* depths, T* opac, int32_t* radii) {
#pragma omp parallel for schedule(static) if (B * C * N > kMinParallel)
  for (int64_t idx = 0; idx < B * C * N; ++idx) {
    const int64_t n = idx % N, bc = idx / N, b = bc / C;
    const Camera<T> cam(viewmats + bc * 16, Ks + bc * 9);
    const int64_t g = b * N + n;
    gs::Projected<T> pr;
    gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], cam.R, cam.t, cam.fx, cam.fy,
                        cam.cx, cam.cy, width, height, near_plane, far_plane, eps2d, antialiased, pr);
    int r[2];
    gs::screen_radii(pr, r);
    depths[idx] = pr.p[2];
    if (pr.valid) {
      means2d[idx * 2] = pr.mean2d[0];
      means2d[idx * 2 + 1] = pr.mean2d[1];
      for (int k = 0; k < 3; ++k) conics[idx * 3 + k] = pr.conic[k];
      opac[idx] = pr.opacity;
    } else {  // finite stand-in values, as the reference has
      means2d[idx * 2] = means2d[idx * 2 + 1] = T(0);
      conics[idx * 3] = conics[idx * 3 + 2] = T(1);
      conics[idx * 3 + 1] = T(0);
      opac[idx] = T(0);
    }
    radii[idx * 2] = r[0];
    radii[idx * 2 + 1] = r[1];
  }
}

template <typename T>
void gs_project_backward_cpu(const T* means, const T* quats, const T* scales, const T* opacities,
                             const T* viewmats, const T* Ks, int64_t B, int64_t C, int64_t N, int width,
                             int height, T near_plane, T far_plane, T eps2d, bool antialiased,
                             const T* g_means2d, const T* g_conics, const T* g_depths, const T* g_opac,
                             T* g_means, T* g_quats, T* g_scales, T* g_opacities) {
#pragma omp parallel for schedule(static) if (B * C * N > kMinParallel)
  for (int64_t g = 0; g < B * N; ++g) {
    const int64_t b = g / N, n = g % N;
    T gm[3] = {0, 0, 0}, gq[4] = {0, 0, 0, 0}, gs_[3] = {0, 0, 0}, go = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bc = b * C + c, idx = bc * N + n;
      const Camera<T> cam(viewmats + bc * 16, Ks + bc * 9);
      gs::Projected<T> pr;
      gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], cam.R, cam.t, cam.fx,
                          cam.fy, cam.cx, cam.cy, width, height, near_plane, far_plane, eps2d, antialiased, pr);
      if (!pr.valid) {
        // Culled: constant stand-in values, but depth = z still reads the mean.
        for (int k = 0; k < 3; ++k) gm[k] += cam.R[2][k] * g_depths[idx];
        continue;
      }
      gs::project_backward(pr, scales + g * 3, opacities[g], cam.R, cam.fx, cam.fy, eps2d, antialiased,
                           g_means2d + idx * 2, g_conics + idx * 3, g_depths[idx], g_opac[idx], gm, gq, gs_, &go);
    }
    for (int k = 0; k < 3; ++k) g_means[g * 3 + k] = gm[k];
    for (int k = 0; k < 4; ++k) g_quats[g * 4 + k] = gq[k];
    for (int k = 0; k < 3; ++k) g_scales[g * 3 + k] = gs_[k];
    g_opacities[g] = go;
  }
}

template <typename T>
void gs_sh_forward_cpu(const T* sh, const T* means, const T* viewmats, int64_t B, int64_t C, int64_t N, int K,
                       int degree, T* colors) {
#pragma omp parallel for schedule(static) if (B * C * N * K > kMinParallel)
  for (int64_t idx = 0; idx < B * C * N; ++idx) {
    const int64_t n = idx % N, bc = idx / N, b = bc / C, g = b * N + n;
    const T* vm = viewmats + bc * 16;
    T campos[3];
    for (int k = 0; k < 3; ++k) campos[k] = -(vm[k] * vm[3] + vm[4 + k] * vm[7] + vm[8 + k] * vm[11]);
    gs::sh_forward(degree, sh + g * K * 3, means + g * 3, campos, colors + idx * 3);
  }
}

template <typename T>
void gs_sh_backward_cpu(const T* sh, const T* means, const T* viewmats, int64_t B, int64_t C, int64_t N, int K,
                        int degree, const T* g_colors, T* g_sh, T* g_means) {
#pragma omp parallel for schedule(static) if (B * C * N * K > kMinParallel)
  for (int64_t g = 0; g < B * N; ++g) {
    const int64_t b = g / N, n = g % N;
    std::fill(g_sh + g * K * 3, g_sh + (g + 1) * K * 3, T(0));
    T gm[3] = {0, 0, 0};
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bc = b * C + c;
      const T* vm = viewmats + bc * 16;
      T campos[3];
      for (int k = 0; k < 3; ++k) campos[k] = -(vm[k] * vm[3] + vm[4 + k] * vm[7] + vm[8 + k] * vm[11]);
      gs::sh_backward(degree, sh + g * K * 3, means + g * 3, campos, g_colors + (bc * N + n) * 3, g_sh + g * K * 3,
                      gm);
    }
    for (int k = 0; k < 3; ++k) g_means[g * 3 + k] = gm[k];
  }
}

template <typename T>
void gs_bin_count_cpu(const T* means2d, const T* depths, const int32_t* radii, int64_t I, int64_t N, int width,
                      int height, int32_t* order, int64_t* n_valid, int64_t* tile_counts) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
#pragma omp parallel for schedule(dynamic, 1) if (I * N > kMinParallel)
  for (int64_t i = 0; i < I; ++i) {
    std::vector<std::pair<T, int32_t>> keyed;
    int64_t* counts = tile_counts + i * TT;
    std::fill(counts, counts + TT, int64_t(0));
    for (int64_t n = 0; n < N; ++n) {
      int tr[4];
      if (!gs::tile_rect(means2d + (i * N + n) * 2, radii + (i * N + n) * 2, width, height, tr)) continue;
      keyed.emplace_back(depths[i * N + n], int32_t(n));
      for (int ty = tr[2]; ty < tr[3]; ++ty)
        for (int tx = tr[0]; tx < tr[1]; ++tx) ++counts[ty * TX + tx];
    }
    std::sort(keyed.begin(), keyed.end());  // by depth, ties by index: a stable depth order
    for (size_t k = 0; k < keyed.size(); ++k) order[i * N + k] = keyed[k].second;
    n_valid[i] = int64_t(keyed.size());
  }
}

template <typename T>
void gs_bin_fill_cpu(const T* means2d, const int32_t* radii, const int32_t* order, const int64_t* n_valid,
                     const int64_t* tile_offsets, int64_t I, int64_t N, int width, int height, int32_t* ids) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
#pragma omp parallel for schedule(dynamic, 1) if (I * N > kMinParallel)
  for (int64_t i = 0; i < I; ++i) {
    std::vector<int64_t> cursor(tile_offsets + i * TT, tile_offsets + (i + 1) * TT);
    for (int64_t k = 0; k < n_valid[i]; ++k) {
      const int32_t n = order[i * N + k];
      int tr[4];
      gs::tile_rect(means2d + (i * N + n) * 2, radii + (i * N + n) * 2, width, height, tr);
      for (int ty = tr[2]; ty < tr[3]; ++ty)
        for (int tx = tr[0]; tx < tr[1]; ++tx) ids[cursor[ty * TX + tx]++] = n;
    }
  }
}

template <typename T>
void gs_rasterize_forward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats,
                              const int32_t* radii, const int64_t* tile_offsets, const int32_t* ids, int64_t I,
                              int64_t N, int D, int width, int height, T* image, T* alpha, int32_t* last) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
#pragma omp parallel
  {
    std::vector<T> trans(kTile * kTile), acc(kTile * kTile * D);
    std::vector<int32_t> lst(kTile * kTile);
    std::vector<char> done(kTile * kTile);
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < I * TT; ++it) {
      const int64_t i = it / TT;
      const int tile = int(it % TT), x0 = (tile % TX) * kTile, y0 = (tile / TX) * kTile;
      const int tw = std::min(kTile, width - x0), th = std::min(kTile, height - y0);
      std::fill(trans.begin(), trans.end(), T(1));
      std::fill(acc.begin(), acc.end(), T(0));
      std::fill(lst.begin(), lst.end(), 0);
      std::fill(done.begin(), done.end(), 0);
      int active = tw * th;
      const int64_t s = tile_offsets[it], e = tile_offsets[it + 1];
      for (int64_t j = s; j < e && active > 0; ++j) {
        const int64_t g = i * N + ids[j];
        const T* m2 = means2d + g * 2;
        const T* con = conics + g * 3;
        const T o = opac[g];
        int rect[4];
        gs::pixel_rect(m2[0], m2[1], radii + g * 2, width, height, rect);
        const int px0 = std::max(rect[0], x0), px1 = std::min(rect[1], x0 + tw);
        const int py0 = std::max(rect[2], y0), py1 = std::min(rect[3], y0 + th);
        for (int y = py0; y < py1; ++y)
          for (int x = px0; x < px1; ++x) {
            const int p = (y - y0) * kTile + (x - x0);
            if (done[p]) continue;
            T dx, dy, vis;
            const T raw = gs::gaussian_raw_alpha(m2, con, o, T(x) + T(0.5), T(y) + T(0.5), dx, dy, vis);
            if (raw < T(kAlphaMin)) continue;
            const T a = std::min(raw, T(kAlphaMax));
            const T next = trans[p] * (T(1) - a);
            if (next < T(kTransMin)) {
              done[p] = 1;
              --active;
              continue;
            }
            const T w = a * trans[p];
            const T* f = feats + g * D;
            for (int d = 0; d < D; ++d) acc[p * D + d] += w * f[d];
            trans[p] = next;
            lst[p] = int32_t(j - s + 1);
          }
      }
      for (int y = 0; y < th; ++y)
        for (int x = 0; x < tw; ++x) {
          const int p = y * kTile + x;
          const int64_t pix = (i * height + y0 + y) * width + x0 + x;
          for (int d = 0; d < D; ++d) image[pix * D + d] = acc[p * D + d];
          alpha[pix] = T(1) - trans[p];
          last[pix] = lst[p];
        }
    }
  }
}

namespace {

// Backward of one tile of image i; gradients of the image's Gaussians ADDED into the given
// per-image buffers (g_m2 [N,2], g_con [N,3], g_op [N], g_f [N,D], g_abs [N,2]).
template <typename T>
void backward_tile(const T* means2d, const T* conics, const T* opac, const T* feats, const int32_t* radii,
                   const int64_t* tile_offsets, const int32_t* ids, const T* alpha, const int32_t* last,
                   const T* g_image, const T* g_alpha, int64_t i, int tile, int64_t N, int D, int width,
                   int height, T* g_m2, T* g_con, T* g_op, T* g_f, T* g_abs, std::vector<T>& trans,
                   std::vector<T>& sg, std::vector<T>& kk, std::vector<T>& gfeat) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
  const int x0 = (tile % TX) * kTile, y0 = (tile / TX) * kTile;
  const int tw = std::min(kTile, width - x0), th = std::min(kTile, height - y0);
  const int64_t s = tile_offsets[i * TT + tile];
  int max_last = 0;
  for (int y = 0; y < th; ++y)
    for (int x = 0; x < tw; ++x) {
      const int p = y * kTile + x;
      const int64_t pix = (i * height + y0 + y) * width + x0 + x;
      trans[p] = T(1) - alpha[pix];          // T_final
      sg[p] = T(0);                          // sum over later Gaussians of w_k <g_image, f_k>
      kk[p] = -g_alpha[pix] * trans[p];      // the alpha output's share: dA/da_j = T_final / (1 - a_j)
      max_last = std::max(max_last, int(last[pix]));
    }
  for (int64_t j = s + max_last - 1; j >= s; --j) {
    const int64_t n = ids[j], g = i * N + n;
    const T* m2 = means2d + g * 2;
    const T* con = conics + g * 3;
    const T* f = feats + g * D;
    const T o = opac[g];
    int rect[4];
    gs::pixel_rect(m2[0], m2[1], radii + g * 2, width, height, rect);
    const int px0 = std::max(rect[0], x0), px1 = std::min(rect[1], x0 + tw);
    const int py0 = std::max(rect[2], y0), py1 = std::min(rect[3], y0 + th);
    T gm[2] = {0, 0}, gc[3] = {0, 0, 0}, go = 0, ga2[2] = {0, 0};
    bool touched = false;
    std::fill(gfeat.begin(), gfeat.end(), T(0));
    for (int y = py0; y < py1; ++y)
      for (int x = px0; x < px1; ++x) {
        const int p = (y - y0) * kTile + (x - x0);
        const int64_t pix = (i * height + y) * width + x;
        if (j - s >= last[pix]) continue;
        T dx, dy, vis;
        const T raw = gs::gaussian_raw_alpha(m2, con, o, T(x) + T(0.5), T(y) + T(0.5), dx, dy, vis);
        if (raw < T(kAlphaMin)) continue;
        touched = true;
        const T a = std::min(raw, T(kAlphaMax));
        const T tj = trans[p] / (T(1) - a);  // transmittance in front of this Gaussian
        const T* gi = g_image + pix * D;
        T gcol = 0;
        for (int d = 0; d < D; ++d) {
          gcol += gi[d] * f[d];
          gfeat[d] += a * tj * gi[d];
        }
        // dL/da_j = T_j <g, f_j> - (sum_{k>j} w_k <g, f_k> + K) / (1 - a_j)
        const T g_a = tj * gcol - (sg[p] + kk[p]) / (T(1) - a);
        sg[p] += a * tj * gcol;
        trans[p] = tj;
        T pm[2] = {0, 0};
        gs::gaussian_alpha_backward(con, o, dx, dy, vis, g_a, pm, gc, go);
        gm[0] += pm[0];
        gm[1] += pm[1];
        ga2[0] += std::abs(pm[0]);
        ga2[1] += std::abs(pm[1]);
      }
    if (!touched) continue;
    g_m2[n * 2] += gm[0];
    g_m2[n * 2 + 1] += gm[1];
    for (int k = 0; k < 3; ++k) g_con[n * 3 + k] += gc[k];
    g_op[n] += go;
    for (int d = 0; d < D; ++d) g_f[n * D + d] += gfeat[d];
    g_abs[n * 2] += ga2[0];
    g_abs[n * 2 + 1] += ga2[1];
  }
}

}  // namespace

template <typename T>
void gs_rasterize_backward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats,
                               const int32_t* radii, const int64_t* tile_offsets, const int32_t* ids,
                               const T* alpha, const int32_t* last, const T* g_image, const T* g_alpha, int64_t I,
                               int64_t N, int D, int width, int height, T* g_means2d, T* g_conics, T* g_opac,
                               T* g_feats, T* absgrad) {
  const int TT = tiles_along(width) * tiles_along(height);
  std::fill(g_means2d, g_means2d + I * N * 2, T(0));
  std::fill(g_conics, g_conics + I * N * 3, T(0));
  std::fill(g_opac, g_opac + I * N, T(0));
  std::fill(g_feats, g_feats + I * N * D, T(0));
  std::fill(absgrad, absgrad + I * N * 2, T(0));
  const int threads = omp_get_max_threads();
  if (I >= threads) {
    // One image per iteration: each writes only its own slice of the gradients.
#pragma omp parallel
    {
      std::vector<T> trans(kTile * kTile), sg(kTile * kTile), kk(kTile * kTile), gfeat(D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < I; ++i)
        for (int tile = 0; tile < TT; ++tile)
          backward_tile(means2d, conics, opac, feats, radii, tile_offsets, ids, alpha, last, g_image, g_alpha, i,
                        tile, N, D, width, height, g_means2d + i * N * 2, g_conics + i * N * 3, g_opac + i * N,
                        g_feats + i * N * D, absgrad + i * N * 2, trans, sg, kk, gfeat);
    }
    return;
  }
  // Few images: tiles in parallel, each thread into its own buffers, summed in thread order
  // (deterministic for a given thread count).
  const int64_t per = N * (2 + 3 + 1 + D + 2);
  std::vector<T> buf(size_t(threads) * per);
  for (int64_t i = 0; i < I; ++i) {
    std::fill(buf.begin(), buf.end(), T(0));
#pragma omp parallel
    {
      T* b = buf.data() + omp_get_thread_num() * per;
      std::vector<T> trans(kTile * kTile), sg(kTile * kTile), kk(kTile * kTile), gfeat(D);
#pragma omp for schedule(dynamic, 2)
      for (int tile = 0; tile < TT; ++tile)
        backward_tile(means2d, conics, opac, feats, radii, tile_offsets, ids, alpha, last, g_image, g_alpha, i, tile,
                      N, D, width, height, b, b + 2 * N, b + 5 * N, b + 6 * N, b + (6 + D) * N, trans, sg, kk, gfeat);
    }
    T* outs[5] = {g_means2d + i * N * 2, g_conics + i * N * 3, g_opac + i * N, g_feats + i * N * D,
                  absgrad + i * N * 2};
    const int64_t off[5] = {0, 2 * N, 5 * N, 6 * N, (6 + D) * N}, len[5] = {2 * N, 3 * N, N, D * N, 2 * N};
#pragma omp parallel for schedule(static)
    for (int k = 0; k < 5; ++k)
      for (int t = 0; t < threads; ++t) {
        const T* src = buf.data() + t * per + off[k];
        for (int64_t e = 0; e < len[k]; ++e) outs[k][e] += src[e];
      }
  }
}

#define FAST3D_INSTANTIATE(T)                                                                               \
  template void gs_project_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t, \
                                          int64_t, int64_t, int, int, T, T, T, bool, T*, T*, T*, T*, int32_t*);  \
  template void gs_project_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t, \
                                           int64_t, int64_t, int, int, T, T, T, bool, const T*, const T*,       \
                                           const T*, const T*, T*, T*, T*, T*);                                 \
  template void gs_sh_forward_cpu<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int, T*);    \
  template void gs_sh_backward_cpu<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int,        \
                                      const T*, T*, T*);                                                        \
  template void gs_bin_count_cpu<T>(const T*, const T*, const int32_t*, int64_t, int64_t, int, int, int32_t*,   \
                                    int64_t*, int64_t*);                                                        \
  template void gs_bin_fill_cpu<T>(const T*, const int32_t*, const int32_t*, const int64_t*, const int64_t*,    \
                                   int64_t, int64_t, int, int, int32_t*);                                       \
  template void gs_rasterize_forward_cpu<T>(const T*, const T*, const T*, const T*, const int32_t*,             \
                                            const int64_t*, const int32_t*, int64_t, int64_t, int, int, int,    \
                                            T*, T*, int32_t*);                                                  \
  template void gs_rasterize_backward_cpu<T>(const T*, const T*, const T*, const T*, const int32_t*,            \
                                             const int64_t*, const int32_t*, const T*, const int32_t*,          \
                                             const T*, const T*, int64_t, int64_t, int, int, int, T*, T*, T*,   \
                                             T*, T*);
FAST3D_INSTANTIATE(float)
FAST3D_INSTANTIATE(double)
#undef FAST3D_INSTANTIATE

}  // namespace fast3d
