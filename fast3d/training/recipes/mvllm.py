"""MV-LLaVA instruction tuning (Bootstrap3D): ``fast3d train mvllm``.

Bootstrap3D (Sun et al. 2024, /work/shared/seeds/bootstrap3d-summary.txt) builds MV-LLaVA on LLaVA
and instruction-tunes it on 30K multi-view sets annotated by GPT-4V with "descriptions, quality
scores, and reasoning chains"; "the last 8 layers of CLIP-L/14 are unfrozen to enhance multi-view
texture perception and reduce hallucinations". The rest follows LLaVA's instruction tuning: the
projector and the language model train, the vision tower is otherwise frozen. Each record is the
two-turn conversation of :mod:`fast3d.datagen.mvllm` (describe, then grade), and the loss is the
language model's cross-entropy on the two answers only (the prompts and image tokens are masked).

Config sections (YAML), each validated with its unknown keys named:

* ``model``: ``pretrained`` (a local LLaVA directory, relative to the YAML, or "random-tiny"),
  ``vision_layers`` (the vision tower's last N layers that train; Bootstrap3D: 8).
* ``data``: ``train`` (multi-view shards), ``annotations`` (JSONL, one record a line:
  ``{"key", "description", "score" (1..5), "reasoning" (optional)}``; shard samples without a record
  are skipped), ``views`` (views read per sample), ``picks`` (the 4 tiled 2x2; null spreads them),
  ``resolution`` (of each view before tiling), ``prompts`` (the prompts YAML), ``max_length``
  (tokens per conversation; a longer one is an error, not silently cut).

Metrics: ``loss`` (mean over answer tokens), ``answer_tokens``. Export: ``save_pretrained`` of the
model and its processor, a directory the ``mvllm`` pipeline stage loads.

With LLaVA-1.5's ``vision_feature_layer = -2`` the tower's last layer feeds nothing, so of the last N
layers only N - 1 get gradients (and change); the tiny model selects the last layer (-1).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from fast3d.checks import integer, positive_int
from fast3d.data.dataset import MultiViewDataset
from fast3d.datagen import mvllm
from fast3d.models.checkpoints import dataclass_from_dict
from fast3d.training.loop import Recipe, StepContext

IGNORE = -100   # the label of tokens the loss skips (transformers' convention)


@dataclass(frozen=True)
class ModelSection:
    pretrained: str = mvllm.RANDOM_TINY
    vision_layers: int = 8           # Bootstrap3D: the last 8 layers of CLIP-L/14 train


@dataclass(frozen=True)
class DataSection:
    train: str = ""
    annotations: str = ""
    views: int = 16
    picks: tuple | None = None
    resolution: int = 224
    prompts: str = "mvllm_prompts.yaml"
    max_length: int = 2048


def read_annotations(path: str) -> dict[str, dict]:
    """key -> {"description", "score", "reasoning"} from a JSONL file; ValueError naming the line of
    any bad record."""
    if not os.path.isfile(path):
        raise ValueError(f"data.annotations must be a JSONL file; got {path!r}, which is not a file")
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"data.annotations {path}:{n}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(r, dict):
                raise ValueError(f"{where}: expected an object; got {type(r).__name__}")
            unknown = sorted(set(r) - {"key", "description", "score", "reasoning"})
            if unknown:
                raise ValueError(f"{where}: unknown fields {unknown}")
            key, desc, score, reason = r.get("key"), r.get("description"), r.get("score"), r.get("reasoning", "")
            if not isinstance(key, str) or not key:
                raise ValueError(f"{where}: key must be a non-empty string; got {key!r}")
            if not isinstance(desc, str) or not desc.strip():
                raise ValueError(f"{where}: description must be a non-empty string; got {desc!r}")
            if isinstance(score, bool) or not isinstance(score, int) or not mvllm.SCORE_MIN <= score <= mvllm.SCORE_MAX:
                raise ValueError(f"{where}: score must be an int in [{mvllm.SCORE_MIN}, {mvllm.SCORE_MAX}]; got {score!r}")
            if not isinstance(reason, str):
                raise ValueError(f"{where}: reasoning must be a string; got {reason!r}")
            if key in out:
                raise ValueError(f"{where}: key {key!r} appears twice")
            out[key] = {"description": desc.strip(), "score": score, "reasoning": reason.strip()}
    if not out:
        raise ValueError(f"data.annotations {path!r} holds no records")
    return out


def vision_layers(model) -> torch.nn.ModuleList:
    """The encoder layers of a LLaVA's vision tower (CLIP / SigLIP layouts)."""
    tower = model.model.vision_tower
    tower = getattr(tower, "vision_model", tower)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"the vision tower ({type(tower).__name__}) has no encoder.layers")
    return layers


def set_trainable(model, n_vision: int) -> list[str]:
    """Bootstrap3D's split: the projector, the language model (and its head) and the vision tower's
    last ``n_vision`` layers train; everything else is frozen. Returns the trainable names."""
    layers = vision_layers(model)
    if not 0 <= n_vision <= len(layers):
        raise ValueError(f"model.vision_layers must be in [0, {len(layers)}] (the tower's layers); got {n_vision}")
    model.requires_grad_(False)
    for m in (model.model.multi_modal_projector, model.model.language_model, model.lm_head,
              *list(layers)[len(layers) - n_vision:]):
        m.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


