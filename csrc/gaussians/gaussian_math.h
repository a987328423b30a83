// 3D Gaussian splatting math shared by the C++ CPU kernels and the CUDA kernels: projection (EWA
// with gsplat's pinhole Jacobian), spherical harmonics, per-pixel alpha, screen extent, and the
// hand-derived backward of each. The PyTorch twin (fast3d/ops/rasterization/reference.py) is the
// specification; every formula here is its derivative, written out.
//
// Conventions: quaternions wxyz (any norm), viewmats world-to-camera [R | t] (OpenCV axes), K
// (fx, fy, cx, cy) of a pinhole or an orthographic camera. Symmetric 2x2 matrices are stored (xx, xy, yy); a conic (A,
// B, C) is the inverse 2D covariance, q = A dx^2 + 2 B dx dy + C dy^2.
#pragma once

#include <cstdint>

#include "common/hd.h"

namespace fast3d {
namespace gs {

// Thresholds as doubles, cast to the kernel's T at use (a float constant widened to double would
// differ from the reference's 0.99 by 1e-8).
constexpr double kAlphaMin = 1.0 / 255.0;  // contributions below this are skipped
constexpr double kAlphaMax = 0.99;         // alpha is clamped to this
constexpr double kTransMin = 1e-4;         // a pixel stops before T would fall below this
// Tile side in pixels, CPU and CUDA (the one definition; Python's twin is reference.TILE, tied to
// it by a test through the binding's gs_tile).
constexpr int kTile = 16;

// Screen radii saturate here: any radius past the image bins the same (reference.RADIUS_MAX).
constexpr int kRadiusMax = 1 << 24;

// Tiles along an image side of `pixels` pixels (no overflow up to INT_MAX).
FAST3D_HD int tiles_along(int pixels) { return pixels / kTile + (pixels % kTile != 0); }

// Rotation matrix of the normalised quaternion qn = (w, x, y, z); R[3][3] row-major.
template <typename T>
FAST3D_HD void quat_to_rotmat(const T qn[4], T R[3][3]) {
  const T w = qn[0], x = qn[1], y = qn[2], z = qn[3];
  // clang-format off
  R[0][0] = 1 - 2 * (y * y + z * z); R[0][1] = 2 * (x * y - w * z);     R[0][2] = 2 * (x * z + w * y);
  R[1][0] = 2 * (x * y + w * z);     R[1][1] = 1 - 2 * (x * x + z * z); R[1][2] = 2 * (y * z - w * x);
  R[2][0] = 2 * (x * z - w * y);     R[2][1] = 2 * (y * z + w * x);     R[2][2] = 1 - 2 * (x * x + y * y);
  // clang-format on
}

// dL/dqn from dL/dR (G), by differentiating each entry of quat_to_rotmat.
template <typename T>
FAST3D_HD void quat_to_rotmat_vjp(const T qn[4], const T G[3][3], T g[4]) {
  const T w = qn[0], x = qn[1], y = qn[2], z = qn[3];
  g[0] = 2 * (-z * G[0][1] + y * G[0][2] + z * G[1][0] - x * G[1][2] - y * G[2][0] + x * G[2][1]);
  g[1] = 2 * (y * G[0][1] + z * G[0][2] + y * G[1][0] - 2 * x * G[1][1] - w * G[1][2] + z * G[2][0] + w * G[2][1] -
              2 * x * G[2][2]);
  g[2] = 2 * (-2 * y * G[0][0] + x * G[0][1] + w * G[0][2] + x * G[1][0] + z * G[1][2] - w * G[2][0] + z * G[2][1] -
              2 * y * G[2][2]);
  g[3] = 2 * (-2 * z * G[0][0] - w * G[0][1] + x * G[0][2] + w * G[1][0] - 2 * z * G[1][1] + y * G[1][2] + x * G[2][0] +
              y * G[2][1]);
}

// Everything the projection of one Gaussian into one camera computes, kept for its backward.
template <typename T>
struct Projected {
  bool valid;
  T qn[4], qnorm;                  // normalised quaternion and |q|
  T Rq[3][3];                      // its rotation
  T M[3][3];                       // Rq diag(scale)
  T W[3][3];                       // camera-space covariance R Sigma R^T
  T p[3];                          // camera-space mean
  T J02, J12;                      // -fx uc / z, -fy vc / z
  bool u_free, v_free;             // u = x/z, v = y/z inside the Jacobian's clamp (gradient flows)
  bool ortho;                      // orthographic camera: u = x, v = y, J = [[fx, 0, 0], [0, fy, 0]]
  T a, b, c, det;                  // 2D covariance + eps2d I and its determinant
  T comp;                          // antialiasing compensation (1 in classic mode)
  T mean2d[2], conic[3], opacity;  // outputs
};

// Projection of one Gaussian: mean [3], quat [4], scale [3], opacity; R [3][3] and t [3] of the
// viewmat; intrinsics; pinhole, or orthographic with `ortho`. Returns with pr.valid = false when
// culled by near/far (the camera-space z, both models) or det <= 0.
template <typename T>
FAST3D_HD void project_forward(const T* mean, const T* quat, const T* scale, T opacity, const T Rc[3][3], const T tc[3],
                               T fx, T fy, T cx, T cy, int width, int height, T near_plane, T far_plane, T eps2d,
                               bool antialiased, bool ortho, Projected<T>& pr) {
  pr.ortho = ortho;
  for (int i = 0; i < 3; ++i) pr.p[i] = Rc[i][0] * mean[0] + Rc[i][1] * mean[1] + Rc[i][2] * mean[2] + tc[i];
  const T z = pr.p[2];
  pr.valid = z >= near_plane && z <= far_plane;
  if (!pr.valid) return;
  pr.qnorm = sqrt_(quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3]);
  for (int i = 0; i < 4; ++i) pr.qn[i] = quat[i] / pr.qnorm;
  quat_to_rotmat(pr.qn, pr.Rq);
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) pr.M[i][k] = pr.Rq[i][k] * scale[k];
  T RM[3][3];  // Rc M; W = (Rc M)(Rc M)^T
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) RM[i][k] = Rc[i][0] * pr.M[0][k] + Rc[i][1] * pr.M[1][k] + Rc[i][2] * pr.M[2][k];
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) pr.W[i][j] = RM[i][0] * RM[j][0] + RM[i][1] * RM[j][1] + RM[i][2] * RM[j][2];
  const T rz = T(1) / z;
  T u, v, J00, J11;
  if (ortho) {  // a parallel projection: the Jacobian is the constant scale, depth only culls
    u = pr.p[0];
    v = pr.p[1];
    pr.u_free = pr.v_free = true;
    J00 = fx;
    J11 = fy;
    pr.J02 = pr.J12 = T(0);
  } else {
    u = pr.p[0] * rz;
    v = pr.p[1] * rz;
    // gsplat's clamp: the Jacobian is evaluated no further than 1.3x the half field of view out.
    const T lxp = (T(width) - cx) / fx + T(0.15) * T(width) / fx, lxn = cx / fx + T(0.15) * T(width) / fx;
    const T lyp = (T(height) - cy) / fy + T(0.15) * T(height) / fy, lyn = cy / fy + T(0.15) * T(height) / fy;
    pr.u_free = u >= -lxn && u <= lxp;
    pr.v_free = v >= -lyn && v <= lyp;
    const T uc = min_(max_(u, -lxn), lxp), vc = min_(max_(v, -lyn), lyp);
    J00 = fx * rz;
    J11 = fy * rz;
    pr.J02 = -fx * uc * rz;
    pr.J12 = -fy * vc * rz;
  }
  // cov2d = J W J^T with J = [[J00, 0, J02], [0, J11, J12]].
  const T r0[3] = {J00 * pr.W[0][0] + pr.J02 * pr.W[2][0], J00 * pr.W[0][1] + pr.J02 * pr.W[2][1],
                   J00 * pr.W[0][2] + pr.J02 * pr.W[2][2]};
  const T r1[3] = {J11 * pr.W[1][0] + pr.J12 * pr.W[2][0], J11 * pr.W[1][1] + pr.J12 * pr.W[2][1],
                   J11 * pr.W[1][2] + pr.J12 * pr.W[2][2]};
  pr.a = r0[0] * J00 + r0[2] * pr.J02 + eps2d;
  pr.b = r0[1] * J11 + r0[2] * pr.J12;
  pr.c = r1[1] * J11 + r1[2] * pr.J12 + eps2d;
  pr.det = pr.a * pr.c - pr.b * pr.b;
  if (!(pr.det > T(0))) {
    pr.valid = false;
    return;
  }
  pr.conic[0] = pr.c / pr.det;
  pr.conic[1] = -pr.b / pr.det;
  pr.conic[2] = pr.a / pr.det;
  pr.mean2d[0] = fx * u + cx;
  pr.mean2d[1] = fy * v + cy;
  pr.comp = T(1);
  if (antialiased) {
    const T r = ((pr.a - eps2d) * (pr.c - eps2d) - pr.b * pr.b) / pr.det;
    pr.comp = r > T(0) ? sqrt_(r) : T(0);
  }
  pr.opacity = opacity * pr.comp;
}

