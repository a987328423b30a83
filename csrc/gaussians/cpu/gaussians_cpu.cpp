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
// Both keep a tile's per-pixel state as structure of arrays and apply a Gaussian to the whole rows
// of its rect in one branch-free loop (masks pick the pixels it changes) that the compiler
// vectorises; rows at either end of the rect that no pixel needs are skipped.
#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <type_traits>
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
void gs_project_forward_cpu(const T* means, const T* quats, const T* scales, const T* opacities, const T* viewmats,
                            const T* Ks, int64_t B, int64_t C, int64_t N, int width, int height, T near_plane,
                            T far_plane, T eps2d, bool antialiased, bool ortho, T* means2d, T* conics, T* depths,
                            T* opac, int32_t* radii) {
#pragma omp parallel for schedule(static) if (B * C * N > kMinParallel)
  for (int64_t idx = 0; idx < B * C * N; ++idx) {
    const int64_t n = idx % N, bc = idx / N, b = bc / C;
    const Camera<T> cam(viewmats + bc * 16, Ks + bc * 9);
    const int64_t g = b * N + n;
    gs::Projected<T> pr;
    gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], cam.R, cam.t, cam.fx, cam.fy,
                        cam.cx, cam.cy, width, height, near_plane, far_plane, eps2d, antialiased, ortho, pr);
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
void gs_project_backward_cpu(const T* means, const T* quats, const T* scales, const T* opacities, const T* viewmats,
                             const T* Ks, int64_t B, int64_t C, int64_t N, int width, int height, T near_plane,
                             T far_plane, T eps2d, bool antialiased, bool ortho, const T* g_means2d, const T* g_conics,
                             const T* g_depths, const T* g_opac, T* g_means, T* g_quats, T* g_scales, T* g_opacities) {
#pragma omp parallel for schedule(static) if (B * C * N > kMinParallel)
  for (int64_t g = 0; g < B * N; ++g) {
    const int64_t b = g / N, n = g % N;
    T gm[3] = {0, 0, 0}, gq[4] = {0, 0, 0, 0}, gs_[3] = {0, 0, 0}, go = 0;
    for (int64_t c = 0; c < C; ++c) {
      const int64_t bc = b * C + c, idx = bc * N + n;
      const Camera<T> cam(viewmats + bc * 16, Ks + bc * 9);
      gs::Projected<T> pr;
      gs::project_forward(means + g * 3, quats + g * 4, scales + g * 3, opacities[g], cam.R, cam.t, cam.fx, cam.fy,
                          cam.cx, cam.cy, width, height, near_plane, far_plane, eps2d, antialiased, ortho, pr);
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
      gs::sh_backward(degree, sh + g * K * 3, means + g * 3, campos, g_colors + (bc * N + n) * 3, g_sh + g * K * 3, gm);
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
      if (!gs::tile_rect(means2d + (i * N + n) * 2, radii + (i * N + n) * 2, width, height, tr)) continue;
      for (int ty = tr[2]; ty < tr[3]; ++ty)
        for (int tx = tr[0]; tx < tr[1]; ++tx) ids[cursor[ty * TX + tx]++] = n;
    }
  }
}

