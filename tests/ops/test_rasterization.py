"""Tests of fast3d.rasterization (3D Gaussian splatting).

The native backends (`cpu`; `cuda` on a GPU) are compared with the dense PyTorch twin
`fast3d.ops.rasterization.reference` in float64 on the same (upcast) inputs: rendered images and
alphas, and the gradients of means, quats, scales, opacities, colours/SH and backgrounds for random
upstream gradients. Scenes mix ordinary Gaussians with ones behind the camera, beyond the far
plane, outside the frustum, huge, tiny and nearly opaque; odd image sizes, several B and C, SH
degrees 0-3, every render mode, antialiased. Also: exact screen extents (no alpha >= 1/255 pixel
outside a Gaussian's radii), absgrad, determinism, empty scenes, batch shapes, half precision,
torch.compile, input validation (of the public function, and of the native entry points called
directly), and a cross-check of the reference against gsplat's own PyTorch implementation when
gsplat is installed. Every test draws fresh inputs from the `gen` fixture. The intersection count,
the capacity mode and the int32 intersection guard: test_rasterization_capacity.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close, random_like

from fast3d import backends
from fast3d.ops.rasterization import bench, rasterization, reference

OP = "rasterization"

# dtype -> (atol, rtol) of a backend's outputs / gradients against the float64 reference.
TOL = {
    # cpu float64: same formulas in a different order (per-pixel sequential sums, T recovered by
    # division in the backward instead of cumprod): measured worst |diff| ~1e-12 on gradients
    # of size ~10-100 (r1 sweep: every mode x SH degree x antialiased).
    torch.float64: (1e-9, 1e-8),
    # float32 kernels: exp/conic rounding ~1e-6 relative per alpha, carried through the blended
    # Gaussians of a pixel and summed over the pixels of each Gaussian gradient. Measured (6 seeds
    # x CASES, ties cleared): worst |diff| / max|ref| 1.3e-6 on images, 1.8e-5 on gradients (quats,
    # ED mode); atol is applied relative to the largest reference element (see compare), 10x margin.
    torch.float32: (2e-4, 1e-3),
}

NATIVE = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def require(backend: str) -> None:
    reason = backends.availability(OP)[backend]
    if reason:
        pytest.skip(f"backend {backend!r} unavailable: {reason}")


def make_scene(gen: torch.Generator, B: int, C: int, N: int, W: int, H: int, *, sh_degree=None, D: int = 3,
               per_camera: bool = False, background: bool = True, odd: bool = True) -> dict:
    """Orbit cameras at distance 3 around Gaussians in a 1.6-wide cube; with odd=True every fifth
    Gaussian is moved behind the first camera, past the far plane of 1e10's test value (100),
    far outside the frustum, made huge, tiny, or nearly opaque."""
    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    means = (rand(B, N, 3) - 0.5) * 1.6
    quats = torch.randn(B, N, 4, generator=gen, dtype=torch.float64)
    scales = 0.02 + 0.12 * rand(B, N, 3)
    opacities = 0.05 + 0.9 * rand(B, N)
    viewmats, Ks = bench.orbit_cameras(B, C, W, H, gen)
    viewmats, Ks = viewmats.double(), Ks.double()
    if odd:  # (positions jittered: Gaussians at one depth would have no defined order)
        eye = -(viewmats[:, 0, :3, :3].transpose(-1, -2) @ viewmats[:, 0, :3, 3:])[..., 0]  # [B, 3]
        for k in range(0, N, 5):
            kind = (k // 5) % 6
            if kind == 0:    # behind the first camera
                means[:, k] = eye * 1.5 + 0.1 * rand(B, 3)
            elif kind == 1:  # past the far plane
                means[:, k] = -eye * 50 + rand(B, 3)
            elif kind == 2:  # far outside the frustum (clamped Jacobian)
                means[:, k] = torch.tensor([4.0, -3.0, 0.5], dtype=torch.float64) + 0.3 * rand(B, 3)
            elif kind == 3:  # huge
                scales[:, k] = 0.8 + rand(B, 3)
            elif kind == 4:  # tiny
                scales[:, k] = 1e-4 * (1 + rand(B, 3))
            else:            # nearly opaque
                opacities[:, k] = 0.995 + 0.005 * rand(B)
    if sh_degree is None:
        colors = rand(B, C, N, D) if per_camera else rand(B, N, D)
    else:
        colors = torch.randn(B, N, (sh_degree + 1) ** 2 + 1, 3, generator=gen, dtype=torch.float64) * 0.4
    bg = rand(B, C, D if sh_degree is None else 3) if background else None
    return dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors, viewmats=viewmats,
                Ks=Ks, backgrounds=bg, width=W, height=H, sh_degree=sh_degree)


DIFF = ("means", "quats", "scales", "opacities", "colors", "backgrounds")


def render(x: dict, backend: str, dtype=torch.float64, **kw):
    """(render, alpha, meta, grad fn) of `backend` on x cast to dtype; the grad fn maps upstream
    gradients to the gradients of every DIFF input."""
    kw = dict(dict(far_plane=100.0), **kw)
    leaves = {k: x[k].detach().to(dtype).requires_grad_() for k in DIFF if x[k] is not None}
    args = {k: leaves.get(k, None if x[k] is None else x[k].to(dtype)) for k in DIFF}
    out, alpha, meta = rasterization(args["means"], args["quats"], args["scales"], args["opacities"], args["colors"],
                                     x["viewmats"].to(dtype), x["Ks"].to(dtype), x["width"], x["height"],
                                     sh_degree=x["sh_degree"], backgrounds=args["backgrounds"], backend=backend, **kw)

    def grad(g_out, g_alpha):
        pairs = [(o, g.to(o.device, dtype)) for o, g in ((out, g_out), (alpha, g_alpha)) if o.requires_grad]
        gs = torch.autograd.grad([o for o, _ in pairs], list(leaves.values()), [g for _, g in pairs],
                                 allow_unused=True, retain_graph=True)
        return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), gs)}

    return out, alpha, meta, grad


def clear_of_ties(x: dict, rasterize_mode: str = "classic", margin: float = 2e-3) -> dict:
    """Nudge the opacities of Gaussians whose float64 alpha at some pixel lies within `margin`
    (relative) of the 1/255 cut or whose inclusive transmittance lies within it of 1e-4: there a
    float32 kernel may decide differently from the float64 reference (a jump of ~1/255 in the
    image), which is rounding, not a bug."""
    x = dict(x)
    op = x["opacities"].clone()
    B, N = op.shape
    C = x["viewmats"].shape[1]
    for _ in range(50):
        m2, con, depths, opac, valid = reference.project(x["means"], x["quats"], x["scales"], op, x["viewmats"],
                                                         x["Ks"], x["width"], x["height"], 0.01, 100.0, 0.3,
                                                         rasterize_mode == "antialiased")
        I, W, H = B * C, x["width"], x["height"]
        ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64) + 0.5, torch.arange(W, dtype=torch.float64) + 0.5,
                                indexing="ij")
        pix = torch.stack([xs, ys], -1).reshape(-1, 2)
        order = torch.argsort(torch.where(valid, depths, torch.full_like(depths, math.inf)).reshape(I, N), dim=-1,
                              stable=True)
        take = lambda t: torch.gather(t.reshape(I, N, -1), 1, order[..., None].expand(I, N, t.reshape(I, N, -1).shape[-1]))  # noqa: E731
        m2s, cons, ops, oks = take(m2), take(con), take(opac)[..., 0], take(valid)[..., 0]
        d = pix[None, :, None, :] - m2s[:, None]
        q = cons[:, None, :, 0] * d[..., 0] ** 2 + 2 * cons[:, None, :, 1] * d[..., 0] * d[..., 1] \
            + cons[:, None, :, 2] * d[..., 1] ** 2
        raw = ops[:, None] * torch.exp(-0.5 * q)
        live = oks[:, None] & (raw >= 1 / 255)
        t_incl = torch.cumprod(1 - torch.where(live, raw.clamp(max=0.99), torch.zeros_like(raw)), -1)
        tie = oks[:, None] & (((raw * 255 - 1).abs() < margin) | (live & ((t_incl / 1e-4 - 1).abs() < margin * 10)))
        bad = tie.any(1)                                                       # [I, N] in sorted order
        if not bad.any():
            return dict(x, opacities=op)
        hit = torch.zeros(I, N, dtype=torch.bool).scatter_(1, order, bad).reshape(B, C, N).any(1)  # [B, N]
        op = torch.where(hit, op * 0.93, op)
    raise AssertionError("could not move the scene away from the alpha / transmittance cut-offs")


def compare(x: dict, backend: str, dtype, gen, tol, **kw) -> None:
    ref_out, ref_alpha, _, ref_grad = render(x, "torch", torch.float64, **kw)
    out, alpha, meta, grad = render(x, backend, dtype, **kw)
    assert meta["backend"] == backend
    assert out.dtype == dtype and out.shape == ref_out.shape and alpha.shape == ref_alpha.shape
    atol, rtol = tol
    assert_close(out, ref_out, atol=atol, rtol=rtol, name=f"{backend} render")
    assert_close(alpha, ref_alpha, atol=atol, rtol=rtol, name=f"{backend} alpha")
    g_out, g_alpha = random_like(ref_out, gen), random_like(ref_alpha, gen)
    g_ref, g = ref_grad(g_out, g_alpha), grad(g_out, g_alpha)
    for k in g_ref:
        scale = g_ref[k].abs().max().item() + 1e-30
        assert_close(g[k], g_ref[k], atol=atol * scale, rtol=rtol, name=f"{backend} grad {k}")


# --- native backends vs the reference ----------------------------------------------------------

CASES = [  # (B, C, N, W, H, sh_degree, render_mode, rasterize_mode)
    (1, 1, 41, 33, 17, None, "RGB", "classic"),
    (2, 3, 67, 37, 29, 0, "RGB+D", "classic"),
    (1, 2, 53, 48, 31, 1, "RGB", "antialiased"),
    (2, 2, 45, 17, 40, 2, "RGB+ED", "classic"),
    (1, 3, 61, 35, 35, 3, "RGB+D", "antialiased"),
    (3, 1, 29, 21, 19, None, "D", "classic"),
    (2, 2, 37, 31, 23, None, "ED", "antialiased"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}N{}-{}x{}-sh{}-{}-{}".format(*c))
@pytest.mark.parametrize("backend", NATIVE)
def test_native_float32_matches_reference(backend, case, gen):
    require(backend)
    B, C, N, W, H, sh, mode, rmode = case
    x = make_scene(gen, B, C, N, W, H, sh_degree=sh, background=mode.startswith("RGB"))
    x = clear_of_ties(x, rmode)
    if backend == "cuda":
        x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    tol = TOL[torch.float32]
    if "ED" in mode:  # depth / alpha: alpha >= 1/255 where non-zero, so 255x the depth error
        tol = (tol[0] * 10, tol[1] * 10)
    compare(x, backend, torch.float32, gen, tol, render_mode=mode, rasterize_mode=rmode)


@pytest.mark.parametrize("case", CASES[:5], ids=lambda c: "B{}C{}N{}-{}x{}-sh{}-{}-{}".format(*c))
def test_cpu_float64_matches_reference_tightly(case, gen):
    require("cpu")
    B, C, N, W, H, sh, mode, rmode = case
    x = make_scene(gen, B, C, N, W, H, sh_degree=sh, background=mode.startswith("RGB"))
    tol = TOL[torch.float64] if "ED" not in mode else (1e-6, 1e-6)
    compare(x, "cpu", torch.float64, gen, tol, render_mode=mode, rasterize_mode=rmode)


@pytest.mark.parametrize("backend", NATIVE)
def test_per_camera_colors_many_channels(backend, gen):
    require(backend)
    x = make_scene(gen, 2, 3, 31, 23, 19, D=7, per_camera=True)
    if backend == "cuda":
        x = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    compare(x, backend, torch.float64 if backend == "cpu" else torch.float32, gen,
            TOL[torch.float64] if backend == "cpu" else TOL[torch.float32])


def test_screen_extent_is_exact(gen):
    """Every pixel where a Gaussian's alpha reaches 1/255 lies within the radii the projection
    reports: tile culling cannot drop a contribution. The radii are also not loose: rounded up
    from the exact half-extents, so within ~1 px + 0.01% of them."""
    require("cpu")
    x = make_scene(gen, 1, 2, 80, 64, 48)
    _, _, meta, _ = render(x, "cpu", torch.float64)
    m2, con, _, opac, valid = reference.project(x["means"], x["quats"], x["scales"], x["opacities"],
                                                x["viewmats"], x["Ks"], 64, 48, 0.01, 100.0, 0.3, False)
    radii = meta["radii"][0]                                                  # [C, N, 2]
    ys, xs = torch.meshgrid(torch.arange(48.0, dtype=torch.float64) + 0.5, torch.arange(64.0, dtype=torch.float64) + 0.5,
                            indexing="ij")
    d = torch.stack([xs, ys], -1).reshape(-1, 1, 1, 2) - m2[0][None]          # [P, C, N, 2]
    con = con[0][None]
    q = con[..., 0] * d[..., 0] ** 2 + 2 * con[..., 1] * d[..., 0] * d[..., 1] + con[..., 2] * d[..., 1] ** 2
    reach = valid[0][None] & (opac[0][None] * torch.exp(-0.5 * q) >= 1 / 255)
    assert reach.any()
    inside = (d[..., 0].abs() <= radii[None, ..., 0]) & (d[..., 1].abs() <= radii[None, ..., 1])
    assert not (reach & ~inside).any(), "a pixel with alpha >= 1/255 lies outside its Gaussian's radii"
    assert ((radii > 0) == (valid[0] & (opac[0] > 1 / 255))[..., None]).all()


@pytest.mark.parametrize("backend", NATIVE)
def test_absgrad(backend, gen):
    """meta["means2d"].absgrad after backward: summed |per-pixel gradient| of each 2D mean."""
    require(backend)
    x = make_scene(gen, 1, 2, 31, 29, 23)
    dev = "cuda" if backend == "cuda" else "cpu"
    x = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    dtype = torch.float64 if backend == "cpu" else torch.float32
    got = []
    for be, dt in (("torch", torch.float64), (backend, dtype)):
        out, alpha, meta, grad = render(x, be, dt, absgrad=True)
        torch.manual_seed(0)
        grad(torch.randn(out.shape, dtype=torch.float64), torch.randn(alpha.shape, dtype=torch.float64))
        got.append(meta["means2d"].absgrad)
    assert got[0].abs().sum() > 0
    assert_close(got[1], got[0], atol=1e-8 if dtype == torch.float64 else 1e-3 * got[0].abs().max().item(),
                 rtol=1e-6 if dtype == torch.float64 else 2e-3, name="absgrad")


@pytest.mark.parametrize("kw", [dict(sh_degree=0), dict(absgrad=True, channel_chunk=2), dict(absgrad=True, packed=True)],
                         ids=["sh0", "absgrad-chunks", "absgrad-packed"])
@pytest.mark.parametrize("backend", ["torch", *NATIVE])
def test_a_call_and_its_backward_keep_nothing_alive(backend, kw, gen):
    """After a call, its backward and dropping its outputs, no tensor autograd saved survives and
    meta["means2d"] is freed: nothing closes a cycle through C++ autograd state that gc cannot see
    (the reference's unused degree-0 direction branch; the absgrad hook holding means2d, or a native
    buffer whose node is downstream of the hook)."""
    import gc
    import weakref

    require(backend)
    dev = "cuda" if backend == "cuda" else "cpu"
    sh_degree = kw.pop("sh_degree", None)
    x = make_scene(gen, 1, 3, 24, 19, 17, sh_degree=sh_degree, D=5 if sh_degree is None else 3)
    x = {k: v.to(dev, torch.float32) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    leaves = [x[k].requires_grad_() for k in DIFF if x[k] is not None]
    refs = []

    def pack(t):  # kept as is: an unreleased saved output then stays alive (the refine test's probe)
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, alpha, meta = rasterization(x["means"], x["quats"], x["scales"], x["opacities"], x["colors"],
                                         x["viewmats"], x["Ks"], x["width"], x["height"], sh_degree=sh_degree,
                                         backgrounds=x["backgrounds"], far_plane=100.0, backend=backend, **kw)
        (out.sum() + alpha.sum()).backward()
    assert meta["backend"] == backend and refs
    if kw.get("absgrad"):
        assert meta["means2d"].absgrad.abs().sum() > 0
    means2d = weakref.ref(meta["means2d"])
    del out, alpha, meta
    gc.collect()
    keep = {t.untyped_storage().data_ptr() for t in [*leaves, x["viewmats"], x["Ks"]]}
    alive = [w() for w in refs if w() is not None and w().untyped_storage().data_ptr() not in keep]
    assert not alive, [(tuple(t.shape), type(t.grad_fn).__name__) for t in alive]
    assert means2d() is None, "meta['means2d'] outlives the call: a reference cycle gc cannot break"


@pytest.mark.parametrize("backend", NATIVE)
def test_deterministic_gradients_are_bit_identical(backend, gen):
    require(backend)
    x = make_scene(gen, 2, 2, 301, 45, 37, sh_degree=2)
    dev = "cuda" if backend == "cuda" else "cpu"
    x = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    results = []
    for _ in range(3):
        out, alpha, _, grad = render(x, backend, torch.float32, deterministic=True)
        g = grad(torch.ones_like(out), torch.ones_like(alpha))
        results.append((out, alpha, g))
    for out, alpha, g in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(alpha, results[0][1])
        for k in g:
            assert torch.equal(g[k], results[0][2][k]), k


def _random_binning(gen: torch.Generator, I: int, N: int, tiles: int, D: int):
    """A binning as the CUDA forward makes it, for the deterministic reduction: each of the I * N
    Gaussians meets 0..4 distinct tiles of its image (pre-sort indices k in Gaussian order, tiles
    ascending), sorted by image | tile | depth. Returns rows [n, 8 + D] (float32, random),
    isect_src [n] (pre-sort index of each sorted intersection) and gauss_offsets [I * N + 1]."""
    G = I * N
    counts = torch.randint(0, 5, (G,), generator=gen)
    counts[torch.randint(0, G, (G // 7,), generator=gen)] = 0  # Gaussians that miss the image
    tile = torch.cat([torch.randperm(tiles, generator=gen)[:c].sort().values for c in counts.tolist()])
    owner = torch.repeat_interleave(torch.arange(G), counts)
    depth_rank = torch.randperm(G, generator=gen)[owner]  # one depth per Gaussian, all distinct
    key = ((owner // N) * tiles + tile) * G + depth_rank
    isect_src = torch.argsort(key, stable=True).to(torch.int32)
    gauss_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = torch.randn(len(key), 8 + D, generator=gen) * torch.rand(len(key), 1, generator=gen) * 10
    return rows, isect_src, gauss_offsets


def test_deterministic_reduction_same_bits_for_every_pass_size(gen):
    """The deterministic CUDA backward's reduction (csrc/gaussians/isect_rows.h), run on the CPU:
    each Gaussian's gradient is the float32 sum of its intersection rows in pre-sort order, bit for
    bit, whether the sorted intersections come in one pass or in passes of any size."""
    require("cpu")
    from fast3d import _native

    m = _native.module()
    I, N, tiles, D = 3, 41, 12, 5
    rows, isect_src, gauss_offsets = _random_binning(gen, I, N, tiles, D)
    n = rows.shape[0]
    sorted_of = torch.empty(n, dtype=torch.int64)
    sorted_of[isect_src.long()] = torch.arange(n)
    want = torch.zeros(I * N, 8 + D)
    for g in range(I * N):
        for k in range(int(gauss_offsets[g]), int(gauss_offsets[g + 1])):
            want[g] = want[g] + rows[sorted_of[k]]  # float32 adds, in k order
    results = {p: m.gs_reduce_isect_rows(rows, isect_src, gauss_offsets, p) for p in (None, n, max(1, n // 3), 7, 2, 1)}
    for p, (g_m2, g_con, g_op, g_f, g_abs) in results.items():
        got = torch.cat([g_m2, g_con, g_op[:, None], g_abs, g_f], 1)
        assert torch.equal(got, want), f"pass_rows={p}"


GS_REDUCE_BAD = {  # case: (change of (rows, isect_src, gauss_offsets, pass_rows), message fragment)
    "rows-rank": (lambda r, s, o, p: (r[0], s, o, p), "rows must have shape [n, 8 + D] (2 dims)"),
    "rows-narrow": (lambda r, s, o, p: (r[:, :7], s, o, p), "rows must have shape [n, 8 + D]"),
    "src-length": (lambda r, s, o, p: (r, s[:-1], o, p), "isect_src must have shape [n] (n = rows.size(0))"),
    "src-dtype": (lambda r, s, o, p: (r, s.long(), o, p), "isect_src has dtype Long, expected Int"),
    "src-not-permutation": (lambda r, s, o, p: (r, torch.zeros_like(s), o, p), "isect_src must be a permutation"),
    "offsets-end": (lambda r, s, o, p: (r, s, o - 1, p), "gauss_offsets must rise from 0 to n"),
    "pass-rows": (lambda r, s, o, p: (r, s, o, 0), "pass_rows must be >= 1; got 0"),
    "rows-device": (lambda r, s, o, p: (r.to("meta"), s, o, p), "rows is on meta"),
}


@pytest.mark.parametrize("case", list(GS_REDUCE_BAD))
def test_deterministic_reduction_rejects_bad_inputs(case, gen):
    require("cpu")
    from fast3d import _native

    change, message = GS_REDUCE_BAD[case]
    args = change(*_random_binning(gen, 2, 9, 6, 3), None)
    with pytest.raises(RuntimeError) as info:
        _native.module().gs_reduce_isect_rows(*args)
    assert message in str(info.value)


def test_deterministic_pass_rows_bound_the_row_memory():
    """The deterministic CUDA backward holds at most gs_deterministic_row_bytes of intersection
    rows: 50 M intersections at D = 64 (14.4 GB of rows in one pass) take ceil(n / rows) passes."""
    require("cpu")
    from fast3d import _native

    m = _native.module()
    budget = m.gs_deterministic_row_bytes
    for n, D in [(50_000_000, 64), (50_000_000, 3), (3_000_000, 17), (1000, 64), (2**31 - 1, 1)]:
        row = (8 + D) * 4
        rows = m.gs_deterministic_pass_rows(n, D)
        if n * row <= budget:
            assert rows == n, (n, D)  # fits: one pass
        else:
            assert rows * row <= budget < (rows + 1) * row, (n, D)  # as many rows as the budget holds
    assert m.gs_deterministic_pass_rows(0, 64) == 0
    rows = m.gs_deterministic_pass_rows(50_000_000, 64)
    assert -(-50_000_000 // rows) == 27  # 14.4 GB of rows in 512 MiB passes


@pytest.mark.gpu
def test_cuda_deterministic_backward_same_bits_for_every_pass_size(gen):
    """The CUDA deterministic backward gives the same bits with its default pass size and with
    passes of a few intersections (the tiles split across passes, each pass's rows reduced into the
    Gaussians' running sums)."""
    require("cuda")
    from fast3d import _native

    m = _native.module()
    x = make_scene(gen, 1, 2, 211, 45, 37, D=40)
    scene = [x[k].cuda().float() for k in ("means", "quats", "scales", "opacities", "viewmats", "Ks")]
    means2d, conics, depths, opac, radii = m.gs_project_forward(*scene, 45, 37, 0.01, 100.0, 0.3, False, False)
    I, N = 2, 211
    feats = torch.rand(I, N, 40, generator=gen).cuda()
    images = (means2d.view(I, N, 2), conics.view(I, N, 3), opac.view(I, N), feats)
    image, alpha, last, tile_offsets, flat_ids, isect_src, gauss_offsets, _ = m.gs_rasterize_forward(
        *images, depths.view(I, N), radii.view(I, N, 2), 45, 37, None)
    g_image, g_alpha = torch.rand(image.shape, generator=gen).cuda(), torch.rand(alpha.shape, generator=gen).cuda()
    n = flat_ids.numel()
    assert n > 100
    results = [m.gs_rasterize_backward(*images, radii.view(I, N, 2), tile_offsets, flat_ids, isect_src, gauss_offsets,
                                       alpha, last, g_image, g_alpha, 45, 37, True, p) for p in (None, n // 3, 7)]
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


# --- shapes, empty inputs, dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_batch_dims_equal_separate_calls(backend, gen):
    """Leading dims [2, 3] (6 scenes) in one call equal six single-scene calls without batch dims."""
    require(backend)
    x = make_scene(gen, 6, 2, 23, 19, 17, sh_degree=1)
    shaped = {k: v.reshape(2, 3, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    out, alpha, meta, _ = render(shaped, backend)
    assert out.shape == (2, 3, 2, 17, 19, 3) and alpha.shape == (2, 3, 2, 17, 19, 1)
    assert meta["means2d"].shape == (2, 3, 2, 23, 2)
    for b in range(6):
        one = {k: v[b] if isinstance(v, torch.Tensor) else v for k, v in x.items()}
        o1, a1, _, _ = render(one, backend)
        assert o1.shape == (2, 17, 19, 3)
        assert_close(out.reshape(6, 2, 17, 19, 3)[b], o1, atol=1e-12, rtol=1e-12, name=f"scene {b}")
        assert_close(alpha.reshape(6, 2, 17, 19, 1)[b], a1, atol=1e-12, rtol=1e-12, name=f"alpha {b}")


@pytest.mark.parametrize("backend", ["torch", "cpu", "auto"])
@pytest.mark.parametrize("N, C", [(0, 2), (5, 0), (0, 0)])
def test_empty_scene_gives_background(backend, N, C, gen):
    x = make_scene(gen, 2, max(C, 1), max(N, 1), 13, 11, odd=False)
    x.update(means=x["means"][:, :N], quats=x["quats"][:, :N], scales=x["scales"][:, :N],
             opacities=x["opacities"][:, :N], colors=x["colors"][:, :N], viewmats=x["viewmats"][:, :C],
             Ks=x["Ks"][:, :C], backgrounds=x["backgrounds"][:, :C])
    out, alpha, meta, grad = render(x, backend, render_mode="RGB+D")
    assert out.shape == (2, C, 11, 13, 4) and alpha.shape == (2, C, 11, 13, 1)
    assert torch.equal(alpha, torch.zeros_like(alpha))
    assert torch.equal(out[..., :3], x["backgrounds"][:, :, None, None, :].expand(2, C, 11, 13, 3))
    assert torch.equal(out[..., 3], torch.zeros_like(out[..., 3]))
    g = grad(torch.ones_like(out), torch.ones_like(alpha))
    assert torch.equal(g["backgrounds"], torch.full_like(x["backgrounds"], 11 * 13.0))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, gen):
    """bf16/fp16 in, computed in float32, cast back: within the output dtype's rounding of the
    float32 result on the same (rounded) inputs."""
    require("cpu")
    x = make_scene(gen, 1, 2, 41, 27, 21, odd=False)
    x = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    out, alpha, meta, grad = render(x, "auto", dtype)
    assert out.dtype == dtype and meta["backend"] == "cpu"
    g = grad(torch.ones(out.shape), torch.ones(alpha.shape))
    assert all(v.dtype == dtype for v in g.values())
    x32 = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    out32, alpha32, _, _ = render(x32, "cpu", torch.float32)
    eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert_close(out, out32, atol=2 * eps, rtol=2 * eps, name="half render")


def test_compile_fullgraph(gen):
    """The custom ops trace under torch.compile(fullgraph=True) (aot_eager) and match eager."""
    require("cpu")
    torch._dynamo.reset()
    x = make_scene(gen, 1, 2, 19, 17, 15, odd=False)
    args = (x["means"].float(), x["quats"].float(), x["scales"].float(), x["opacities"].float(),
            x["colors"].float(), x["viewmats"].float(), x["Ks"].float())

    def f(*a):
        return rasterization(*a, 17, 15, backend="cpu")[:2]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), f(*args)):
        assert torch.equal(a, b)


# --- the reference against gsplat's own PyTorch implementation ------------------------------------


def test_reference_projection_and_sh_match_gsplat(gen):
    pytest.importorskip("gsplat")
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

    x = make_scene(gen, 2, 3, 57, 41, 33, sh_degree=3, odd=False)
    covars, _ = _quat_scale_to_covar_preci(x["quats"], x["scales"], compute_covar=True, compute_preci=False,
                                           triu=False)
    _, m2, depths, conics, comp = _fully_fused_projection(x["means"], covars, x["viewmats"], x["Ks"], 41, 33,
                                                          calc_compensations=True)
    r_m2, r_con, r_depths, r_op, valid = reference.project(x["means"], x["quats"], x["scales"], x["opacities"],
                                                           x["viewmats"], x["Ks"], 41, 33, 0.01, 1e10, 0.3, True)
    assert valid.all()
    assert_close(r_m2, m2, atol=1e-9, rtol=1e-9, name="means2d")
    assert_close(r_con, conics, atol=1e-9, rtol=1e-9, name="conics")
    assert_close(r_depths, depths, atol=1e-12, rtol=1e-12, name="depths")
    assert_close(r_op, comp * x["opacities"][:, None], atol=1e-12, rtol=1e-12, name="compensated opacity")
    campos = -torch.einsum("bcji,bcj->bci", x["viewmats"][..., :3, :3], x["viewmats"][..., :3, 3])
    dirs = x["means"][:, None] - campos[:, :, None]
    sh = x["colors"][:, None, :, :16].expand(2, 3, 57, 16, 3)
    expected = torch.clamp_min(_spherical_harmonics(3, dirs, sh) + 0.5, 0)
    assert_close(reference.sh_colors(x["colors"], 3, x["means"], x["viewmats"]), expected, atol=1e-12, rtol=1e-12,
                 name="sh colors")


# --- input validation ---------------------------------------------------------------------------


def _valid(gen):
    x = make_scene(gen, 2, 3, 7, 9, 8, odd=False)
    return {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


def _call(x, **kw):
    a = dict(width=x["width"], height=x["height"], sh_degree=x["sh_degree"], backgrounds=x["backgrounds"])
    a.update(kw)
    return rasterization(x["means"], x["quats"], x["scales"], x["opacities"], x["colors"], x["viewmats"], x["Ks"],
                         **a)


def _put(x, key, index, value):
    t = x[key].clone()
    t[index] = value
    return dict(x, **{key: t})


BAD = {
    "means-not-tensor": (lambda x: dict(x, means=x["means"].tolist()), {}, TypeError, r"means must be a torch.Tensor"),
    "means-last": (lambda x: dict(x, means=x["means"][..., :2]), {}, ValueError, r"means must end in a dimension of size 3"),
    "quats-N": (lambda x: dict(x, quats=x["quats"][:, :6]), {}, ValueError, r"quats must have shape \[\.\.\., N, 4\]"),
    "quats-last": (lambda x: dict(x, quats=x["quats"][..., :3]), {}, ValueError, r"quats must have shape"),
    "scales-batch": (lambda x: dict(x, scales=x["scales"][:1]), {}, ValueError, r"scales must have shape"),
    "opacities-trailing": (lambda x: dict(x, opacities=x["opacities"][..., None]), {}, ValueError,
                           r"opacities must have shape \[\.\.\., N\]"),
    "viewmats-shape": (lambda x: dict(x, viewmats=x["viewmats"][..., :3, :]), {}, ValueError,
                       r"viewmats must have shape \[\.\.\., C, 4, 4\]"),
    "Ks-C": (lambda x: dict(x, Ks=x["Ks"][:, :2]), {}, ValueError, r"Ks must have shape \[\.\.\., C, 3, 3\]"),
    "colors-N": (lambda x: dict(x, colors=x["colors"][:, :5]), {}, ValueError, r"colors must have shape"),
    "colors-C": (lambda x: dict(x, colors=x["colors"][:, None].expand(2, 2, 7, 3)), {}, ValueError,
                 r"colors must have shape"),
    "sh-K": (lambda x: dict(x, colors=torch.rand(2, 7, 3, 3)), dict(sh_degree=1), ValueError,
             r"sh_degree=1 needs K >= 4"),
    "sh-degree": (lambda x: dict(x, colors=torch.rand(2, 7, 16, 3)), dict(sh_degree=4), ValueError,
                  r"sh_degree must be None or an integer in \[0, 3\]"),
    "backgrounds-D": (lambda x: dict(x, backgrounds=torch.rand(2, 3, 4)), {}, ValueError, r"backgrounds must have shape"),
    "backgrounds-depth-mode": (lambda x: x, dict(render_mode="D"), ValueError, r"backgrounds apply to colour channels"),
    "means-int": (lambda x: dict(x, means=x["means"].int()), {}, TypeError, r"means must be a floating tensor"),
    "Ks-long": (lambda x: dict(x, Ks=x["Ks"].long()), {}, TypeError, r"Ks must be a floating tensor"),
    "dtype-mix": (lambda x: dict(x, scales=x["scales"].double()), {}, TypeError, r"scales has dtype float64"),
    "device-mix": (lambda x: dict(x, opacities=x["opacities"].to("meta")), {}, ValueError,
                   r"opacities is on meta but means is on cpu"),
    "means-nan": (lambda x: _put(x, "means", (1, 3, 0), math.nan), {}, ValueError, r"means must be finite; got nan"),
    "scales-inf": (lambda x: _put(x, "scales", (0, 2, 1), math.inf), {}, ValueError, r"scales must be finite; got inf"),
    "width-zero": (lambda x: x, dict(width=0), ValueError, r"width must be a positive integer"),
    "height-negative": (lambda x: x, dict(height=-3), ValueError, r"height must be a positive integer"),
    "width-float": (lambda x: x, dict(width=9.0), ValueError, r"width must be a positive integer"),
    "render-mode": (lambda x: x, dict(render_mode="RGBD"), ValueError, r"render_mode must be one of"),
    "rasterize-mode": (lambda x: x, dict(rasterize_mode="mip"), ValueError, r"rasterize_mode must be one of"),
    "near-zero": (lambda x: x, dict(near_plane=0.0), ValueError, r"near_plane must be a positive real number"),
    "far-below-near": (lambda x: x, dict(near_plane=1.0, far_plane=0.5), ValueError, r"far_plane must exceed"),
    "eps2d-negative": (lambda x: x, dict(eps2d=-0.1), ValueError, r"eps2d must be a real number"),
    "absgrad-not-bool": (lambda x: x, dict(absgrad=1), ValueError, r"absgrad must be a bool"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_bad_inputs_are_rejected(case, backend, gen):
    mutate, kw, exc, pattern = BAD[case]
    x = mutate(_valid(gen))
    with pytest.raises(exc, match=pattern):
        _call(x, backend=backend, **kw)


def test_registered_backends_and_selection(gen):
    table = backends.backends(OP)
    assert set(table) == {"torch", "cpu", "cuda"}
    assert table["cuda"].priority > table["cpu"].priority > table["torch"].priority
    cpu_ok = backends.availability(OP)["cpu"] is None
    x = _valid(gen)
    _, _, meta = _call(x)
    assert meta["backend"] == ("cpu" if cpu_ok else "torch")
    with pytest.raises(ValueError, match=r"rasterization: no backend can serve these inputs \(backend='cuda'\)"):
        _call(x, backend="cuda")
    with pytest.raises(ValueError, match=r"rasterization: backend must be 'auto' or one of"):
        _call(x, backend="triton")


# --- GPU: larger scenes -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("sh", [None, 3])
def test_cuda_larger_scene_matches_cpu(sh, gen):
    """CUDA vs the CPU backend (both float32, tile-binned) on a scene too large for the dense
    reference: 4 x 4 images of 181x133 with 3001 Gaussians."""
    require("cuda")
    require("cpu")
    x = make_scene(gen, 4, 4, 3001, 181, 133, sh_degree=sh)
    x["scales"] = x["scales"] * 0.3
    out_c, alpha_c, _, grad_c = render(x, "cpu", torch.float32)
    xg = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in x.items()}
    out_g, alpha_g, _, grad_g = render(xg, "cuda", torch.float32)
    # Float32 rounding can flip a 1/255 or 1e-4 cut in a handful of the ~1e6 pixel decisions.
    diff = (out_g.cpu() - out_c).abs()
    assert (diff > 1e-3).float().mean() < 1e-3 and diff.max() < 0.1
    g_out, g_alpha = random_like(out_c, gen), random_like(alpha_c, gen)
    gc, gg = grad_c(g_out, g_alpha), grad_g(g_out.cuda(), g_alpha.cuda())
    for k in gc:
        rel = (gg[k].cpu() - gc[k]).norm() / (gc[k].norm() + 1e-12)
        assert rel < 1e-2, (k, rel.item())


def test_gaussian_renderer_module(gen):
    """fast3d.nn.gaussians.GaussianRenderer is rasterization with options fixed at construction."""
    from fast3d.nn.gaussians import GaussianRenderer

    x = make_scene(gen, 2, 2, 23, 19, 15, sh_degree=2)
    r = GaussianRenderer(19, 15, sh_degree=2, far_plane=100.0, render_mode="RGB+ED")
    assert "render_mode='RGB+ED'" in repr(r) and not list(r.parameters())
    out, alpha, meta = r(x["means"], x["quats"], x["scales"], x["opacities"], x["colors"], x["viewmats"], x["Ks"],
                         x["backgrounds"])
    ref, ref_alpha, _ = rasterization(x["means"], x["quats"], x["scales"], x["opacities"], x["colors"], x["viewmats"],
                                      x["Ks"], 19, 15, sh_degree=2, far_plane=100.0, render_mode="RGB+ED",
                                      backgrounds=x["backgrounds"])
    assert out.shape == (2, 2, 15, 19, 4) and torch.equal(out, ref) and torch.equal(alpha, ref_alpha)
    # A capacity bound passes through: the count and overflow flag of the call come back in meta.
    bounded = GaussianRenderer(19, 15, sh_degree=2, far_plane=100.0, capacity=1)
    meta = bounded(x["means"], x["quats"], x["scales"], x["opacities"], x["colors"], x["viewmats"], x["Ks"])[2]
    assert meta["capacity"] == 1 and bool(meta["overflow"]) == (int(meta["n_intersections"]) > 1)


def test_gaussian_at_a_camera_centre_gives_finite_gradients(gen):
    """A Gaussian exactly at a camera centre is culled (z < near), and its SH direction is
    undefined: it must contribute nothing, not NaN, to the gradients (review finding B2)."""
    N = 5
    means = (torch.rand(N, 3, generator=gen, dtype=torch.float64) - 0.5) + torch.tensor([0.0, 0.0, 3.0],
                                                                                      dtype=torch.float64)
    means[0] = 0.0                                                       # the camera centre
    quats = torch.randn(N, 4, generator=gen, dtype=torch.float64)
    scales = torch.rand(N, 3, generator=gen, dtype=torch.float64) * 0.2 + 0.05
    opac = torch.rand(N, generator=gen, dtype=torch.float64) * 0.5 + 0.4
    sh = torch.randn(N, 4, 3, generator=gen, dtype=torch.float64) * 0.3
    viewmats = torch.eye(4, dtype=torch.float64)[None]
    Ks = torch.tensor([[[20.0, 0, 12], [0, 20, 10], [0, 0, 1]]], dtype=torch.float64)
    for backend in [b for b, r in backends.availability("rasterization").items() if r is None
                    and (b != "cuda" or torch.cuda.is_available())]:
        dev = "cuda" if backend == "cuda" else "cpu"
        dtype = torch.float32 if backend == "cuda" else torch.float64
        inputs = [t.to(dev, dtype).requires_grad_() for t in (means, quats, scales, opac, sh)]
        rgb, alpha, _ = rasterization(*inputs, viewmats.to(dev, dtype), Ks.to(dev, dtype), 24, 20,
                                             sh_degree=1, backend=backend)
        assert torch.isfinite(rgb).all() and torch.isfinite(alpha).all(), backend
        grads = torch.autograd.grad((rgb.sum() + alpha.sum()), inputs)
        for name, g in zip(("means", "quats", "scales", "opacities", "sh"), grads):
            assert torch.isfinite(g).all(), f"{backend}: non-finite {name} gradient"
            assert (g[0] == 0).all(), f"{backend}: the culled Gaussian got a {name} gradient"


# --- the native entry points, called directly --------------------------------------------------
# fast3d._C's gs_* functions (and the fast3d::gs_* torch ops over them) are reachable without the
# Python API's validation: each must reject a bad tensor with a RuntimeError naming it, before any
# pointer is read.


def _native_valid(gen) -> dict:
    """Valid positional arguments of every gs_* binding, as native.py passes them (B=2, C=3,
    N=7, 9x8 pixels, float32 on the CPU)."""
    from fast3d import _native

    m = _native.module()
    x = _valid(gen)
    B, N, C, W, H = 2, 7, 3, x["width"], x["height"]
    I = B * C
    scene = dict(means=x["means"], quats=x["quats"], scales=x["scales"], opacities=x["opacities"],
                 viewmats=x["viewmats"], Ks=x["Ks"])
    planes = dict(width=W, height=H, near_plane=0.01, far_plane=100.0, eps2d=0.3, antialiased=False, ortho=False)
    means2d, conics, depths, opac, radii = m.gs_project_forward(*scene.values(), *planes.values())
    sh = torch.rand(B, N, 4, 3, generator=gen)
    images = dict(means2d=means2d.view(I, N, 2), conics=conics.view(I, N, 3), opac=opac.view(I, N),
                  feats=torch.rand(I, N, 3, generator=gen))
    fwd = m.gs_rasterize_forward(*images.values(), depths.view(I, N), radii.view(I, N, 2), W, H, None)
    image, alpha, last, tile_offsets, flat_ids, isect_src, gauss_offsets, _ = fwd
    return {
        "gs_project_forward": dict(**scene, **planes),
        "gs_project_backward": dict(**scene, **planes, g_means2d=torch.rand(B, C, N, 2),
                                    g_conics=torch.rand(B, C, N, 3), g_depths=torch.rand(B, C, N),
                                    g_opac=torch.rand(B, C, N)),
        "gs_sh_forward": dict(sh=sh, means=x["means"], viewmats=x["viewmats"], degree=1),
        "gs_sh_backward": dict(sh=sh, means=x["means"], viewmats=x["viewmats"], degree=1,
                               g_colors=torch.rand(B, C, N, 3)),
        "gs_rasterize_forward": dict(**images, depths=depths.view(I, N), radii=radii.view(I, N, 2), width=W,
                                     height=H, capacity=None),
        "gs_rasterize_backward": dict(**images, radii=radii.view(I, N, 2), tile_offsets=tile_offsets,
                                      flat_ids=flat_ids, isect_src=isect_src, gauss_offsets=gauss_offsets,
                                      alpha=alpha, last=last, g_image=torch.rand(image.shape),
                                      g_alpha=torch.rand(alpha.shape), width=W, height=H, deterministic=False,
                                      pass_rows=None),
    }


P, PB = "gs_project_forward", "gs_project_backward"
S, SB = "gs_sh_forward", "gs_sh_backward"
R, RB = "gs_rasterize_forward", "gs_rasterize_backward"


def META(t: torch.Tensor) -> torch.Tensor:  # a device other than the CPU, without a GPU
    return t.to("meta")


NATIVE_BAD = {  # case: (function, argument, new value from the valid one, expected message fragment)
    "project-means-rank": (P, "means", lambda t: t[0], f"{P}: means must have shape [B, N, 3] (3 dims); got [7, 3]"),
    "project-means-int": (P, "means", lambda t: t.int(), "means has dtype Int, expected Float or Double"),
    "project-means-meta": (P, "means", META, "means is on meta, expected a CPU or CUDA tensor"),
    "project-quats-N": (P, "quats", lambda t: t[:, :6], "quats must have shape [B, N, 4] = [2, 7, 4]; got [2, 6, 4]"),
    "project-scales-dtype": (P, "scales", lambda t: t.double(), "scales has dtype Double, expected Float"),
    "project-opacities-trailing": (P, "opacities", lambda t: t[..., None],
                                   "opacities must have shape [B, N] = [2, 7]; got [2, 7, 1]"),
    "project-viewmats-rank": (P, "viewmats", lambda t: t[0],
                              "viewmats must have shape [B, C, 4, 4] (4 dims); got [3, 4, 4]"),
    "project-viewmats-3x4": (P, "viewmats", lambda t: t[..., :3, :],
                             "viewmats must have shape [B, C, 4, 4] = [2, 3, 4, 4]; got [2, 3, 3, 4]"),
    "project-Ks-C": (P, "Ks", lambda t: t[:, :2], "Ks must have shape [B, C, 3, 3] = [2, 3, 3, 3]"),
    "project-Ks-device": (P, "Ks", META, "Ks is on meta, expected cpu (the device of means)"),
    "project-width": (P, "width", lambda w: 0, "width must be a positive int32; got 0"),
    "project-height": (P, "height", lambda h: -4, "height must be a positive int32; got -4"),
    "project-near": (P, "near_plane", lambda v: 0.0, "near_plane must be > 0; got 0"),
    "project-bwd-g-conics": (PB, "g_conics", lambda t: t[..., :2],
                             f"{PB}: g_conics must have shape [B, C, N, 3] = [2, 3, 7, 3]"),
    "project-bwd-g-depths-device": (PB, "g_depths", META, "g_depths is on meta, expected cpu (the device of means)"),
    "project-bwd-g-opac-dtype": (PB, "g_opac", lambda t: t.double(), "g_opac has dtype Double, expected Float"),
    "project-bwd-quats-B": (PB, "quats", lambda t: t[:1], "quats must have shape [B, N, 4] = [2, 7, 4]"),
    "sh-K": (S, "sh", lambda t: t[:, :, :3], f"{S}: sh holds K = 3 coefficients per Gaussian; degree 1 needs K >= 4"),
    "sh-degree": (S, "degree", lambda d: 4, "degree must be in 0..3; got 4"),
    "sh-means-N": (S, "means", lambda t: t[:, :5], "means must have shape [B, N, 3] = [2, 7, 3]"),
    "sh-viewmats-B": (S, "viewmats", lambda t: t[:1],
                      "viewmats must have shape [B, C, 4, 4] = [2, 3, 4, 4]; got [1, 3, 4, 4]"),
    "sh-rank": (S, "sh", lambda t: t[..., 0], "sh must have shape [B, N, K, 3] (4 dims)"),
    "sh-bwd-K": (SB, "sh", lambda t: t[:, :, :2], f"{SB}: sh holds K = 2 coefficients per Gaussian; degree 1 needs K >= 4"),
    "sh-bwd-g-colors": (SB, "g_colors", lambda t: t[:, :, :, :2], "g_colors must have shape [B, C, N, 3] = [2, 3, 7, 3]"),
    "sh-bwd-means-device": (SB, "means", META, "means is on meta, expected cpu (the device of sh)"),
    "raster-radii-device": (R, "radii", META, f"{R}: radii is on meta, expected cpu (the device of feats)"),
    "raster-radii-dtype": (R, "radii", lambda t: t.long(), "radii has dtype Long, expected Int"),
    "raster-radii-N": (R, "radii", lambda t: t[:, :6], "radii must have shape [I, N, 2] = [6, 7, 2]"),
    "raster-means2d-N": (R, "means2d", lambda t: t[:, :4], "means2d must have shape [I, N, 2] = [6, 7, 2]; got [6, 4, 2]"),
    "raster-conics-I": (R, "conics", lambda t: t[:5], "conics must have shape [I, N, 3] = [6, 7, 3]"),
    "raster-opac-dtype": (R, "opac", lambda t: t.double(), "opac has dtype Double, expected Float"),
    "raster-depths": (R, "depths", lambda t: t[..., None], "depths must have shape [I, N] = [6, 7]"),
    "raster-feats-rank": (R, "feats", lambda t: t[..., 0], "feats must have shape [I, N, D] (3 dims)"),
    "raster-feats-empty": (R, "feats", lambda t: t[..., :0], "feats must have at least one channel; got shape [6, 7, 0]"),
    "raster-width": (R, "width", lambda w: 0, "width must be a positive int32; got 0"),
    "raster-width-int32": (R, "width", lambda w: 2**31, "width must be a positive int32"),
    "raster-capacity": (R, "capacity", lambda c: 0, "capacity must be None or in [1, 2147483647]; got 0"),
    "raster-bwd-tile-offsets": (RB, "tile_offsets", lambda t: t[:-1],
                                f"{RB}: tile_offsets must have shape [I * tiles + 1] = [7]"),
    "raster-bwd-tile-offsets-dtype": (RB, "tile_offsets", lambda t: t.int(), "tile_offsets has dtype Int, expected Long"),
    "raster-bwd-flat-ids-rank": (RB, "flat_ids", lambda t: t[None], "flat_ids must have shape [n] (1 dims)"),
    "raster-bwd-flat-ids-dtype": (RB, "flat_ids", lambda t: t.long(), "flat_ids has dtype Long, expected Int"),
    "raster-bwd-isect-src": (RB, "isect_src", lambda t: torch.zeros(3, dtype=torch.int32),
                             "isect_src must have shape [0] = [0]; got [3]"),
    "raster-bwd-gauss-offsets-dtype": (RB, "gauss_offsets", lambda t: t.int(),
                                       "gauss_offsets has dtype Int, expected Long"),
    "raster-bwd-alpha": (RB, "alpha", lambda t: t[:, :, :-1], "alpha must have shape [I, H, W] = [6, 8, 9]; got [6, 8, 8]"),
    "raster-bwd-last-dtype": (RB, "last", lambda t: t.float(), "last has dtype Float, expected Int"),
    "raster-bwd-g-image-D": (RB, "g_image", lambda t: t[..., :2], "g_image must have shape [I, H, W, D] = [6, 8, 9, 3]"),
    "raster-bwd-g-alpha-device": (RB, "g_alpha", META, "g_alpha is on meta, expected cpu (the device of feats)"),
    "raster-bwd-radii-device": (RB, "radii", META, "radii is on meta, expected cpu (the device of feats)"),
    "raster-bwd-height": (RB, "height", lambda h: h + 16, "tile_offsets must have shape [I * tiles + 1] = [13]"),
    "raster-bwd-pass-rows": (RB, "pass_rows", lambda p: 0, f"{RB}: pass_rows must be None or >= 1; got 0"),
}


@pytest.mark.parametrize("case", list(NATIVE_BAD))
def test_native_bindings_reject_bad_tensors(case, gen):
    require("cpu")
    from fast3d import _native

    fn, arg, change, message = NATIVE_BAD[case]
    args = _native_valid(gen)[fn]
    args[arg] = change(args[arg])
    with pytest.raises(RuntimeError) as info:
        getattr(_native.module(), fn)(*args.values())
    assert message in str(info.value)


@pytest.mark.parametrize("fn", ["gs_project_forward", "gs_project_backward", "gs_sh_forward", "gs_sh_backward",
                                "gs_rasterize_forward", "gs_rasterize_backward"])
def test_native_bindings_take_non_contiguous_tensors(fn, gen):
    """Non-contiguous inputs are made contiguous, not read with the wrong strides."""
    require("cpu")
    from fast3d import _native

    args = _native_valid(gen)[fn]
    strided = {k: v.transpose(0, -1).contiguous().transpose(0, -1) if isinstance(v, torch.Tensor) and v.dim() > 1
               else v for k, v in args.items()}
    assert any(isinstance(v, torch.Tensor) and not v.is_contiguous() for v in strided.values())
    f = getattr(_native.module(), fn)
    got, want = f(*strided.values()), f(*args.values())
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)


def test_native_constants_match_python():
    """The tile size, the radius cap and the intersection limit have one definition in C++
    (gaussian_math.h, gaussians.h); the Python twins that run without the extension agree."""
    require("cpu")
    from fast3d import _native
    from fast3d.ops.rasterization import api

    m = _native.module()
    assert reference.TILE == m.gs_tile == 16
    assert reference.RADIUS_MAX == m.gs_radius_max
    assert api.MAX_CAPACITY == m.gs_max_intersections == 2**31 - 1