// Half-extents (pixels) of the region where alpha >= 1/255 can hold: o exp(-q/2) >= 1/255 iff
// q <= 2 ln(255 o), and the ellipse {d : d^T Sigma^-1 d <= t} has half-widths sqrt(t Sigma_xx),
// sqrt(t Sigma_yy). Exact, so binning by it loses no contribution; the integer radii are rounded
// up with a margin for float rounding. Both 0 when no pixel can reach 1/255.
template <typename T>
FAST3D_HD void screen_radii(const Projected<T>& pr, int r[2]) {
  r[0] = r[1] = 0;
  if (!pr.valid || !(pr.opacity * T(255) > T(1))) return;
  const T t = T(2) * log_(pr.opacity * T(255));
  const T big = T(kRadiusMax);
  r[0] = int(min_(sqrt_(t * pr.a) * T(1.0001) + T(1), big));
  r[1] = int(min_(sqrt_(t * pr.c) * T(1.0001) + T(1), big));
}

// Pixel-rect [x0, x1) x [y0, y1) of pixel centres within the radii of mean2d, clipped to the
// image; empty (x0 >= x1 or y0 >= y1) when the Gaussian misses it.
template <typename T>
FAST3D_HD void pixel_rect(T mx, T my, const int r[2], int width, int height, int rect[4]) {
  // centres px = x + 0.5 with |px - mx| <= r  <=>  ceil(mx - r - 0.5) <= x <= floor(mx + r - 0.5);
  // bounds are clamped to [-1, size] first so the int conversions cannot overflow.
  const T lx = min_(max_(mx - T(r[0]) - T(0.5), T(-1)), T(width));
  const T hx = min_(max_(mx + T(r[0]) - T(0.5), T(-1)), T(width));
  const T ly = min_(max_(my - T(r[1]) - T(0.5), T(-1)), T(height));
  const T hy = min_(max_(my + T(r[1]) - T(0.5), T(-1)), T(height));
  rect[0] = max_(int(ceil_(lx)), 0);
  rect[1] = min_(int(floor_(hx)) + 1, width);
  rect[2] = max_(int(ceil_(ly)), 0);
  rect[3] = min_(int(floor_(hy)) + 1, height);
}

