"""LGM at model level: ``lgm-step`` (one training step) and ``lgm-infer`` (images in, Gaussians out).

``lgm-step`` is the step of :class:`fast3d.training.recipes.lgm.LGMRecipe` without its data
augmentations and LPIPS: the U-Net on the 4 posed input views, the Gaussians rendered to the
supervision views in one rasterization call for the batch, MSE on RGB plus MSE on alpha. The
``forward+backward`` row is the step (no optimizer step: AdamW's update is outside the measured
passes, as DeepSpeed's fused optimizer would make it a different number anyway); ``forward`` is
the same under ``no_grad``. Backends: each of ``fast3d.rasterization``'s (``torch`` is the dense
PyTorch reference, which refuses the full size with its reason; ``cpu``; ``cuda``) and gsplat's
``rasterization`` (``gsplat``: packed=False, ``gsplat-packed``), where importable on CUDA. The
U-Net's cross-view attention runs on ``fast3d.multiview_attention``'s ``auto`` backend in all.

The rasterizer's share of the step is the workload ``big-render``: the same render of the
supervision views and the same loss, forward and backward, from the Gaussians the model outputs
(leaf tensors); share = its median / the median of ``big`` for the same backend and pass, both
measured in one run. Samples/s = ``params["batch"]`` / median.

``lgm-infer`` is ``fast3d.inference.lgm.reconstruct`` + the PLY-ready tensors of ``infer`` (the
Gaussians moved back to the input cameras' world, opacities clamped, colours as degree-0 SH), the
PLY write itself left out: the ``forward`` row (under ``no_grad``, as inference runs) is the
latency; the backward rows are a by-product of the harness's passes. Backends: those of
``fast3d.multiview_attention``, the one fast3d op in the forward (the U-Net's cross-view attention).

Weights are random (LGM's initialisation: the pixel-anchored Gaussians tile each input view's
plane), so the rasterizer sees Gaussians of the initial scale (~0.035), not those of a trained model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.bench.workloads import _common as c
from fast3d.ops.rasterization import bench as raster_bench
from fast3d.ops.rasterization.reference import SH_C0

STEP_OP = "lgm-step"
INFER_OP = "lgm-infer"
GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "colors")

_BIG = dict(preset="big", input_size=256, render_size=512, sup_views=8, batch=8, dtype="bfloat16")
# The quick shape keeps tiny's network but takes 16 px inputs (8 x 8 Gaussians a view, 256 a
# sample) and renders 16 px: the dense PyTorch reference rasterizer, which holds images x
# Gaussians x pixels, must also run in --quick (every registered backend gets quick rows).
_TINY = dict(preset="tiny", input_size=16, render_size=16, sup_views=4, batch=2, dtype="float32")

STEP_WORKLOADS = [
    Workload("big", dict(_BIG, part="step"), quick=dict(_TINY, part="step"),
             source="LGM (Tang et al. 2024) training step: the big U-Net, 4 input views at 256 px -> 65,536 "
                    "Gaussians, rendered to 8 supervision views at 512x512 (4 inputs + 4 others), batch 8 per GPU, "
                    "bf16 weights, MSE + alpha loss (no LPIPS, no optimizer step); samples/s = batch / median"),
    Workload("big-render", dict(_BIG, part="render"), quick=dict(_TINY, part="render"),
             source="the rasterizer's share of lgm-step:big: its render of the 8 supervision views at 512x512 "
                    "(65,536 Gaussians a sample, batch 8) + the loss, from the model's Gaussians; "
                    "share = this median / big's median, same backend and pass"),
]
INFER_WORKLOADS = [
    Workload("big", dict(preset="big", input_size=256, batch=1, dtype="float16"),
             quick=dict(preset="tiny", input_size=32, batch=1, dtype="float32"),
             source="LGM inference (fast3d infer): 4 views at 256 px -> 65,536 Gaussians, PLY-ready tensors "
                    "(world frame, SH0 colours), batch 1, fp16 weights; the forward row is the latency"),
]


def config(p: dict):
    """The LGMConfig of a workload: the preset with its input size (and so its splat size),
    render size and supervision views replaced."""
    from fast3d.models.lgm import LGMConfig

    cfg = LGMConfig.preset(p["preset"])
    n_down, n_up = len(cfg.down_channels), len(cfg.up_channels)
    s = p["input_size"]
    return dataclasses.replace(cfg, input_size=s, splat_size=s * 2 ** (n_up - 1) // 2 ** (n_down - 1),
                               render_size=p.get("render_size", cfg.render_size),
                               num_sup_views=p.get("sup_views", cfg.num_sup_views))


def _model(p: dict, device: torch.device):
    from fast3d.models.lgm import LGM

    cfg = config(p)
    return c.cached_model(("lgm", device, cfg, p["dtype"]), lambda: LGM(cfg).to(device, c.dtype_of(p)))


@contextlib.contextmanager
def attention_backend(model, name: str):
    """``model``'s cross-view attention on ``fast3d.multiview_attention``'s backend ``name`` while
    inside (the cached model is shared by the backends of a run)."""
    before = model.attention_backend
    model.set_attention_backend(name)
    try:
        yield
    finally:
        model.set_attention_backend(before)


# --- flops ----------------------------------------------------------------------------------------

_NET_FLOPS: dict = {}


def _network_flops(p: dict, model, x: dict) -> int:
    """The U-Net forward's flops (torch's flop counter; attention on the PyTorch reference, which
    it can count), memoised per shape."""
    key = (p["preset"], p["input_size"], p["batch"])
    if key not in _NET_FLOPS:
        with torch.no_grad(), attention_backend(model, "torch"):
            _NET_FLOPS[key] = c.count_flops(lambda: model(x["images"], x["vm_in"], x["K_in"]))
    return _NET_FLOPS[key]


def _raster_params(p: dict) -> dict:
    cfg = config(p)
    return dict(scenes=p["batch"], cameras=cfg.num_sup_views, gaussians=cfg.num_gaussians, width=cfg.render_size,
                height=cfg.render_size, sh_degree=None, render_mode="RGB")


# --- lgm-step -------------------------------------------------------------------------------------


def make_step_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """A batch as LGMRecipe.loss sees it after its data preparation: 4 input views (orthogonal
    orbit cameras, normalised so the first is canonical), S supervision views (the inputs + random
    others) with RGB and alpha targets and a background colour per view."""
    from fast3d.models.lgm import apply_transform_to_viewmats, normalize_cameras

    cfg = config(p)
    B, S, R, s, n_in = p["batch"], cfg.num_sup_views, cfg.render_size, cfg.input_size, cfg.num_input_views
    dtype = c.dtype_of(p)
    vm, Ks = c.orbit_cameras(B, S, R, gen, distance=cfg.camera_distance, fov_y_deg=cfg.fov_y_deg,
                             orthogonal=n_in)
    vm_in, T = normalize_cameras(vm[:, :n_in], cfg.camera_distance)
    K_in = Ks[:, :n_in].clone()
    K_in[..., :2, :] *= s / R
    model = _model(p, device)
    x = dict(model=model, params=p,
             images=torch.rand(B, n_in, 3, s, s, generator=gen).to(device, dtype),
             vm_in=vm_in.to(device), K_in=K_in.to(device),
             vm_sup=apply_transform_to_viewmats(vm, T).to(device), K_sup=Ks.to(device),
             target=torch.rand(B, S, 3, R, R, generator=gen).to(device),
             alphas=(torch.rand(B, S, 1, R, R, generator=gen) > 0.5).float().to(device),
             backgrounds=torch.rand(B, S, 3, generator=gen).to(device))
    _network_flops(p, model, x)
    if p["part"] == "render":
        with torch.no_grad():
            g = model(x["images"], x["vm_in"], x["K_in"])
        x.update({k: g[k].detach().float().requires_grad_() for k in GAUSSIAN_KEYS})
    return x


def render(backend: str, g: dict, viewmats, Ks, size: int, backgrounds) -> tuple:
    """LGM.render on a chosen rasterizer: images [B, C, 3, H, W], alphas [B, C, 1, H, W]."""
    means, quats, scales, opacities, colors = (g[k].float() for k in GAUSSIAN_KEYS)
    args = (means, quats, scales, opacities, colors, viewmats, Ks, size, size)
    if backend in ("gsplat", "gsplat-packed"):
        import gsplat

        images, alphas, _ = gsplat.rasterization(*args, backgrounds=backgrounds, packed=backend == "gsplat-packed")
    else:
        from fast3d.ops.rasterization import rasterization

        images, alphas, _ = rasterization(*args, backgrounds=backgrounds, backend=backend)
    return images.permute(0, 1, 4, 2, 3), alphas.permute(0, 1, 4, 2, 3)


def run_step(backend: str, x: dict) -> tuple:
    from fast3d.training.recipes.lgm import LossSection, render_loss

    p, model = x["params"], x["model"]
    with c.oom_as_value_error(f"{STEP_OP} {p['preset']} batch {p['batch']} on {backend}"):
        if p["part"] == "render":
            g = {k: x[k] for k in GAUSSIAN_KEYS}
        else:
            model.train()
            model.zero_grad(set_to_none=True)  # the step's zero_grad: gradients are not accumulated
            g = model(x["images"], x["vm_in"], x["K_in"])
        rgb, alpha = render(backend, g, x["vm_sup"], x["K_sup"], config(p).render_size, x["backgrounds"])
        # the recipe's loss without its LPIPS term (mse and alpha at the default weights, 1 and 1)
        loss, _ = render_loss(rgb, alpha, x["target"], x["alphas"], LossSection(lpips=0.0))
    return (loss,)


def step_model(p: dict, pass_: str) -> tuple[int, int]:
    """Network: the counted forward flops, backward twice that; weights read once forward, read
    and their gradients written backward; inputs read once. Rasterizer: the byte/flop floor of
    ``rasterization``'s own model (its backward 2.5x its forward)."""
    rb_f, rf_f = raster_bench.model(_raster_params(p), "forward")
    rb_b, rf_b = raster_bench.model(_raster_params(p), "backward")
    if p["part"] == "render":
        return c.split_passes(pass_, (rb_f, rf_f), (rb_b, rf_b))
    key = (p["preset"], p["input_size"], p["batch"])
    if key not in _NET_FLOPS:  # not measured in this process: count on the CPU
        make_step_inputs(p, torch.device("cpu"), torch.Generator().manual_seed(0))
    cfg = config(p)
    e = torch.finfo(c.dtype_of(p)).bits // 8
    weights = _weights(p) * e
    inputs = p["batch"] * cfg.num_input_views * 9 * cfg.input_size ** 2 * e
    net_f = _NET_FLOPS[key]
    return c.split_passes(pass_, (weights + inputs + rb_f, net_f + rf_f), (2 * weights + rb_b, 2 * net_f + rf_b))


