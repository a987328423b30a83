"""Sampling the image-conditioned multi-view diffusion model (:mod:`fast3d.models.mvdiff`): one image
in, the rig's V views and their cameras out.

* :func:`load_mvdiff` loads a model directory (or a training run / checkpoint directory: its newest
  EMA weights, as ``fast3d.models.checkpoints.resolve_checkpoint`` finds them).
* :func:`sample_views` runs a diffusers sampler (DDIM, Euler or DPM-Solver++) over the model's
  training schedule with classifier-free guidance against the dropped image, optionally from given
  views noised to a strength (SDEdit). The same seed gives the same views.
* :func:`denoise` is the loop itself on latents, for callers that bring their own conditioning
  (the cameras of held-out views, say).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import checks
from fast3d.inference.common import default_device
from fast3d.models import checkpoints
from fast3d.models.mvdiff import MODEL_TYPE, NOISE_SCHEDULE, MVDiffusion

SCHEDULERS = ("ddim", "euler", "dpm")


def load_mvdiff(model_dir: str, device: str | torch.device | None = None) -> MVDiffusion:
    """A trained multi-view diffusion model, in eval mode on ``device``.

    Args:
        model_dir: a model directory (``config.yaml`` with model_type ``"mvdiff"``), a checkpoint
            directory or a training run (its newest checkpoint's EMA weights when kept).
        device: where to put it; None: CUDA when there is one, else the CPU.

    Returns:
        The :class:`MVDiffusion` model.
    """
    if not isinstance(model_dir, str):
        raise ValueError(f"model_dir must be a path (str); got {type(model_dir).__name__}")
    path = checkpoints.resolve_checkpoint(model_dir, what="model_dir")
    kind = checkpoints.model_type(path)
    if kind != MODEL_TYPE:
        raise ValueError(f"model_dir {model_dir!r} holds a {kind!r} model, not a multi-view diffusion model "
                         f"({MODEL_TYPE!r})")
    dev = default_device(device)
    return MVDiffusion.from_pretrained(path).to(dev).eval()


def make_scheduler(name: str, prediction_type: str):
    """The diffusers sampler ``name`` (``"ddim"``, ``"euler"``, ``"dpm"``) on the model's training
    schedule (``NOISE_SCHEDULE``) and prediction type."""
    checks.one_of("scheduler", name, SCHEDULERS)
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type, clip_sample=False,
                             set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    if name == "euler":
        return EulerDiscreteScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type, timestep_spacing="leading",
                                      steps_offset=1)
    return DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type=prediction_type,
                                       algorithm_type="dpmsolver++", solver_order=2)


def sdedit_timesteps(sched, steps: int, strength: float, device=None) -> Tensor:  # -> [n] the timesteps to run
    """SDEdit's timesteps: the last ``n = int(steps * strength)`` of ``steps`` sampler steps over the
    whole schedule (the scheduler's ``set_timesteps`` is called here, its begin index set). The
    latents are noised to the first of them, so the start depends on the scheduler's spacing: of
    T = 1000, 10 steps at strength 0.3 start at t = 201 with "leading" spacing (:func:`make_scheduler`'s
    DDIM), at t = 299 (the strength) with "trailing".

    Args:
        sched: a diffusers scheduler (:func:`make_scheduler`), on the device of its timesteps.
        steps: sampler steps over the whole schedule.
        strength: the fraction of them to run, in (0, 1]; ``int(steps * strength)`` must be >= 1.
        device: where the timesteps go.

    Returns:
        The timesteps, high to low.
    """
    sched.set_timesteps(steps, device=device)
    n = int(steps * strength)
    if n < 1:
        raise ValueError(f"strength x steps must reach one sampler step; got {strength:g} x {steps}")
    start = (steps - n) * sched.order
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(start)
    return sched.timesteps[start:]


@torch.no_grad()
def denoise(model: MVDiffusion,
            cond_latent: Tensor,     # [B, C, h, w] the input images' scaled latents
            image_embeds: Tensor,    # [B, E] their CLIP image embeddings (imagedream: [B, T, E] tokens)
            cameras: Tensor,         # [B, V, camera_dim] view_camera_features of the views to make
            noise: Tensor,           # [B, V, C, h, w] standard normal
            *, steps: int, guidance_scale: float, scheduler: str, init_latents: Tensor | None = None,
            strength: float = 1.0) -> Tensor:   # -> [B, V, C, h, w] scaled latents
    """The sampling loop on latents (arguments checked by the caller, :func:`sample_views`).

    Args:
        model: the model.
        cond_latent, image_embeds, cameras: the conditioning.
        noise: the initial noise (strength 1) or the noise added to ``init_latents`` (SDEdit).
        steps: sampler steps over the whole schedule; SDEdit runs the last ``int(steps * strength)``.
        guidance_scale: classifier-free guidance weight (1: the conditional model alone).
        scheduler: ``"ddim"``, ``"euler"`` or ``"dpm"``.
        init_latents: [B, V, C, h, w] latents to start from (SDEdit), or None.
        strength: how far ``init_latents`` are noised, in (0, 1].

    Returns:
        The denoised latents.
    """
    dev = model.device
    sched = make_scheduler(scheduler, model.config.prediction_type)
    noise = noise.to(dev)
    if init_latents is None:
        sched.set_timesteps(steps, device=dev)
        timesteps = sched.timesteps
        latents = noise * sched.init_noise_sigma
    else:
        timesteps = sdedit_timesteps(sched, steps, strength, dev)
        latents = sched.add_noise(init_latents.to(dev), noise, timesteps[:1])
    B = noise.shape[0]
    guided = guidance_scale != 1.0
    cond_latent, image_embeds, cameras = cond_latent.to(dev), image_embeds.to(dev), cameras.to(dev)
    if guided:  # one batch: the conditional samples, then the same with the image dropped
        cond_latent, image_embeds, cameras = (torch.cat([x, x]) for x in (cond_latent, image_embeds, cameras))
        drop = torch.arange(2 * B, device=dev) >= B
    else:
        drop = None
    for t in timesteps:
        x = sched.scale_model_input(latents, t)
        x = torch.cat([x, x]) if guided else x
        out = model.denoiser(x, cond_latent, image_embeds, cameras, t.expand(x.shape[0]).to(dev), drop).float()
        if guided:
            c, u = out.chunk(2)
            out = u + guidance_scale * (c - u)
        # the schedulers step one tensor; the views of a sample are one "image" of V C channels
        latents = sched.step(out.flatten(1, 2), t, latents.flatten(1, 2)).prev_sample.unflatten(1, latents.shape[1:3])
    return latents


def _square(image: Tensor, background: float) -> Tensor:  # [3, H, W] -> [3, S, S], S = max(H, W)
    """Pad the shorter side with the background colour, keeping the image centred."""
    _, H, W = image.shape
    S = max(H, W)
    top, left = (S - H) // 2, (S - W) // 2
    return F.pad(image, (left, S - W - left, top, S - H - top), value=background)


def sample_views(model: MVDiffusion,
                 image: Tensor,          # [3, H, W] in [0, 1], the object centred on the model's background
                 *, steps: int = 30, guidance_scale: float = 3.0, scheduler: str = "ddim", seed: int = 0,
                 init_views: Tensor | None = None,   # [V, 3, R, R] in [0, 1] (SDEdit)
                 strength: float = 1.0) -> dict:
    """The rig's views of the object in ``image``.

    Args:
        model: a loaded :class:`MVDiffusion` (:func:`load_mvdiff`).
        image: the input view, float [3, H, W] in [0, 1], the object centred on the model's
            background colour (``model.config.background``); a non-square image is padded with
            that colour, then it is resized to the model's resolution R.
        steps: sampler steps, a positive int.
        guidance_scale: classifier-free guidance weight, >= 0 (1: no guidance).
        scheduler: ``"ddim"``, ``"euler"`` or ``"dpm"`` (diffusers' DDIM, Euler, DPM-Solver++).
        seed: seeds the noise (drawn on the CPU): the same seed gives the same views.
        init_views: views to refine instead of starting from noise (SDEdit), [V, 3, R, R] in
            [0, 1], or None.
        strength: with ``init_views``, how far they are noised before denoising, in (0, 1]
            (1: to the start of the schedule); without them it must be 1.

    Returns:
        {"images": [V, 3, R, R] float in [0, 1], "viewmats": [V, 4, 4], "Ks": [V, 3, 3]}: the views
        and the rig's cameras (OpenCV world-to-camera, pixels of R px images; the input's view is
        view 0, at azimuth 0), on the CPU.
    """
    cfg = model.config
    V, R = model.num_views, cfg.resolution
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or min(image.shape[1:]) < 1 \
            or not image.is_floating_point():
        got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"image must be a float tensor [3, H, W] in [0, 1]; got {got}")
    steps = checks.positive_int("steps", steps)
    guidance_scale = checks.real("guidance_scale", guidance_scale, 0)
    checks.one_of("scheduler", scheduler, SCHEDULERS)
    seed = checks.nonneg_int("seed", seed)
    strength = checks.real("strength", strength, 0, 1, lo_open=True)
    if init_views is None:
        if strength != 1.0:
            raise ValueError(f"strength applies to init_views (SDEdit); without them it must be 1; got {strength}")
    else:
        if not isinstance(init_views, Tensor) or tuple(init_views.shape) != (V, 3, R, R) \
                or not init_views.is_floating_point():
            got = tuple(init_views.shape) if isinstance(init_views, Tensor) else type(init_views).__name__
            raise ValueError(f"init_views must be a float tensor [V, 3, R, R] = [{V}, 3, {R}, {R}] in [0, 1] (the "
                             f"model's views); got {got}")
        if int(steps * strength) < 1:
            raise ValueError(f"strength * steps must reach one sampler step; got strength={strength}, steps={steps}")

    with torch.no_grad():
        x = _square(image.detach().float().cpu().clamp(0, 1), cfg.background)
        if x.shape[-1] != R:
            x = F.interpolate(x[None], size=(R, R), mode="bilinear", antialias=True, align_corners=False)[0]
        x = x.clamp(0, 1)[None]                                                   # [1, 3, R, R]
        cond = model.encode_latents(x)                                            # [1, C, h, w]
        embeds = model.image_embeds(x)                                            # [1, E] (imagedream: [1, T, E])
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, V, *cond.shape[1:]), generator=gen)
        init = None
        if init_views is not None:
            init = model.encode_latents(init_views.detach().float().clamp(0, 1)).unsqueeze(0)   # [1, V, C, h, w]
        cameras = model.rig_camera_features()[None]                               # [1, V, camera_dim]
        latents = denoise(model, cond, embeds, cameras, noise, steps=steps, guidance_scale=guidance_scale,
                          scheduler=scheduler, init_latents=init, strength=strength)
        images = model.decode_latents(latents[0]).cpu()                           # [V, 3, R, R]
    viewmats, Ks = model.rig_cameras(R)
    return {"images": images, "viewmats": viewmats, "Ks": Ks}
