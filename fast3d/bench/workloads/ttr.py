"""The multi-view DiT at model level: ``ttr-step``, one training step of
:class:`fast3d.training.recipes.ttr.TTRRecipe` on cached features: the PixArt-alpha transformer
(:func:`fast3d.models.mvdit.build_transformer`) on noised VAE latents of 2x2 view grids with T5
caption embeddings, MSE between the noise and the first ``latent_channels`` output channels.
``forward+backward`` is the step (no optimizer step), ``forward`` the same under ``no_grad``.

MFU: the byte/flop model gives :meth:`fast3d.models.mvdit.MVDiTConfig.step_flops` for
``forward+backward`` (a third of it forward, two thirds backward), so a row's ``tflops`` is the
achieved rate and ``frac_peak_flops`` is the MFU against the device's measured matmul peak (bf16
on a GPU). Samples/s = ``params["batch"]`` / median.

Backends: the self-attention (``attn1`` of every block) on fast3d's ``MultiViewAttnProcessor``
with each of ``fast3d.multiview_attention``'s backends, and the baseline ``diffusers``: diffusers'
default processor (``AttnProcessor2_0``, PyTorch's scaled_dot_product_attention).
"""

from __future__ import annotations

import torch

from fast3d.bench.spec import BenchSpec, Workload, register_bench
from fast3d.bench.workloads import _common as c

OP = "ttr-step"
DIFFUSERS = "diffusers"

WORKLOADS = [
    Workload("xl-512", dict(preset="xl-512", batch=8, dtype="bfloat16"),
             quick=dict(preset="tiny", batch=2, dtype="float32"),
             source="Bootstrap3D's multi-view DiT (PixArt-alpha DiT-XL/2, 28 layers x 1152 wide) on 2x2 grids of "
                    "4 views at 512 px (64x64x4 latents, 1024 tokens), 120 T5 caption tokens, batch 8 per GPU, "
                    "bf16; MFU = step_flops / time / peak (frac_peak_flops of the forward+backward row)"),
]


def config(p: dict):
    from fast3d.models.mvdit import MVDiTConfig

    return MVDiTConfig.preset(p["preset"])


def _build(cfg, device: torch.device, dtype: torch.dtype):
    from fast3d.models import mvdit

    model = mvdit.build_transformer(cfg, attention_backend="auto").to(device, dtype).train()
    model._fast3d_attention = None
    return model


def set_attention(model, backend: str) -> None:
    """Every block's self-attention on ``MultiViewAttnProcessor(num_views=1, backend=backend)``
    (the model's own, see fast3d.models.mvdit), or on diffusers' default processor."""
    if getattr(model, "_fast3d_attention", None) == backend:
        return
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fast3d.nn import MultiViewAttnProcessor

    for block in model.transformer_blocks:
        block.attn1.set_processor(AttnProcessor2_0() if backend == DIFFUSERS
                                  else MultiViewAttnProcessor(num_views=1, backend=backend))
    model._fast3d_attention = backend


def make_inputs(p: dict, device: torch.device, gen: torch.Generator) -> dict:
    """A batch as TTRRecipe.loss builds it from the feature cache: latents already noised at a
    random timestep, caption embeddings with a mask of random caption lengths, the noise target."""
    cfg = config(p)
    B, C, h, L = p["batch"], cfg.latent_channels, cfg.latent_size, cfg.max_caption_tokens
    dtype = c.dtype_of(p)
    lengths = torch.randint(1, L + 1, (B, 1), generator=gen)
    model = c.cached_model(("mvdit", device, cfg, p["dtype"]), lambda: _build(cfg, device, dtype))
    return dict(model=model, params=p,
                noisy=torch.randn(B, C, h, h, generator=gen).to(device, dtype),
                embeds=torch.randn(B, L, cfg.caption_channels, generator=gen).to(device, dtype),
                mask=(torch.arange(L)[None] < lengths).long().to(device),
                timestep=torch.randint(0, 1000, (B,), generator=gen).to(device),
                noise=torch.randn(B, C, h, h, generator=gen).to(device))


def run(backend: str, x: dict) -> tuple:
    p, model = x["params"], x["model"]
    C = x["noise"].shape[1]
    set_attention(model, backend)
    model.zero_grad(set_to_none=True)
    with c.oom_as_value_error(f"{OP} {p['preset']} batch {p['batch']} on {backend}"):
        out = model(x["noisy"], encoder_hidden_states=x["embeds"], encoder_attention_mask=x["mask"],
                    timestep=x["timestep"], added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = (out[:, :C].float() - x["noise"]).pow(2).mean()
    return (loss,)


def model(p: dict, pass_: str) -> tuple[int, int]:
    """Flops: the config's step_flops (forward + backward = 3 forwards of the matmuls and attention),
    a third forward. Bytes: the weights read forward, read and their gradients written backward, the
    latents and caption embeddings read."""
    cfg = config(p)
    B, e = p["batch"], torch.finfo(c.dtype_of(p)).bits // 8
    total = cfg.step_flops(B)
    weights = _weights_of(cfg) * e
    inputs = B * (2 * cfg.latent_channels * cfg.latent_size ** 2 + cfg.max_caption_tokens * cfg.caption_channels) * e
    fwd = total / 3
    if pass_ == "forward":
        return weights + inputs, fwd
    if pass_ == "backward":
        return 2 * weights, total - fwd
    return 3 * weights + inputs, total


_WEIGHTS: dict = {}


def _weights_of(cfg) -> int:
    if cfg not in _WEIGHTS:
        from diffusers import PixArtTransformer2DModel

        from fast3d.models.mvdit import transformer_kwargs

        with torch.device("meta"):
            _WEIGHTS[cfg] = sum(q.numel() for q in PixArtTransformer2DModel(**transformer_kwargs(cfg)).parameters())
    return _WEIGHTS[cfg]


def diffusers_available(device: torch.device) -> str | None:
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"diffusers not importable ({type(e).__name__})"
    return None


SPEC = register_bench(BenchSpec(op=OP, workloads=WORKLOADS, make_inputs=make_inputs, run=run, model=model,
                                baselines={DIFFUSERS: diffusers_available}, kernel_op="multiview_attention"))