// Tile rect [tx0, tx1) x [ty0, ty1) of a Gaussian's pixel rect (m2 [2], radii r [2]); false when
// it misses the image. The Gaussian's intersections are its (tx1 - tx0) (ty1 - ty0) tiles: the
// count the CPU binning, the CUDA sort and the reference's n_intersections all use.
template <typename T>
FAST3D_HD bool tile_rect(const T* m2, const int32_t* r, int width, int height, int trect[4]) {
  if (r[0] <= 0 || r[1] <= 0) return false;
  int rect[4];
  pixel_rect(m2[0], m2[1], r, width, height, rect);
  if (rect[0] >= rect[1] || rect[2] >= rect[3]) return false;
  trect[0] = rect[0] / kTile;
  trect[1] = (rect[1] - 1) / kTile + 1;
  trect[2] = rect[2] / kTile;
  trect[3] = (rect[3] - 1) / kTile + 1;
  return true;
}

// Backward of project_forward for one (camera, Gaussian) given dL/d(mean2d, conic, depth,
// opacity_eff); ADDS into g_mean [3], g_quat [4], g_scale [3], g_opacity.
template <typename T>
FAST3D_HD void project_backward(const Projected<T>& pr, const T* scale, T opacity, const T Rc[3][3], T fx, T fy,
                                T eps2d, bool antialiased, const T g_m2[2], const T g_con[3], T g_depth, T g_opac,
                                T* g_mean, T* g_quat, T* g_scale, T* g_opacity) {
  if (!pr.valid) return;
  const T a = pr.a, b = pr.b, c = pr.c, det = pr.det;
  // conic = (c, -b, a) / det
  const T g_det = -(g_con[0] * c - g_con[1] * b + g_con[2] * a) / (det * det);
  T ga = g_con[2] / det + g_det * c;
  T gb = -g_con[1] / det - T(2) * b * g_det;
  T gc = g_con[0] / det + g_det * a;
  // opacity_eff = opacity * comp, comp = sqrt(r), r = det0 / det, det0 = (a-e)(c-e) - b^2
  if (antialiased) {
    *g_opacity += g_opac * pr.comp;
    if (pr.comp > T(0)) {
      const T det0 = (a - eps2d) * (c - eps2d) - b * b;
      const T g_r = g_opac * opacity * T(0.5) / pr.comp;
      const T d2 = det * det;
      ga += g_r * ((c - eps2d) * det - det0 * c) / d2;
      gb += g_r * (T(2) * b * (det0 - det)) / d2;
      gc += g_r * ((a - eps2d) * det - det0 * a) / d2;
    }
  } else {
    *g_opacity += g_opac;
  }
  // cov2d = J W J^T: with G = [[ga, gb/2], [gb/2, gc]] (symmetric), dL/dW = J^T G J and
  // dL/dJ = 2 G J W.
  const T z = pr.p[2], rz = T(1) / z, rz2 = rz * rz;
  const T j00 = pr.ortho ? fx : fx * rz, j11 = pr.ortho ? fy : fy * rz;
  const T J[2][3] = {{j00, T(0), pr.J02}, {T(0), j11, pr.J12}};
  const T G[2][2] = {{ga, T(0.5) * gb}, {T(0.5) * gb, gc}};
  T GJ[2][3];
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 3; ++k) GJ[i][k] = G[i][0] * J[0][k] + G[i][1] * J[1][k];
  T gW[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) gW[i][k] = J[0][i] * GJ[0][k] + J[1][i] * GJ[1][k];
  T gJ[2][3];
  for (int i = 0; i < 2; ++i)
    for (int k = 0; k < 3; ++k)
      gJ[i][k] = T(2) * (GJ[i][0] * pr.W[0][k] + GJ[i][1] * pr.W[1][k] + GJ[i][2] * pr.W[2][k]);
  T gp[3] = {T(0), T(0), g_depth};
  if (pr.ortho) {  // J constant; mean2d = (fx x + cx, fy y + cy)
    gp[0] += g_m2[0] * fx;
    gp[1] += g_m2[1] * fy;
  } else {
    // J00 = fx/z, J11 = fy/z; J02 = -fx uc/z with uc = x/z when free (else a constant), J12 alike.
    gp[2] += -gJ[0][0] * fx * rz2 - gJ[1][1] * fy * rz2;
    if (pr.u_free) {
      gp[0] += -gJ[0][2] * fx * rz2;
      gp[2] += gJ[0][2] * T(2) * fx * pr.p[0] * rz2 * rz;
    } else {
      gp[2] += -gJ[0][2] * pr.J02 * rz;  // d(-fx uc / z)/dz = fx uc / z^2 = -J02 / z
    }
    if (pr.v_free) {
      gp[1] += -gJ[1][2] * fy * rz2;
      gp[2] += gJ[1][2] * T(2) * fy * pr.p[1] * rz2 * rz;
    } else {
      gp[2] += -gJ[1][2] * pr.J12 * rz;
    }
    // mean2d = (fx x/z + cx, fy y/z + cy)
    gp[0] += g_m2[0] * fx * rz;
    gp[1] += g_m2[1] * fy * rz;
    gp[2] -= (g_m2[0] * fx * pr.p[0] + g_m2[1] * fy * pr.p[1]) * rz2;
  }
  // p = Rc mean + t
  for (int k = 0; k < 3; ++k) g_mean[k] += Rc[0][k] * gp[0] + Rc[1][k] * gp[1] + Rc[2][k] * gp[2];
  // W = Rc Sigma Rc^T: dL/dSigma = Rc^T gW Rc
  T tmp[3][3], gS[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) tmp[i][k] = gW[i][0] * Rc[0][k] + gW[i][1] * Rc[1][k] + gW[i][2] * Rc[2][k];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) gS[i][k] = Rc[0][i] * tmp[0][k] + Rc[1][i] * tmp[1][k] + Rc[2][i] * tmp[2][k];
  // Sigma = M M^T (gS symmetric): dL/dM = 2 gS M;  M = Rq diag(s)
  T gRq[3][3];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) {
      const T gM = T(2) * (gS[i][0] * pr.M[0][k] + gS[i][1] * pr.M[1][k] + gS[i][2] * pr.M[2][k]);
      g_scale[k] += gM * pr.Rq[i][k];
      gRq[i][k] = gM * scale[k];
    }
  T gqn[4];
  quat_to_rotmat_vjp(pr.qn, gRq, gqn);
  // qn = q / |q|: dL/dq = (gqn - qn <qn, gqn>) / |q|
  const T dot = gqn[0] * pr.qn[0] + gqn[1] * pr.qn[1] + gqn[2] * pr.qn[2] + gqn[3] * pr.qn[3];
  for (int i = 0; i < 4; ++i) g_quat[i] += (gqn[i] - pr.qn[i] * dot) / pr.qnorm;
}

