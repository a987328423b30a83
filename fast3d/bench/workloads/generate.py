"""``generate`` in ``fast3d bench``: ``fast3d generate``'s image-to-3D latency (issue 16), image in to
PLY out, and each stage's share.

One call of the ``base`` workload is the pipeline of :mod:`fast3d.inference.generate` on an input
image already at the model's resolution: multi-view sampling (:func:`fast3d.inference.mvdiff.sample_views`:
CLIP image embedding, VAE encode, ``steps`` sampler steps of the multi-view UNet with
classifier-free guidance, VAE decode of the 4 views), LGM reconstruction
(:func:`fast3d.inference.lgm.reconstruct`, the Gaussians moved back to the views' world), the
``gaussians.ply`` write, and a turntable render of ``frames`` views. The other workloads time one
stage each from the same inputs: ``base-mv`` (sampling), ``base-recon`` (reconstruction + PLY),
``base-render`` (the turntable); a stage's share = its median / ``base``'s median, same backend,
same run.

Backends: each of ``fast3d.multiview_attention``'s, for the self-attention of the UNet
(:class:`fast3d.nn.MultiViewAttnProcessor`) and of the LGM, with fast3d's rasterizer (``auto``);
and the baseline ``diffusers-gsplat``: the same pipeline as the models' own code runs it,
diffusers' default processor (``AttnProcessor2_0``, PyTorch SDPA) on the views rearranged to one
sequence per sample (``B (V L) C``; row-wise ``(B h) (V w) C`` for an Era3D layout), the LGM's
attention on the rearranging PyTorch reference (``torch``), and gsplat's ``rasterization`` for the
turntable (CUDA only: elsewhere it is skipped with that reason).

``imagedream`` is the whole pipeline of LGM's released image-to-3D path, ``base`` with
ImageDream's conditioning (``conditioning="imagedream"``, what ``fast3d convert imagedream``
makes: the input image as a fifth view in the self-attention, 77 text + 16 image tokens in the
cross-attention, guidance 5); its baseline keeps the image-token cross-attention and rearranges
the five views' self-attention.

Weights are random (nothing is downloaded): ``base`` is MVDiffConfig's ``base`` (Stable Diffusion
2.x UNet at 256 px, lgm4 rig) with a full-size SD VAE and a CLIP ViT-H/14 image encoder built from
their configs, and LGM's big model; the work per call is that of the real models. Forward only
(inference), under bf16 autocast on a GPU. ``--quick``: the tiny models, 1 step, 16 px.
"""

from __future__ import annotations

import functools
import os
import tempfile

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.bench.workloads import _common as c

OP = "generate"
BASELINE = "diffusers-gsplat"
PARTS = ("all", "mv", "recon", "render")

_BASE = dict(mv="base", mv_res=256, lgm="big", lgm_input=256, render=512, steps=30, guidance=3.0, scheduler="ddim",
             frames=8, dtype="bfloat16")
_QUICK = dict(mv="tiny", mv_res=16, lgm="tiny", lgm_input=16, render=16, steps=1, guidance=3.0, scheduler="ddim",
              frames=2, dtype="float32")
_SOURCES = {
    "all": "fast3d generate --image (issue 16; MVBoost / LGM's image-to-3D): SD 2.x-size multi-view UNet at 256 px, "
           "4 views (lgm4 rig), 30 DDIM steps, CFG 3.0, SD VAE + CLIP ViT-H/14, then LGM big (65,536 Gaussians), "
           "the PLY written and 8 turntable frames rendered at 512 px; bf16 autocast; the forward row is the latency",
    "mv": "the multi-view sampling stage of generate:base (share = this median / base's)",
    "recon": "the LGM reconstruction + PLY write stage of generate:base (share = this median / base's)",
    "render": "the turntable stage of generate:base: 8 frames of the Gaussians (share = this median / base's)",
}
WORKLOADS = [Workload("base" if part == "all" else f"base-{part}", dict(_BASE, part=part), quick=dict(_QUICK, part=part),
                      source=_SOURCES[part]) for part in PARTS]
# ImageDream's conditioning (its released sizes are MVDiffConfig's defaults; quick: a tiny resampler)
_IMAGEDREAM = dict(conditioning="imagedream", image_embed_dim=1280)
_IMAGEDREAM_QUICK = dict(conditioning="imagedream", image_embed_dim=32, image_tokens=4, resampler_depth=1,
                         resampler_heads=2, resampler_head_dim=16, text_tokens=4)
WORKLOADS.append(Workload(
    "imagedream", dict(_BASE, part="all", guidance=5.0, mv_overrides=_IMAGEDREAM),
    quick=dict(_QUICK, part="all", guidance=5.0, mv_overrides=_IMAGEDREAM_QUICK),
    source="LGM's released image-to-3D pipeline (fast3d convert imagedream + convert lgm): ImageDream's SD 2.1-size "
           "UNet at 256 px with its pixel-controller fifth view, 16 image + 77 text tokens, 30 DDIM steps, CFG 5.0, "
           "SD VAE + CLIP ViT-H/14 (penultimate tokens), then LGM big, the PLY and 8 turntable frames at 512 px; bf16"))