namespace {

// c ? a : b, computed on the bits. Written as a conditional, a select in a pixel loop may become a
// branch (jump threading folds a constant into one side; a float operation that may trap is then
// not executed speculatively), which keeps the loop from vectorising; on the bits it cannot.
template <typename T>
inline T pick(bool c, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  const U m = U(0) - U(c);
  return std::bit_cast<T>(U((std::bit_cast<U>(a) & m) | (std::bit_cast<U>(b) & ~m)));
}

// e^x with plain arithmetic, so that the pixel loops calling it vectorise (std::exp is a library
// call, which keeps a loop scalar). float: Cephes' expf, within ~1 ulp: x = n ln2 + r with
// n = round(x / ln2) (adding and subtracting 1.5 * 2^23 rounds to an integer) and |r| <= ln2 / 2
// (ln2 in two parts, the first exact in a product with n), e^r by a degree-6 polynomial, times 2^n
// built in the exponent bits. x is clamped to [-87.3, 88.3] so that 2^n stays a normal float (the
// loops only compare the e^x < 1.2e-38 of a clamped x with 1/255); NaN stays NaN. double: std::exp,
// the accurate path.
inline float exp_vec(float x) {
  x = pick(x < -87.3f, -87.3f, x);
  x = pick(x > 88.3f, 88.3f, x);
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const int32_t e = int32_t(pick(n == n, n, 0.f)) + 127;  // NaN: any exponent (p is NaN)
  return p * std::bit_cast<float>(e << 23);
}
inline double exp_vec(double x) { return std::exp(x); }

// The tile kernels are compiled for x86-64's baseline (SSE2: 4 floats a vector), AVX2 (8) and
// AVX-512 (16), and the loader picks the best one the CPU runs (function multiversioning). The
// AVX-512 version may fuse multiply-adds, so its results can differ from the others' in the last
// bits (each is deterministic). Elsewhere, the baseline only.
#if defined(__x86_64__) && defined(__GNUC__)
#define FAST3D_TILE_KERNEL __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FAST3D_TILE_KERNEL
#endif

constexpr int kTilePixels = kTile * kTile;

// A Gaussian's pixel rect clipped to the tile at (x0, y0) of tw x th pixels, in tile coordinates:
// columns [xa, xb), rows [ya, yb).
struct TileRect {
  int xa, xb, ya, yb;
  template <typename T>
  TileRect(T mx, T my, const int32_t* radii, int width, int height, int x0, int y0, int tw, int th) {
    int rect[4];
    gs::pixel_rect(mx, my, radii, width, height, rect);
    xa = std::max(rect[0], x0) - x0;
    xb = std::min(rect[1], x0 + tw) - x0;
    ya = std::max(rect[2], y0) - y0;
    yb = std::min(rect[3], y0 + th) - y0;
  }
  bool empty() const { return xa >= xb || ya >= yb; }
  // The loops walk whole rows of the tile, row-major indices [first(), first() + count()), and mask
  // off the columns outside [xa, xb): a multiple of 16 pixels leaves no scalar remainder at any
  // vector width. They count k from 0 with the arrays offset by first(): such a counter vectorises
  // also where signed overflow is defined (-fwrapv, in Python's build flags).
  int first() const { return ya * kTile; }
  int count() const { return (yb - ya) * kTile; }
  bool inside(int p) const { return ((p & (kTile - 1)) >= xa) & ((p & (kTile - 1)) < xb); }
};

// Per-thread scratch of forward_tile. Per pixel of the tile, as structure of arrays (row-major,
// kTile pixels a row): the pixel centre, transmittance, features accumulated (channel-major), the
// count of Gaussians up to the last one blended, whether the pixel still blends, and the current
// Gaussian's blending weight.
template <typename T>
struct ForwardScratch {
  std::vector<T> px, py, trans, acc, w;
  std::vector<int32_t> lst, live;
  int row_live[kTile];  // pixels of each row still blending
  explicit ForwardScratch(int D)
      : px(kTilePixels),
        py(kTilePixels),
        trans(kTilePixels),
        acc(size_t(D) * kTilePixels),
        w(kTilePixels),
        lst(kTilePixels),
        live(kTilePixels) {}
};

// Pixel centres of the tile at (x0, y0).
template <typename T>
void pixel_centres(int x0, int y0, T* px, T* py) {
  for (int p = 0; p < kTilePixels; ++p) {
    px[p] = T(x0 + p % kTile) + T(0.5);
    py[p] = T(y0 + p / kTile) + T(0.5);
  }
}

// Front-to-back blending of one tile of image i (`it` = i * tiles + tile).
template <typename T>
FAST3D_TILE_KERNEL void forward_tile(const T* means2d, const T* conics, const T* opac, const T* feats,
                                     const int32_t* radii, const int64_t* tile_offsets, const int32_t* ids, int64_t it,
                                     int64_t N, int D, int width, int height, T* image, T* alpha, int32_t* last,
                                     ForwardScratch<T>& sc) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
  const int64_t i = it / TT;
  const int tile = int(it % TT), x0 = (tile % TX) * kTile, y0 = (tile / TX) * kTile;
  const int tw = std::min(kTile, width - x0), th = std::min(kTile, height - y0);
  const T* px = sc.px.data();
  const T* py = sc.py.data();
  T* trans = sc.trans.data();
  T* w = sc.w.data();
  int32_t* lst = sc.lst.data();
  int32_t* live = sc.live.data();
  pixel_centres(x0, y0, sc.px.data(), sc.py.data());
  std::fill(sc.trans.begin(), sc.trans.end(), T(1));
  std::fill(sc.acc.begin(), sc.acc.end(), T(0));
  std::fill(sc.lst.begin(), sc.lst.end(), 0);
  std::fill(sc.live.begin(), sc.live.end(), 1);
  for (int y = 0; y < kTile; ++y) sc.row_live[y] = y < th ? tw : 0;
  int active = tw * th;
  const int64_t s = tile_offsets[it], e = tile_offsets[it + 1];
  for (int64_t j = s; j < e && active > 0; ++j) {
    const int64_t g = i * N + ids[j];
    const T mx = means2d[g * 2], my = means2d[g * 2 + 1];
    const T A = conics[g * 3], B = conics[g * 3 + 1], C = conics[g * 3 + 2], o = opac[g];
    const T* f = feats + g * D;
    const int32_t count = int32_t(j - s + 1);
    TileRect r(mx, my, radii + g * 2, width, height, x0, y0, tw, th);
    if (r.empty()) continue;
    while (r.ya < r.yb && sc.row_live[r.ya] == 0) ++r.ya;  // rows already done at either end
    while (r.ya < r.yb && sc.row_live[r.yb - 1] == 0) --r.yb;
    if (r.ya >= r.yb) continue;
    const int p0 = r.first(), np = r.count();
    const T *pxr = px + p0, *pyr = py + p0;
    T *tr = trans + p0, *wr = w + p0;
    int32_t *ls = lst + p0, *lv = live + p0;
    int stopped = 0;
#pragma omp simd reduction(+ : stopped)
    for (int k = 0; k < np; ++k) {
      // gs::gaussian_raw_alpha at the pixel centre
      const T dx = pxr[k] - mx, dy = pyr[k] - my;
      const T raw = o * exp_vec(T(-0.5) * (A * dx * dx + T(2) * B * dx * dy + C * dy * dy));
      const T a = pick(T(kAlphaMax) < raw, T(kAlphaMax), raw);  // std::min
      const T next = tr[k] * (T(1) - a);
      // The pixel meets the Gaussian (in its rect, still blending, alpha >= 1/255), then either
      // stops for good (T would fall below 1e-4) or blends it.
      const bool hit = r.inside(p0 + k) & (lv[k] != 0) & !(raw < T(kAlphaMin));
      const bool stop = hit & (next < T(kTransMin));
      const bool blend = hit & !stop;
      wr[k] = pick(blend, a * tr[k], T(0));
      tr[k] = pick(blend, next, tr[k]);
      ls[k] = pick(blend, count, ls[k]);
      lv[k] = pick(stop, 0, lv[k]);
      stopped += stop;
    }
    for (int d = 0; d < D; ++d) {
      T* acc = sc.acc.data() + d * kTilePixels + p0;
      const T fd = f[d];
#pragma omp simd
      for (int k = 0; k < np; ++k) acc[k] += wr[k] * fd;
    }
    if (stopped > 0) {  // at most once per pixel: recount the rows
      active -= stopped;
      for (int y = r.ya; y < r.yb; ++y) {
        int n_live = 0;
        for (int x = 0; x < tw; ++x) n_live += live[y * kTile + x] != 0;
        sc.row_live[y] = n_live;
      }
    }
  }
  for (int y = 0; y < th; ++y)
    for (int x = 0; x < tw; ++x) {
      const int p = y * kTile + x;
      const int64_t pix = (i * height + y0 + y) * width + x0 + x;
      for (int d = 0; d < D; ++d) image[pix * D + d] = sc.acc[d * kTilePixels + p];
      alpha[pix] = T(1) - trans[p];
      last[pix] = lst[p];
    }
}

}  // namespace