@functools.cache
def _weights_of(cfg) -> int:
    from fast3d.models.lgm import LGM

    with torch.device("meta"):
        return sum(q.numel() for q in LGM(cfg).parameters())


def _weights(p: dict) -> int:
    return _weights_of(config(p))


STEP_SPEC = register_bench(BenchSpec(
    op=STEP_OP, workloads=STEP_WORKLOADS, make_inputs=make_step_inputs, run=run_step, model=step_model,
    baselines={"gsplat": raster_bench.gsplat_available, "gsplat-packed": raster_bench.gsplat_available},
    kernel_op="rasterization"))


# --- lgm-infer ------------------------------------------------------------------------------------


def make_infer_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """Images at the model's input size and LGM's default input cameras (4 orthogonal views)."""
    from fast3d.inference.lgm import default_input_cameras
    from fast3d.models.lgm import normalize_cameras

    cfg = config(p)
    B, V, s = p["batch"], cfg.num_input_views, cfg.input_size
    vm, Ks = default_input_cameras(cfg, s)
    model = _model(p, device)
    x = dict(model=model, params=p, images=torch.rand(B, V, 3, s, s, generator=gen).to(device),
             viewmats=vm.expand(B, V, 4, 4).contiguous().to(device), Ks=Ks.expand(B, V, 3, 3).contiguous().to(device))
    vm_in, _ = normalize_cameras(x["viewmats"], cfg.camera_distance)
    _network_flops(p, model, dict(images=x["images"].to(c.dtype_of(p)), vm_in=vm_in, K_in=x["Ks"]))
    return x