// --- spherical harmonics (gsplat / INRIA real basis, degree <= 3) ---------------------------------

constexpr double kC0 = 0.28209479177387814, kC1 = 0.4886025119029199;
// (scalars, not arrays: namespace-scope constexpr arrays are not visible in device code)
constexpr double kC2_0 = 1.0925484305920792, kC2_1 = -1.0925484305920792, kC2_2 = 0.31539156525252005,
                 kC2_3 = -1.0925484305920792, kC2_4 = 0.5462742152960396;
constexpr double kC3_0 = -0.5900435899266435, kC3_1 = 2.890611442640554, kC3_2 = -0.4570457994644658,
                 kC3_3 = 0.3731763325901154, kC3_4 = -0.4570457994644658, kC3_5 = 1.445305721320277,
                 kC3_6 = -0.5900435899266435;

// Basis values Y[k] at unit direction d, k < (degree+1)^2; with dY non-null also their gradients
// dY[k][3] with respect to d (each Y_k is a polynomial in x, y, z).
template <typename T>
FAST3D_HD void sh_basis(int degree, const T d[3], T Y[16], T (*dY)[3]) {
  const T x = d[0], y = d[1], z = d[2];
  Y[0] = T(kC0);
  if (dY) dY[0][0] = dY[0][1] = dY[0][2] = T(0);
  if (degree < 1) return;
  const T c1 = T(kC1);
  // clang-format off
  Y[1] = -c1 * y; Y[2] = c1 * z; Y[3] = -c1 * x;
  if (dY) {
    dY[1][0] = 0; dY[1][1] = -c1; dY[1][2] = 0;
    dY[2][0] = 0; dY[2][1] = 0;   dY[2][2] = c1;
    dY[3][0] = -c1; dY[3][1] = 0; dY[3][2] = 0;
  }
  if (degree < 2) return;
  const T xx = x * x, yy = y * y, zz = z * z;
  const T a0 = T(kC2_0), a1 = T(kC2_1), a2 = T(kC2_2), a3 = T(kC2_3), a4 = T(kC2_4);
  Y[4] = a0 * x * y; Y[5] = a1 * y * z; Y[6] = a2 * (2 * zz - xx - yy); Y[7] = a3 * x * z; Y[8] = a4 * (xx - yy);
  if (dY) {
    dY[4][0] = a0 * y;      dY[4][1] = a0 * x;      dY[4][2] = 0;
    dY[5][0] = 0;           dY[5][1] = a1 * z;      dY[5][2] = a1 * y;
    dY[6][0] = -2 * a2 * x; dY[6][1] = -2 * a2 * y; dY[6][2] = 4 * a2 * z;
    dY[7][0] = a3 * z;      dY[7][1] = 0;           dY[7][2] = a3 * x;
    dY[8][0] = 2 * a4 * x;  dY[8][1] = -2 * a4 * y; dY[8][2] = 0;
  }
  if (degree < 3) return;
  const T b0 = T(kC3_0), b1 = T(kC3_1), b2 = T(kC3_2), b3 = T(kC3_3), b4 = T(kC3_4), b5 = T(kC3_5),
          b6 = T(kC3_6);
  Y[9] = b0 * y * (3 * xx - yy);
  Y[10] = b1 * x * y * z;
  Y[11] = b2 * y * (4 * zz - xx - yy);
  Y[12] = b3 * z * (2 * zz - 3 * xx - 3 * yy);
  Y[13] = b4 * x * (4 * zz - xx - yy);
  Y[14] = b5 * z * (xx - yy);
  Y[15] = b6 * x * (xx - 3 * yy);
  if (dY) {
    dY[9][0] = 6 * b0 * x * y;               dY[9][1] = b0 * (3 * xx - 3 * yy);          dY[9][2] = 0;
    dY[10][0] = b1 * y * z;                  dY[10][1] = b1 * x * z;                     dY[10][2] = b1 * x * y;
    dY[11][0] = -2 * b2 * x * y;             dY[11][1] = b2 * (4 * zz - xx - 3 * yy);    dY[11][2] = 8 * b2 * y * z;
    dY[12][0] = -6 * b3 * x * z;             dY[12][1] = -6 * b3 * y * z;  dY[12][2] = b3 * (6 * zz - 3 * xx - 3 * yy);
    dY[13][0] = b4 * (4 * zz - 3 * xx - yy); dY[13][1] = -2 * b4 * x * y;            dY[13][2] = 8 * b4 * x * z;
    dY[14][0] = 2 * b5 * x * z;              dY[14][1] = -2 * b5 * y * z;            dY[14][2] = b5 * (xx - yy);
    dY[15][0] = b6 * (3 * xx - 3 * yy);      dY[15][1] = -6 * b6 * x * y;            dY[15][2] = 0;
  }
  // clang-format on
}

