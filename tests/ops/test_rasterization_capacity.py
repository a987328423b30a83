"""Tests of rasterization's intersection count, its `capacity` mode and the int32 intersection guard.

meta["n_intersections"] is the number of (Gaussian, 16x16 tile) pairs the native backends bin:
every backend reports the same count (the cpu and torch backends exactly, in float64), checked
against a brute-force count over pixels. With capacity=int, meta["overflow"] is set exactly when
the count exceeds it; the cpu and torch backends still render everything, CUDA drops the
intersections past the capacity and never synchronises with the host, so a forward + backward can
be captured in a CUDA graph (gpu tests). Past 2^31 - 1 intersections the native backends refuse
with a message naming the count, the image and the Gaussians.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_like
from test_rasterization import make_scene, render, require

from fast3d.ops.rasterization import check_overflow, rasterization, reference

CASES = [  # (B, C, N, W, H, sh_degree, rasterize_mode)
    (1, 1, 41, 33, 17, None, "classic"),
    (2, 3, 67, 37, 29, 0, "classic"),
    (1, 2, 53, 48, 31, 2, "antialiased"),
    (3, 2, 45, 17, 40, None, "antialiased"),
    (2, 2, 90, 65, 47, 3, "classic"),
]


def brute_force_count(means2d: torch.Tensor, radii: torch.Tensor, width: int, height: int) -> int:
    """Tiles holding a pixel centre within a Gaussian's radii, summed over Gaussians, by looking
    at every pixel: the definition tile_intersections computes in closed form."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    tile_id = (ys.long() // reference.TILE) * width + xs.long() // reference.TILE        # [H, W]
    total = 0
    for m2, r in zip(means2d.reshape(-1, 2).double(), radii.reshape(-1, 2)):
        if (r <= 0).any():
            continue
        inside = ((xs - m2[0]).abs() <= r[0]) & ((ys - m2[1]).abs() <= r[1])
        total += tile_id[inside].unique().numel()
    return total


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}C{}N{}-{}x{}-sh{}-{}".format(*c))
def test_n_intersections_agree_between_cpu_and_torch(case, gen):
    require("cpu")
    B, C, N, W, H, sh, rmode = case
    x = make_scene(gen, B, C, N, W, H, sh_degree=sh)
    metas = {be: render(x, be, torch.float64, rasterize_mode=rmode)[2] for be in ("torch", "cpu")}
    for meta in metas.values():
        n = meta["n_intersections"]
        assert n.dtype == torch.int64 and n.dim() == 0 and n.device == x["means"].device
        assert meta["capacity"] is None and meta["overflow"].dtype == torch.bool and not meta["overflow"]
    assert torch.equal(metas["torch"]["radii"], metas["cpu"]["radii"])
    n = int(metas["cpu"]["n_intersections"])
    assert n == int(metas["torch"]["n_intersections"]) > 0
    assert n == brute_force_count(metas["cpu"]["means2d"].detach(), metas["cpu"]["radii"], W, H)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_overflow_is_set_exactly_when_capacity_is_below_the_count(backend, gen):
    """The flag is n_intersections > capacity; the torch and cpu backends render every Gaussian
    whatever the capacity (only CUDA drops intersections)."""
    require(backend)
    x = make_scene(gen, 2, 2, 37, 31, 23, sh_degree=1)
    out_full, alpha_full, meta, _ = render(x, backend)
    n = int(meta["n_intersections"])
    assert n > 2
    for capacity in (1, n - 1, n, n + 1, 2**31 - 1):
        out, alpha, meta, _ = render(x, backend, capacity=capacity)
        assert int(meta["n_intersections"]) == n and meta["capacity"] == capacity
        overflow = meta["overflow"]
        assert overflow.dtype == torch.bool and overflow.dim() == 0 and bool(overflow) == (capacity < n), capacity
        assert torch.equal(out, out_full) and torch.equal(alpha, alpha_full)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_check_overflow_raises_naming_count_and_capacity(backend, gen):
    require(backend)
    x = make_scene(gen, 1, 2, 29, 27, 21)
    n = int(render(x, backend)[2]["n_intersections"])
    with pytest.raises(RuntimeError, match=rf"rasterization: {n} Gaussian-tile intersections exceeded "
                                           rf"capacity={n - 1} \(the {backend} backend rendered them all"):
        check_overflow(render(x, backend, capacity=n - 1)[2])
    check_overflow(render(x, backend, capacity=n)[2])
    check_overflow(render(x, backend)[2])


