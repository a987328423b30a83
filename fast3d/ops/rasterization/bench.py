"""Benchmark workloads and the byte/flop model of rasterization."""

from __future__ import annotations

import math

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.ops.rasterization.api import rasterization

WORKLOADS = [
    Workload("lgm", dict(scenes=8, cameras=8, gaussians=65536, width=512, height=512, sh_degree=None,
                         render_mode="RGB+D"),
             quick=dict(scenes=1, cameras=2, gaussians=256, width=48, height=48, sh_degree=None,
                        render_mode="RGB+D"),
             source="LGM training step: 8 scenes x 8 views, 65,536 Gaussians (4 views x 128x128 pixels), "
                    "512x512 RGB + alpha + depth (docs/design.md#named-workloads `lgm`)"),
    Workload("scene", dict(scenes=1, cameras=1, gaussians=1_000_000, width=1920, height=1080, sh_degree=3,
                           render_mode="RGB", step="scene"),
             quick=dict(scenes=1, cameras=1, gaussians=512, width=64, height=36, sh_degree=3, render_mode="RGB",
                        step="scene"),
             source="3DGS scene optimisation step as gsplat's simple_trainer runs it: 1 camera, 1M Gaussians, "
                    "1920x1080, SH degree 3; rasterization with the trainer's arguments (packed=False; "
                    "gsplat-packed: packed=True), L1 loss, gsplat's DefaultStrategy bookkeeping (retain_grad on "
                    "meta['means2d'] before backward, its 2D-gradient statistics after) "
                    "(docs/design.md#named-workloads `scene`)"),
    # A CPU yardstick (issue 3): a single-threaded CPU port of gsplat (OpenSplat's) was measured on
    # a 2-core machine of this project's kind at ~0.5 s forward + ~0.3 s backward on this scene.
    Workload("cpu-65k", dict(scenes=1, cameras=1, gaussians=65536, width=512, height=512, sh_degree=None,
                             render_mode="RGB"),
             quick=dict(scenes=1, cameras=1, gaussians=512, width=48, height=48, sh_degree=None,
                        render_mode="RGB"),
             source="65,536 Gaussians in a unit cube (scales 0.01-0.03), one 512x512 RGB view, 30-degree field "
                    "of view, camera at distance 3: the CPU comparison scene of issue 3 (OpenSplat's "
                    "single-threaded port: ~0.5 s forward + ~0.3 s backward, measured outside this harness)"),
]


def orbit_cameras(B: int, C: int, width: int, height: int, gen: torch.Generator, *, distance: float = 3.0,
                  fov_deg: float = 30.0) -> tuple[torch.Tensor, torch.Tensor]:
    """C cameras per scene on a circle of radius `distance` around the origin at random heights,
    looking at it (OpenCV world-to-camera), with a `fov_deg` horizontal field of view.
    Returns viewmats [B, C, 4, 4], Ks [B, C, 3, 3]."""
    az = torch.rand(B, C, generator=gen) * 2 * math.pi
    el = (torch.rand(B, C, generator=gen) - 0.5) * 0.8
    eye = distance * torch.stack([torch.cos(el) * torch.sin(az), -torch.sin(el), -torch.cos(el) * torch.cos(az)], -1)
    fwd = -eye / eye.norm(dim=-1, keepdim=True)                           # camera z (towards the origin)
    up = torch.tensor([0.0, -1.0, 0.0]).expand_as(fwd)                    # OpenCV: y down
    right = torch.linalg.cross(up, fwd)
    right = right / right.norm(dim=-1, keepdim=True)
    down = torch.linalg.cross(fwd, right)
    R = torch.stack([right, down, fwd], -2)                               # rows: camera axes in world
    viewmats = torch.eye(4).repeat(B, C, 1, 1)
    viewmats[..., :3, :3] = R
    viewmats[..., :3, 3] = -(R @ eye[..., None])[..., 0]
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    Ks = torch.tensor([[f, 0.0, width / 2], [0.0, f, height / 2], [0.0, 0.0, 1.0]]).repeat(B, C, 1, 1)
    return viewmats, Ks


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """A unit cube of Gaussians, scales 0.01-0.03, random rotations, opacities U(0.05, 1),
    colours U(0, 1) (or SH with a DC term for grey and small higher bands), orbit cameras."""
    B, C, N, W, H = p["scenes"], p["cameras"], p["gaussians"], p["width"], p["height"]

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    means = rand(B, N, 3) - 0.5
    quats = torch.randn(B, N, 4, generator=gen)
    scales = 0.01 + 0.02 * rand(B, N, 3)
    opacities = 0.05 + 0.95 * rand(B, N)
    if p["sh_degree"] is None:
        colors = rand(B, N, 3)
    else:
        K = (p["sh_degree"] + 1) ** 2
        colors = torch.randn(B, N, K, 3, generator=gen) * 0.1
        colors[:, :, 0] = (rand(B, N, 3) - 0.5) / 0.28209479177387814
    viewmats, Ks = orbit_cameras(B, C, W, H, gen)
    backgrounds = rand(B, C, 3)
    x = dict(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)
    out = {k: v.to(device).requires_grad_() for k, v in x.items()}
    out.update(viewmats=viewmats.to(device), Ks=Ks.to(device), backgrounds=backgrounds.to(device).requires_grad_())
    out["params"] = p
    if p.get("step") == "scene":
        try:
            from gsplat.strategy import DefaultStrategy
        except ImportError as e:
            raise ValueError("the scene workload runs gsplat's DefaultStrategy bookkeeping: install gsplat "
                             f"(the [bench] or [dev] extra); {type(e).__name__}: {e}") from None
        if B != 1:
            raise ValueError(f"the scene workload optimises one scene; got scenes={B}")
        strategy = DefaultStrategy()
        out.update(target=rand(C, H, W, 3).to(device), strategy=strategy,
                   strategy_state=strategy.initialize_state(scene_scale=1.0))
    return out


