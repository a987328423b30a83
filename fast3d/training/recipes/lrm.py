"""LRM training with VFusion3D's recipe (Han et al. 2024): an LRM (fast3d.models.lrm) learns to
reconstruct a triplane from one posed image, supervised by renders of several views of the object.

Each sample has ``data.views`` views (a random subset of the object's, drawn by the dataset from
the sample key, the run seed and the epoch, so a resumed run reads the same ones); the first is the
input, and all of them, the input included (as OpenLRM), are rendered and supervised. VFusion3D
pre-trains on its synthetic multi-view data (``data.sources: [synthetic]``), then fine-tunes on
renders of 3D assets (``[rendered3d]``, ``model.init_from`` pointing at the pre-trained weights).

The recipe's switches, in the ``loss`` section (the paper's values in brackets; the tiny CPU config
scales the resolutions down):

* ``stages`` (required): ``[{resolution, steps}, ...]``, the render resolution of each training
  stage, in order; steps past the last stage stay at its resolution [128, 192, 256, 320, 384 px,
  5 epochs each but the last, 10: 30 epochs]. Targets are resized from ``data.resolution`` to the
  stage's resolution.
* ``lr_reset_after``: a stage resolution; the learning rate's cosine annealing restarts at the peak
  after that stage ends, without a second warm-up [192: the restart after the first 10 epochs].
  null: one cosine cycle. The schedule (``lr_factor``, on top of the run's linear warm-up over
  ``warmup_steps`` [3000], which must end before the restart): constant through the warm-up, then
  each cycle ``(a, b]`` anneals ``0.5 (1 + cos(pi (step - a - 1) / (b - a)))`` from 1 towards 0;
  the first cycle runs from the end of the warm-up to the restart, the second from the restart to
  the end of the last stage; steps past the last stage keep its last factor.
* ``image_level``: the RGB renders are supervised by LPIPS alone, no pixel MSE (the opacity loss
  stays): the synthetic views are not pixel-consistent across views [true for pre-training; false,
  MSE + LPIPS, when fine-tuning on 3D renders]. Needs ``lpips_weight > 0``.
* ``lpips_weight`` [1.0, OpenLRM's]: weight of LPIPS-VGG between the renders and the targets;
  ``lpips_backbone``: "imagenet" (the metric; its VGG weights must be in torchvision's cache),
  "random" (an offline stand-in for CPU tests and demos) or a VGG-16 weights file.
* ``opacity_weight`` [VFusion3D's opacity loss; the weight 1.0 is fast3d's choice]: MSE between
  the rendered opacity and the views' foreground alpha, against floaters and hollow objects.
* ``camera_noise`` [0.02]: uniform noise of +-camera_noise on the input camera's extrinsics and
  normalised intrinsics fed to the model (``fast3d.training.augment.camera_noise``); the rendering
  cameras stay exact.
* ``patch`` [null]: null renders whole frames; a size renders one random size x size crop of
  each frame at the stage's resolution (LRM's patch training, for memory), one position a micro
  batch.
* ``random_background`` [false]: composite the supervision targets over a random colour per
  sample (and render over it) instead of the data's own background; the input stays as stored.

All randomness of the loss (camera noise, backgrounds, patch positions, the renderer's sample
jitter) comes from the step's generator, so a resumed run draws the same.
Logged metrics: loss, loss_mse (without image_level), loss_lpips (lpips_weight > 0),
loss_opacity, psnr (of the RGB renders), render_resolution.

``model``: ``preset`` (LRMConfig.preset), ``overrides`` (LRMConfig fields), ``init_from`` (a model
directory, checkpoint directory or run directory to start from). ``activation_checkpointing``
(run config) recomputes the decoder layers in the backward. ``data``: ``train`` (shard
directories or files), ``views``, ``sources`` (a dataset without any sample of them fails in
``prepare``, before the first step), ``resolution`` (default: the largest stage resolution).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d import checks
from fast3d.data.dataset import MultiViewDataset
from fast3d.data.shards import SOURCES, background_color
from fast3d.evaluation.image_metrics import load_lpips, psnr
from fast3d.models import checkpoints
from fast3d.models.lrm import LRM, LRMConfig
from fast3d.training import augment
from fast3d.training.loop import Recipe, StepContext
from fast3d.training.recipes.lrm_data import SourceFiltered, check_sources

LPIPS_MIN_SIZE = 16   # LPIPS-VGG pools 4 times: smaller images vanish


@dataclass(frozen=True)
class ModelSection:
    preset: str = "small"
    overrides: dict = dataclasses.field(default_factory=dict)  # LRMConfig fields
    init_from: str = ""            # model / checkpoint / run directory to start from ("" : random init)

    def lrm_config(self, activation_checkpointing: bool) -> LRMConfig:
        fields = {f.name for f in dataclasses.fields(LRMConfig)} - {"grad_checkpointing"}
        unknown = sorted(set(self.overrides) - fields)
        if unknown:
            raise ValueError(f"model.overrides: unknown keys {unknown}; expected some of {sorted(fields)} "
                             f"(grad_checkpointing follows activation_checkpointing)")
        return LRMConfig.preset(self.preset, **self.overrides, grad_checkpointing=activation_checkpointing)


@dataclass(frozen=True)
class DataSection:
    train: str | tuple = ""        # shard directory or file, or a list of them (relative to the YAML)
    views: int = 4                 # views per sample: 1 input + views - 1 supervision-only
    sources: tuple = ("synthetic", "rendered3d")
    resolution: int | None = None  # resolution samples are read at (default: the largest stage's)

    def __post_init__(self):
        paths = (self.train,) if isinstance(self.train, str) else self.train
        if not paths or not all(isinstance(p, str) and p for p in paths):
            raise ValueError(f"data.train must name a shard directory or file, or a list of them; got {self.train!r}")
        checks.integer("data.views", self.views, 2, note="1 input + supervision views")
        allowed = tuple(s for s in SOURCES if s != "image2d")
        if (not isinstance(self.sources, tuple) or not self.sources
                or not all(s in allowed for s in self.sources)):
            raise ValueError(f"data.sources must be a non-empty list of {list(allowed)} (image2d samples have no "
                             f"other views to supervise); got {self.sources!r}")
        if self.resolution is not None and (isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
                                            or self.resolution < 1):
            raise ValueError(f"data.resolution must be a positive integer or null; got {self.resolution!r}")

    @property
    def paths(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)


def _number(name: str, x, lo: float = 0.0) -> None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not x >= lo:
        raise ValueError(f"{name} must be a number >= {lo}; got {x!r}")


@dataclass(frozen=True)
class LossSection:
    stages: tuple = ()             # ({resolution, steps}, ...): required
    lr_reset_after: int | None = None
    image_level: bool = True
    lpips_weight: float = 1.0
    lpips_backbone: str = "imagenet"
    opacity_weight: float = 1.0
    camera_noise: float = 0.02
    patch: int | None = None
    random_background: bool = False

    def __post_init__(self):
        if not isinstance(self.stages, tuple) or not self.stages:
            raise ValueError(f"loss.stages must be a non-empty list of {{resolution, steps}}; got {self.stages!r}")
        for i, s in enumerate(self.stages):
            if not isinstance(s, dict) or set(s) != {"resolution", "steps"}:
                raise ValueError(f"loss.stages[{i}] must be a mapping with exactly the keys resolution and steps; "
                                 f"got {s!r}")
            for k in ("resolution", "steps"):
                checks.positive_int(f"loss.stages[{i}].{k}", s[k])
        resolutions = [s["resolution"] for s in self.stages]
        if self.lr_reset_after is not None and self.lr_reset_after not in resolutions[:-1]:
            raise ValueError(f"loss.lr_reset_after must be the resolution of a stage before the last, "
                             f"{resolutions[:-1]}, or null; got {self.lr_reset_after!r}")
        for name in ("image_level", "random_background"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"loss.{name} must be true or false; got {getattr(self, name)!r}")
        for name in ("lpips_weight", "opacity_weight", "camera_noise"):
            _number(f"loss.{name}", getattr(self, name))
        if self.image_level and self.lpips_weight == 0:
            raise ValueError("loss.image_level supervises with LPIPS alone: it needs lpips_weight > 0")
        if self.patch is not None and (isinstance(self.patch, bool) or not isinstance(self.patch, int)
                                       or not 1 <= self.patch <= min(resolutions)):
            raise ValueError(f"loss.patch must be null or an integer in [1, smallest stage resolution "
                             f"{min(resolutions)}]; got {self.patch!r}")
        smallest = min(resolutions) if self.patch is None else self.patch
        if self.lpips_weight > 0 and smallest < LPIPS_MIN_SIZE:
            raise ValueError(f"loss.lpips_weight > 0 needs renders of at least {LPIPS_MIN_SIZE} px (LPIPS-VGG pools 4 "
                             f"times); the smallest stage resolution or patch is {smallest}")


def _resize(x: Tensor,  # [B, V, C, H, W]
            size: int) -> Tensor:  # -> [B, V, C, size, size]
    return F.interpolate(x.flatten(0, 1), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).unflatten(0, x.shape[:2])


class LRMRecipe(Recipe):
    name = "lrm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model_section = checkpoints.dataclass_from_dict(ModelSection, cfg.model, "model")
        self.data_section = checkpoints.dataclass_from_dict(DataSection, cfg.data, "data")
        self.loss_section = checkpoints.dataclass_from_dict(LossSection, cfg.loss, "loss")
        self.lrm = self.model_section.lrm_config(cfg.activation_checkpointing)
        self.stages = [(s["resolution"], s["steps"]) for s in self.loss_section.stages]
        self.resolution = self.data_section.resolution or max(r for r, _ in self.stages)
        if self.resolution < max(r for r, _ in self.stages):
            raise ValueError(f"data.resolution ({self.resolution}) must be at least the largest stage resolution "
                             f"({max(r for r, _ in self.stages)}): targets are not upsampled")
        self.total_steps = sum(steps for _, steps in self.stages)
        self.restart_step = None
        if self.loss_section.lr_reset_after is not None:
            end = 0
            for res, steps in self.stages:
                end += steps
                if res == self.loss_section.lr_reset_after:
                    self.restart_step = end
                    break
        first_end = self.restart_step if self.restart_step is not None else self.total_steps
        if cfg.warmup_steps >= first_end:
            where = "the restart after loss.lr_reset_after" if self.restart_step else "the end of loss.stages"
            raise ValueError(f"warmup_steps ({cfg.warmup_steps}) must end before the first cosine cycle does (step "
                             f"{first_end}: {where})")
        # (start, end] of each cosine cycle, in steps
        self.cycles = [(cfg.warmup_steps, first_end)]
        if self.restart_step is not None:
            self.cycles.append((self.restart_step, self.total_steps))
        self.init_dir = None
        if self.model_section.init_from:
            from fast3d.models.checkpoints import resolve_checkpoint

            # Found before anything is written (a run directory means its newest weights) and pinned
            # in the run's config, so config.json names the weights it started from.
            self.init_dir = resolve_checkpoint(cfg.path(self.model_section.init_from), what="model.init_from")
            self.cfg = self.cfg.replace(model={**self.cfg.model, "init_from": os.path.abspath(self.init_dir)})
        self.lpips = None

    def stage_resolution(self, step: int) -> int:
        """The render resolution of (1-based) step ``step``."""
        end = 0
        for res, steps in self.stages:
            end += steps
            if step <= end:
                return res
        return self.stages[-1][0]

    def lr_factor(self, step: int) -> float:
        """The cosine annealing with restart of (1-based) step ``step`` (module docstring)."""
        step = min(step, self.total_steps)
        for a, b in reversed(self.cycles):
            if step > a:
                return 0.5 * (1 + math.cos(math.pi * (step - a - 1) / (b - a)))
        return 1.0  # the warm-up: the run's scheduler ramps the rate

    def build_model(self) -> torch.nn.Module:
        src = self.init_dir
        if src is not None:
            try:
                saved = checkpoints.read_config(src, "lrm", LRMConfig)
            except ValueError as e:
                raise ValueError(f"model.init_from: {e}") from None
            ignore = dict(grad_checkpointing=False, encoder_path=None)
            if dataclasses.replace(saved, **ignore) != dataclasses.replace(self.lrm, **ignore):
                raise ValueError(f"model.init_from {self.model_section.init_from!r} holds another LRM configuration ({saved}) "
                                 f"than model.preset/overrides ({self.lrm})")
        torch.manual_seed(self.cfg.seed)
        model = LRM(self.lrm)
        if src is not None:
            checkpoints.load_state(model, checkpoints.read_weights(src), src)
        return model

    def prepare(self, device: torch.device) -> None:
        check_sources([self.cfg.path(p) for p in self.data_section.paths], self.data_section.sources)
        if self.loss_section.lpips_weight > 0:
            self.lpips = load_lpips(self.loss_section.lpips_backbone, device)

    def dataset(self, rank: int, world: int):
        data = MultiViewDataset([self.cfg.path(p) for p in self.data_section.paths], views=self.data_section.views,
                                resolution=self.resolution, random_views=True, seed=self.cfg.seed,
                                rank=rank, world_size=world)
        return SourceFiltered(data, self.data_section.sources)

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        losses, dev, gen = self.loss_section, ctx.device, ctx.generator
        lrm = getattr(model, "module", model)                                     # the DeepSpeed engine's LRM
        images, alphas = batch["images"].float(), batch["alphas"].float()        # [B, V, 3, R, R], [B, V, 1, R, R]
        viewmats, Ks = batch["viewmats"].float(), batch["Ks"].float()            # [B, V, 4, 4], [B, V, 3, 3]
        B, R = images.shape[0], images.shape[-1]
        res = self.stage_resolution(ctx.step + 1)

        vm_in, K_in = viewmats[:, 0], Ks[:, 0]
        if losses.camera_noise > 0:
            vm_in, K_in = augment.camera_noise(vm_in, K_in, gen, losses.camera_noise, R)
        planes = model(images[:, 0].to(dev, ctx.dtype), vm_in.to(dev), K_in.to(dev))

        bg = background_color(images, alphas)                                    # [B, 3]
        if res != R:
            images, alphas = _resize(images, res), _resize(alphas, res)
            Ks = Ks.clone()
            Ks[..., :2, :] *= res / R
        if losses.random_background:
            new = torch.rand(B, 3, generator=gen)
            images = images + (1 - alphas) * (new - bg)[:, None, :, None, None]
            bg = new
        patch = None
        if losses.patch is not None:
            y0, x0 = (int(v) for v in torch.randint(0, res - losses.patch + 1, (2,), generator=gen))
            patch = (y0, x0, losses.patch)
            images, alphas = (x[..., y0:y0 + losses.patch, x0:x0 + losses.patch] for x in (images, alphas))
        out = lrm.render(planes, viewmats.to(dev), Ks.to(dev), res, res, background=bg.to(dev), patch=patch,
                         generator=gen)
        pred, opacity = out["images"].float(), out["opacity"].float()           # [B, V, 3, h, w], [B, V, 1, h, w]
        target, alphas = images.to(dev), alphas.to(dev)

        l_opacity = F.mse_loss(opacity, alphas)
        loss = losses.opacity_weight * l_opacity
        m = {"loss_opacity": l_opacity.detach()}
        if not losses.image_level:
            l_mse = F.mse_loss(pred, target)
            loss = loss + l_mse
            m["loss_mse"] = l_mse.detach()
        if self.lpips is not None:
            l_lpips = self.lpips(pred.flatten(0, 1), target.flatten(0, 1)).mean()
            loss = loss + losses.lpips_weight * l_lpips
            m["loss_lpips"] = l_lpips.detach()
        m.update(loss=loss.detach(), psnr=psnr(pred.detach(), target).mean(), render_resolution=float(res))
        return loss, m

    def export(self, module: torch.nn.Module, path: str) -> None:
        module.save_pretrained(path)
