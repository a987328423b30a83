"""``fast3d refine``: Magic-Boost's refinement of a coarse 3D Gaussian asset (issue 19).

A coarse asset (any 3DGS PLY: ``fast3d infer`` / ``generate``'s ``gaussians.ply``) is optimised
with score distillation (SDS) from the multi-view conditioned diffusion model
(:mod:`fast3d.models.magicboost`), conditioned on K anchor views of the object and their cameras:

* **Parameters.** Positions, log scales, rotations (quaternions, normalised by the rasterizer),
  opacity logits and the SH colour coefficients, by Adam (:data:`LEARNING_RATES`).
* **SDS** (DreamFusion's score distillation). Each step renders ``views_per_step`` random views
  around the object (azimuth uniform, elevation uniform in ``elevation_deg``, at the anchors'
  mean distance and field of view) in one :func:`fast3d.rasterization` call, together with the K
  anchor views when the Anchor Iterative Update is on. Their latents ``z`` (of the renders clamped
  to [0, 1], the VAE's range) are noised to a
  timestep ``t`` drawn uniformly from ``t_range`` (fractions of the training schedule: a small
  range refines, a large one regenerates), the model predicts the noise with classifier-free
  guidance (``u + s (c - u)``, the unconditional pass dropping every anchor) and the gradient
  ``w(t) (eps_hat - eps)``, ``w(t) = 1 - alpha_bar_t``, flows to ``z`` and through the VAE
  encoder and the rasterizer to the Gaussians (the UNet is not differentiated). Its loss is a mean
  over latent elements, as the AIU loss is over pixels, so ``sds_weight`` and ``aiu_weight`` weigh
  comparable terms.
* **Anchor Iterative Update** (Magic-Boost's AIU loss, ``aiu``). The anchor renders of every step
  are supervised (``aiu_loss``: L1 or MSE, weight ``aiu_weight``) by the anchor targets, which
  start as the anchor images themselves (the best estimate of those views there is) and are
  updated every ``aiu_every`` steps (not at step 0): the anchor views are rendered from the current
  asset, noised and denoised by the last ``int(aiu_denoise_steps * aiu_strength)`` of
  ``aiu_denoise_steps`` DDIM steps (:func:`fast3d.inference.mvdiff.sdedit_timesteps`, "trailing"
  spacing: the noise level is ``aiu_strength`` of the schedule, t = 299 of 1000 for 0.3 x 10), the
  same guidance,
  each with its own anchor dropped from its conditioning, so the model redraws it from the other
  anchors. This keeps SDS from over-saturating the colours. Only the loss targets are updated: the
  model's conditioning stays the original anchors (computed once), the fixed evidence the updates
  are drawn from; conditioning on the updated anchors would feed the asset's own renders back as
  evidence and let errors compound.

Randomness comes from one CPU generator seeded by ``seed``. A checkpoint (``OUT/checkpoint.pt``:
the Gaussians, Adam's state, the step, the generator's state and the updated anchors, written
atomically) every ``checkpoint_every`` steps lets a killed run resume; the resumed run ends where
an uninterrupted one ends. Outputs: ``OUT/refined.ply``, ``OUT/turntable.gif`` (the coarse asset
left, the refined one right), ``OUT/compare.png`` (rows: the anchors, the coarse asset and the
refined one at the anchor cameras) and, last, ``OUT/report.json`` (settings, losses, wall time per
stage). Every input is checked before anything is written: a bad input leaves OUT as it was.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import cameras as cams
from fast3d import checks
from fast3d.inference.common import StageTimer, load_images, write_turntable
from fast3d.io.atomic import atomic_open, atomic_path

CHECKPOINT, REPORT = "checkpoint.pt", "report.json"
OUTPUTS = (CHECKPOINT, "refined.ply", "turntable.gif", "compare.png", REPORT)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
AIU_LOSSES = ("l1", "mse")
# how far (px) a principal point may lie from the anchors' centre when --cameras gives no size
PRINCIPAL_TOLERANCE_PX = 2.0
# Adam learning rates per parameter group for an object in the unit box: means in world units, the
# rest in their raw spaces (log scales, unnormalised quaternions, opacity logits, SH coefficients).
# ``lr_scale`` scales all. A refinement starts from a converged asset, so these are the 3DGS reference
# optimisation's (Kerbl et al. 2023) rates where it ends, not where it starts: means 1.6e-5 (its
# position rate decays from 1.6e-4 to 1.6e-6; this is the middle of that decay), scales, rotations
# and opacities a fifth of its constant rates, colours at its rate (texture is what SDS and the AIU
# loss refine). Adam moves every parameter by about its rate each step whatever the gradient's size,
# and the SDS gradient is mostly noise: at 3DGS's fitting rates 20 steps of SDS from an untrained
# model moved scales and positions enough to cost about 2 dB of held-out PSNR.
LEARNING_RATES = dict(means=1.6e-5, log_scales=1e-3, quats=2e-4, opacity_logits=1e-2, sh=2.5e-3)
PARAMS = tuple(LEARNING_RATES)


@dataclass(frozen=True)
class RefineSettings:
    """How ``fast3d refine`` optimises (module docstring). Error messages name the CLI flags."""

    steps: int = 400
    t_range: tuple = (0.02, 0.5)          # SDS timesteps, fractions of the training schedule, in (0, 1)
    views_per_step: int = 4               # random views rendered (and denoised) per step
    guidance_scale: float = 3.0           # classifier-free guidance (1: the conditional model alone)
    sds_weight: float = 1.0               # the SDS loss's weight (0: the AIU loss alone)
    elevation_deg: tuple = (-10.0, 40.0)  # the random views' elevation range
    aiu: bool = True                      # the Anchor Iterative Update loss
    aiu_every: int = 50                   # steps between anchor updates (the first at step aiu_every)
    aiu_strength: float = 0.3             # the fraction of the DDIM steps an update runs, in (0, 1]
    aiu_denoise_steps: int = 10           # DDIM steps over the whole schedule (an update runs int(strength x that))
    aiu_loss: str = "l1"                  # l1 | mse
    aiu_weight: float = 1.0
    lr_scale: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    turntable_frames: int = 24

    def __post_init__(self):
        checks.positive_int("--steps", self.steps)
        tr = self.t_range
        if not isinstance(tr, tuple) or len(tr) != 2:
            raise ValueError(f"--t-range must be two numbers LO HI; got {tr!r}")
        lo = checks.real("--t-range LO", tr[0], 0, 1, lo_open=True, hi_open=True,
                         note="a fraction of the diffusion schedule")
        hi = checks.real("--t-range HI", tr[1], 0, 1, lo_open=True, hi_open=True,
                         note="a fraction of the diffusion schedule")
        if lo > hi:
            raise ValueError(f"--t-range must have LO <= HI; got {lo:g} {hi:g}")
        checks.positive_int("--views-per-step", self.views_per_step)
        checks.real("--guidance", self.guidance_scale, 0)
        checks.real("--sds-weight", self.sds_weight, 0)
        el = self.elevation_deg
        if not isinstance(el, tuple) or len(el) != 2:
            raise ValueError(f"--elevation must be two numbers LO HI (degrees); got {el!r}")
        for e in el:
            checks.real("--elevation", e, -89, 89)
        if el[0] > el[1]:
            raise ValueError(f"--elevation must have LO <= HI; got {el[0]:g} {el[1]:g}")
        checks.boolean("--aiu", self.aiu)
        checks.positive_int("--aiu-every", self.aiu_every)
        checks.real("--aiu-strength", self.aiu_strength, 0, 1, lo_open=True)
        checks.positive_int("--aiu-denoise-steps", self.aiu_denoise_steps)
        if int(self.aiu_denoise_steps * self.aiu_strength) < 1:
            raise ValueError(f"--aiu-strength x --aiu-denoise-steps must reach one DDIM step; got "
                             f"{self.aiu_strength:g} x {self.aiu_denoise_steps}")
        checks.one_of("--aiu-loss", self.aiu_loss, AIU_LOSSES)
        checks.real("--aiu-weight", self.aiu_weight, 0)
        checks.real("--lr-scale", self.lr_scale, 0, lo_open=True)
        checks.positive_int("--checkpoint-every", self.checkpoint_every)
        checks.nonneg_int("--seed", self.seed)
        checks.positive_int("--frames", self.turntable_frames)


# --- inputs ---------------------------------------------------------------------------------------


def anchor_paths(anchors: list[str]) -> list[str]:
    """``--anchors``: one folder (its images, sorted by name) or image files, in order."""
    if not anchors:
        raise ValueError("--anchors: give a folder of anchor images or the image files")
    if len(anchors) == 1 and os.path.isdir(anchors[0]):
        folder = anchors[0]
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                       if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
        if not files:
            raise ValueError(f"--anchors {folder!r}: a folder with no image ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    for p in anchors:
        if not os.path.isfile(p):
            raise ValueError(f"--anchors {p!r} is not a file (or give one folder)")
    return list(anchors)


def read_anchor_cameras(path: str, n: int, width: int, height: int) -> tuple[Tensor, Tensor]:
    """The anchors' cameras from ``--cameras`` (the format of :func:`fast3d.inference.lgm.read_cameras`;
    ``width`` / ``height``, when the file has them, must be the anchor images'). Returns
    viewmats [n, 4, 4], Ks [n, 3, 3] (pixels of the anchor images)."""
    from fast3d.inference.lgm import parse_cameras

    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--cameras {path!r} cannot be read as JSON ({e})") from None
    if isinstance(d, dict) and ("viewmats" in d or "c2w" in d):
        given = d.get("viewmats", d.get("c2w"))
        if isinstance(given, list) and len(given) != n:
            raise ValueError(f"--anchors has {n} images but --cameras {path!r} has {len(given)} cameras")
    vm, Ks = parse_cameras(d, n, f"--cameras {path}")
    for key, size in (("width", width), ("height", height)):
        got = d.get(key)
        if got is None:
            continue
        sizes = got if isinstance(got, list) else [got]
        if any(s != size for s in sizes):
            raise ValueError(f"--anchors are {width}x{height} px but --cameras {path!r} says {key} {got}")
    # without a size in the file, the principal point says which images the intrinsics are for: a
    # centred one (as every fast3d camera has) within PRINCIPAL_TOLERANCE_PX of the anchors' centre
    off = (Ks[:, :2, 2] - Ks.new_tensor([width / 2, height / 2])).abs()
    if "width" not in d and "height" not in d and bool((off > PRINCIPAL_TOLERANCE_PX).any()):
        raise ValueError(f"--cameras {path!r}: the principal points {Ks[:, :2, 2].tolist()} are not at the centre "
                         f"({width / 2:g}, {height / 2:g}) of the {width}x{height} px anchors: the intrinsics are for "
                         f"images of another size (add width/height to the file)")
    return vm, Ks


def read_ply(path: str) -> dict:
    """``--ply``: a 3DGS PLY (:func:`fast3d.io.ply.load_ply`) with at least one Gaussian."""
    from fast3d.io.ply import load_ply

    if not os.path.isfile(path):
        raise ValueError(f"--ply {path!r} is not a file")
    try:
        g = load_ply(path)
    except ValueError as e:
        raise ValueError(f"--ply {path!r} is not a usable 3DGS PLY: {e}") from None
    if g["means"].shape[0] == 0:
        raise ValueError(f"--ply {path!r} holds no Gaussians")
    return g


def load_model(model_dir: str, device: torch.device):
    """``--model``: a Magic-Boost model directory (or a training run / checkpoint directory).

    Args:
        model_dir: the directory as the user gave it.
        device: where the model goes.

    Returns:
        (the ``MagicBoost`` in eval mode on ``device``, its weights frozen; the model directory
        resolved, :func:`fast3d.models.checkpoints.resolve_checkpoint`).
    """
    from fast3d.models import checkpoints
    from fast3d.models.magicboost import MODEL_TYPE, MagicBoost

    if not isinstance(model_dir, str):
        raise ValueError(f"--model must be a directory path; got {type(model_dir).__name__}")
    path = checkpoints.resolve_checkpoint(model_dir, what="--model")
    kind = checkpoints.model_type(path)
    if kind != MODEL_TYPE:
        raise ValueError(f"--model {model_dir!r} holds a {kind!r} model, not a Magic-Boost model ({MODEL_TYPE!r})")
    return MagicBoost.from_pretrained(path).to(device).eval().requires_grad_(False), path


def fov_y_deg(Ks: Tensor,  # [K, 3, 3]
              height: int) -> float:
    """The vertical field of view of intrinsics in pixels of ``height`` px images (their mean focal)."""
    return math.degrees(2 * math.atan(0.5 * height / float(Ks[:, 1, 1].double().mean())))


# --- the optimisation -----------------------------------------------------------------------------


class Refiner:
    """The optimisation state and one step of it (module docstring).

    Args:
        model: a loaded ``MagicBoost`` (eval mode, frozen).
        gaussians: the coarse asset as :func:`fast3d.io.ply.load_ply` returns it (activated).
        anchors: the anchor images at the model's resolution R. [K, 3, R, R] in [0, 1]
        anchor_viewmats: their cameras, world-to-camera, OpenCV. [K, 4, 4]
        anchor_Ks: their intrinsics in pixels of R x R images. [K, 3, 3]
        settings: the :class:`RefineSettings`.
        rasterize: the rasterizer, ``fast3d.rasterization`` or a function of its (gsplat's) signature.
    """

    def __init__(self, model, gaussians: dict, anchors: Tensor, anchor_viewmats: Tensor, anchor_Ks: Tensor,
                 settings: RefineSettings, rasterize=None):
        from fast3d.inference.mvdiff import make_scheduler

        self.model, self.settings = model, settings
        self.rasterize = rasterize
        dev = self.device = model.device
        self.R = model.config.resolution
        self.background = float(getattr(model.config, "background", 1.0))
        self.sh_degree = int(gaussians["sh_degree"])
        raw = _raw({k: gaussians[k].to(dev, torch.float32) for k in ("means", "quats", "scales", "opacities", "sh")})
        self.params = {k: raw[k].detach().clone().requires_grad_(True) for k in PARAMS}
        self.optimizer = torch.optim.Adam([{"params": [self.params[k]], "lr": LEARNING_RATES[k] * settings.lr_scale,
                                            "name": k} for k in PARAMS], eps=1e-15)
        self.anchors = anchors.to(dev, torch.float32)
        self.anchor_viewmats = anchor_viewmats.to(dev, torch.float32)
        self.anchor_Ks = anchor_Ks.to(dev, torch.float32)
        self.K = anchors.shape[0]
        with torch.no_grad():
            self.cond = model.condition(self.anchors, self.anchor_viewmats)
        self.alphas_cumprod = model.alphas_cumprod().to(dev, torch.float64)          # [T]
        T = self.alphas_cumprod.shape[0]
        lo, hi = settings.t_range
        self.t_lo, self.t_hi = max(1, round(lo * (T - 1))), max(1, round(hi * (T - 1)))
        self.distance = float(cams.camera_centers(self.anchor_viewmats.double().cpu()).norm(dim=-1).mean())
        self.fov_y_deg = fov_y_deg(self.anchor_Ks.cpu(), self.R)
        # the anchor update's DDIM with "trailing" spacing, so that its start follows the strength: the
        # last int(s x n) of n steps start at t = s T - 1 (0.3 x 10: t = 299 of 1000; "leading" spacing,
        # sampling's, would start at 201)
        ddim = make_scheduler("ddim", model.config.prediction_type)
        self.scheduler = type(ddim).from_config(ddim.config, timestep_spacing="trailing")
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.step_index = 0
        # [K, 3, R, R] the AIU loss's targets: the anchors themselves until the first update
        self.anchor_targets = self.anchors.clone()

    # --- rendering ---

    def gaussians(self) -> dict:
        """The current Gaussians, activated: means [N, 3], quats [N, 4] (unit), scales [N, 3],
        opacities [N], sh [N, K, 3] (graph-free, on the model's device)."""
        p = {k: v.detach() for k, v in self.params.items()}
        return dict(means=p["means"], quats=F.normalize(p["quats"], dim=-1), scales=p["log_scales"].exp(),
                    opacities=torch.sigmoid(p["opacity_logits"]), sh=p["sh"])

    def render(self, viewmats: Tensor,  # [C, 4, 4]
               Ks: Tensor,              # [C, 3, 3] pixels of R x R images
               size: int | None = None) -> Tensor:  # -> [C, 3, size, size]
        """The current Gaussians from ``C`` cameras in one rasterization call, on the model's
        background colour (differentiable in the parameters)."""
        p, C = self.params, viewmats.shape[0]
        size = size or self.R
        bg = torch.full((C, 3), self.background, device=self.device)
        rasterize = self.rasterize
        if rasterize is None:
            from fast3d import rasterization as rasterize
        rgb, _, _ = rasterize(p["means"], p["quats"], p["log_scales"].exp(), torch.sigmoid(p["opacity_logits"]),
                              p["sh"], viewmats.to(self.device), Ks.to(self.device), size, size,
                              sh_degree=self.sh_degree, backgrounds=bg)
        return rgb.permute(0, 3, 1, 2)

    def random_cameras(self, n: int) -> tuple[Tensor, Tensor]:  # -> [n, 4, 4], [n, 3, 3]
        """``n`` views around the object: azimuth uniform, elevation uniform in the settings' range."""
        lo, hi = (math.radians(e) for e in self.settings.elevation_deg)
        az = torch.rand(n, generator=self.generator, dtype=torch.float64) * (2 * math.pi)
        el = lo + torch.rand(n, generator=self.generator, dtype=torch.float64) * (hi - lo)
        return cams.orbit_cameras(az, el, self.distance, self.fov_y_deg, self.R)

    # --- the diffusion model ---

    def _guided(self, noisy: Tensor,      # [B, C, h, w]
                t: Tensor,                # [B] int
                viewmats: Tensor,         # [B, 4, 4]
                drop: Tensor,             # [B, K] bool: the conditional pass's dropped anchors
                ) -> Tensor:              # -> [B, C, h, w] the guided prediction
        s = self.settings.guidance_scale
        if s == 1.0:
            return self.model.predict(noisy, t, viewmats, self.cond, drop=drop)
        out = self.model.predict(torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([viewmats, viewmats]),
                                 self.cond, drop=torch.cat([drop, torch.ones_like(drop)]))
        c, u = out.chunk(2)
        return u + s * (c - u)

    def _eps(self, pred: Tensor, noisy: Tensor, ab: Tensor) -> Tensor:  # all [B, C, h, w] (ab broadcasting)
        """The noise estimate from the model's prediction (``v = sqrt(ab) eps - sqrt(1 - ab) x0``
        gives ``eps = sqrt(ab) v + sqrt(1 - ab) x_t``)."""
        if self.model.config.prediction_type == "v_prediction":
            return ab.sqrt() * pred + (1 - ab).sqrt() * noisy
        return pred

    @torch.no_grad()
    def update_anchors(self) -> None:
        """The Anchor Iterative Update: the anchor views rendered now, noised and denoised by the last
        ``int(aiu_denoise_steps * aiu_strength)`` of ``aiu_denoise_steps`` DDIM steps
        (:func:`fast3d.inference.mvdiff.sdedit_timesteps`, "trailing" spacing: the noise level is
        ``aiu_strength`` of the schedule, e.g. t = 299 of 1000 for 0.3 x 10) with each one's own
        anchor dropped from its conditioning."""
        from fast3d.inference.mvdiff import sdedit_timesteps

        st = self.settings
        z0 = self.model.encode_latents(self.render(self.anchor_viewmats, self.anchor_Ks).clamp(0, 1))
        sched = self.scheduler
        timesteps = sdedit_timesteps(sched, st.aiu_denoise_steps, st.aiu_strength, self.device)
        noise = torch.randn(z0.shape, generator=self.generator).to(self.device)
        z = sched.add_noise(z0, noise, timesteps[:1])
        own = torch.eye(self.K, dtype=torch.bool, device=self.device)         # target k drops anchor k
        for t in timesteps:
            pred = self._guided(z, t.expand(self.K).to(self.device), self.anchor_viewmats, own)
            z = sched.step(pred, t, z).prev_sample
        self.anchor_targets = self.model.decode_latents(z).detach()

    def step(self) -> dict:
        """One optimisation step. Returns its losses as floats: ``sds`` (the SDS surrogate's value,
        half the mean square of the latent-space SDS gradient's elements; its gradient is the SDS
        gradient over the number of latent elements) and ``aiu`` (the anchor loss; 0 when off)."""
        st, dev = self.settings, self.device
        if st.aiu and self.step_index > 0 and self.step_index % st.aiu_every == 0:
            self.update_anchors()
        V = st.views_per_step
        vm, Ks = self.random_cameras(V)
        t = torch.randint(self.t_lo, self.t_hi + 1, (V,), generator=self.generator)
        if st.aiu:  # the anchors join the random views in the one rasterization call
            vm, Ks = torch.cat([vm.to(dev), self.anchor_viewmats]), torch.cat([Ks.to(dev), self.anchor_Ks])
        images = self.render(vm, Ks)                                             # [V (+K), 3, R, R]
        # the VAE's input range (SH colours can render above 1), as the anchor update encodes them
        z = self.model.encode_latents(images[:V].clamp(0, 1))                    # [V, C, h, w]
        eps = torch.randn(z.shape, generator=self.generator).to(dev)
        t = t.to(dev)
        ab = self.alphas_cumprod[t].float()[:, None, None, None]
        sds = torch.zeros((), device=dev)
        if st.sds_weight > 0:   # (the draws above are made either way: one random stream for any weight)
            with torch.no_grad():
                noisy = ab.sqrt() * z + (1 - ab).sqrt() * eps
                none = torch.zeros(V, self.K, dtype=torch.bool, device=dev)
                eps_hat = self._eps(self._guided(noisy, t, vm[:V].to(dev), none), noisy, ab)
                grad = torch.nan_to_num((1 - ab) * (eps_hat.float() - eps))
            # d sds / d z = grad / z.numel(): the SDS gradient, a mean over the views' latent elements as
            # the AIU loss is a mean over the anchors' pixels, so sds_weight and aiu_weight are comparable
            # (a per-view sum made SDS outweigh the anchor loss a thousandfold: the AIU loss changed nothing)
            sds = 0.5 * (z - (z - grad).detach()).pow(2).mean()
        loss = st.sds_weight * sds
        aiu = torch.zeros((), device=dev)
        if st.aiu:
            diff = images[V:] - self.anchor_targets
            aiu = diff.abs().mean() if st.aiu_loss == "l1" else diff.pow(2).mean()
            loss = loss + st.aiu_weight * aiu
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step_index += 1
        return {"sds": float(sds.detach()), "aiu": float(aiu.detach())}

    # --- checkpoints ---

    def state_dict(self) -> dict:
        """The state a resumed run needs (CPU tensors).

        Returns:
            ``step``, ``params`` (the raw parameters by group), ``optimizer`` (Adam's state),
            ``generator`` (the RNG's state) and ``anchor_targets`` [K, 3, R, R].
        """
        return {"step": self.step_index, "params": {k: v.detach().cpu() for k, v in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                "anchor_targets": self.anchor_targets.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (of a refiner of the same inputs and settings).

        Args:
            state: what :meth:`state_dict` returned (possibly through ``torch.load``).
        """
        with torch.no_grad():
            for k in PARAMS:
                self.params[k].copy_(state["params"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step_index = int(state["step"])
        self.anchor_targets = state["anchor_targets"].to(self.device)


# --- the command ----------------------------------------------------------------------------------


def _fingerprint(ply: str,
                 anchors: Tensor,   # [K, 3, R, R]
                 viewmats: Tensor,  # [K, 4, 4]
                 Ks: Tensor,        # [K, 3, 3]
                 model_path: str, settings: RefineSettings) -> str:
    """What a checkpoint must match to be resumed: the inputs' bytes, the model and the settings
    (all but the turntable's frames, which the optimisation does not read)."""
    h = hashlib.sha256()
    with open(ply, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for t in (anchors, viewmats, Ks):
        h.update(t.contiguous().numpy().tobytes())
    with open(os.path.join(model_path, "config.yaml"), "rb") as f:
        h.update(f.read())
    w = os.path.join(model_path, "model.safetensors")
    if os.path.isfile(w):
        s = os.stat(w)
        h.update(f"{os.path.abspath(w)}:{s.st_size}:{s.st_mtime_ns}".encode())
    opt = {k: v for k, v in dataclasses.asdict(settings).items() if k != "turntable_frames"}
    h.update(json.dumps(opt, sort_keys=True).encode())
    return h.hexdigest()


def _read_checkpoint(path: str, fingerprint: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file: say which and why)
        raise ValueError(f"--out: the checkpoint {path!r} cannot be read ({type(e).__name__}: {e}); delete it to "
                         f"start over") from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise ValueError(f"--out: {path!r} is the checkpoint of another refinement (other inputs, model or "
                         f"settings); use another --out or delete it to start over")
    return state


def _side_by_side(a: Tensor, b: Tensor) -> Tensor:  # [F, 3, H, W] x2 -> [F, 3, H, 2W]
    return torch.cat([a, b], dim=-1)


def refine(ply: str, anchors: list[str], cameras: str, model_dir: str, out: str,
           settings: RefineSettings | None = None, device: str | None = None, stream=None) -> dict:
    """Refine a coarse 3DGS asset (module docstring) into ``out``.

    Args:
        ply: the coarse asset, a 3DGS PLY file.
        anchors: one folder of anchor images (sorted by name) or the image files, K of them
            (the model's ``num_anchors``), square, all of one size.
        cameras: the anchors' cameras, a JSON file (:func:`fast3d.inference.lgm.read_cameras`'s format).
        model_dir: a Magic-Boost model directory (or a training run / checkpoint directory).
        out: the output directory; a checkpoint left there by a killed run with the same inputs
            and settings is resumed.
        settings: the :class:`RefineSettings` (default: its defaults).
        device: "cuda" or "cpu" (default: CUDA when there is one).
        stream: where progress goes (default: stderr).

    Returns:
        The report (also written to ``out/report.json``): the output paths, ``resumed_from``
        (the checkpoint's step, or 0), the losses of the first and last step, and ``stages_ms``.
    """
    from PIL import Image

    from fast3d.inference.lgm import TURNTABLE_ELEVATION_DEG, resize_inputs
    from fast3d.io import save_ply
    from fast3d.io.images import to_uint8

    settings = settings or RefineSettings()
    if not isinstance(settings, RefineSettings):
        raise ValueError(f"settings must be a RefineSettings; got {type(settings).__name__}")
    stream = stream or sys.stderr
    timer = StageTimer()
    with timer("load"):
        if not isinstance(out, str) or not out:
            raise ValueError(f"--out must be a directory path; got {out!r}")
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out!r} exists and is not a directory")
        try:
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            raise ValueError(f"--device {device!r} is not a device ({e})") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: torch sees no CUDA device here")
        gaussians = read_ply(ply)
        paths = anchor_paths(anchors)
        try:
            imgs = load_images(paths)                                            # [K, 3, H, W]
        except ValueError as e:
            raise ValueError(f"--anchors: {e}") from None
        H, W = imgs.shape[-2:]
        if H != W:
            raise ValueError(f"--anchors must be square images; got {W}x{H}")
        if not os.path.isfile(cameras):
            raise ValueError(f"--cameras {cameras!r} is not a file")
        vm, Ks = read_anchor_cameras(cameras, len(paths), W, H)
        model, model_path = load_model(model_dir, dev)
        if len(paths) != model.num_anchors:
            raise ValueError(f"--anchors: the model takes {model.num_anchors} anchor views; got {len(paths)}")
        R = model.config.resolution
        x, K_R = resize_inputs(imgs[None], Ks[None], R)                          # [1, K, 3, R, R], [1, K, 3, 3]
        x, K_R = x[0].clamp(0, 1), K_R[0]
        fingerprint = _fingerprint(ply, x, vm, K_R, model_path, settings)
        ckpt_path = os.path.join(out, CHECKPOINT)
        state = _read_checkpoint(ckpt_path, fingerprint)
        refiner = Refiner(model, gaussians, x, vm, K_R, settings)
        first = None
        if state is not None:
            refiner.load_state_dict(state)
            first = state.get("first_losses")
    # everything is checked: from here on OUT is written
    os.makedirs(out, exist_ok=True)
    for name in OUTPUTS:  # what a killed run left half-written (io.atomic's temporary names)
        for tmp in glob.glob(os.path.join(glob.escape(out), f".{name}.tmp*")):
            os.remove(tmp)
    start = refiner.step_index
    if start:
        print(f"fast3d refine: resuming from step {start} ({ckpt_path})", file=stream, flush=True)
    coarse = {k: v.to(dev) for k, v in gaussians.items() if k != "sh_degree"}
    last = None
    every = max(1, settings.steps // 20)
    with timer("refine"):
        t0 = time.perf_counter()
        while refiner.step_index < settings.steps:
            losses = refiner.step()
            first = first or losses
            last = losses
            i = refiner.step_index
            if i % every == 0 or i == settings.steps:
                rate = (time.perf_counter() - t0) / (i - start)
                print(f"fast3d refine: step {i}/{settings.steps}  sds {losses['sds']:.4g}  aiu {losses['aiu']:.4g}  "
                      f"({rate:.2f} s/step, eta {rate * (settings.steps - i):.0f} s)", file=stream, flush=True)
            if i % settings.checkpoint_every == 0 and i < settings.steps:
                with atomic_path(ckpt_path) as tmp:
                    torch.save({**refiner.state_dict(), "fingerprint": fingerprint, "first_losses": first}, tmp)
    with timer("export"):
        g = refiner.gaussians()
        ply_out = os.path.join(out, "refined.ply")
        save_ply(ply_out, g["means"], g["quats"], g["scales"], g["opacities"].clamp(1e-6, 1 - 1e-6), g["sh"])
    with timer("turntable"):
        tv, tK = cams.turntable(settings.turntable_frames, R, TURNTABLE_ELEVATION_DEG, refiner.distance,
                                refiner.fov_y_deg)
        with torch.no_grad():
            after = refiner.render(tv, tK).clamp(0, 1).cpu()
            refiner_params = refiner.params
            refiner.params = _raw(coarse)
            before = refiner.render(tv, tK).clamp(0, 1).cpu()
            before_anchor = refiner.render(refiner.anchor_viewmats, refiner.anchor_Ks).clamp(0, 1).cpu()
            refiner.params = refiner_params
            after_anchor = refiner.render(refiner.anchor_viewmats, refiner.anchor_Ks).clamp(0, 1).cpu()
        gif = write_turntable(_side_by_side(before, after), os.path.join(out, "turntable.gif"))
        strip = torch.cat([torch.cat(list(rows), dim=-1) for rows in (x, before_anchor, after_anchor)], dim=-2)
        png = os.path.join(out, "compare.png")
        with atomic_path(png) as tmp:
            Image.fromarray(to_uint8(strip)).save(tmp, format="PNG")
    report = {"ply": ply_out, "turntable": gif, "compare": png, "input_ply": os.path.abspath(ply),
              "anchors": [os.path.abspath(p) for p in paths], "cameras": os.path.abspath(cameras),
              "model": os.path.abspath(model_path), "device": str(dev), "gaussians": int(g["means"].shape[0]),
              "settings": json.loads(json.dumps(dataclasses.asdict(settings))), "resumed_from": start, "first_losses": first,
              "last_losses": last, "stages_ms": dict(timer.stages)}
    with atomic_open(os.path.join(out, REPORT)) as f:
        json.dump(report, f, indent=1)
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    print(f"fast3d refine ({settings.steps} steps, {report['gaussians']} Gaussians, {dev}):\n{timer.report()}\n"
          f"wrote {ply_out}\nwrote {gif}\nwrote {png}", file=stream, flush=True)
    return report


def _raw(g: dict) -> dict:
    """Activated Gaussians (``load_ply``'s keys) as the raw parameters :meth:`Refiner.render` reads."""
    op = g["opacities"].clamp(1e-6, 1 - 1e-6)
    return dict(means=g["means"], log_scales=g["scales"].log(), quats=g["quats"],
                opacity_logits=torch.log(op / (1 - op)), sh=g["sh"])
