"""Sampling a trained multi-view DiT: a diffusers ``PixArtAlphaPipeline`` around the transformer of a
checkpoint (:func:`fast3d.models.mvdit.save_transformer`), with the VAE and text encoder its config
names, writing the generated 2x2 grid and its 4 views as PNGs.

The VAE and text encoder are rebuilt from the checkpoint's config: local directories, or for
``random-tiny`` random models drawn from the config's ``random_seed``, the very ones a tiny run's
feature cache was made with, so a tiny checkpoint samples offline. PixArt-alpha's sampler: DPM-Solver++
over its linear training schedule (``NOISE_SCHEDULE``), classifier-free guidance against the empty
caption, captions preprocessed as in :func:`fast3d.models.mvdit.encode_prompts`.
"""

from __future__ import annotations

import os

import torch

from fast3d.inference.common import default_device
from fast3d.io.images import to_uint8
from fast3d.models.mvdit import NOISE_SCHEDULE, build_text_encoder, build_vae, load_transformer, split_grid


def _save_png(img: torch.Tensor,  # [3, H, W] in [0, 1]
              path: str) -> None:
    from PIL import Image

    arr = to_uint8(img)
    Image.fromarray(arr).save(path, format="PNG")


def _check_args(prompt, steps, guidance_scale) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty str; got {prompt!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0; got {guidance_scale!r}")


def load_pipeline(checkpoint_dir: str, device: str | torch.device | None = None):
    """The diffusers ``PixArtAlphaPipeline`` of a checkpoint (module docstring) on ``device`` (default:
    CUDA when there is one), and its :class:`MVDiTConfig`."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    device = default_device(device)
    cfg, transformer = load_transformer(checkpoint_dir)
    text_encoder, tokenizer = build_text_encoder(cfg)
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=build_vae(cfg),
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler(**NOISE_SCHEDULE))
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, cfg


def sample_grid(pipe, cfg, prompt: str, steps: int = 20, guidance_scale: float = 4.5,
                seed: int = 0) -> torch.Tensor:  # -> [3, G, G] in [0, 1]
    """One 2x2 grid for ``prompt`` from :func:`load_pipeline`'s pipeline; ``seed`` seeds the
    initial noise (a generator on the pipeline's device). :func:`split_grid` gives its 4 views.

    Args:
        pipe, cfg: what :func:`load_pipeline` returns.
        prompt: a non-empty caption.
        steps: DPM-Solver steps, a positive int.
        guidance_scale: classifier-free guidance against the empty caption, >= 0.
        seed: the initial noise's seed.

    Returns:
        The grid, float [3, grid_size, grid_size] in [0, 1], on the pipeline's device.
    """
    _check_args(prompt, steps, guidance_scale)
    with torch.no_grad():
        grid = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, height=cfg.grid_size,
                    width=cfg.grid_size, generator=torch.Generator(pipe.device).manual_seed(seed), output_type="pt",
                    use_resolution_binning=False, clean_caption=False,
                    max_sequence_length=cfg.max_caption_tokens).images                  # [1, 3, G, G] in [0, 1]
    return grid[0]


def sample(checkpoint_dir: str, prompt: str, out_png: str, steps: int = 20, guidance_scale: float = 4.5, seed: int = 0,
           device: str | torch.device | None = None) -> list[str]:
    """Generate one grid for ``prompt``; write ``out_png`` (grid_size px square) and the views as
    ``<out_png stem>_view{0..3}.png`` beside it (grid_size // 2 px). Returns the 5 paths, grid first.
    ``seed`` seeds the initial noise; ``device`` defaults to CUDA when there is one."""
    if not isinstance(out_png, str) or not out_png.lower().endswith(".png"):
        raise ValueError(f"out_png must be a path ending in .png; got {out_png!r}")
    _check_args(prompt, steps, guidance_scale)
    pipe, cfg = load_pipeline(checkpoint_dir, device)
    grid = sample_grid(pipe, cfg, prompt, steps, guidance_scale, seed)[None]            # [1, 3, G, G]
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    stem = out_png[: -len(".png")]
    paths = [out_png] + [f"{stem}_view{v}.png" for v in range(4)]
    _save_png(grid[0], out_png)
    for v, view in enumerate(split_grid(grid)[0]):
        _save_png(view, paths[1 + v])
    return paths
