"""LRM at model level: ``lrm-step``, one training step of :class:`fast3d.training.recipes.lrm.LRMRecipe`
at a stage resolution, without camera noise and LPIPS: the LRM (DINOv2 encoder, triplane decoder)
on the input view, then ``LRM.render`` of all views (the input included, as OpenLRM) at the
stage's resolution, whole frames, samples jittered as in training; loss MSE on RGB + MSE on
opacity. ``forward+backward`` is the step (no optimizer step), ``forward`` the same under
``no_grad``; the harness records peak memory beside the time.

Backends: those of ``fast3d.render_triplane`` (``torch``: the PyTorch renderer, OpenLRM's;
``triton``: fast3d's kernels, what ``auto`` picks on a GPU), set on the model's renderer. Where
the PyTorch renderer cannot hold a workload's samples in the device's memory it is skipped with
the estimate as its reason. Samples/s = ``params["batch"]`` / median.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.bench.workloads import _common as c

OP = "lrm-step"

# Peak bytes of the PyTorch renderer's forward + backward per sample point: per plane channel
# (in the planes' dtype; 12 in float32) and besides (sample positions, MLP activations,
# compositing; kept as float32's 1072), measured with the harness's CPU peak-memory counter on
# float32 renders of 1024 rays at C = 8, 32, 80 (1168, 1456, 2032 bytes a point).
TORCH_RENDER_BYTES_PER_POINT = (12, 1072)
# The PyTorch renderer is skipped where that estimate exceeds this share of the device's memory
# (the rest holds the model, its activations and gradients).
TORCH_RENDER_MEMORY_SHARE = 0.75

_LARGE = dict(preset="large", views=4, dtype="bfloat16")
_TINY = dict(preset="tiny", views=2, batch=2, dtype="float32")
_SRC = ("VFusion3D's LRM training (OpenLRM-large: DINOv2 ViT-B/14 at 448 px, 16 x 1024-wide decoder layers, "
        "80-channel 64x64 triplanes, 64 + 64 samples a ray), 4 views rendered as whole frames, bf16, MSE + opacity "
        "loss (no LPIPS)")
# One workload per stage of VFusion3D's resolution schedule. Batches: 4 at 128 px, where the
# PyTorch renderer still fits an 80 GB GPU (the side-by-side speed comparison); VFusion3D's 8 a GPU
# (1024 over 128 GPUs) at 192-320; 16 at 384 px (issue 9's memory target).
WORKLOADS = [
    Workload(f"large-{res}", dict(_LARGE, resolution=res, batch=batch), quick=dict(_TINY, resolution=quick_res),
             source=f"{_SRC}; stage {res} px, batch {batch} per GPU")
    for res, batch, quick_res in ((128, 4, 16), (192, 8, 16), (256, 8, 16), (320, 8, 16), (384, 16, 32))
]


def config(p: dict):
    from fast3d.models.lrm import LRMConfig

    return LRMConfig.preset(p["preset"])


def _model(p: dict, device: torch.device):
    from fast3d.models.lrm import LRM

    cfg = config(p)
    return c.cached_model(("lrm", device, cfg, p["dtype"]), lambda: LRM(cfg).to(device, c.dtype_of(p)))


def sample_points(p: dict) -> int:
    """Sample points one render evaluates: rays of all views x (coarse + importance) samples."""
    cfg = config(p)
    return p["batch"] * p["views"] * p["resolution"] ** 2 * (cfg.n_samples + cfg.n_importance)


def torch_render_bytes(p: dict) -> int:
    """The PyTorch renderer's estimated peak for one step's render (TORCH_RENDER_BYTES_PER_POINT)."""
    per_channel, other = TORCH_RENDER_BYTES_PER_POINT
    e = torch.finfo(c.dtype_of(p)).bits // 8
    return sample_points(p) * (per_channel * config(p).plane_channels * e // 4 + other)


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """The input view at the encoder's resolution, V random orbit views (the input first) with RGB
    and alpha targets at the stage's resolution, and the background colour of each sample."""
    from fast3d.cameras import DEFAULT_DISTANCE, DEFAULT_FOV_Y_DEG

    cfg = config(p)
    B, V, R, s = p["batch"], p["views"], p["resolution"], cfg.image_size
    vm, Ks = c.orbit_cameras(B, V, R, gen, distance=DEFAULT_DISTANCE, fov_y_deg=DEFAULT_FOV_Y_DEG)
    K_in = Ks[:, 0].clone()
    K_in[:, :2, :] *= s / R
    model = _model(p, device)
    x = dict(model=model, params=p, image=torch.rand(B, 3, s, s, generator=gen).to(device, c.dtype_of(p)),
             vm_in=vm[:, 0].to(device), K_in=K_in.to(device), viewmats=vm.to(device), Ks=Ks.to(device),
             target=torch.rand(B, V, 3, R, R, generator=gen).to(device),
             alphas=(torch.rand(B, V, 1, R, R, generator=gen) > 0.5).float().to(device),
             background=torch.rand(B, 3, generator=gen).to(device))
    _network_flops(p, model, x)
    return x