# Stable Diffusion 2.x's VAE and OpenCLIP ViT-H/14's vision tower (the image encoder of ImageDream /
# Zero123++ / SD image variations): the configs of the released models, built with random weights.
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.18215)
CLIP_VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                  image_size=224, patch_size=14, projection_dim=1024, hidden_act="gelu")


def _build(p: dict, device: torch.device):
    from fast3d.bench.workloads.lgm import config as lgm_config
    from fast3d.models.lgm import LGM
    from fast3d.models.mvdiff import MVDiffConfig, MVDiffusion, build_image_encoder, build_vae

    cfg = MVDiffConfig.preset(p["mv"], resolution=p["mv_res"], **p.get("mv_overrides", {}))
    if p["mv"] == "base":
        mv = MVDiffusion(cfg, vae=build_vae(cfg, SD_VAE), image_encoder=build_image_encoder(cfg, CLIP_VIT_H))
    else:
        mv = MVDiffusion(cfg)
    lgm = LGM(lgm_config(dict(preset=p["lgm"], input_size=p["lgm_input"], render_size=p["render"])))
    bundle = torch.nn.ModuleDict({"mv": mv, "lgm": lgm}).to(device).eval()
    bundle.attention = None
    return bundle


class RearrangedAttnProcessor:
    """The baseline's self-attention, as multi-view diffusion code writes it: the views' tokens
    rearranged into one sequence (``(B V) L C`` -> ``B (V L) C``; ``"rows"``: ``(B h) (V w) C``),
    diffusers' ``AttnProcessor2_0`` on it, rearranged back. Cross-attention stays per view. A call's
    ``num_views`` (Magic-Boost's UNet passes each call's target + kept anchors) overrides the
    constructor's. The reference processor of the ``generate`` and ``refine`` bench baselines."""

    def __init__(self, num_views: int, layout: str):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.num_views, self.layout, self.inner = num_views, layout, AttnProcessor2_0()

    def __call__(self, attn, hidden_states,  # [B*V, L, C]
                 encoder_hidden_states=None, attention_mask=None, temb=None, *args, num_views: int | None = None,
                 **kwargs):
        if encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        BV, L, C = hidden_states.shape
        V = num_views or self.num_views
        B = BV // V
        if self.layout == "views":
            x = hidden_states.reshape(B, V * L, C)
            return self.inner(attn, x, None, attention_mask, temb).reshape(BV, L, C)
        h = w = int(L ** 0.5)
        x = hidden_states.reshape(B, V, h, w, C).permute(0, 2, 1, 3, 4).reshape(B * h, V * w, C)
        y = self.inner(attn, x, None, attention_mask, temb)
        return y.reshape(B, h, V, w, C).permute(0, 2, 1, 3, 4).reshape(BV, L, C)


def set_attention(bundle, backend: str) -> None:
    """The UNet's and the LGM's self-attention on ``backend`` (a ``multiview_attention`` backend),
    or the baseline's (class docstring of :class:`RearrangedAttnProcessor`)."""
    if bundle.attention == backend:
        return
    from fast3d.nn import MultiViewAttnProcessor

    mv, cfg = bundle["mv"], bundle["mv"].config
    imagedream = cfg.conditioning == "imagedream"
    V = cfg.num_views + imagedream          # ImageDream's input image is one more view
    proc = (RearrangedAttnProcessor(V, cfg.layout) if backend == BASELINE
            else MultiViewAttnProcessor(V, cfg.layout, backend=backend))
    unet = mv.denoiser.unet
    if imagedream:   # the self-attention only: the cross-attention keeps its image-token weights
        unet.set_attn_processor({k: proc if k.endswith("attn1.processor") else v
                                 for k, v in unet.attn_processors.items()})
    else:
        unet.set_attn_processor(proc)
    bundle["lgm"].set_attention_backend("torch" if backend == BASELINE else backend)
    bundle.attention = backend


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """The input image (a random object-sized square on white, at the model's resolution), the
    rig's cameras, and for the stages that start later the views and Gaussians they start from."""
    from fast3d.inference.lgm import rig_distance, turntable_cameras

    bundle = c.cached_model(("generate", device, p["mv"], p["mv_res"], p["lgm"], p["lgm_input"], p["render"],
                             tuple(sorted(p.get("mv_overrides", {}).items()))), lambda: _build(p, device))
    mv, lgm = bundle["mv"], bundle["lgm"]
    R = mv.config.resolution
    image = torch.ones(3, R, R)
    q = R // 4
    image[:, q:R - q, q:R - q] = torch.rand(3, R - 2 * q, R - 2 * q, generator=gen)
    vm, Ks = mv.rig_cameras(R)
    res = lgm.config.render_size
    tv, tK = turntable_cameras(lgm.config, rig_distance(vm), p["frames"], res)
    x = dict(bundle=bundle, params=p, image=image, viewmats=vm, Ks=Ks, turntable=(tv.to(device), tK.to(device)),
             tmp=_scratch().name)
    if p["part"] in ("recon", "render"):
        x["views"] = torch.rand(mv.num_views, 3, R, R, generator=gen)
        if p["part"] == "render":
            with _autocast(p, device):
                x["gaussians"] = _reconstruct(bundle, x["views"], vm, Ks)
    return x


