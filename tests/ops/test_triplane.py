"""Tests of fast3d triplane sampling and rendering (fast3d.ops.triplane, fast3d.nn.triplane).

triplane_sample: the `triton` backend (interpreter on the CPU, TRITON_INTERPRET=1) against the
reference (F.grid_sample per plane) run in float64 on the same (upcast) inputs, forward and
gradients to planes and points for random upstream gradients; fp32 and bf16 planes, odd sizes,
points outside the box, channel counts past one channel tile. render_triplane: the `triton`
backend against the float64 reference (decoder copied to float64), forward and gradients to
planes, rays_o, rays_d, background and decoder weights; rays missing the box, empty and opaque
scenes (early termination), random sampling with a shared generator; NeRF's sample_pdf; the nn
modules; bad input; empty input. Every test draws fresh inputs from the `gen` fixture.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import assert_close, grads, random_like, triton_launches_inside_guard

from fast3d import backends
from fast3d.nn.triplane import TriplaneMLP, TriplaneRenderer
from fast3d.ops.triplane import march, reference, render_triplane, triplane_sample, triton_kernels
from fast3d.ops.triplane.api import box_interval
from fast3d.ops.triplane.decoder import DecoderWeights, decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (atol, rtol) against the float64 reference on the same inputs, by the dtype of the compared tensor.
TOL = {
    # float32 kernels: bilinear weights from float32 coordinates (ix error ~ ix 2^-24 texel) times
    # feature slopes ~ 1 per texel, and float32 atomic sums of <= a few hundred plane-gradient
    # contributions; measured worst |diff| ~2e-6 on features and plane gradients.
    torch.float32: (1e-5, 1e-4),
    # bf16 planes: values read exactly, computed in float32, the result rounded to bf16 (2^-9
    # relative) -- output and plane gradients; the atol covers elements near zero.
    torch.bfloat16: (1e-2, 1e-2),
}
# Point gradients: sums over C channels of terms g_c dP W / 2 (~5 each) that cancel to ~0.1, each
# term off by its float32 texel fraction (~ix 2^-24): measured worst |diff| 5e-5 at C = 70.
POINT_TOL = (2e-4, 1e-4)
# Renders: the same float32 arithmetic through a 3-layer MLP and the compositor, and importance
# samples that move with the float32 coarse weights (~1e-7 relative); measured worst ~5e-6.
# Gradients are piecewise smooth in the sample positions (the bilinear slope jumps at texel edges),
# and box-clipped intervals put samples exactly on texel edges (a ray through opposite faces of
# the box samples its centre plane, an edge for odd plane sizes), where float32 and float64
# positions take different sides: so a float32 gradient element may also be off by twice the
# torch backend's own float32 error on the same inputs (check_against_float32_twin).
RENDER_TOL = {torch.float32: (5e-5, 5e-4),
              # bf16 planes round the sampled features (2^-9 relative) before the MLP.
              torch.bfloat16: (3e-2, 3e-2)}


def require(op: str, backend: str = "triton") -> None:
    reason = backends.availability(op)[backend]
    if reason:
        pytest.skip(f"{op}: backend {backend!r} unavailable: {reason}")


def clear_of_texel_edges(points: torch.Tensor, H: int, W: int, bound: float, margin: float = 1e-3) -> torch.Tensor:
    """Move coordinates lying within `margin` texels of a texel boundary (where the bilinear
    point gradient jumps, so float32 and float64 may take different sides) by 3 margins. x and y
    map to widths (planes 0, 1 / plane 2), y and z to heights; checked against both."""
    p = points.detach().clone()
    for _ in range(10):
        bad = torch.zeros_like(p, dtype=torch.bool)
        for n in (H, W):
            i = ((p.double() / bound + 1) * n - 1) / 2
            f = i - torch.floor(i)
            bad |= (f < margin) | (f > 1 - margin)
        if not bad.any():
            return p
        p[bad] += 3 * margin * 2 * bound / max(H, W)
    raise AssertionError("could not move the points off the texel edges")


def make_planes(gen, B, C, H, W, dtype=torch.float32):
    return torch.randn(B, 3, C, H, W, generator=gen).to(DEVICE, dtype)


def make_points(gen, B, M, H, W, bound=1.0, spread=1.3):
    """Uniform in [-spread, spread]^3 * bound: about a quarter of them outside the box."""
    p = (torch.rand(B, M, 3, generator=gen) * 2 - 1) * spread * bound
    return clear_of_texel_edges(p, H, W, bound).to(DEVICE)


def check(name, actual, expected, tol):
    atol, rtol = tol
    assert torch.isfinite(actual).all(), f"{name}: non-finite elements"
    assert_close(actual, expected, atol=atol, rtol=rtol, name=name)


def check_against_float32_twin(name, actual, expected, twin, tol):
    """|actual - expected| <= atol + rtol |expected| + 2 |twin - expected| elementwise: `actual`
    no further from the float64 `expected` than the tolerance plus twice the float32 torch
    backend's (`twin`) error, which is large only where the float32 sample positions fall on the
    other side of a texel edge (RENDER_TOL)."""
    atol, rtol = tol
    a, e, t = (x.detach().cpu().double() for x in (actual, expected, twin))
    assert torch.isfinite(a).all(), f"{name}: non-finite elements"
    err, slack = (a - e).abs(), 2 * (t - e).abs()
    excess = err - (atol + rtol * e.abs() + slack)
    if (excess > 0).any():
        rows = [f"  {tuple(int(i) for i in torch.unravel_index(torch.tensor(k), a.shape))}: actual={a.flatten()[k]:.9g} "
                f"expected={e.flatten()[k]:.9g} torch-float32={t.flatten()[k]:.9g}"
                for k in torch.topk(excess.flatten(), min(5, int((excess > 0).sum()))).indices.tolist()]
        raise AssertionError(f"{name}: {int((excess > 0).sum())}/{a.numel()} elements outside atol={atol:g} "
                             f"rtol={rtol:g} + twice the float32 torch backend's error; worst:\n" + "\n".join(rows))


# --- triplane_sample -----------------------------------------------------------------------------


def compare_sample(planes, points, reduce, bound, gen):
    out = triplane_sample(planes, points, reduce, bound, backend="triton")
    p64, x64 = planes.detach().cpu().double(), points.detach().cpu().double()
    out64 = reference.triplane_sample(p64, x64, reduce, bound)
    assert out.dtype == planes.dtype and out.device == planes.device
    check(f"sample {reduce}", out, out64, TOL[planes.dtype])
    up = random_like(out64, gen).to(planes.dtype)
    g = grads(lambda a, b: (triplane_sample(a, b, reduce, bound, backend="triton"),), [planes, points], [up.to(DEVICE)])
    g64 = grads(lambda a, b: (reference.triplane_sample(a, b, reduce, bound),), [p64, x64], [up.double()])
    assert g[0].dtype == planes.dtype and g[1].dtype == points.dtype
    check("grad planes", g[0], g64[0], TOL[planes.dtype])
    check("grad points", g[1], g64[1], POINT_TOL)
    return out, g


@pytest.mark.parametrize("reduce", ["concat", "sum", "mean"])
@pytest.mark.parametrize("B, M, C, H, W", [(1, 1, 1, 1, 1), (2, 37, 5, 7, 9), (1, 130, 3, 16, 11), (3, 65, 70, 5, 6)],
                         ids=lambda v: str(v))
def test_sample_float32_matches_reference(B, M, C, H, W, reduce, gen):
    """Odd sizes: one texel planes, M past a 64-point block, C = 70 past a 64-channel tile."""
    require("triplane_sample")
    bound = 0.8
    compare_sample(make_planes(gen, B, C, H, W), make_points(gen, B, M, H, W, bound), reduce, bound, gen)


@pytest.mark.parametrize("reduce", ["concat", "mean"])
def test_sample_bf16_planes(reduce, gen):
    """bf16 planes with float32 points: bf16 features and plane gradients, float32 point gradients."""
    require("triplane_sample")
    compare_sample(make_planes(gen, 2, 6, 9, 7, torch.bfloat16), make_points(gen, 2, 41, 9, 7), reduce, 1.0, gen)


def test_sample_points_outside_the_box_read_zero(gen):
    """Zero padding: points beyond half a texel outside the box give zero features and zero
    gradients (huge coordinates too); inside points are unaffected by their neighbours."""
    require("triplane_sample")
    B, C, H, W = 1, 4, 5, 6
    planes = make_planes(gen, B, C, H, W)
    far = torch.tensor([[[1.3, 0.0, 0.0], [0.0, -1.25, 0.1], [1e6, -1e6, 3e5], [2.0, 2.0, 2.0]]], device=DEVICE)
    out, g = compare_sample(planes, far, "concat", 1.0, gen)
    assert torch.equal(out[0, 2:], torch.zeros_like(out[0, 2:]))
    assert torch.equal(g[1][0, 2:], torch.zeros_like(g[1][0, 2:]))
    # Point 0 is outside in x: planes 0 (XY) and 1 (XZ) read zero, plane 2 (YZ) does not.
    assert torch.equal(out[0, 0, :2 * C], torch.zeros(2 * C, device=DEVICE)) and out[0, 0, 2 * C:].abs().sum() > 0


def test_sample_non_contiguous_inputs(gen):
    require("triplane_sample")
    planes = make_planes(gen, 2, 5, 8, 7).transpose(3, 4).contiguous().transpose(3, 4)
    points = make_points(gen, 2, 33, 8, 7).transpose(0, 1).contiguous().transpose(0, 1)
    assert not planes.is_contiguous() and not points.is_contiguous()
    compare_sample(planes, points, "concat", 1.0, gen)


@pytest.mark.parametrize("B, M", [(2, 0), (0, 5)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_sample_empty(B, M, backend, gen):
    require("triplane_sample", backend)
    planes = make_planes(gen, B, 3, 4, 4).requires_grad_()
    points = torch.zeros(B, M, 3, device=DEVICE, requires_grad=True)
    out = triplane_sample(planes, points, "concat", backend=backend)
    assert out.shape == (B, M, 9)
    g = torch.autograd.grad(out.sum(), [planes, points])
    assert g[0].shape == planes.shape and g[1].shape == points.shape and not g[0].any()


def test_sample_plane_convention(gen):
    """Plane 0 XY, 1 XZ, 2 YZ; u indexes the width: a plane that is its own column index reads
    back the pixel coordinate of u at texel centres."""
    H, W = 4, 8
    col = torch.arange(W, dtype=torch.float64).expand(H, W)
    planes = col.expand(1, 3, 1, H, W).clone()
    x, y, z = [(torch.tensor([[2, 5]], dtype=torch.float64) + 0.5) / W * 2 - 1 for _ in range(3)]
    pts = torch.stack([x, torch.flip(y, [1]), z * 0.5], -1)                      # [1, 2, 3]
    out = reference.triplane_sample(planes, pts, "concat", 1.0)[0]               # [2, 3]
    ix = lambda u: (u + 1) * W / 2 - 0.5  # noqa: E731
    assert torch.allclose(out[:, 0], ix(pts[0, :, 0])) and torch.allclose(out[:, 1], ix(pts[0, :, 0]))
    assert torch.allclose(out[:, 2], ix(pts[0, :, 1]))
    if backends.availability("triplane_sample")["triton"] is None:
        got = triplane_sample(planes.float().to(DEVICE), pts.float().to(DEVICE), backend="triton")[0]
        assert torch.allclose(got.cpu().double(), out, atol=1e-5)


# --- sample_pdf ----------------------------------------------------------------------------------


def test_sample_pdf_follows_the_weights():
    bins = torch.linspace(0.0, 4.0, 5, dtype=torch.float64).expand(2, 5)          # 4 bins of width 1
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    s = reference.sample_pdf(bins, w, 400, True, None)
    assert torch.equal(s, torch.sort(s, -1).values) and s.shape == (2, 400)
    # Ray 0: nearly all samples inside bin 1 (the 1e-5 floor leaves ~1e-5 of the mass elsewhere).
    assert ((s[0] >= 1.0) & (s[0] <= 2.0)).float().mean() > 0.99
    # Ray 1: uniform pdf, deterministic u = linspace(0, 1): evenly spaced over [0, 4].
    assert torch.allclose(s[1], torch.linspace(0.0, 4.0, 400, dtype=torch.float64), atol=1e-9)


def test_sample_pdf_random_matches_the_cdf(gen):
    bins = torch.linspace(0.0, 3.0, 4, dtype=torch.float64)[None]
    w = torch.tensor([[1.0, 2.0, 5.0]], dtype=torch.float64)
    s = reference.sample_pdf(bins, w, 20000, False, gen)
    frac = torch.stack([((s >= k) & (s < k + 1)).double().mean() for k in range(3)])
    assert torch.allclose(frac, w[0] / w.sum(), atol=0.02)


# --- render_triplane -----------------------------------------------------------------------------


def make_scene(gen, B, R, C, N, *, density_bias=-1.0, hidden=16, layers=3, dtype=torch.float32, miss=0):
    """Planes, a decoder, rays from a sphere of radius 2 through the box; the last `miss` rays of
    each batch element start outside and point away (they never enter the box)."""
    planes = (torch.randn(B, 3, C, N, N, generator=gen) * 2).to(DEVICE, dtype)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    dec = TriplaneMLP(C, hidden, layers, density_bias=density_bias).to(DEVICE)
    o = torch.nn.functional.normalize(torch.randn(B, R, 3, generator=gen), dim=-1) * 2
    d = torch.nn.functional.normalize((torch.rand(B, R, 3, generator=gen) - 0.5) * 1.2 - o, dim=-1)
    if miss:
        d[:, R - miss:] = -d[:, R - miss:]
    return planes, dec, o.to(DEVICE), d.to(DEVICE)


def compare_render(planes, dec, o, d, *, near=0.5, far=3.5, bg=None, tol, gen, normwise=None, **kw):
    """`backend` (triton) vs the float64 reference (decoder copied to float64), outputs and
    gradients to planes, rays_o, rays_d, background and the decoder's parameters. Gradients named
    in `normwise` (name -> bound) are compared as whole tensors: |a - e| / |e| < bound. Returns
    the outputs and these relative errors."""
    normwise = normwise or {}
    backend = kw.pop("backend", "triton")
    kw = dict(n_samples=11, n_importance=7, deterministic=True) | kw
    dec64 = copy.deepcopy(dec).double().cpu()

    def run(backend, decoder, cast):
        def f(p, a, b, *rest):
            bgr = rest[0] if bg is not None else None
            params = rest[1:] if bg is not None else rest
            with torch.nn.utils.stateless._reparametrize_module(
                    decoder, dict(zip([n for n, _ in decoder.named_parameters()], params))):
                out = render_triplane(p, decoder, a, b, cast(near), cast(far), background=bgr, backend=backend, **kw)
            return out["color"], out["opacity"], out["depth"]
        return f

    same = lambda x: x  # noqa: E731
    up64 = lambda x: x.detach().cpu().double() if isinstance(x, torch.Tensor) else x  # noqa: E731
    inputs = [planes, o, d] + ([bg] if bg is not None else []) + [p.detach() for p in dec.parameters()]
    inputs64 = [up64(x) for x in inputs]
    with torch.no_grad():
        out = run(backend, dec, same)(*inputs)
        out64 = run("torch", dec64, up64)(*inputs64)
    for name, a, e in zip(("color", "opacity", "depth"), out, out64):
        assert a.device == planes.device
        check(f"render {name}", a, e, tol)
    ups = [random_like(e, gen) for e in out64]
    up32 = [u.to(DEVICE, torch.float32) for u in ups]
    g = grads(run(backend, dec, same), inputs, up32)
    g64 = grads(run("torch", dec64, up64), inputs64, ups)
    # float32 renders: the torch backend's own float32 gradients (same sample positions) bound the
    # error that texel edges allow (RENDER_TOL).
    g32 = grads(run("torch", dec, same), inputs, up32) if tol is RENDER_TOL[torch.float32] else None
    names = ["planes", "rays_o", "rays_d"] + (["background"] if bg is not None else []) + \
        [n for n, _ in dec.named_parameters()]
    rel = {}
    for k, (name, a, e) in enumerate(zip(names, g, g64)):
        if name in normwise:
            rel[name] = float((a.cpu().double() - e).norm() / e.norm())
            assert rel[name] < normwise[name], f"render grad {name}: relative error {rel[name]:.3g} >= {normwise[name]:.3g}"
        elif g32 is not None:
            check_against_float32_twin(f"render grad {name}", a, e, g32[k], tol)
        else:
            check(f"render grad {name}", a, e, tol)
    return out, out64, rel


def compare_within_twice_torch(planes, dec, o, d, gen) -> None:
    """bf16 renders: outputs within bf16 tolerance of float64, and each gradient no further from
    float64 (relative norm) than twice the torch backend's on the same inputs and upstream
    gradients, plus 1%."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    names = ["planes", "rays_o", "rays_d"] + [n for n, _ in dec.named_parameters()]
    ref = compare_render(planes, dec, o, d, tol=RENDER_TOL[torch.bfloat16], gen=torch.Generator().manual_seed(seed),
                         normwise=dict.fromkeys(names, math.inf), backend="torch")[2]
    compare_render(planes, dec, o, d, tol=RENDER_TOL[torch.bfloat16], gen=torch.Generator().manual_seed(seed),
                   normwise={k: 2 * v + 1e-2 for k, v in ref.items()})