template <typename T>
void gs_rasterize_forward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats, const int32_t* radii,
                              const int64_t* tile_offsets, const int32_t* ids, int64_t I, int64_t N, int D, int width,
                              int height, T* image, T* alpha, int32_t* last) {
  const int64_t TT = tiles_along(width) * tiles_along(height);
#pragma omp parallel
  {
    ForwardScratch<T> sc(D);
#pragma omp for schedule(dynamic, 4)
    for (int64_t it = 0; it < I * TT; ++it)
      forward_tile(means2d, conics, opac, feats, radii, tile_offsets, ids, it, N, D, width, height, image, alpha, last,
                   sc);
  }
}

namespace {

// Per-thread scratch of backward_tile.
template <typename T>
struct BackwardScratch {
  // Per pixel (structure of arrays, as in the forward; the names and the derivation are those of
  // rasterize_backward_kernel in gaussians_cuda.cu): the pixel centre; t_after = T_{j+1}, the
  // transmittance past the current Gaussian j (T_final = 1 - alpha at the start); later_color = sum
  // over the Gaussians k > j of w_k <g_image, f_k>; alpha_share = -g_alpha T_final, the alpha
  // output's share; the forward's last count; g_img = g_image (channel-major); g_dot_f = <g_image,
  // f_j> and w = w_j of the current Gaussian.
  std::vector<T> px, py, t_after, later_color, alpha_share, g_img, g_dot_f, w;
  std::vector<int32_t> lst;
  int row_last[kTile];  // the largest last count of each row
  explicit BackwardScratch(int D)
      : px(kTilePixels),
        py(kTilePixels),
        t_after(kTilePixels),
        later_color(kTilePixels),
        alpha_share(kTilePixels),
        g_img(size_t(D) * kTilePixels),
        g_dot_f(kTilePixels),
        w(kTilePixels),
        lst(kTilePixels) {}
};

// Backward of one tile of image i; gradients of the image's Gaussians ADDED into the given
// per-image buffers (g_m2 [N,2], g_con [N,3], g_op [N], g_f [N,D], g_abs [N,2]).
template <typename T>
FAST3D_TILE_KERNEL void backward_tile(const T* means2d, const T* conics, const T* opac, const T* feats,
                                      const int32_t* radii, const int64_t* tile_offsets, const int32_t* ids,
                                      const T* alpha, const int32_t* last, const T* g_image, const T* g_alpha,
                                      int64_t i, int tile, int64_t N, int D, int width, int height, T* g_m2, T* g_con,
                                      T* g_op, T* g_f, T* g_abs, BackwardScratch<T>& sc) {
  const int TX = tiles_along(width), TT = TX * tiles_along(height);
  const int x0 = (tile % TX) * kTile, y0 = (tile / TX) * kTile;
  const int tw = std::min(kTile, width - x0), th = std::min(kTile, height - y0);
  const int64_t s = tile_offsets[i * TT + tile];
  T* t_after = sc.t_after.data();
  T* later_color = sc.later_color.data();
  T* alpha_share = sc.alpha_share.data();
  T* g_dot_f = sc.g_dot_f.data();
  T* w = sc.w.data();
  int32_t* lst = sc.lst.data();
  pixel_centres(x0, y0, sc.px.data(), sc.py.data());
  int max_last = 0;
  for (int y = 0; y < kTile; ++y) {
    sc.row_last[y] = 0;
    for (int x = 0; x < kTile; ++x) {
      const int p = y * kTile + x;
      const bool in = y < th && x < tw;
      const int64_t pix = (i * height + y0 + y) * width + x0 + x;
      t_after[p] = in ? T(1) - alpha[pix] : T(1);  // T_final
      later_color[p] = T(0);
      alpha_share[p] = in ? -g_alpha[pix] * t_after[p] : T(0);  // dA/da_j = T_final / (1 - a_j)
      lst[p] = in ? last[pix] : 0;
      for (int d = 0; d < D; ++d) sc.g_img[d * kTilePixels + p] = in ? g_image[pix * D + d] : T(0);
      sc.row_last[y] = std::max(sc.row_last[y], int(lst[p]));
    }
    max_last = std::max(max_last, sc.row_last[y]);
  }
  for (int64_t j = s + max_last - 1; j >= s; --j) {
    const int64_t n = ids[j], g = i * N + n;
    const T mx = means2d[g * 2], my = means2d[g * 2 + 1];
    const T A = conics[g * 3], B = conics[g * 3 + 1], C = conics[g * 3 + 2], o = opac[g];
    const T* f = feats + g * D;
    const int32_t idx = int32_t(j - s);  // pixels with last > idx blended this Gaussian
    TileRect r(mx, my, radii + g * 2, width, height, x0, y0, tw, th);
    if (r.empty()) continue;
    while (r.ya < r.yb && idx >= sc.row_last[r.ya]) ++r.ya;  // rows that stopped before it at either end
    while (r.ya < r.yb && idx >= sc.row_last[r.yb - 1]) --r.yb;
    if (r.ya >= r.yb) continue;
    const int p0 = r.first(), np = r.count();
    const T *pxr = sc.px.data() + p0, *pyr = sc.py.data() + p0, *alpha_share_r = alpha_share + p0;
    T *t_after_r = t_after + p0, *later_color_r = later_color + p0, *g_dot_f_r = g_dot_f + p0, *wr = w + p0;
    const int32_t* ls = lst + p0;
    for (int k = 0; k < np; ++k) g_dot_f_r[k] = T(0);
    for (int d = 0; d < D; ++d) {
      const T* g_img = sc.g_img.data() + d * kTilePixels + p0;
      const T fd = f[d];
#pragma omp simd
      for (int k = 0; k < np; ++k) g_dot_f_r[k] += g_img[k] * fd;  // <g_image, f>
    }
    T gm0 = 0, gm1 = 0, ga0 = 0, ga1 = 0, gc0 = 0, gc1 = 0, gc2 = 0, go = 0;
#pragma omp simd reduction(+ : gm0, gm1, ga0, ga1, gc0, gc1, gc2, go)
    for (int k = 0; k < np; ++k) {
      const T dx = pxr[k] - mx, dy = pyr[k] - my;
      const T vis = exp_vec(T(-0.5) * (A * dx * dx + T(2) * B * dx * dy + C * dy * dy));
      const T raw = o * vis;
      const bool hit = r.inside(p0 + k) & (idx < ls[k]) & !(raw < T(kAlphaMin));
      const T a = pick(T(kAlphaMax) < raw, T(kAlphaMax), raw);  // std::min
      const T inv = T(1) / (T(1) - a);
      const T t_j = t_after_r[k] * inv;  // transmittance in front of this Gaussian
      // dL/da_j = T_j <g, f_j> - (later_color + alpha_share) / (1 - a_j)
      const T g_a = t_j * g_dot_f_r[k] - (later_color_r[k] + alpha_share_r[k]) * inv;
      wr[k] = pick(hit, a * t_j, T(0));
      later_color_r[k] += wr[k] * g_dot_f_r[k];
      t_after_r[k] = pick(hit, t_j, t_after_r[k]);
      // gs::gaussian_alpha_backward: no gradient where the clamp is active (raw > 0.99)
      const T g_al = pick(hit & !(raw > T(kAlphaMax)), g_a, T(0));
      go += g_al * vis;
      const T g_q = T(-0.5) * g_al * o * vis;  // dL/dq
      gc0 += g_q * dx * dx;
      gc1 += g_q * T(2) * dx * dy;
      gc2 += g_q * dy * dy;
      const T pm0 = g_q * T(-2) * (A * dx + B * dy), pm1 = g_q * T(-2) * (B * dx + C * dy);
      gm0 += pm0;
      gm1 += pm1;
      ga0 += std::abs(pm0);
      ga1 += std::abs(pm1);
    }
    for (int d = 0; d < D; ++d) {
      const T* g_img = sc.g_img.data() + d * kTilePixels + p0;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int k = 0; k < np; ++k) sum += wr[k] * g_img[k];
      g_f[n * D + d] += sum;
    }
    g_m2[n * 2] += gm0;
    g_m2[n * 2 + 1] += gm1;
    g_con[n * 3] += gc0;
    g_con[n * 3 + 1] += gc1;
    g_con[n * 3 + 2] += gc2;
    g_op[n] += go;
    g_abs[n * 2] += ga0;
    g_abs[n * 2 + 1] += ga1;
  }
}

}  // namespace

