"""Pure-PyTorch twin of :func:`fast3d.rasterization`: the executable specification.

Dense (every Gaussian at every pixel), batched over B scenes x C cameras, differentiable by
autograd, any device, float64 included. The semantics are gsplat's / the INRIA rasterizer's:

The backend contract is three stages (fast3d/ops/rasterization/stages.py), chained by the public
function: project_stage, sh_stage and rasterize_stage here are the reference's.

Projection, per camera (viewmat = [R | t], world-to-camera, OpenCV axes; K = [[fx,0,cx],[0,fy,cy]]):

    q = quat / |quat| (wxyz),  Rq = rotation(q),  M = Rq diag(scale),  Sigma = M M^T  (or covars)
    p = R mean + t = (x, y, z),                    Sigma_c = R Sigma R^T
    valid iff near <= z <= far
    u = x / z, v = y / z;  uc = clamp(u, -cx/fx - 0.3 w/(2fx), (W-cx)/fx + 0.3 W/(2fx)) (same for v)
    J = [[fx/z, 0, -fx uc / z], [0, fy/z, -fy vc / z]]     (gsplat's pinhole Jacobian, clamped
                                                            to 1.3x the half field of view)
    Sigma2d = J Sigma_c J^T + eps2d I,  valid iff det(Sigma2d) > 0,  conic = Sigma2d^-1
    mean2d = (fx u + cx, fy v + cy),  depth = z
    orthographic camera: u = x, v = y and J = [[fx, 0, 0], [0, fy, 0]] (no clamp)
    "antialiased": opacity *= sqrt(max(0, det(Sigma2d - eps2d I) / det(Sigma2d)))

Colour: given per Gaussian (or per camera and Gaussian), or spherical harmonics of degree d
(0..3, gsplat/INRIA basis) at the direction dir = (mean - camera centre) / |...|:
color = max(sum_k Y_k(dir) sh_k + 0.5, 0).

Compositing at pixel centres c = (x + 0.5, y + 0.5), Gaussians in increasing depth (stable):

    alpha_i = min(0.99, o_i exp(-0.5 (c - mean2d_i)^T conic_i (c - mean2d_i)))
    live_i  = valid_i and alpha_i >= 1/255
    T_i     = prod_{j < i, used} (1 - alpha_j);  i is used iff live_i and T_i (1 - alpha_i) >= 1e-4
              (the first live Gaussian that would bring T below 1e-4 ends the pixel, unused)
    w_i     = alpha_i T_i for used i, else 0
    image   = sum_i w_i color_i + (1 - A) background,  A = sum_i w_i
    depth   = sum_i w_i z_i  (render mode D; ED divides by A, done by the caller)

The selection masks are piecewise constant: no gradient flows through them. Cameras (viewmats,
Ks) are constants. absgrad: the per-pixel gradients of each mean2d, summed in absolute value.

Screen extents and tile intersections (what the native backends bin; the dense composite needs
neither, but reports them so every backend's meta agrees):

    radii   = trunc(min(sqrt(2 ln(255 o) Sigma2d_kk) * 1.0001 + 1, 2^24)), k = x, y, for valid
              Gaussians with 255 o > 1 (where alpha >= 1/255 can hold; exact, plus a margin), else 0
    rect    = pixels whose centre lies within radii of mean2d, clipped to the image
    n_intersections = sum over images and Gaussians with a non-empty rect of the number of
              TILE x TILE tiles the rect touches
"""

from __future__ import annotations

import torch
from torch import Tensor

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
TILE = 16  # tile side in pixels: gs::kTile of csrc/gaussians/gaussian_math.h (a test ties the two)
RADIUS_MAX = 2 ** 24  # radii saturate here: gs::kRadiusMax (tested equal, as TILE)

SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
         1.445305721320277, -0.5900435899266435)


def quat_to_rotmat(quats: Tensor) -> Tensor:  # [..., 4] wxyz, any norm -> [..., 3, 3]
    w, x, y, z = (quats / quats.norm(dim=-1, keepdim=True)).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).unflatten(-1, (3, 3))