@pytest.mark.parametrize("B, R, C, N, bg", [(1, 1, 1, 4, None), (2, 13, 5, 9, "shared"), (1, 37, 7, 6, "per_ray")],
                         ids=lambda v: str(v))
def test_render_float32_matches_reference(B, R, C, N, bg, gen):
    """Odd sizes; some rays miss the box (their samples read zero features)."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, B, R, C, N, miss=R // 4)
    background = {None: None, "shared": torch.rand(3, generator=gen),
                  "per_ray": torch.rand(B, R, 3, generator=gen)}[bg]
    compare_render(planes, dec, o, d, bg=None if background is None else background.to(DEVICE),
                   tol=RENDER_TOL[torch.float32], gen=gen)


@pytest.mark.parametrize("layers, hidden, C, B, R", [(2, 16, 3, 1, 5), (4, 24, 20, 2, 50), (5, 40, 17, 1, 9)],
                         ids=lambda v: str(v))
def test_render_fused_decoder_shapes(layers, hidden, C, B, R, gen):
    """The fused marcher's MLP: no middle layer, two and three (their inputs recomputed from the
    first layer's output in the backward), hidden widths padded to a power of two, channel counts
    past one 16-channel gather; (2, 50) rays are 8 ray blocks over 3 persistent backward programs
    (several blocks per program, weight gradients summed over the programs' rows)."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, B, R, C, 7, hidden=hidden, layers=layers, miss=R // 5)
    compare_render(planes, dec, o, d, bg=torch.rand(3, generator=gen).to(DEVICE), tol=RENDER_TOL[torch.float32],
                   gen=gen)


@pytest.mark.parametrize("hidden", [40, 72])
def test_render_fused_gpu_tile_configs(hidden, gen, monkeypatch):
    """The tiles a GPU launches (backends.gpu_launch_configs: fp32 decoders past HP = 64 march 8 x 4
    tiles in one stage) compute the same render, run here by the interpreter: 21 rays are ray
    blocks with a tail, 11 + 7 samples tiles with a tail."""
    require("render_triplane")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    planes, dec, o, d = make_scene(gen, 1, 21, 5, 6, hidden=hidden, layers=3, miss=4)
    with backends.gpu_launch_configs():
        assert march.launch_config(hidden, torch.float32, True)["BLOCK_R"] == (8 if hidden > 64 else 16)
        compare_render(planes, dec, o, d, bg=torch.rand(3, generator=gen).to(DEVICE), tol=RENDER_TOL[torch.float32],
                       gen=gen)


def test_render_fused_bf16_decoder(gen):
    """A bf16 decoder (what bf16 training runs): the fused kernel multiplies in bf16 with float32
    accumulation, as torch's bf16 Linear does, and keeps activations in float32 between layers.
    Outputs within bf16 rounding of the float64 reference of the same (bf16-valued) weights; each
    gradient, a sum of many rounded terms, no further from float64 than twice the torch backend's
    on the same bf16 decoder (plus 1%), as in test_render_bf16_planes."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 11, 6, 7, hidden=32, layers=3)
    dec = dec.to(torch.bfloat16)
    compare_within_twice_torch(planes, dec, o, d, gen)


def test_render_fused_saves_no_per_sample_activations(gen):
    """What autograd keeps for the backward: the fused marcher saves the sample positions
    ([B, R, S] floats) and per-ray outputs, never a per-sample feature or activation tensor; the
    reference keeps the [B, R*S, 3C] features and the MLP's activations."""
    require("render_triplane")
    B, R, C, S = 1, 20, 8, 12 + 6
    planes, dec, o, d = make_scene(gen, B, R, C, 6, hidden=32, layers=4)
    planes.requires_grad_(True)
    saved = {}
    for backend in ("triton", "torch"):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: sizes.append(x.numel()) or x, lambda x: x):
            out = render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=12, n_importance=6, deterministic=True,
                                  backend=backend)
        out["color"].sum().backward()
        saved[backend] = sizes
    per_sample_features = B * R * S * 3 * C
    assert max(saved["triton"]) <= max(B * R * S, planes.numel(), sum(p.numel() for p in dec.parameters()))
    assert sum(saved["torch"]) >= per_sample_features
    assert sum(saved["torch"]) > 10 * sum(saved["triton"])