@pytest.mark.parametrize("backend", ["auto", "torch", "cpu"])
@pytest.mark.parametrize("capacity", [0, -3, 2**31, True, 64.0, "64"])
def test_capacity_is_validated(backend, capacity, gen):
    x = make_scene(gen, 1, 1, 5, 9, 8, odd=False)
    with pytest.raises(ValueError, match=r"capacity must be None or an integer in \[1, 2147483647\] .*; got "):
        render(x, backend, capacity=capacity)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_empty_scene_has_no_intersections(backend, gen):
    x = make_scene(gen, 2, 2, 1, 13, 11, odd=False)
    x.update({k: x[k][:, :0] for k in ("means", "quats", "scales", "opacities", "colors")})
    _, _, meta, _ = render(x, backend, capacity=1)
    assert int(meta["n_intersections"]) == 0 and not meta["overflow"]


def test_capacity_under_compile(gen):
    """The custom op's fake implementation takes the capacity: fullgraph traces and matches eager."""
    require("cpu")
    torch._dynamo.reset()
    x = make_scene(gen, 1, 2, 19, 17, 15, odd=False)
    args = [x[k].float() for k in ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks")]

    def f(*a):
        out, alpha, meta = rasterization(*a, 17, 15, backend="cpu", capacity=8)
        return out, alpha, meta["n_intersections"], meta["overflow"]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(*args), f(*args)):
        assert torch.equal(a, b)


def huge_scene(device: str = "cpu") -> dict:
    """65,536 Gaussians that each cover all of a 4096x2048 image (256 x 128 = 32,768 tiles):
    2^31 intersections, one past the int32 range."""
    N, W, H = 65536, 4096, 2048
    means = torch.zeros(1, N, 3)
    means[..., 2] = torch.linspace(5.0, 6.0, N)
    x = dict(means=means, quats=torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(1, N, 1), scales=torch.full((1, N, 3), 100.0),
             opacities=torch.full((1, N), 0.9), colors=torch.rand(1, N, 3), viewmats=torch.eye(4)[None, None],
             Ks=torch.tensor([[[[1000.0, 0.0, W / 2], [0.0, 1000.0, H / 2], [0.0, 0.0, 1.0]]]]))
    return dict({k: v.to(device) for k, v in x.items()}, width=W, height=H)


GUARD = (r"2147483648 Gaussian-tile intersections \(1 image of 4096x2048 pixels = 32768 tiles of 16x16 each, "
         r"65536 Gaussians per image\) exceed the limit of 2147483647 \(int32 intersection indices\); use fewer or "
         r"smaller Gaussians, a smaller image")


def _rasterize(x: dict, **kw):
    keys = ("means", "quats", "scales", "opacities", "colors", "viewmats", "Ks", "width", "height")
    return rasterization(*(x[k] for k in keys), **kw)


def test_intersections_past_int32_are_refused(gen):
    """The cpu backend counts the tile pairs (about half a second here) and refuses before it
    allocates the intersection list or the image, through the same check CUDA runs."""
    require("cpu")
    with pytest.raises(RuntimeError, match=r"gs_rasterize_forward: " + GUARD):
        _rasterize(huge_scene(), backend="cpu")


# --- GPU ------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_intersections_past_int32_are_refused_before_allocation():
    """Counting is per Gaussian on the GPU; the refusal comes before the 2^31-entry key and value
    buffers (24 GiB) would be allocated."""
    require("cuda")
    x = huge_scene("cuda")
    torch.cuda.reset_peak_memory_stats()
    with pytest.raises(RuntimeError, match=r"gs_rasterize_forward: " + GUARD):
        _rasterize(x, backend="cuda")
    assert torch.cuda.max_memory_allocated() < 2**30


def _cuda_scene(gen, B=2, C=3, N=301, W=45, H=37, sh_degree=1) -> dict:
    x = make_scene(gen, B, C, N, W, H, sh_degree=sh_degree)
    return {k: v.cuda().float() if isinstance(v, torch.Tensor) else v for k, v in x.items()}