def run(backend: str, x: dict) -> tuple:
    p = x["params"]
    if p.get("step") == "scene":
        return scene_step(backend, x)
    args = (x["means"], x["quats"], x["scales"], x["opacities"], x["colors"], x["viewmats"], x["Ks"],
            p["width"], p["height"])
    kw = dict(sh_degree=p["sh_degree"], backgrounds=x["backgrounds"], render_mode=p["render_mode"])
    if backend in ("gsplat", "gsplat-packed"):
        import gsplat

        colors, alphas, _ = gsplat.rasterization(*args, packed=backend == "gsplat-packed", **kw)
        return colors, alphas
    colors, alphas, _ = rasterization(*args, backend=backend, **kw)
    return colors, alphas


def scene_step(backend: str, x: dict) -> tuple:
    """One per-scene optimisation step as gsplat's simple_trainer runs it, minus the optimizer
    update: the rasterization call with the trainer's keyword arguments, the L1 loss against the
    target, and (when gradients are on) gsplat's ``DefaultStrategy.step_pre_backward`` before the
    backward and its ``step_post_backward`` bookkeeping (step 0: the 2D-gradient statistics, no
    refinement) run as soon as the backward has accumulated the means' gradient. Returns (loss,)."""
    from gsplat.strategy import DefaultStrategy  # noqa: F401  (make_inputs checked it imports)

    p = x["params"]
    packed = backend == "gsplat-packed"
    if backend in ("gsplat", "gsplat-packed"):
        import gsplat

        fn = gsplat.rasterization
    else:
        def fn(**kw):
            return rasterization(**kw, backend=backend)
    means = x["means"][0]                                                      # [N, 3] (one scene)
    renders, _, info = fn(means=means, quats=x["quats"][0], scales=x["scales"][0], opacities=x["opacities"][0],
                          colors=x["colors"][0], viewmats=x["viewmats"][0], Ks=x["Ks"][0], width=p["width"],
                          height=p["height"], packed=packed, absgrad=False, sparse_grad=False,
                          rasterize_mode="classic", distributed=False, camera_model="pinhole", with_ut=False,
                          with_eval3d=False, sh_degree=p["sh_degree"], near_plane=0.01, far_plane=1e10,
                          render_mode=p["render_mode"])
    loss = (renders - x["target"]).abs().mean()
    if torch.is_grad_enabled():
        strategy, state, params = x["strategy"], x["strategy_state"], {"means": means}
        strategy.step_pre_backward(params=params, optimizers={}, state=state, step=0, info=info)

        def post_backward(_leaf):
            x.pop("pending_bookkeeping").remove()
            strategy.step_post_backward(params=params, optimizers={}, state=state, step=0, info=info, packed=packed)
        if "pending_bookkeeping" in x:  # a forward whose backward never ran (the harness draws upstream grads so)
            x.pop("pending_bookkeeping").remove()
        x["pending_bookkeeping"] = x["means"].register_post_accumulate_grad_hook(post_backward)
    return (loss,)


def gsplat_available(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "gsplat's rasterizer runs on CUDA only"
    try:
        import gsplat  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"gsplat not importable ({type(e).__name__}); install the [bench] extra"
    return None


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Floor of each pass (float32). Bytes: Gaussian parameters in, per-camera projected records
    (mean2d, conic, opacity, depth, features: 7 + D floats) written and read once, the images out
    (D + 1 channels). Flops: projection ~200 per camera x Gaussian (+ ~30 per SH coefficient x 3),
    and ~15 + 2D per pixel per Gaussian it blends, with an expected coverage of pi r^2 pixels per
    Gaussian (r ~ 3 sigma of a projected scale) times the images; backward ~2.5x forward."""
    B, C, N, W, H = p["scenes"], p["cameras"], p["gaussians"], p["width"], p["height"]
    D = 3 + (1 if "D" in p["render_mode"] else 0)
    K = 1 if p["sh_degree"] is None else (p["sh_degree"] + 1) ** 2
    e = 4
    params = B * N * (3 + 4 + 3 + 1 + 3 * K)
    records = B * C * N * (7 + D)
    images = B * C * H * W * (D + 1)
    fwd_bytes = e * (params + 2 * records + images)
    bwd_bytes = e * (2 * params + 3 * records + 2 * images)
    f = 0.5 * W / math.tan(math.radians(30.0) / 2)
    sigma_px = 0.02 * f / 3.0
    coverage = B * C * N * math.pi * (3 * sigma_px) ** 2
    fwd_flops = int(B * C * N * (200 + 90 * K) + coverage * (15 + 2 * D))
    bwd_flops = int(2.5 * fwd_flops)
    if pass_ == "forward":
        return fwd_bytes, fwd_flops
    if pass_ == "backward":
        return bwd_bytes, bwd_flops
    return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops


SPEC = register_bench(BenchSpec(op="rasterization", workloads=WORKLOADS, make_inputs=make_inputs, run=run,
                                model=model, baselines={"gsplat": gsplat_available,
                                                        "gsplat-packed": gsplat_available}))