def run_infer(backend: str, x: dict) -> tuple:
    """reconstruct() (camera normalisation, the model, float32 Gaussians) and infer()'s PLY-ready
    tensors: means, quats in the cameras' world, scales, opacities clamped, SH0 colours [N, 1, 3]."""
    from fast3d.models.lgm import apply_transform_to_gaussians, normalize_cameras

    p, model = x["params"], x["model"]
    model.eval()
    model.zero_grad(set_to_none=True)
    with c.oom_as_value_error(f"{INFER_OP} {p['preset']} batch {p['batch']} on {backend}"), \
            attention_backend(model, backend):
        vm, T = normalize_cameras(x["viewmats"], model.config.camera_distance)
        g = model(x["images"], vm, x["Ks"])
        g = apply_transform_to_gaussians({k: v.float() for k, v in g.items()}, torch.linalg.inv(T.double()).float())
    return (g["means"], g["quats"], g["scales"], g["opacities"].clamp(1e-6, 1 - 1e-6),
            ((g["colors"] - 0.5) / SH_C0)[..., None, :])


def infer_model(p: dict, pass_: str) -> tuple[int, int]:
    """Counted forward flops of the U-Net, backward twice that; weights read (and their gradients
    written backward), images in, Gaussians (14 floats each) out."""
    key = (p["preset"], p["input_size"], p["batch"])
    if key not in _NET_FLOPS:
        make_infer_inputs(p, torch.device("cpu"), torch.Generator().manual_seed(0))
    cfg = config(p)
    e = torch.finfo(c.dtype_of(p)).bits // 8
    weights = _weights(p) * e
    io = p["batch"] * (cfg.num_input_views * 3 * cfg.input_size ** 2 * 4 + cfg.num_gaussians * 14 * 4)
    f = _NET_FLOPS[key]
    return c.split_passes(pass_, (weights + io, f), (2 * weights + io, 2 * f))


INFER_SPEC = register_bench(BenchSpec(op=INFER_OP, workloads=INFER_WORKLOADS, make_inputs=make_infer_inputs,
                                      run=run_infer, model=infer_model, kernel_op="multiview_attention"))