def test_render_fused_falls_back_for_unsupported_decoders(gen):
    """A one-layer decoder has no hidden layer for the fused kernel: `auto` on CUDA and an explicit
    request name the reason; the torch reference still renders it."""
    planes, _, o, d = make_scene(gen, 1, 4, 3, 5)
    dec = TriplaneMLP(3, 16, 1).to(DEVICE)
    if backends.availability("render_triplane")["triton"] is None:
        with pytest.raises(ValueError, match=r"triton: decoder has 1 layer"):
            render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=4, n_importance=0, backend="triton")
    out = render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=4, n_importance=0, backend="auto")
    assert out["color"].shape == (1, 4, 3)


def test_render_bf16_planes(gen):
    """bf16 planes: bf16 features, and their gradient reaches the sampler rounded to bf16 too.
    The outputs match the float64 reference to bf16 rounding. The gradients sum many rounded
    terms (a point's gradient is a difference of texel values, a weight's a sum over samples)
    and the importance samples move with the rounded coarse weights: the torch reference itself
    on these bf16 planes is up to ~10% off (relative norm) from float64. So each triton gradient
    must be no further from float64 than twice the torch backend's (plus 1%), measured on the
    same inputs and upstream gradients."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 9, 5, 7, dtype=torch.bfloat16)
    compare_within_twice_torch(planes, dec, o, d, gen)


def test_render_empty_scene(gen):
    """Zero density (softplus of -40: ~4e-18): opacity ~0, the colour is the background."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 7, 3, 5, density_bias=-40.0)
    bg = torch.rand(3, generator=gen).to(DEVICE)
    out, _, _ = compare_render(planes, dec, o, d, bg=bg, tol=RENDER_TOL[torch.float32], gen=gen)
    assert out[1].abs().max() < 1e-12 and torch.allclose(out[0], bg.expand_as(out[0]), atol=1e-6)