def project(means: Tensor,            # [B, N, 3]
            quats: Tensor | None,     # [B, N, 4], or None with covars
            scales: Tensor | None,    # [B, N, 3], or None with covars
            opacities: Tensor,        # [B, N]
            viewmats: Tensor,         # [B, C, 4, 4]
            Ks: Tensor,               # [B, C, 3, 3]
            width: int, height: int, near: float, far: float, eps2d: float, antialiased: bool,
            covars: Tensor | None = None,  # [B, N, 3, 3] symmetric positive definite, instead of quats/scales
            camera_model: str = "pinhole"):
    """EWA projection. Returns means2d [B, C, N, 2], conics [B, C, N, 3] (xx, xy, yy of the
    inverse 2D covariance), depths [B, C, N], effective opacities [B, C, N] and valid [B, C, N].

    ``covars`` gives the world-space covariances directly (quats and scales unused);
    ``camera_model="ortho"`` projects orthographically: mean2d = (fx x + cx, fy y + cy) and the
    constant Jacobian J = [[fx, 0, 0], [0, fy, 0]] (depth culling as for the pinhole)."""
    viewmats, Ks = viewmats.detach(), Ks.detach()
    Rc, tc = viewmats[..., :3, :3], viewmats[..., :3, 3]                     # [B, C, 3, 3], [B, C, 3]
    p = torch.einsum("bcij,bnj->bcni", Rc, means) + tc[:, :, None]            # [B, C, N, 3]
    if covars is None:
        M = quat_to_rotmat(quats) * scales[..., None, :]                      # [B, N, 3, 3]
        cov = M @ M.transpose(-1, -2)                                         # [B, N, 3, 3]
    else:
        cov = covars
    cov_c = Rc[:, :, None] @ cov[:, None] @ Rc.transpose(-1, -2)[:, :, None]  # [B, C, N, 3, 3]
    x, y, z = p.unbind(-1)                                                    # [B, C, N]
    valid = (z >= near) & (z <= far)
    z = torch.where(valid, z, torch.ones_like(z))  # stand-in values keep invalid entries finite
    x, y = torch.where(valid, x, torch.zeros_like(x)), torch.where(valid, y, torch.zeros_like(y))
    fx, fy, cx, cy = (Ks[..., i, j][..., None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))  # [B, C, 1]
    zero = torch.zeros_like(z)
    if camera_model == "ortho":
        u, v = x, y
        J = torch.stack([fx.expand_as(z), zero, zero, zero, fy.expand_as(z), zero], -1).unflatten(-1, (2, 3))
    else:
        u, v = x / z, y / z
        uc = torch.clamp(u, -(cx / fx + 0.15 * width / fx), (width - cx) / fx + 0.15 * width / fx)
        vc = torch.clamp(v, -(cy / fy + 0.15 * height / fy), (height - cy) / fy + 0.15 * height / fy)
        J = torch.stack([fx / z, zero, -fx * uc / z, zero, fy / z, -fy * vc / z], -1).unflatten(-1, (2, 3))
    cov2d = J @ cov_c @ J.transpose(-1, -2)                                   # [B, C, N, 2, 2]
    a, b, c = cov2d[..., 0, 0] + eps2d, cov2d[..., 0, 1], cov2d[..., 1, 1] + eps2d
    det = a * c - b * b
    valid = valid & (det > 0)
    det = torch.where(valid, det, torch.ones_like(det))
    conics = torch.stack([c / det, -b / det, a / det], -1)                    # [B, C, N, 3]
    means2d = torch.stack([fx * u + cx, fy * v + cy], -1)                     # [B, C, N, 2]
    opac = opacities[:, None].expand_as(z)                                    # [B, C, N]
    if antialiased:
        r = ((a - eps2d) * (c - eps2d) - b * b) / det
        pos = r > 0
        opac = opac * torch.where(pos, torch.sqrt(torch.where(pos, r, torch.ones_like(r))), torch.zeros_like(r))
    # Culled Gaussians: stand-in values mean2d 0, conic (1, 0, 1), opacity 0 (the native kernels' too).
    means2d = torch.where(valid[..., None], means2d, torch.zeros_like(means2d))
    conics = torch.where(valid[..., None], conics, conics.new_tensor([1.0, 0.0, 1.0]))
    opac = torch.where(valid, opac, torch.zeros_like(opac))
    return means2d, conics, p[..., 2], opac, valid


