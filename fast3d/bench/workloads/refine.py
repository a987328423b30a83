"""``refine`` in ``fast3d bench``: one step of ``fast3d refine`` (issue 19, Magic-Boost's SDS
refinement, :class:`fast3d.inference.refine.Refiner`), and the rasterizer's and the attention's
share of it.

One call of the ``base`` workload is :meth:`Refiner.step` between anchor updates: ``views`` random
views and the K anchor views rendered in one rasterization call, the random views' VAE encode,
the anchor-conditioned UNet with classifier-free guidance (the conditional and the unconditional
pass), the SDS and Anchor Iterative Update losses' backward through the encoder and the
rasterizer, and Adam's update of the Gaussians. Steps/s = 1000 / median. The parts, from the same
state: ``base-render`` is the step's rasterization (the same V + K cameras) forward and backward
with a fixed upstream gradient; ``base-attn`` replays the step's multi-view self-attention calls
(the shapes recorded from one step, random q/k/v). A part's share = its median / ``base``'s
median, same backend, same run. The harness's ``forward`` pass is the only one: a row is one call
(the step's own backward and optimizer update happen inside it), as ``generate``'s rows are.

Backends: each of ``fast3d.multiview_attention``'s for the UNet's self-attention (fast3d's
:class:`fast3d.models.magicboost.AnchorAttnProcessor`), with fast3d's rasterizer (``auto``); the
baseline ``gsplat-diffusers`` is the same step as Magic-Boost's threestudio code runs it: diffusers'
default processor (``AttnProcessor2_0``, PyTorch SDPA) on each sample's views rearranged into one
sequence (``B (V L) C``), and gsplat's ``rasterization`` (CUDA only: elsewhere it is skipped with
that reason).

Weights are random (nothing is downloaded): ``base`` is MagicBoostConfig's ``base`` (Stable
Diffusion 2.x UNet at 256 px, 4 anchors) with a full-size SD VAE and a CLIP ViT-H/14 image encoder
built from their configs; the asset is a procedural object of 65,536 Gaussians (LGM big's output
size), degree-0 SH. UNet and VAE under bf16 autocast on a GPU. ``--quick``: the tiny model (32 px,
pixel latents) and 256 Gaussians.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.bench.workloads import _common as c

OP = "refine"
BASELINE = "gsplat-diffusers"
PARTS = ("step", "render", "attn")

_BASE = dict(model="base", gaussians=65_536, views=4, guidance=3.0, dtype="bfloat16")
_QUICK = dict(model="tiny", gaussians=256, views=2, guidance=3.0, dtype="float32")
_SOURCES = {
    "step": "fast3d refine (issue 19; Magic-Boost's SDS refinement): SD 2.x-size anchor-conditioned UNet at 256 px, "
            "4 anchors, 4 random views a step + the 4 anchor views in one rasterization of 65,536 Gaussians, CFG 3.0 "
            "(2 UNet passes), SD VAE encode + backward, AIU L1, Adam; bf16 autocast; steps/s = 1000 / median",
    "render": "the rasterizer's share of refine:base: its 8 views at 256 px, forward + backward "
              "(share = this median / base's)",
    "attn": "the attention's share of refine:base: the step's multi-view self-attention calls replayed "
            "(share = this median / base's)",
}
WORKLOADS = [Workload("base" if part == "step" else f"base-{part}", dict(_BASE, part=part),
                      quick=dict(_QUICK, part=part), source=_SOURCES[part]) for part in PARTS]


def _build(p: dict, device: torch.device):
    from fast3d.bench.workloads.generate import CLIP_VIT_H, SD_VAE
    from fast3d.models.magicboost import MagicBoost, MagicBoostConfig
    from fast3d.models.mvdiff import build_image_encoder, build_vae

    cfg = MagicBoostConfig.preset(p["model"])
    if p["model"] == "base":
        model = MagicBoost(cfg, vae=build_vae(cfg.mvdiff(), SD_VAE),
                           image_encoder=build_image_encoder(cfg.mvdiff(), CLIP_VIT_H))
    else:
        model = MagicBoost(cfg)
    return model.to(device).eval().requires_grad_(False)


def set_backend(refiner, backend: str) -> None:
    """The UNet's self-attention and the refiner's rasterizer for ``backend`` (a
    ``multiview_attention`` backend with fast3d's rasterizer, or the baseline). The model is shared
    by the input sets and backends of a run: its processors are replaced only when they change."""
    from fast3d.bench.workloads.generate import RearrangedAttnProcessor
    from fast3d.models.magicboost import AnchorAttnProcessor

    model = refiner.model
    if getattr(model, "bench_attention", None) != backend:
        proc = (RearrangedAttnProcessor(model.num_anchors + 1, "views") if backend == BASELINE
                else AnchorAttnProcessor(model.num_anchors + 1, "views", backend=backend))
        model.denoiser.unet.set_attn_processor(proc)
        model.bench_attention = backend
    if backend == BASELINE:
        import gsplat

        refiner.rasterize = gsplat.rasterization
    else:
        refiner.rasterize = None


def _autocast(p: dict, device: torch.device):
    dtype = c.dtype_of(p)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@contextlib.contextmanager
def recorded_attention(calls: list):
    """Record every ``fast3d.multiview_attention`` call of the multi-view processors while inside:
    (q's shape [B*V, L, H, D], num_views, scale, dtype)."""
    from fast3d.nn import attention as nn_attention

    inner = nn_attention.multiview_attention

    def record(q, k, v, num_views, layout="views", image_size=None, view_mask=None, scale=None, backend="auto"):
        calls.append((tuple(q.shape), num_views, scale, q.dtype))
        return inner(q, k, v, num_views, layout, image_size, view_mask, scale=scale, backend=backend)

    nn_attention.multiview_attention = record
    try:
        yield calls
    finally:
        nn_attention.multiview_attention = inner


_RECORDED: dict = {}   # the attention calls of one step, by (device, model, views, guidance, dtype)


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """A procedural asset of ``gaussians`` Gaussians, K random anchor images 90 degrees apart at
    the model's resolution, a :class:`Refiner` on them between anchor updates (its anchor targets
    set to the anchors: their values do not change the step's cost); for the parts, the step's
    cameras and an upstream gradient (render) or the step's attention calls (recorded from one
    step, once per model and settings) with random q/k/v (attn)."""
    from fast3d import cameras as cams
    from fast3d.datagen.assets import make_asset
    from fast3d.inference.refine import Refiner, RefineSettings

    model = c.cached_model(("refine", device, p["model"]), lambda: _build(p, device))
    R, K = model.config.resolution, model.num_anchors
    a = make_asset(gen, p["gaussians"])
    g = dict(means=a.means, quats=a.quats, scales=a.scales, opacities=a.opacities.clamp(1e-4, 1 - 1e-4), sh=a.sh,
             sh_degree=0)
    az = torch.arange(K, dtype=torch.float64) * (2 * math.pi / K)
    vm, Ks = cams.orbit_cameras(az, torch.full_like(az, math.radians(15)), cams.DEFAULT_DISTANCE,
                                cams.DEFAULT_FOV_Y_DEG, R)
    anchors = torch.rand(K, 3, R, R, generator=gen)
    settings = RefineSettings(steps=1 << 30, views_per_step=p["views"], guidance_scale=p["guidance"], aiu=True,
                              aiu_every=1 << 30, seed=int(torch.randint(0, 2**31, (), generator=gen)))
    with _autocast(p, device):
        refiner = Refiner(model, g, anchors, vm, Ks, settings)
    refiner.anchor_targets = refiner.anchors.clone()
    refiner.step_index = 1   # the next anchor update is 2^30 steps away
    x = dict(params=p, refiner=refiner)
    if p["part"] == "render":
        rv, rK = refiner.random_cameras(p["views"])
        x["viewmats"] = torch.cat([rv.to(device), refiner.anchor_viewmats])
        x["Ks"] = torch.cat([rK.to(device), refiner.anchor_Ks])
        x["grad"] = torch.randn(p["views"] + K, 3, R, R, generator=gen).to(device)
    elif p["part"] == "attn":
        key = (device, p["model"], p["views"], p["guidance"], p["dtype"])
        if key not in _RECORDED:
            set_backend(refiner, "auto")
            with recorded_attention([]) as calls, torch.enable_grad(), _autocast(p, device):
                refiner.step()
            _RECORDED[key] = calls
        calls = _RECORDED[key]
        dtype = c.dtype_of(p) if device.type == "cuda" else torch.float32
        x["calls"] = [(tuple(torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3)), V, scale)
                      for shape, V, scale, _ in calls]
    return x


def _sdpa_rearranged(q, k, v, V: int, scale):  # [B*V, L, H, D] each -> [B*V, L, H, D]
    """The baseline's attention: the views' tokens side by side, PyTorch SDPA (as AttnProcessor2_0)."""
    BV, L, H, D = q.shape
    qs, ks, vs = (t.reshape(BV // V, V * L, H, D).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=scale)
    return out.transpose(1, 2).reshape(BV, L, H, D)


def run(backend: str, x: dict) -> tuple:
    from fast3d import multiview_attention

    p, refiner = x["params"], x["refiner"]
    dev = refiner.device
    with c.oom_as_value_error(f"{OP} {p['model']} part {p['part']} on {backend}"):
        if p["part"] == "attn":
            outs = [_sdpa_rearranged(q, k, v, V, scale) if backend == BASELINE
                    else multiview_attention(q, k, v, V, scale=scale, backend=backend) for (q, k, v), V, scale
                    in x["calls"]]
            return (outs[-1],)
        set_backend(refiner, backend)
        with torch.enable_grad(), _autocast(p, dev):
            if p["part"] == "render":
                images = refiner.render(x["viewmats"], x["Ks"])
                images.backward(x["grad"])
                for q in refiner.params.values():
                    q.grad = None
                return (images.detach(),)
            refiner.step()
    return (refiner.params["means"].detach(),)


@functools.cache
def _param_counts(name: str) -> tuple[int, int]:
    """Parameters of (the UNet + embedding projection, the VAE's encoder) of a model preset,
    counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        m = _build(dict(model=name), torch.device("meta"))
    n = lambda mod: sum(q.numel() for q in mod.parameters())  # noqa: E731
    enc = getattr(m.vae, "encoder", None)
    return n(m.denoiser), (n(enc) + n(m.vae.quant_conv) if enc is not None else 0)


def _raster_params(p: dict) -> dict:
    from fast3d.models.magicboost import MagicBoostConfig

    cfg = MagicBoostConfig.preset(p["model"])
    return dict(scenes=1, cameras=p["views"] + cfg.num_anchors, gaussians=p["gaussians"], width=cfg.resolution,
                height=cfg.resolution, sh_degree=0, render_mode="RGB")


def attention_model(calls: list, bytes_per: int) -> tuple[int, int]:
    """(bytes, flops) of multi-view self-attention calls ``(q shape [B*V, L, H, D], V)``: q, k, v
    read and the output written once; 4 flops per query-key-channel (QK^T and PV), every query
    attending to its sample's V L keys."""
    total_b = total_f = 0
    for (BV, L, H, D), V in calls:
        total_b += 4 * BV * L * H * D * bytes_per
        total_f += 4 * BV * L * V * L * H * D
    return total_b, total_f


def model(p: dict, pass_: str) -> tuple[int, int]:
    """The step: the UNet's weights read once per UNet call (2 with guidance: the conditional
    samples and the unconditional ones run as separate calls), the VAE encoder's read forward and
    backward, and the rasterizer's floor forward + backward (its own model); flops: the
    rasterizer's (the UNet's are not modelled). Render: the rasterizer's floor. Attn: q, k, v and
    the output once; 4 L_q L_k H D flops a sample."""
    rb_f, rf_f = _raster_model(p, "forward")
    rb_b, rf_b = _raster_model(p, "backward")
    if p["part"] == "render":
        return rb_f + rb_b, rf_f + rf_b
    if p["part"] == "attn":
        return attention_model(_attention_calls(p["model"], p["views"], p["guidance"]),
                               torch.finfo(c.dtype_of(p)).bits // 8)
    unet, enc = _param_counts(p["model"])
    e = torch.finfo(c.dtype_of(p)).bits // 8
    calls = 2 if p["guidance"] != 1.0 else 1
    return (calls * unet + 2 * enc) * e + rb_f + rb_b, rf_f + rf_b


def _raster_model(p: dict, pass_: str) -> tuple[int, int]:
    from fast3d.ops.rasterization import bench as raster_bench

    return raster_bench.model(_raster_params(p), pass_)


@functools.cache
def _attention_calls(name: str, views: int, guidance: float) -> tuple:
    """The self-attention calls of one UNet step of a preset: (q shape, V) per call, derived from
    the UNet's layout: at every transformer block of latent side s / 2^level, the conditional pass
    (``views`` samples of K + 1 views) and, with guidance, the unconditional one (``views``
    samples of 1 view)."""
    from fast3d.models.magicboost import MagicBoostConfig

    cfg = MagicBoostConfig.preset(name)
    K, s = cfg.num_anchors, cfg.latent_size
    out = []
    for level, (ch, heads) in enumerate(zip(cfg.block_out_channels, cfg.attention_heads)):
        side = s // 2 ** level
        blocks = (cfg.layers_per_block if cfg.down_block_types[level].startswith("CrossAttn") else 0) + \
                 (cfg.layers_per_block + 1 if cfg.up_block_types[-1 - level].startswith("CrossAttn") else 0)
        if level == len(cfg.block_out_channels) - 1:
            blocks += 1                      # the mid block's transformer
        groups = [(K + 1, views)] + ([(1, views)] if guidance != 1.0 else [])
        for V, B in groups:
            out += [((B * V, side * side, heads, ch // heads), V)] * blocks
    return tuple(out)


def available(device: torch.device) -> str | None:
    """The baseline needs gsplat's CUDA rasterizer."""
    from fast3d.ops.rasterization.bench import gsplat_available

    return gsplat_available(device)


SPEC = register_bench(BenchSpec(op=OP, workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
                                baselines={BASELINE: available}, passes=("forward",),
                                kernel_op="multiview_attention"))