def test_render_opaque_scene_terminates_early(gen):
    """Very dense everywhere: every ray is opaque within its first samples, the rest are cut
    (transmittance below eps) in both implementations."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 9, 3, 5, density_bias=60.0)
    out, _, _ = compare_render(planes, dec, o, d, tol=RENDER_TOL[torch.float32], gen=gen, n_samples=16, n_importance=5)
    assert torch.allclose(out[1], torch.ones_like(out[1]), atol=1e-4)
    # Depth sits in the first stratum of the box-clipped interval: the ray stops at once.
    full = torch.full(o.shape[:2], 0.5, device=DEVICE), torch.full(o.shape[:2], 3.5, device=DEVICE)
    near, far = box_interval(o, d, *full, 1.0)
    assert (far > near).all() and (out[2][..., 0] < near + (far - near) / 16).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_render_clips_rays_to_the_box(backend, gen):
    """Box clipping (default): rays that miss the box get exactly the background, zero opacity and
    depth, and no gradient to planes, decoder or rays (the background's is 1); the hit rays equal
    a render of their clipped intervals without clipping. clip_to_box=False integrates the
    density that zero features decode to outside the box (the floaters clipping removes)."""
    require("render_triplane", backend)
    B, R, miss = 2, 9, 3
    planes, dec, o, d = make_scene(gen, B, R, 4, 6, miss=miss)
    planes.requires_grad_()
    o, d = o.requires_grad_(), d.requires_grad_()
    bg = torch.rand(B, R, 3, generator=gen).to(DEVICE).requires_grad_()
    kw = dict(n_samples=9, n_importance=5, deterministic=True, backend=backend)
    out = render_triplane(planes, dec, o, d, 0.5, 4.5, background=bg, **kw)
    hit = slice(0, R - miss)
    missed = slice(R - miss, R)
    assert torch.equal(out["color"][:, missed], bg[:, missed].detach())
    assert not out["opacity"][:, missed].any() and not out["depth"][:, missed].any()
    # Gradients of the missed rays' outputs alone.
    loss = sum((out[k][:, missed] * random_like(out[k][:, missed], gen)).sum() for k in out)
    params = [p for p in dec.parameters()]
    g = torch.autograd.grad(loss, [planes, o, d, bg, *params], allow_unused=True)
    for name, x in zip(["planes", "rays_o", "rays_d", *[n for n, _ in dec.named_parameters()]], g[:3] + g[4:]):
        assert x is None or not x.any(), f"{name} has a gradient from rays that miss the box"
    assert not g[3][:, hit].any() and g[3][:, missed].any()

    near, far = box_interval(o, d, torch.full((B, R), 0.5, device=DEVICE), torch.full((B, R), 4.5, device=DEVICE), 1.0)
    assert torch.equal(near[:, missed], far[:, missed]) and (far[:, hit] > near[:, hit]).all()
    inner = render_triplane(planes, dec, o[:, hit], d[:, hit], near[:, hit], far[:, hit], background=bg[:, hit],
                            clip_to_box=False, **kw)
    # The same rays in a smaller batch: equal up to float32 reassociation (the torch backend's
    # decoder matmuls block by row count, so the sums may round differently), not bitwise.
    for k in out:
        check(k, out[k][:, hit], inner[k], RENDER_TOL[torch.float32])
    unclipped = render_triplane(planes, dec, o, d, 0.5, 4.5, background=bg, clip_to_box=False, **kw)
    assert (unclipped["opacity"][:, missed] > 0.1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_interval_of_half_rays_on_a_box_face(dtype, gen):
    """Rays on the face x = -bound with a zero x direction (the slab guard's case) hit the box in
    half precision too: the interval is computed in float32 (in fp16 the 1e-12 guard rounds to 0,
    0 / 0 = NaN, a miss) and equals the float32 interval of the same rays, rounded."""
    B, R, bound = 2, 5, 0.5 + int(torch.randint(0, 9, (), generator=gen)) / 8   # exact in half precision
    u = (torch.rand(B, R, 2, generator=gen) - 0.5) * bound           # y, z inside the face
    o = torch.cat([torch.full((B, R, 1), -bound), u[..., :1], u[..., 1:] - 2 * bound], -1).to(dtype)  # [B, R, 3]
    d = torch.cat([torch.zeros(B, R, 1), (torch.rand(B, R, 1, generator=gen) - 0.5) * 0.1,
                   torch.ones(B, R, 1)], -1).to(dtype)                                              # [B, R, 3]
    near, far = torch.full((B, R), 0.25, dtype=dtype), torch.full((B, R), 8 * bound, dtype=dtype)
    lo, hi = box_interval(o.to(DEVICE), d.to(DEVICE), near.to(DEVICE), far.to(DEVICE), bound)
    lo32, hi32 = box_interval(o.float(), d.float(), near.float(), far.float(), bound)
    assert lo.dtype == hi.dtype == dtype and (hi32 > lo32).all()
    assert torch.equal(lo.cpu(), lo32.to(dtype)) and torch.equal(hi.cpu(), hi32.to(dtype)) and (hi > lo).all()


def test_render_thin_samples_match_float64(gen):
    """Thin media (optical depth ~1e-7 a sample): opacity 1 - exp(-tau) is taken without
    cancellation (a series for small tau), so the fused marcher's colour and opacity match float64
    to 1e-4 relative, where 1 - exp(-tau) in float32 is ~20% off at tau = 1e-7."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 7, 3, 5, density_bias=-16.0)
    kw = dict(n_samples=24, n_importance=8, deterministic=True)
    out = render_triplane(planes, dec, o, d, 0.5, 3.5, backend="triton", **kw)
    ref = render_triplane(planes.double(), copy.deepcopy(dec).double(), o.double(), d.double(), 0.5, 3.5,
                          backend="torch", **kw)
    assert (ref["opacity"] > 1e-7).all() and (ref["opacity"] < 1e-4).all()
    for k in ("color", "opacity", "depth"):
        check(f"thin {k}", out[k], ref[k], (0.0, 1e-4))


def test_render_random_sampling_with_shared_generator(gen):
    """Jittered strata and random importance samples: the same generator state gives the same
    samples to both backends."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 2, 6, 4, 5)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    outs = []
    for backend in ("triton", "torch"):
        g2 = torch.Generator(device=DEVICE).manual_seed(seed)
        outs.append(render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=9, n_importance=5, generator=g2,
                                    backend=backend))
    for k in ("color", "opacity", "depth"):
        check(k, outs[0][k], outs[1][k].double(), RENDER_TOL[torch.float32])
    det = render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=9, n_importance=5, deterministic=True, backend="torch")
    assert not torch.equal(det["depth"], outs[1]["depth"])


def test_render_tensor_near_far_and_no_importance(gen):
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 2, 5, 3, 6)
    near = (0.4 + torch.rand(2, 5, generator=gen)).to(DEVICE)
    far = near + 0.5 + 2 * torch.rand(2, 5, generator=gen).to(DEVICE)
    compare_render(planes, dec, o, d, near=near, far=far, tol=RENDER_TOL[torch.float32], gen=gen, n_importance=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_render_empty_rays(backend, gen):
    require("render_triplane", backend)
    planes, dec, o, d = make_scene(gen, 2, 0, 3, 4)
    planes.requires_grad_()
    out = render_triplane(planes, dec, o, d, 0.5, 2.0, n_samples=4, n_importance=3, backend=backend)
    assert [tuple(v.shape) for v in out.values()] == [(2, 0, 3), (2, 0, 1), (2, 0, 1)]
    g = torch.autograd.grad(sum(v.sum() for v in out.values()), planes)[0]
    assert g.shape == planes.shape and not g.any()


def test_renderer_module(gen):
    """TriplaneRenderer = render_triplane with its decoder; deterministic in eval mode."""
    planes, _, o, d = make_scene(gen, 1, 5, 4, 6)
    m = TriplaneRenderer(4, hidden=8, n_layers=2, n_samples=6, n_importance=4, backend="torch").to(DEVICE).eval()
    a, b = m(planes, o, d, 0.5, 3.5), m(planes, o, d, 0.5, 3.5)
    ref = render_triplane(planes, m.decoder, o, d, 0.5, 3.5, n_samples=6, n_importance=4, deterministic=True)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], ref[k])
    m.train()
    loss = m(planes.requires_grad_(), o, d, 0.5, 3.5)["color"].sum()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters()) and planes.grad.abs().sum() > 0


# --- the decoder ---------------------------------------------------------------------------------


def test_decoder_weights_decode_and_module(gen):
    """TriplaneMLP is decode() on its weights(); render_triplane takes the weights themselves or
    the module, with the same result; inconsistent weights are refused naming the layer."""
    planes, dec, o, d = make_scene(gen, 1, 6, 4, 5)
    feats = torch.randn(2, 7, 12, generator=gen).to(DEVICE)
    w = dec.weights()
    assert isinstance(w, DecoderWeights) and w.in_features == 12 and w.hidden == 16
    for a, b in zip(dec(feats), decode(w, feats)):
        assert torch.equal(a, b)
    kw = dict(n_samples=5, n_importance=3, deterministic=True, backend="torch")
    by_module = render_triplane(planes, dec, o, d, 0.5, 3.5, **kw)
    by_weights = render_triplane(planes, w, o, d, 0.5, 3.5, **kw)
    for k in by_module:
        assert torch.equal(by_module[k], by_weights[k])
    bad = w._replace(weights=(w.weights[0], w.weights[1][:, :5], w.weights[2]))
    with pytest.raises(ValueError, match=r"decoder layer 1: weight must be \[hidden, 16\] and bias \[hidden\]"):
        render_triplane(planes, bad, o, d, 0.5, 3.5, **kw)
    short = w._replace(biases=w.biases[:2])
    with pytest.raises(ValueError, match=r"decoder must have as many biases as weights"):
        render_triplane(planes, short, o, d, 0.5, 3.5, **kw)


# --- selection, bad input ------------------------------------------------------------------------


def test_registered_backends_and_auto():
    for op in ("triplane_sample", "render_triplane"):
        table = backends.backends(op)
        assert set(table) == {"torch", "triton"} and table["triton"].priority > table["torch"].priority
        q = backends.Query(device=torch.device("cpu"), dtype=torch.float32)
        # auto never runs the Triton interpreter on CPU tensors.
        assert backends.select(op, "auto", q).name == "torch"


def _sample_args(gen):
    return dict(planes=make_planes(gen, 2, 3, 4, 5), points=torch.rand(2, 6, 3, generator=gen).to(DEVICE))


SAMPLE_BAD = {
    "planes-count": (lambda x: dict(x, planes=x["planes"][:, :2]), ValueError, r"planes must have shape \[B, 3, C, H, W\]"),
    "planes-rank": (lambda x: dict(x, planes=x["planes"][0]), ValueError, r"planes must have 5 dims"),
    "planes-int": (lambda x: dict(x, planes=x["planes"].int()), TypeError, r"planes must be a floating tensor"),
    "planes-empty": (lambda x: dict(x, planes=x["planes"][..., :0]), ValueError, r"planes must have C, H, W >= 1"),
    "points-last": (lambda x: dict(x, points=x["points"][..., :2]), ValueError, r"points must end in a dimension of size 3"),
    "points-rank": (lambda x: dict(x, points=x["points"][0]), ValueError, r"points must have 3 dims"),
    "points-batch": (lambda x: dict(x, points=x["points"][:1]), ValueError, r"points must have shape \[B, M, 3\] with B = 2"),
    "points-nan": (lambda x: dict(x, points=x["points"].index_fill(1, torch.tensor([3]), math.nan)), ValueError,
                   r"points must be finite; got nan at index \(0, 3, 0\)"),
    "reduce": (lambda x: dict(x, reduce="max"), ValueError, r"reduce must be one of"),
    "bound-zero": (lambda x: dict(x, bound=0.0), ValueError, r"bound must be a finite real number > 0"),
    "bound-inf": (lambda x: dict(x, bound=math.inf), ValueError, r"bound must be a finite real number > 0"),
}


@pytest.mark.parametrize("case", list(SAMPLE_BAD))
def test_sample_bad_input(case, gen):
    mutate, exc, pattern = SAMPLE_BAD[case]
    x = dict(reduce="concat", bound=1.0) | mutate(dict(_sample_args(gen), reduce="concat", bound=1.0))
    with pytest.raises(exc, match=pattern):
        triplane_sample(x["planes"], x["points"], x["reduce"], x["bound"])


def _render_args(gen):
    planes, dec, o, d = make_scene(gen, 2, 5, 3, 4)
    return dict(planes=planes, decoder=dec, rays_o=o, rays_d=d, near=0.5, far=2.0)


RENDER_BAD = {
    "planes-count": (lambda x: dict(x, planes=x["planes"][:, :1]), ValueError, r"planes must have shape \[B, 3"),
    "planes-rank": (lambda x: dict(x, planes=x["planes"][None]), ValueError, r"planes must have 5 dims"),
    "decoder-width": (lambda x: dict(x, decoder=TriplaneMLP(4)), ValueError,
                      r"decoder takes 12 input features \(n_features=4\) but planes give 3 \* C = 9"),
    "decoder-type": (lambda x: dict(x, decoder=torch.nn.Linear(9, 4)), TypeError, r"decoder must be a"),
    "rays_o-last": (lambda x: dict(x, rays_o=x["rays_o"][..., :2]), ValueError, r"rays_o must end in a dimension of size 3"),
    "rays_o-batch": (lambda x: dict(x, rays_o=x["rays_o"][:1]), ValueError, r"rays_o must have shape \[B, R, 3\]"),
    "rays_d-shape": (lambda x: dict(x, rays_d=x["rays_d"][:, :4]), ValueError, r"rays_d must have shape"),
    "rays_o-inf": (lambda x: dict(x, rays_o=x["rays_o"].index_fill(1, torch.tensor([2]), math.inf)), ValueError,
                   r"rays_o must be finite; got inf at index \(0, 2, 0\)"),
    "rays_d-nan": (lambda x: dict(x, rays_d=x["rays_d"].index_fill(2, torch.tensor([1]), math.nan)), ValueError,
                   r"rays_d must be finite; got nan"),
    "near-eq-far": (lambda x: dict(x, near=2.0), ValueError, r"near must be < far for every ray; got near=2.0 >= far=2.0"),
    "near-gt-far-tensor": (lambda x: dict(x, far=torch.full((2, 5), 2.0).index_fill(1, torch.tensor([3]), 0.1)),
                           ValueError, r"near must be < far .* at ray \(0, 3\)"),
    "near-shape": (lambda x: dict(x, near=torch.zeros(2, 4)), ValueError, r"near must have shape \[B, R\] of rays_o"),
    "far-nan": (lambda x: dict(x, far=math.nan), ValueError, r"far must be a finite real number or a \[B, R\] tensor"),
    "near-inf-tensor": (lambda x: dict(x, near=torch.full((2, 5), -math.inf)), ValueError, r"near must be finite"),
    "n_samples": (lambda x: dict(x, n_samples=0), ValueError, r"n_samples must be an integer >= 1"),
    "n_importance": (lambda x: dict(x, n_importance=-1), ValueError, r"n_importance must be an integer >= 0"),
    "background": (lambda x: dict(x, background=torch.zeros(4)), ValueError, r"background must have shape \[3\] or"),
    "eps": (lambda x: dict(x, transmittance_eps=1.0), ValueError, r"transmittance_eps must be a real number"),
}


@pytest.mark.parametrize("case", list(RENDER_BAD))
def test_render_bad_input(case, gen):
    mutate, exc, pattern = RENDER_BAD[case]
    x = mutate(_render_args(gen))
    kw = {k: x.pop(k) for k in ("n_samples", "n_importance", "background", "transmittance_eps") if k in x}
    with pytest.raises(exc, match=pattern):
        render_triplane(x["planes"], x["decoder"], x["rays_o"], x["rays_d"], x["near"], x["far"], **kw)


# --- GPU: the same comparisons at larger sizes on CUDA tensors ------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sample_large(dtype, gen):
    require("triplane_sample")
    compare_sample(make_planes(gen, 4, 80, 64, 64, dtype), make_points(gen, 4, 50_000, 64, 64), "concat", 1.0, gen)


@pytest.mark.gpu
def test_gpu_render_large(gen):
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 2, 1000, 40, 32, hidden=64, layers=4, miss=50)
    compare_render(planes, dec, o, d, tol=RENDER_TOL[torch.float32], gen=gen, n_samples=64, n_importance=64)


def test_compile_triton_sample_fullgraph(gen):
    """The Triton sampler's custom ops trace under fullgraph=True with dynamic shapes (fake
    implementations), and the compiled forward and gradients equal eager's: bit for bit under the
    interpreter (sequential atomics), to float32 rounding on a GPU, where the plane gradient's
    atomic adds land in a different order each run."""
    require("triplane_sample")
    triton_triplane = triton_kernels
    torch._dynamo.reset()
    f = torch.compile(lambda p, x: (triton_triplane.triplane_sample(p, x, "sum", 1.0),), fullgraph=True,
                      dynamic=True, backend="aot_eager")
    fe = lambda p, x: (triton_triplane.triplane_sample(p, x, "sum", 1.0),)  # noqa: E731
    for M in (9, 20):
        planes, points = make_planes(gen, 2, 3, 5, 4), make_points(gen, 2, M, 5, 4)
        assert torch.equal(f(planes, points)[0], fe(planes, points)[0])
        up = [random_like(fe(planes, points)[0], gen)]
        for a, b in zip(grads(f, [planes, points], up), grads(fe, [planes, points], up)):
            if planes.is_cuda:
                check("compiled grad", a, b, TOL[torch.float32])
            else:
                assert torch.equal(a, b)


# --- launch device, shared memory -------------------------------------------------------------------


def test_triton_launches_run_under_the_tensors_device(gen, monkeypatch):
    """Every Triton launch of triplane_sample and render_triplane (forward and backward) happens
    inside backends.cuda_device_guard(the inputs' device): helpers.triton_launches_inside_guard
    fails a launch outside any guard and returns each launch's guard device."""
    require("render_triplane")
    planes, dec, o, d = make_scene(gen, 1, 5, 3, 5)
    planes.requires_grad_()
    points = make_points(gen, 1, 7, 5, 5)

    def run():
        feats = triplane_sample(planes, points, backend="triton")
        out = render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=4, n_importance=2, backend="triton")
        (feats.sum() + out["color"].sum()).backward()

    guarded = triton_launches_inside_guard(monkeypatch, run)
    assert {device for _, device in guarded} == {planes.device}
    launched = [name for name, _ in guarded]
    assert sorted(set(launched)) == ["_march_bwd", "_march_fwd", "_triplane_bwd", "_triplane_fwd"]


@pytest.mark.gpu
def test_gpu_render_on_a_second_device(gen):
    """Inputs on cuda:1 while cuda:0 is current: the launches follow the tensors."""
    require("render_triplane")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    planes, dec, o, d = make_scene(gen, 1, 40, 8, 9, hidden=32, miss=5)
    with torch.cuda.device(0):
        dev = torch.device("cuda:1")
        p1 = planes.to(dev).requires_grad_()
        feats = triplane_sample(p1, o.to(dev), backend="triton")
        out = render_triplane(p1, dec.to(dev), o.to(dev), d.to(dev), 0.5, 3.5, n_samples=8, n_importance=4,
                              deterministic=True, backend="triton")
        (feats.sum() + out["color"].sum()).backward()
    ref = render_triplane(planes.cpu().double(), copy.deepcopy(dec).cpu().double(), o.cpu().double(),
                          d.cpu().double(), 0.5, 3.5, n_samples=8, n_importance=4, deterministic=True, backend="torch")
    check("cuda:1 color", out["color"], ref["color"].to(dev), RENDER_TOL[torch.float32])
    assert torch.isfinite(p1.grad).all()


# Shared memory of compiled marcher launches (Triton 3.8, sm_86, fast3d.triton_aot), by (operand
# dtype, dot precision, HP, BLOCK_R, BLOCK_S, stages, backward): what shared_memory_bytes models.
COMPILED_SHARED = {
    (torch.float32, "ieee", 128, 16, 8, 3, False): 196_608, (torch.float32, "tf32", 128, 16, 8, 3, False): 196_608,
    (torch.float32, "ieee", 128, 16, 4, 3, True): 172_032,
    (torch.float32, "tf32", 128, 16, 8, 1, False): 131_072, (torch.float32, "tf32", 128, 16, 4, 1, False): 98_304,
    (torch.float32, "tf32", 128, 8, 4, 1, False): 81_920, (torch.float32, "ieee", 128, 8, 4, 1, False): 81_920,
    (torch.float32, "tf32", 128, 16, 4, 1, True): 106_496, (torch.float32, "tf32", 128, 8, 4, 1, True): 90_112,
    (torch.float32, "ieee", 128, 8, 4, 1, True): 90_112,
    (torch.bfloat16, "ieee", 128, 16, 8, 3, False): 73_728, (torch.bfloat16, "ieee", 128, 16, 4, 3, True): 61_440,
}


def test_marcher_shared_memory_model_matches_compiled_figures():
    """shared_memory_bytes equals the compiled figure for fp32 / tf32 and bounds bf16's."""
    for (dtype, _prec, hp, br, bs, stages, backward), figure in COMPILED_SHARED.items():
        cfg = dict(BLOCK_R=br, BLOCK_S=bs, HP=hp, num_stages=stages)
        model = march.shared_memory_bytes(cfg, dtype, backward)
        assert model == figure if dtype == torch.float32 else model >= figure, (dtype, cfg, backward, model, figure)


@pytest.mark.parametrize("allow_tf32", [False, True])
def test_marcher_gpu_configs_fit_every_target(allow_tf32, monkeypatch):
    """Every accepted hidden width and dtype, at the configurations a GPU launches, fits the
    smallest shared memory of the build's targets (sm_86/89: 101,376 B)."""
    require("render_triplane")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    limit = min(backends.SHARED_MEMORY_OPTIN.values())
    with backends.gpu_launch_configs():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for hidden in range(1, march.MAX_HIDDEN + 1):
                assert march.unsupported_decoder(3, hidden, dtype, torch.device("cpu")) == []
                for backward in (False, True):
                    cfg = march.launch_config(hidden, dtype, backward)
                    assert march.shared_memory_bytes(cfg, dtype, backward) <= limit


def test_marcher_refuses_configs_past_the_device_limit(gen, monkeypatch):
    """A device whose shared memory is below a launch's need gets the reason, not a launch."""
    require("render_triplane")
    planes, _, o, d = make_scene(gen, 1, 4, 3, 5)
    dec = TriplaneMLP(3, 128, 3).to(DEVICE)
    monkeypatch.setattr(backends, "shared_memory_limit", lambda device: 50_000)
    why = r"triton: forward tile 8x4 at hidden width 128 .* needs 81920 B of shared memory; cpu allows 50000 B"
    with backends.gpu_launch_configs(), pytest.raises(ValueError, match=why):
        render_triplane(planes, dec, o, d, 0.5, 3.5, n_samples=4, n_importance=0, backend="triton")