@pytest.mark.gpu
def test_cuda_capacity_overflow_is_reported(gen):
    """With capacity >= the count, CUDA renders exactly what capacity=None renders; below it, the
    count is still the true one, overflow is set, the render (fewer intersections) stays finite,
    and check_overflow names count and capacity."""
    require("cuda")
    x = _cuda_scene(gen)
    out_full, alpha_full, meta, grad_full = render(x, "cuda", torch.float32, deterministic=True)
    n = int(meta["n_intersections"])
    radii, means2d = meta["radii"], meta["means2d"].detach()
    assert n == int(reference.tile_intersections(means2d, radii, x["width"], x["height"]).sum()) > 10
    g_out, g_alpha = random_like(out_full, gen), random_like(alpha_full, gen)
    g_full = grad_full(g_out, g_alpha)
    for capacity in (n, n + 1000):
        out, alpha, meta, grad = render(x, "cuda", torch.float32, deterministic=True, capacity=capacity)
        assert int(meta["n_intersections"]) == n and not meta["overflow"]
        assert meta["overflow"].device.type == "cuda"
        assert torch.equal(out, out_full) and torch.equal(alpha, alpha_full)
        g = grad(g_out, g_alpha)
        for k in g:
            assert torch.equal(g[k], g_full[k]), k
    out, alpha, meta, grad = render(x, "cuda", torch.float32, deterministic=True, capacity=n // 2)
    assert int(meta["n_intersections"]) == n and bool(meta["overflow"])
    assert torch.isfinite(out).all() and torch.isfinite(alpha).all() and not torch.equal(alpha, alpha_full)
    assert alpha.sum() < alpha_full.sum()
    assert all(torch.isfinite(v).all() for v in grad(g_out, g_alpha).values())
    with pytest.raises(RuntimeError, match=rf"{n} Gaussian-tile intersections exceeded capacity={n // 2} "
                                           r"\(the intersections past it were not rendered\)"):
        check_overflow(meta)


@pytest.mark.gpu
def test_cuda_capacity_path_never_synchronises():
    """2^31 intersections with capacity=4096, forward and backward under
    torch.cuda.set_sync_debug_mode("error") (any host synchronisation raises): the count (int64)
    is exact and overflow is set."""
    require("cuda")
    x = huge_scene("cuda")
    x["means"].requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, alpha, meta = _rasterize(x, backend="cuda", capacity=4096)
        (g_means,) = torch.autograd.grad(out.sum() + alpha.sum(), [x["means"]])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(meta["n_intersections"]) == 2**31 and bool(meta["overflow"])
    assert torch.isfinite(out).all() and torch.isfinite(alpha).all() and torch.isfinite(g_means).all()


@pytest.mark.gpu
def test_cuda_graph_captures_forward_and_backward(gen):
    """A forward + backward with a capacity, captured in a torch.cuda.CUDAGraph (capture fails on
    any host synchronisation), replayed on new inputs copied into the captured ones, equals an
    eager call on those inputs (deterministic backward: bit for bit)."""
    require("cuda")
    first = _cuda_scene(gen)
    second = dict(_cuda_scene(gen), viewmats=first["viewmats"], Ks=first["Ks"])  # the cameras are captured too
    diff = ("means", "quats", "scales", "opacities", "colors", "backgrounds")
    static = {k: first[k].clone().requires_grad_() for k in diff}
    consts = {k: first[k].clone() for k in ("viewmats", "Ks")}
    W, H = first["width"], first["height"]
    n_max = max(int(render(s, "cuda", torch.float32)[2]["n_intersections"]) for s in (first, second))
    capacity = 2 * n_max
    g_out = torch.randn(2, 3, H, W, 3, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    g_alpha = torch.randn(2, 3, H, W, 1, device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def step(inputs: dict, capacity):
        out, alpha, meta = rasterization(inputs["means"], inputs["quats"], inputs["scales"], inputs["opacities"],
                                         inputs["colors"], consts["viewmats"], consts["Ks"], W, H, sh_degree=1,
                                         backgrounds=inputs["backgrounds"], far_plane=100.0, deterministic=True,
                                         backend="cuda", capacity=capacity)
        grads = torch.autograd.grad([out, alpha], [inputs[k] for k in diff], [g_out, g_alpha])
        return out, alpha, meta["n_intersections"], meta["overflow"], grads

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture, as torch.cuda.graph requires
            step(static, capacity)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(static, capacity)
    for inputs in (second, first):
        with torch.no_grad():
            for k in diff:
                static[k].copy_(inputs[k])
        graph.replay()
        torch.cuda.synchronize()
        eager = step({k: inputs[k].clone().requires_grad_() for k in diff}, None)
        out, alpha, n, overflow, grads = captured
        assert torch.equal(out, eager[0]) and torch.equal(alpha, eager[1])
        assert int(n) == int(eager[2]) and not bool(overflow)
        for k, a, b in zip(diff, grads, eager[4]):
            assert torch.equal(a, b), k