// color[3] = max(sum_k Y_k(dir) sh[k] + 0.5, 0) with dir = (mean - campos) normalised;
// sh [K, 3] (only the first (degree+1)^2 rows are read).
template <typename T>
FAST3D_HD void sh_forward(int degree, const T* sh, const T* mean, const T campos[3], T color[3]) {
  T v[3] = {mean[0] - campos[0], mean[1] - campos[1], mean[2] - campos[2]};
  const T len = sqrt_(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  const T inv = len > T(0) ? T(1) / len : T(0);  // a Gaussian at the camera centre: direction 0, not NaN
  const T d[3] = {v[0] * inv, v[1] * inv, v[2] * inv};
  T Y[16];
  sh_basis<T>(degree, d, Y, nullptr);
  const int K = (degree + 1) * (degree + 1);
  for (int ch = 0; ch < 3; ++ch) {
    T s = T(0.5);
    for (int k = 0; k < K; ++k) s += Y[k] * sh[k * 3 + ch];
    color[ch] = max_(s, T(0));
  }
}

// Backward of sh_forward given dL/dcolor [3]; ADDS into g_sh [K, 3] and g_mean [3].
template <typename T>
FAST3D_HD void sh_backward(int degree, const T* sh, const T* mean, const T campos[3], const T g_color[3], T* g_sh,
                           T* g_mean) {
  T v[3] = {mean[0] - campos[0], mean[1] - campos[1], mean[2] - campos[2]};
  const T len = sqrt_(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
  const T inv = len > T(0) ? T(1) / len : T(0);  // a Gaussian at the camera centre: direction 0, not NaN
  const T d[3] = {v[0] * inv, v[1] * inv, v[2] * inv};
  T Y[16], dY[16][3];
  sh_basis<T>(degree, d, Y, dY);
  const int K = (degree + 1) * (degree + 1);
  T g_raw[3];
  for (int ch = 0; ch < 3; ++ch) {
    T s = T(0.5);
    for (int k = 0; k < K; ++k) s += Y[k] * sh[k * 3 + ch];
    g_raw[ch] = s >= T(0) ? g_color[ch] : T(0);  // clamp_min passes the gradient at >= 0
  }
  T gd[3] = {T(0), T(0), T(0)};
  for (int k = 0; k < K; ++k) {
    T gY = T(0);
    for (int ch = 0; ch < 3; ++ch) {
      g_sh[k * 3 + ch] += Y[k] * g_raw[ch];
      gY += sh[k * 3 + ch] * g_raw[ch];
    }
    for (int i = 0; i < 3; ++i) gd[i] += gY * dY[k][i];
  }
  // d = v / |v|: dL/dv = (gd - d <d, gd>) / |v|
  const T dot = gd[0] * d[0] + gd[1] * d[1] + gd[2] * d[2];
  for (int i = 0; i < 3; ++i) g_mean[i] += (gd[i] - d[i] * dot) * inv;
}

// --- per-pixel alpha -------------------------------------------------------------------------------

// raw = o exp(-q/2) at pixel centre (px, py); alpha = min(0.99, raw). Returns raw; vis = exp(-q/2).
// A product with exp, not 1 - exp: a fast exp's relative error (__expf under --use_fast_math: a few
// ulps for the q/2 <= ln(255 o) < 5.6 that can reach 1/255) stays relative in alpha, unlike the
// compositor's 1 - exp(-tau), which needs expm1 (composite_math.h).
template <typename T>
FAST3D_HD T gaussian_raw_alpha(const T m2[2], const T con[3], T opacity, T px, T py, T& dx, T& dy, T& vis) {
  dx = px - m2[0];
  dy = py - m2[1];
  const T q = con[0] * dx * dx + T(2) * con[1] * dx * dy + con[2] * dy * dy;
  vis = exp_(T(-0.5) * q);
  return opacity * vis;
}

// Backward of alpha = min(0.99, o exp(-q/2)) given dL/dalpha; ADDS into g_m2 [2], g_con [3],
// g_opac. No gradient where the clamp is active (raw > 0.99).
template <typename T>
FAST3D_HD void gaussian_alpha_backward(const T con[3], T opacity, T dx, T dy, T vis, T g_alpha, T g_m2[2], T g_con[3],
                                       T& g_opac) {
  if (opacity * vis > T(kAlphaMax)) return;
  g_opac += g_alpha * vis;
  const T g_q = T(-0.5) * g_alpha * opacity * vis;  // dL/dq
  g_con[0] += g_q * dx * dx;
  g_con[1] += g_q * T(2) * dx * dy;
  g_con[2] += g_q * dy * dy;
  // d = pixel - mean: dq/dmean = -2 conic d
  g_m2[0] += g_q * T(-2) * (con[0] * dx + con[1] * dy);
  g_m2[1] += g_q * T(-2) * (con[1] * dx + con[2] * dy);
}

}  // namespace gs
}  // namespace fast3d