@functools.cache
def _scratch() -> tempfile.TemporaryDirectory:
    """Where the timed PLY writes go: one directory per process, deleted when it exits."""
    return tempfile.TemporaryDirectory(prefix="fast3d-bench-generate-")


def _autocast(p: dict, device: torch.device):
    dtype = c.dtype_of(p)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def _reconstruct(bundle, views, viewmats, Ks) -> dict:  # views [V, 3, R, R] -> Gaussians in the views' world
    from fast3d.inference.lgm import world_gaussians

    return world_gaussians(bundle["lgm"], views[None], viewmats[None], Ks[None])


def _render(backend: str, g: dict, tv, tK, size: int):  # -> images [F, 3, H, W]
    from fast3d.bench.workloads.lgm import GAUSSIAN_KEYS, render

    n = tv.shape[0]
    bg = torch.ones(1, n, 3, device=tv.device)
    return render("gsplat" if backend == BASELINE else "auto", {k: g[k] for k in GAUSSIAN_KEYS}, tv[None], tK[None],
                  size, bg)[0][0]


def run(backend: str, x: dict) -> tuple:
    from fast3d.inference.lgm import save_gaussians_ply
    from fast3d.inference.mvdiff import sample_views

    p, bundle = x["params"], x["bundle"]
    dev = x["turntable"][0].device
    set_attention(bundle, backend)
    out = ()
    with torch.no_grad(), _autocast(p, dev), c.oom_as_value_error(f"{OP} {p['mv']} part {p['part']} on {backend}"):
        views = x.get("views")
        if p["part"] in ("all", "mv"):
            views = sample_views(bundle["mv"], x["image"], steps=p["steps"], guidance_scale=p["guidance"],
                                 scheduler=p["scheduler"], seed=0)["images"]
            out = (views,)
        g = x.get("gaussians")
        if p["part"] in ("all", "recon"):
            g = _reconstruct(bundle, views, x["viewmats"], x["Ks"])
            save_gaussians_ply(os.path.join(x["tmp"], "gaussians.ply"), g)
            out = (g["means"],)
        if p["part"] in ("all", "render"):
            out = (_render(backend, g, *x["turntable"], bundle["lgm"].config.render_size),)
    return out


@functools.cache
def _param_counts(mv: str, mv_res: int, lgm: str, lgm_input: int, mv_overrides: tuple = ()) -> tuple[int, int, int]:
    """Parameters of (the denoiser, the VAE + image encoder, the LGM) of a workload, counted on the
    meta device (nothing allocated)."""
    with torch.device("meta"):
        b = _build(dict(mv=mv, mv_res=mv_res, lgm=lgm, lgm_input=lgm_input, render=lgm_input,
                        mv_overrides=dict(mv_overrides)), torch.device("meta"))
    n = lambda m: sum(q.numel() for q in m.parameters())  # noqa: E731
    return n(b["mv"].denoiser), n(b["mv"].vae) + n(b["mv"].image_encoder), n(b["lgm"])


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Bytes: the weights a stage reads, in the workload's precision: the UNet's once per step
    (both halves of the guidance batch go in one call), the VAE's and image encoder's once, the
    LGM's once. Flops are not modelled (0): the stages mix convolutions, attention and rasterization."""
    unet, rest, recon = _param_counts(p["mv"], p["mv_res"], p["lgm"], p["lgm_input"],
                                      tuple(sorted(p.get("mv_overrides", {}).items())))
    e = torch.finfo(c.dtype_of(p)).bits // 8
    total = 0
    if p["part"] in ("all", "mv"):
        total += (p["steps"] * unet + rest) * e
    if p["part"] in ("all", "recon"):
        total += recon * e
    return total, 0


def available(device: torch.device) -> str | None:
    """The baseline needs gsplat's CUDA rasterizer."""
    from fast3d.ops.rasterization.bench import gsplat_available

    return gsplat_available(device)


SPEC = register_bench(BenchSpec(op=OP, workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
                                baselines={BASELINE: available}, passes=("forward",),
                                kernel_op="multiview_attention"))