class AnnotatedViews(IterableDataset):
    """The shard samples that have an annotation: {"grid" [3, 2R, 2R], "key", "description",
    "score", "reasoning"}."""

    def __init__(self, shards: MultiViewDataset, records: dict, picks: tuple):
        self.shards, self.records, self.picks = shards, records, picks

    def set_epoch(self, epoch: int) -> None:
        self.shards.set_epoch(epoch)

    def __iter__(self):
        for s in self.shards:
            r = self.records.get(s["key"])
            if r is not None:
                grid = mvllm.tile_views(s["images"][None], self.picks)[0]
                yield {"grid": grid, "key": s["key"], **r}


class MVLLMRecipe(Recipe):
    """``fast3d train mvllm``: MV-LLaVA instruction tuning (module docstring)."""
    name = "mvllm"

    def __init__(self, cfg):
        super().__init__(cfg)
        m = dataclass_from_dict(ModelSection, cfg.model, "model")
        d = dataclass_from_dict(DataSection, cfg.data, "data")
        if m.pretrained != mvllm.RANDOM_TINY:
            m = ModelSection(pretrained=cfg.path(m.pretrained), vision_layers=m.vision_layers)
        mvllm.check_source("model.pretrained", m.pretrained)
        integer("model.vision_layers", m.vision_layers, 0)
        for key, v in (("data.views", d.views), ("data.resolution", d.resolution), ("data.max_length", d.max_length)):
            positive_int(key, v)
        if not d.train:
            raise ValueError("data.train must name a directory of multi-view shards")
        self.picks = mvllm.spread_picks(d.views) if d.picks is None else tuple(d.picks)
        if len(self.picks) != 4 or not all(isinstance(i, int) and 0 <= i < d.views for i in self.picks):
            raise ValueError(f"data.picks must be null or 4 view indices in [0, data.views={d.views}); "
                             f"got {d.picks!r}")
        self.prompts = mvllm.load_prompts(cfg.path(d.prompts))
        self.records = read_annotations(cfg.path(d.annotations)) if d.annotations else None
        if self.records is None:
            raise ValueError("data.annotations must name the JSONL file of (key, description, score) records")
        self.model_section, self.data_section = m, d
        self.processor = None
        self.trainable: list[str] = []

    def build_model(self) -> torch.nn.Module:
        model, self.processor = mvllm.load_llava(self.model_section.pretrained, key="model.pretrained")
        self.trainable = set_trainable(model, self.model_section.vision_layers)
        if self.cfg.activation_checkpointing:
            model.gradient_checkpointing_enable()
        return model.train()

    def dataset(self, rank: int, world: int):
        d = self.data_section
        shards = MultiViewDataset(self.cfg.path(d.train), views=d.views, resolution=d.resolution, seed=self.cfg.seed,
                                  rank=rank, world_size=world)
        return AnnotatedViews(shards, self.records, self.picks)

    def _encode(self, grid_pil, record: dict) -> tuple[Tensor, Tensor, Tensor]:
        """(input_ids [L], labels [L], pixel_values [3, S, S]) of one record's conversation."""
        segs = self.prompts.training_segments(record["description"], record["score"], record["reasoning"])
        first = self.processor(text=[segs[0][0]], images=[grid_pil], return_tensors="pt")
        ids, labels = [first["input_ids"][0]], [torch.full_like(first["input_ids"][0], IGNORE)]
        for text, answer in segs[1:]:
            t = torch.tensor(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            ids.append(t)
            labels.append(t.clone() if answer else torch.full_like(t, IGNORE))
        ids, labels = torch.cat(ids), torch.cat(labels)
        if len(ids) > self.data_section.max_length:
            raise ValueError(f"sample {record.get('key', '?')}: its conversation is {len(ids)} tokens, over "
                             f"data.max_length={self.data_section.max_length}")
        return ids, labels, first["pixel_values"][0]

    def collate(self, samples: list) -> dict:
        if self.processor is None:
            raise ValueError("MVLLMRecipe.collate: call build_model() first (it loads the processor)")
        enc = [self._encode(img, s) for img, s in zip(mvllm.to_pil(torch.stack([s["grid"] for s in samples])),
                                                       samples)]
        L = max(len(e[0]) for e in enc)
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(enc), L), pad, dtype=torch.long)
        labels = torch.full((len(enc), L), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(enc), L), dtype=torch.long)
        for i, (ids, lab, _) in enumerate(enc):      # right padding (training has no generation)
            input_ids[i, :len(ids)], labels[i, :len(ids)], mask[i, :len(ids)] = ids, lab, 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "pixel_values": torch.stack([e[2] for e in enc]), "key": [s["key"] for s in samples]}

    def loss(self, model, batch: dict, ctx: StepContext) -> tuple[Tensor, dict]:
        dev = ctx.device
        out = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                    pixel_values=batch["pixel_values"].to(dev, ctx.dtype), labels=batch["labels"].to(dev))
        loss = out.loss.float()
        return loss, {"loss": loss.detach(), "answer_tokens": float((batch["labels"] != IGNORE).sum())}

    def export(self, module: torch.nn.Module, path: str) -> None:
        module.save_pretrained(path)
        self.processor.save_pretrained(path)