template <typename T>
void gs_rasterize_backward_cpu(const T* means2d, const T* conics, const T* opac, const T* feats, const int32_t* radii,
                               const int64_t* tile_offsets, const int32_t* ids, const T* alpha, const int32_t* last,
                               const T* g_image, const T* g_alpha, int64_t I, int64_t N, int D, int width, int height,
                               T* g_means2d, T* g_conics, T* g_opac, T* g_feats, T* absgrad) {
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
      BackwardScratch<T> sc(D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t i = 0; i < I; ++i)
        for (int tile = 0; tile < TT; ++tile)
          backward_tile(means2d, conics, opac, feats, radii, tile_offsets, ids, alpha, last, g_image, g_alpha, i, tile,
                        N, D, width, height, g_means2d + i * N * 2, g_conics + i * N * 3, g_opac + i * N,
                        g_feats + i * N * D, absgrad + i * N * 2, sc);
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
      BackwardScratch<T> sc(D);
#pragma omp for schedule(dynamic, 2)
      for (int tile = 0; tile < TT; ++tile)
        backward_tile(means2d, conics, opac, feats, radii, tile_offsets, ids, alpha, last, g_image, g_alpha, i, tile, N,
                      D, width, height, b, b + 2 * N, b + 5 * N, b + 6 * N, b + (6 + D) * N, sc);
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

template <typename T>
void gs_reduce_isect_rows_cpu(const T* rows, const int32_t* isect_src, const int64_t* gauss_offsets, int64_t n,
                              int64_t G, int D, int64_t pass_rows, T* g_means2d, T* g_conics, T* g_opac, T* g_feats,
                              T* absgrad) {
  std::fill(g_means2d, g_means2d + G * 2, T(0));
  std::fill(g_conics, g_conics + G * 3, T(0));
  std::fill(g_opac, g_opac + G, T(0));
  std::fill(g_feats, g_feats + G * D, T(0));
  std::fill(absgrad, absgrad + G * 2, T(0));
  std::vector<int32_t> sorted_of(size_t(std::max<int64_t>(n, 0)));
  for (int64_t j = 0; j < n; ++j) sorted_of[isect_src[j]] = int32_t(j);
  const int64_t R = gs::isect_row_size(D);
  for (int64_t j0 = 0; j0 < n; j0 += pass_rows) {
    const int64_t j1 = std::min(n, j0 + pass_rows);
#pragma omp parallel for schedule(static) if (G > kMinParallel)
    for (int64_t g = 0; g < G; ++g)
      gs::reduce_isect_rows_pass(rows + j0 * R, sorted_of.data(), gauss_offsets, n, g, D, j0, j1, g_means2d, g_conics,
                                 g_opac, g_feats, absgrad);
  }
}

#define FAST3D_INSTANTIATE(T)                                                                                          \
  template void gs_project_forward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t,         \
                                          int64_t, int64_t, int, int, T, T, T, bool, bool, T*, T*, T*, T*, int32_t*);  \
  template void gs_project_backward_cpu<T>(const T*, const T*, const T*, const T*, const T*, const T*, int64_t,        \
                                           int64_t, int64_t, int, int, T, T, T, bool, bool, const T*, const T*,        \
                                           const T*, const T*, T*, T*, T*, T*);                                        \
  template void gs_sh_forward_cpu<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int, T*);           \
  template void gs_sh_backward_cpu<T>(const T*, const T*, const T*, int64_t, int64_t, int64_t, int, int, const T*, T*, \
                                      T*);                                                                             \
  template void gs_bin_count_cpu<T>(const T*, const T*, const int32_t*, int64_t, int64_t, int, int, int32_t*,          \
                                    int64_t*, int64_t*);                                                               \
  template void gs_bin_fill_cpu<T>(const T*, const int32_t*, const int32_t*, const int64_t*, const int64_t*, int64_t,  \
                                   int64_t, int, int, int32_t*);                                                       \
  template void gs_rasterize_forward_cpu<T>(const T*, const T*, const T*, const T*, const int32_t*, const int64_t*,    \
                                            const int32_t*, int64_t, int64_t, int, int, int, T*, T*, int32_t*);        \
  template void gs_rasterize_backward_cpu<T>(const T*, const T*, const T*, const T*, const int32_t*, const int64_t*,   \
                                             const int32_t*, const T*, const int32_t*, const T*, const T*, int64_t,    \
                                             int64_t, int, int, int, T*, T*, T*, T*, T*);                              \
  template void gs_reduce_isect_rows_cpu<T>(const T*, const int32_t*, const int64_t*, int64_t, int64_t, int, int64_t,  \
                                            T*, T*, T*, T*, T*);
FAST3D_INSTANTIATE(float)
FAST3D_INSTANTIATE(double)
#undef FAST3D_INSTANTIATE

}  // namespace fast3d