def sh_basis(dirs: Tensor, degree: int) -> Tensor:  # [..., 3] unit -> [..., (degree + 1)^2]
    """Real spherical-harmonics basis Y_k(dir) of degrees 0..degree, in the gsplat/INRIA order and
    sign convention (the constants SH_C*)."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [SH_C2[0] * x * y, SH_C2[1] * y * z, SH_C2[2] * (2 * zz - xx - yy), SH_C2[3] * x * z,
                SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [SH_C3[0] * y * (3 * xx - yy), SH_C3[1] * x * y * z, SH_C3[2] * y * (4 * zz - xx - yy),
                SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), SH_C3[4] * x * (4 * zz - xx - yy),
                SH_C3[5] * z * (xx - yy), SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def sh_colors(sh: Tensor,        # [B, N, K, 3], K >= (degree + 1)^2
              degree: int,
              means: Tensor,     # [B, N, 3]
              viewmats: Tensor,  # [B, C, 4, 4]
              ) -> Tensor:       # [B, C, N, 3]
    """Colours seen from each camera: max(sum_k Y_k(dir) sh_k + 0.5, 0), dir the unit vector from
    the camera centre (-R^T t) to the mean; the first (degree + 1)^2 coefficients are used."""
    viewmats = viewmats.detach()
    Rc, tc = viewmats[..., :3, :3], viewmats[..., :3, 3]
    campos = -torch.einsum("bcji,bcj->bci", Rc, tc)                           # [B, C, 3]
    # Degree 0's basis is the constant Y_0: the directions only give it its shape, so they are made
    # without autograd. A branch recorded but unused by the result is never run by backward, so its
    # saved tensors are never released; a saved-tensor hook that keeps them (save_on_cpu on CPU, or
    # one that returns the tensor) closes a cycle with the branch's nodes that gc cannot break.
    dirs = (means if degree > 0 else means.detach())[:, None] - campos[:, :, None]  # [B, C, N, 3]
    basis = sh_basis(dirs / dirs.norm(dim=-1, keepdim=True).clamp_min(1e-30), degree)          # [B, C, N, K']
    k = (degree + 1) ** 2
    return torch.clamp_min(torch.einsum("bcnk,bnkd->bcnd", basis, sh[:, :, :k]) + 0.5, 0.0)


def composite_dense(means2d: Tensor,  # [I, N, 2]
                    conics: Tensor,   # [I, N, 3]
                    opac: Tensor,     # [I, N]
                    colors: Tensor,   # [I, N, D]
                    depths: Tensor,   # [I, N]
                    valid: Tensor,    # [I, N] bool
                    width: int, height: int,
                    absgrad_out: Tensor | None = None,  # [I, N, 2] float64 buffer filled during backward
                    ) -> tuple[Tensor, Tensor]:         # image [I, H, W, D], alpha [I, H, W, 1]
    """Front-to-back alpha compositing of every Gaussian at every pixel centre of I images (the
    module docstring's rules), depth-sorted (stable); invalid Gaussians sort last and never blend."""
    I, N, D = colors.shape
    order = torch.argsort(torch.where(valid, depths, torch.full_like(depths, float("inf"))), dim=-1, stable=True)
    take = lambda t: torch.gather(t, 1, order.view(I, N, *[1] * (t.dim() - 2)).expand_as(t))  # noqa: E731
    m2, con, o, col, ok = take(means2d), take(conics), take(opac), take(colors), take(valid)
    ys, xs = torch.meshgrid(torch.arange(height, device=m2.device, dtype=m2.dtype) + 0.5,
                            torch.arange(width, device=m2.device, dtype=m2.dtype) + 0.5, indexing="ij")
    pix = torch.stack([xs, ys], -1).reshape(-1, 2)                            # [P, 2]
    m2e = m2[:, None].expand(I, pix.shape[0], N, 2)                           # [I, P, N, 2]
    if absgrad_out is not None and m2e.requires_grad:
        def hook(g):  # g [I, P, N, 2]: the gradient of each pixel's copy of each mean2d
            absgrad_out.scatter_(1, order[..., None].expand(I, N, 2), g.abs().sum(1).to(absgrad_out.dtype))
        m2e.register_hook(hook)
    d = pix[None, :, None, :] - m2e                                           # [I, P, N, 2]
    q = con[:, None, :, 0] * d[..., 0] ** 2 + 2 * con[:, None, :, 1] * d[..., 0] * d[..., 1] \
        + con[:, None, :, 2] * d[..., 1] ** 2                                 # [I, P, N]
    raw = o[:, None, :] * torch.exp(-0.5 * q)
    alpha = torch.clamp(raw, max=ALPHA_MAX)
    live = ok[:, None, :] & (raw >= ALPHA_MIN)
    a = torch.where(live, alpha, torch.zeros_like(alpha))
    used = live & (torch.cumprod(1 - a.detach(), -1) >= T_MIN)
    a = torch.where(used, a, torch.zeros_like(a))
    t_incl = torch.cumprod(1 - a, -1)
    trans = torch.cat([torch.ones_like(t_incl[..., :1]), t_incl[..., :-1]], -1)  # T_i, [I, P, N]
    w = a * trans
    image = torch.einsum("ipn,ind->ipd", w, col)                              # [I, P, D]
    acc = w.sum(-1, keepdim=True)                                             # [I, P, 1]
    return image.view(I, height, width, D), acc.view(I, height, width, 1)


def screen_radii(conics: Tensor,  # [..., N, 3]
                 opac: Tensor,    # [..., N]
                 valid: Tensor,   # [..., N] bool
                 ) -> Tensor:     # [..., N, 2] int32
    """Pixel half-extents (x, y) of the region where alpha >= 1/255 can hold: o exp(-q/2) >= 1/255
    iff q <= t = 2 ln(255 o), and {d : d^T Sigma2d^-1 d <= t} has half-widths sqrt(t Sigma2d_xx),
    sqrt(t Sigma2d_yy), with Sigma2d recovered from the conic. Same rounding as the kernels'."""
    A, B, C = conics.unbind(-1)
    inv_det = A * C - B * B                                                   # 1 / det(Sigma2d)
    sigma = torch.stack([C / inv_det, A / inv_det], -1)                       # Sigma2d_xx, Sigma2d_yy
    live = valid & (opac * 255 > 1)
    t = 2 * torch.log(torch.where(live, opac * 255, torch.ones_like(opac)))
    r = torch.clamp(torch.sqrt(t[..., None] * sigma) * 1.0001 + 1, max=RADIUS_MAX).trunc()
    return torch.where(live[..., None], r, torch.zeros_like(r)).to(torch.int32)


def tile_intersections(means2d: Tensor,  # [..., N, 2]
                       radii: Tensor,    # [..., N, 2] int32
                       width: int, height: int) -> Tensor:  # [..., N] int64
    """Number of TILE x TILE tiles each Gaussian's pixel rect touches (0 when it misses the
    image): centres x + 0.5 with |x + 0.5 - mx| <= r, i.e. ceil(mx - r - 0.5) <= x <= floor(mx + r
    - 0.5), clipped to the image."""
    size = means2d.new_tensor([width, height])
    r = radii.to(means2d.dtype)
    lo = torch.minimum(torch.clamp(means2d - r - 0.5, min=-1), size).ceil().clamp(min=0).long()      # first pixel
    hi = torch.minimum(torch.clamp(means2d + r - 0.5, min=-1), size).floor().long() + 1              # past the last
    hi = torch.minimum(hi, size.long())
    hit = (radii > 0).all(-1) & (hi > lo).all(-1)
    tiles = (torch.div(hi - 1, TILE, rounding_mode="floor") + 1 - torch.div(lo, TILE, rounding_mode="floor")).prod(-1)
    return torch.where(hit, tiles, torch.zeros_like(tiles))


def project_stage(means: Tensor,             # [B, N, 3]
                  quats: Tensor | None,      # [B, N, 4], or None with covars
                  scales: Tensor | None,     # [B, N, 3], or None with covars
                  opacities: Tensor,         # [B, N]
                  viewmats: Tensor,          # [B, C, 4, 4]
                  Ks: Tensor,                # [B, C, 3, 3]
                  width: int, height: int, near: float, far: float, eps2d: float, antialiased: bool,
                  covars: Tensor | None = None,  # [B, N, 3, 3]
                  camera_model: str = "pinhole"):
    """The projection stage of the backend contract (:class:`~fast3d.ops.rasterization.stages.RasterStages`).

    Returns:
        means2d [B, C, N, 2], conics [B, C, N, 3], depths [B, C, N], opacities [B, C, N] (after
        the antialiasing compensation; 0 where culled) and radii [B, C, N, 2] int32 (0 where
        culled or where no pixel can reach alpha 1/255).
    """
    means2d, conics, depths, opac, valid = project(means, quats, scales, opacities, viewmats, Ks, width, height, near,
                                                   far, eps2d, antialiased, covars, camera_model)
    return means2d, conics, depths, opac, screen_radii(conics.detach(), opac.detach(), valid)


def sh_stage(sh: Tensor,        # [B, N, K, 3]
             means: Tensor,     # [B, N, 3]
             viewmats: Tensor,  # [B, C, 4, 4]
             degree: int) -> Tensor:  # [B, C, N, 3]
    """The SH stage of the backend contract: :func:`sh_colors`."""
    return sh_colors(sh, degree, means, viewmats)


def rasterize_stage(means2d: Tensor,  # [I, N, 2]
                    conics: Tensor,   # [I, N, 3]
                    opac: Tensor,     # [I, N]
                    feats: Tensor,    # [I, N, D]
                    depths: Tensor,   # [I, N]
                    radii: Tensor,    # [I, N, 2] int32; 0: not rendered
                    width: int, height: int, deterministic: bool, capacity: int | None, absgrad: bool):
    """The rasterization stage of the backend contract: the Gaussians with radii > 0 composited
    into I images (dense, deterministic; renders every Gaussian whatever the capacity).

    Returns:
        image [I, H, W, D], alpha [I, H, W, 1], n_intersections (0-dim int64: the Gaussian-tile
        pairs the native backends bin) and, with absgrad, an [I, N, 2] buffer the backward fills
        with the summed |per-pixel gradient| of each 2D mean (else None).
    """
    I, N = opac.shape
    absgrad_buf = means2d.new_zeros(I, N, 2) if absgrad else None
    valid = (radii > 0).all(-1)
    image, alpha = composite_dense(means2d, conics, opac, feats, depths, valid, width, height, absgrad_buf)
    n_isect = tile_intersections(means2d.detach(), radii, width, height).sum()
    return image, alpha, n_isect, absgrad_buf