def run(backend: str, x: dict) -> tuple:
    p, model = x["params"], x["model"]
    if backend == "torch":
        need, have = torch_render_bytes(p), c.device_memory(x["image"].device)
        if need > have * TORCH_RENDER_MEMORY_SHARE:
            raise ValueError(f"the PyTorch renderer would keep ~{need / 2**30:.0f} GiB for the backward of "
                             f"{sample_points(p):,} sample points; the {x['image'].device.type} has "
                             f"{have / 2**30:.0f} GiB")
    model.train()
    model.zero_grad(set_to_none=True)
    model.renderer.backend = backend
    R = p["resolution"]
    with c.oom_as_value_error(f"{OP} {p['preset']} at {R} px, batch {p['batch']}, on {backend}"):
        planes = model(x["image"], x["vm_in"], x["K_in"])
        out = model.render(planes, x["viewmats"], x["Ks"], R, R, background=x["background"])
        loss = F.mse_loss(out["images"].float(), x["target"]) + F.mse_loss(out["opacity"].float(), x["alphas"])
    return (loss,)


_FLOPS: dict = {}


def _network_flops(p: dict, model, x: dict) -> int:
    """Forward flops as torch's flop counter sees them: the model (encoder, decoder, upsampler) on
    the batch, plus the render's per ray, counted on one 8x8 view on the PyTorch renderer with
    deterministic samples (the renderer's MLP at every sample point; grid sampling and compositing
    are not counted) times the rays of all views. Memoised per shape."""
    key = (p["preset"], p["resolution"], p["batch"], p["views"])
    if key not in _FLOPS:
        B, side = p["batch"], 8
        # Grad mode: the counter's module tracker fails on this model under no_grad.
        with torch.enable_grad():
            f_model = c.count_flops(lambda: model(x["image"], x["vm_in"], x["K_in"]))
            planes = model(x["image"][:1], x["vm_in"][:1], x["K_in"][:1])
            Ks = x["Ks"][:1, :1].clone()
            Ks[..., :2, :] *= side / p["resolution"]
            backend = model.renderer.backend
            model.renderer.backend = "torch"
            try:
                f_rays = c.count_flops(lambda: model.render(planes, x["viewmats"][:1, :1], Ks, side, side,
                                                            deterministic=True))
            finally:
                model.renderer.backend = backend
        _FLOPS[key] = f_model + f_rays * B * p["views"] * p["resolution"] ** 2 // side ** 2
    return _FLOPS[key]


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Counted forward flops (see _network_flops), backward twice that. Bytes: the weights read
    forward, read and their gradients written backward; the planes' features read at every sample
    point (3 x C each) forward, their gradients accumulated backward; the images and targets."""
    key = (p["preset"], p["resolution"], p["batch"], p["views"])
    if key not in _FLOPS:
        make_inputs(p, torch.device("cpu"), torch.Generator().manual_seed(0))
    cfg = config(p)
    e = torch.finfo(c.dtype_of(p)).bits // 8
    weights = _weights_of(dataclasses.replace(cfg, encoder_path=None)) * e
    points = sample_points(p) * 3 * cfg.plane_channels * e
    images = p["batch"] * (3 * cfg.image_size ** 2 + p["views"] * p["resolution"] ** 2 * 2 * 4) * 4
    f = _FLOPS[key]
    return c.split_passes(pass_, (weights + points + images, f), (2 * weights + 2 * points + images, 2 * f))


_WEIGHTS: dict = {}


def _weights_of(cfg) -> int:
    if cfg not in _WEIGHTS:
        from fast3d.models.lrm import LRM

        with torch.device("meta"):
            _WEIGHTS[cfg] = sum(q.numel() for q in LRM(cfg).parameters())
    return _WEIGHTS[cfg]


SPEC = register_bench(BenchSpec(op=OP, workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
                                kernel_op="render_triplane"))
