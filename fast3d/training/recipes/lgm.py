"""LGM training (Tang et al. 2024) on multi-view shards, and MVBoost's LoRA boost.

Each sample: ``num_input_views`` posed input images (LGM: 4 orthogonal views; here the rig's views
``data.input_views``) and ``num_sup_views`` supervision views (the inputs plus random others).
Cameras are normalised so the first input camera is canonical; the Gaussians the U-Net predicts
are rendered to the supervision views in one rasterization call for the whole batch. Loss: MSE on
RGB and on alpha, plus LPIPS (VGG) on RGB at up to 256 px, as the paper.

Augmentations (data section), as LGM: grid distortion of the input views after the first (with
probability ``grid_distortion``), jitter of the input cameras after the first (``camera_jitter``),
random background colours (``random_background``).

``model.lora_rank > 0`` (``fast3d train lgm --lora [RANK]``, 32 without a value: MVBoost's rank):
MVBoost's boost — LoRA adapters (peft) on the cross-view self-attention only (``to_q``, ``to_k``,
``to_v``, ``to_out`` of each ``CrossViewAttention``; ``lora_target_modules``), from the base weights
in ``model.init_from``, trained on the pseudo ground truth of ``fast3d datagen boost``
(train/configs/lgm_boost_tiny.yaml); the export merges them, so inference loads a plain LGM.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fast3d.data.dataset import MultiViewDataset
from fast3d.evaluation.image_metrics import load_lpips, psnr
from fast3d.models.checkpoints import dataclass_from_dict, resolve_checkpoint
from fast3d.models.lgm import LGM, LGMConfig, apply_transform_to_viewmats, lora_target_modules, normalize_cameras
from fast3d.training import augment
from fast3d.training.loop import Recipe, StepContext


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict = dataclasses.field(default_factory=dict)  # LGMConfig fields
    init_from: str = ""            # weights to start from: a model, checkpoint or training run directory
    lora_rank: int = 0             # > 0: train LoRA adapters on the cross-view self-attention only (MVBoost: 32)
    lora_alpha: float = 0.0        # 0: equal to the rank

    def lgm_config(self, activation_checkpointing: bool) -> LGMConfig:
        cfg = LGMConfig.preset(self.preset)
        try:
            return dataclasses.replace(cfg, **{k: tuple(v) if isinstance(v, list) else v
                                               for k, v in self.overrides.items()},
                                       activation_checkpointing=activation_checkpointing)
        except TypeError as e:
            raise ValueError(f"model.overrides: {e}") from None


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    views: int = 16                    # views read per sample (the rig's)
    input_views: tuple = (0, 4, 8, 12)  # which of them are the inputs (orthogonal on orbit16)
    random_background: bool = True
    grid_distortion: float = 0.5       # probability per sample
    camera_jitter: float = 0.5         # probability per sample
    jitter_deg: float = 3.0
    jitter_shift: float = 0.02


@dataclass(frozen=True)
class LossSection:
    mse: float = 1.0
    alpha: float = 1.0
    lpips: float = 1.0
    lpips_backbone: str = "imagenet"   # "imagenet" | "random" (offline stand-in) | VGG-16 weights file
    lpips_resolution: int = 256


def render_loss(rgb: Tensor,        # [B, S, 3, R, R] rendered supervision views
                alpha: Tensor,      # [B, S, 1, R, R] their alpha
                gt: Tensor,         # [B, S, 3, R, R] target views over the same backgrounds
                gt_alpha: Tensor,   # [B, S, 1, R, R]
                weights: LossSection, lpips=None) -> tuple[Tensor, dict]:
    """LGM's loss on the rendered supervision views.

    Args:
        rgb, alpha: the renders of the predicted Gaussians.
        gt, gt_alpha: the targets.
        weights: the loss section (``mse``, ``alpha``, ``lpips`` weights; ``lpips_resolution``).
        lpips: the LPIPS network (fast3d.evaluation.image_metrics.load_lpips), or None for no
            LPIPS term; renders above ``weights.lpips_resolution`` are resized down first (LGM's
            256 px).

    Returns:
        (loss, parts): the weighted sum, and its detached terms ``loss_mse``, ``loss_alpha`` and,
        with LPIPS, ``loss_lpips``.
    """
    l_rgb = F.mse_loss(rgb, gt)
    l_alpha = F.mse_loss(alpha, gt_alpha)
    loss = weights.mse * l_rgb + weights.alpha * l_alpha
    parts = {"loss_mse": l_rgb.detach(), "loss_alpha": l_alpha.detach()}
    if lpips is not None:
        p, t = rgb.flatten(0, 1), gt.flatten(0, 1)
        if rgb.shape[-1] > weights.lpips_resolution:
            r = weights.lpips_resolution
            p = F.interpolate(p, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
            t = F.interpolate(t, size=(r, r), mode="bilinear", antialias=True, align_corners=False)
        l_lp = lpips(p, t).mean()
        loss = loss + weights.lpips * l_lp
        parts["loss_lpips"] = l_lp.detach()
    return loss, parts


class LGMRecipe(Recipe):
    name = "lgm"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model_section = dataclass_from_dict(ModelSection, cfg.model, "model")
        self.data_section = dataclass_from_dict(DataSection, cfg.data, "data")
        self.loss_section = dataclass_from_dict(LossSection, cfg.loss, "loss")
        self.lgm = self.model_section.lgm_config(cfg.activation_checkpointing)
        if not self.data_section.train:
            raise ValueError("data.train must name a shard directory")
        n_in = self.lgm.num_input_views
        if len(self.data_section.input_views) != n_in or len(set(self.data_section.input_views)) != n_in or \
                not all(0 <= i < self.data_section.views for i in self.data_section.input_views):
            raise ValueError(f"data.input_views must be {n_in} distinct indices in [0, data.views={self.data_section.views}); "
                             f"got {list(self.data_section.input_views)}")
        if self.lgm.num_sup_views < n_in or self.lgm.num_sup_views > self.data_section.views:
            raise ValueError(f"the model's num_sup_views ({self.lgm.num_sup_views}) must be in "
                             f"[{n_in}, data.views={self.data_section.views}]")
        if self.model_section.lora_rank < 0 or (self.model_section.lora_rank > 0 and not self.model_section.init_from):
            raise ValueError(f"model.lora_rank must be >= 0, and LoRA needs model.init_from (the base weights); "
                             f"got lora_rank={self.model_section.lora_rank}, init_from={self.model_section.init_from!r}")
        # The model directory, found before anything is written (a run directory means its newest
        # weights) and pinned in the run's config, so config.json names the weights it started from
        # and a resume refuses other ones.
        self.init_dir = None
        if self.model_section.init_from:
            self.init_dir = resolve_checkpoint(self.cfg.path(self.model_section.init_from), what="model.init_from")
            self.cfg = self.cfg.replace(model={**self.cfg.model, "init_from": os.path.abspath(self.init_dir)})
        self.lpips = None

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.cfg.seed)
        if self.model_section.init_from:
            model = LGM.from_pretrained(self.init_dir)
            if dataclasses.replace(model.config, activation_checkpointing=False) != \
                    dataclasses.replace(self.lgm, activation_checkpointing=False):
                raise ValueError(f"model.init_from {self.model_section.init_from!r} holds another LGM configuration "
                                 f"({model.config}) than model.preset/overrides ({self.lgm})")
            model.config = self.lgm
        else:
            model = LGM(self.lgm)
        if self.model_section.lora_rank > 0:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=self.model_section.lora_rank, lora_alpha=self.model_section.lora_alpha or self.model_section.lora_rank,
                              target_modules=lora_target_modules(model), lora_dropout=0.0)
            model = get_peft_model(model, lora)
        return model

    def prepare(self, device: torch.device) -> None:
        if self.loss_section.lpips > 0:
            self.lpips = load_lpips(self.loss_section.lpips_backbone, device)

    def dataset(self, rank: int, world: int):
        return MultiViewDataset(self.cfg.path(self.data_section.train), views=self.data_section.views, resolution=self.lgm.render_size,
                                seed=self.cfg.seed, rank=rank, world_size=world)

    def collate(self, samples: list) -> dict:
        keys = ("images", "alphas", "viewmats", "Ks")
        return {**{k: torch.stack([s[k] for s in samples]) for k in keys}, "key": [s["key"] for s in samples]}

    def _views(self, B: int, gen: torch.Generator) -> torch.Tensor:  # -> [B, num_sup_views] indices
        """The inputs, then random other views, per sample."""
        inputs = torch.tensor(self.data_section.input_views, dtype=torch.long)
        rest = torch.tensor([i for i in range(self.data_section.views) if i not in self.data_section.input_views],
                            dtype=torch.long)  # empty where every view is an input (boost shards): still indices
        extra = self.lgm.num_sup_views - len(inputs)
        rows = [torch.cat([inputs, rest[torch.randperm(len(rest), generator=gen)[:extra]]]) for _ in range(B)]
        return torch.stack(rows)

    def loss(self, model, batch: dict, ctx: StepContext):
        cfg, data, dev = self.lgm, self.data_section, ctx.device
        images, alphas = batch["images"], batch["alphas"]       # [B, V, 3, R, R], [B, V, 1, R, R]
        viewmats, Ks = batch["viewmats"].float(), batch["Ks"].float()
        B, R = images.shape[0], cfg.render_size
        idx = self._views(B, ctx.generator)                     # [B, S]
        take = lambda t: torch.stack([t[b, idx[b]] for b in range(B)])  # noqa: E731
        images, alphas, viewmats, Ks = take(images), take(alphas), take(viewmats), take(Ks)
        bg = torch.rand(B, 3, generator=ctx.generator) if data.random_background else torch.ones(B, 3)
        S = images.shape[1]
        gt = augment.recomposite(images, alphas, bg[:, None].expand(B, S, 3))   # [B, S, 3, R, R]

        n_in, s = cfg.num_input_views, cfg.input_size
        x = F.interpolate(gt[:, :n_in].flatten(0, 1), size=(s, s), mode="bilinear", antialias=True,
                          align_corners=False).unflatten(0, (B, n_in))          # [B, n_in, 3, s, s]
        K_in = Ks[:, :n_in].clone()
        K_in[..., :2, :] *= s / R
        vm_in, T = normalize_cameras(viewmats[:, :n_in], cfg.camera_distance)
        distort = torch.rand(B, generator=ctx.generator) < data.grid_distortion
        jitter = torch.rand(B, generator=ctx.generator) < data.camera_jitter
        for b in range(B):
            if distort[b]:
                x[b, 1:] = augment.grid_distortion(x[b, 1:], ctx.generator)
            if jitter[b]:
                vm_in[b, 1:] = augment.camera_jitter(vm_in[b, 1:], ctx.generator, data.jitter_deg, data.jitter_shift)

        g = model(x.to(dev, ctx.dtype), vm_in.to(dev), K_in.to(dev))
        vm_sup = apply_transform_to_viewmats(viewmats, T).to(dev)
        rgb, a = LGM.render(g, vm_sup, Ks.to(dev), R, R, backgrounds=bg[:, None].expand(B, S, 3).to(dev))
        gt, alphas = gt.to(dev), alphas.to(dev)
        loss, parts = render_loss(rgb, a, gt, alphas, self.loss_section, self.lpips)
        m = {"loss_mse": parts["loss_mse"], "loss_alpha": parts["loss_alpha"], "psnr": psnr(rgb.detach(), gt).mean()}
        if "loss_lpips" in parts:
            m["loss_lpips"] = parts["loss_lpips"]
        m["loss"] = loss.detach()
        return loss, m

    def export(self, module: torch.nn.Module, path: str) -> None:
        if self.model_section.lora_rank > 0:  # merged into a copy: inference loads a plain LGM
            module = copy.deepcopy(module).merge_and_unload()
        module.save_pretrained(path)

