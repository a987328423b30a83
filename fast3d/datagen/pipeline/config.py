"""The configuration of `fast3d datagen pipeline` (a YAML file read with ``yaml.safe_load``, unknown
keys named) and what it fixes per sample: item i's prompt and seeds are a pure function of
(``seed``, i), whatever the split of the work.

Sections: ``prompts`` (``llm``: written by a local causal LM first, see
:mod:`fast3d.datagen.prompts_llm`; or a ``file``, one prompt a line; or ``templates`` with
``{slot}``s filled from ``vocab`` lists, ``count`` of them), ``t2i``, ``mv``, ``matting``, ``elevation``, ``filter``,
``recaption``, ``shards``; and ``seed``, ``device`` (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).
The sections ``mv``, ``matting``, ``filter`` and ``recaption`` name their stage's ``kind`` (see
:data:`fast3d.datagen.pipeline.stages.STAGE_KINDS`) and hold a plug-in's own settings in ``options``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import string
from dataclasses import dataclass, field

import torch

from fast3d._yaml import load_yaml
from fast3d.cameras import DEFAULT_DISTANCE, DEFAULT_FOV_Y_DEG
from fast3d.models.checkpoints import dataclass_from_dict

RANDOM_TINY = "random-tiny"


@dataclass(frozen=True)
class PromptsConfig:
    llm: dict | None = None           # PromptLMConfig fields + `out` (the prompts file it writes): prompts from a local LM
    file: str | None = None           # UTF-8 text, one prompt a line (blank lines skipped)
    templates: tuple = ()             # e.g. ("a {color} {object}",), used when file is null
    vocab: dict = field(default_factory=dict)  # slot -> list of words
    count: int | None = None          # number of items: required with templates; a file's first `count` lines


@dataclass(frozen=True)
class TextToImageConfig:
    model: str = RANDOM_TINY          # local PixArt-alpha pipeline directory, or "random-tiny"
    steps: int = 20
    guidance: float = 4.5
    resolution: int = 512
    batch_size: int = 4               # prompts per pipeline call (changes results in the last bits: recorded)


@dataclass(frozen=True)
class MultiViewConfig:
    kind: str = "svd"                 # a STAGE_KINDS["mv"] name
    options: dict = field(default_factory=dict)  # the kind's own settings (svd: none)
    model: str = RANDOM_TINY          # local SVD-format pipeline (SV3D_u, a `train mvvideo` export), random-tiny(-pixel)
    views: int = 21                   # frames of the orbit (SV3D: 21, VFusion3D: 16)
    resolution: int = 576
    steps: int = 25
    min_guidance: float = 1.0
    max_guidance: float = 2.5
    elevation_deg: float = 0.0        # the orbit's elevation when elevation.estimator is null (uniform azimuths from 0)
    distance: float = DEFAULT_DISTANCE
    fov_deg: float = DEFAULT_FOV_Y_DEG


@dataclass(frozen=True)
class MattingConfig:
    kind: str = "segmentation"        # a STAGE_KINDS["matting"] name
    options: dict = field(default_factory=dict)  # the kind's own settings (segmentation: none)
    model: str | None = None          # local semantic-segmentation / saliency model, "random-tiny", or null (alpha 1)
    resolution: int = 320             # frames are resized to this for the model (U2-Net's input size)
    background_label: int = 0         # the background class of a multi-class model


@dataclass(frozen=True)
class ElevationConfig:
    estimator: str | None = None      # a `datagen train-filter` directory with its elevation MLP; null: mv.elevation_deg


@dataclass(frozen=True)
class FilterConfig:
    kind: str = "svm"                 # a STAGE_KINDS["filter"] name
    options: dict = field(default_factory=dict)  # the kind's own settings (svm: none)
    dir: str | None = None            # a `fast3d datagen train-filter` directory; null keeps all, quality 1.0
    threshold: float | None = None    # replaces the filter's saved threshold when given


@dataclass(frozen=True)
class RecaptionConfig:
    kind: str = "blip"                # a STAGE_KINDS["recaption"] name
    options: dict = field(default_factory=dict)  # the kind's own settings (blip: none)
    model: str | None = None          # local BLIP directory, "random-tiny", or null (caption = prompt)
    max_tokens: int = 30


@dataclass(frozen=True)
class ShardsConfig:
    samples_per_shard: int = 16       # items per shard (fewer when the filter rejects some)


@dataclass(frozen=True)
class PipelineConfig:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    t2i: TextToImageConfig = field(default_factory=TextToImageConfig)
    mv: MultiViewConfig = field(default_factory=MultiViewConfig)
    matting: MattingConfig = field(default_factory=MattingConfig)
    elevation: ElevationConfig = field(default_factory=ElevationConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    recaption: RecaptionConfig = field(default_factory=RecaptionConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, d) -> PipelineConfig:
        if not isinstance(d, dict):
            raise ValueError(f"pipeline config must be a mapping; got {type(d).__name__}")
        sections = {f.name: f.default_factory for f in dataclasses.fields(cls) if f.default_factory
                    is not dataclasses.MISSING}
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"pipeline config: unknown keys {unknown}; expected some of "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}")
        kwargs = {k: v for k, v in d.items() if k not in sections}
        for name, section in sections.items():
            value = {} if d.get(name) is None else d[name]
            kwargs[name] = dataclass_from_dict(section, value, what=f"pipeline config {name!r}")
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    @property
    def num_items(self) -> int:
        if self.prompts.llm is not None:
            return llm_config(self.prompts)[0].count
        return len(_file_prompts(self.prompts)) if self.prompts.file is not None else self.prompts.count

    @property
    def num_shards(self) -> int:
        return -(-self.num_items // self.shards.samples_per_shard)

    def validate(self) -> None:
        """Check every value and that every named file and model directory exists (before any work)."""
        _int("seed", self.seed, 0)
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                     or (self.device.startswith("cuda:")
                                                         and self.device[5:].isdigit())):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {self.device!r}")
        _check_prompts(self.prompts)
        t, m = self.t2i, self.mv
        for key, value in (("t2i.steps", t.steps), ("t2i.resolution", t.resolution), ("t2i.batch_size", t.batch_size),
                           ("mv.views", m.views), ("mv.resolution", m.resolution), ("mv.steps", m.steps),
                           ("recaption.max_tokens", self.recaption.max_tokens),
                           ("matting.resolution", self.matting.resolution),
                           ("shards.samples_per_shard", self.shards.samples_per_shard)):
            _int(key, value, 1)
        if t.resolution % 32:  # whole patches of PixArt's latent
            raise ValueError(f"t2i.resolution must be a multiple of 32; got {t.resolution}")
        if m.resolution % 8:
            raise ValueError(f"mv.resolution must be a multiple of 8; got {m.resolution}")
        for key, value, lo in (("t2i.guidance", t.guidance, 0.0), ("mv.min_guidance", m.min_guidance, 0.0),
                               ("mv.max_guidance", m.max_guidance, m.min_guidance), ("mv.distance", m.distance, 1e-6)):
            if _number(key, value) < lo:
                raise ValueError(f"{key} must be >= {lo}; got {value!r}")
        if not -90 < _number("mv.elevation_deg", m.elevation_deg) < 90:
            raise ValueError(f"mv.elevation_deg must be in (-90, 90); got {m.elevation_deg!r}")
        if not 0 < _number("mv.fov_deg", m.fov_deg) < 180:
            raise ValueError(f"mv.fov_deg must be in (0, 180); got {m.fov_deg!r}")
        _int("matting.background_label", self.matting.background_label, 0)
        if self.filter.threshold is not None:
            _number("filter.threshold", self.filter.threshold)
        from fast3d.datagen.pipeline.stages import check_model_source, load_elevation, stage_class

        check_model_source("t2i.model", t.model)
        for section in ("mv", "matting", "filter", "recaption"):
            sec = getattr(self, section)
            if not isinstance(sec.options, dict):
                raise ValueError(f"{section}.options must be a mapping; got {type(sec.options).__name__}")
            check = getattr(stage_class(section, sec.kind), "check_config", None)
            if check is not None:
                check(self)
        if self.elevation.estimator is not None:
            load_elevation(self.elevation.estimator)


def load_config(path: str) -> PipelineConfig:
    """A validated PipelineConfig from a YAML file."""
    if not os.path.isfile(path):
        raise ValueError(f"config must be a YAML file; got {path!r}, which is not a file")
    return PipelineConfig.from_dict(load_yaml(path))


def item_generator(cfg: PipelineConfig, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)


def item(cfg: PipelineConfig, index: int) -> tuple[str, int, int]:
    """(prompt, text-to-image seed, multi-view seed) of item `index`: a pure function of (seed, index)."""
    g = item_generator(cfg, index)
    t2i_seed, mv_seed = torch.randint(2**62, (2,), generator=g).tolist()
    p = cfg.prompts
    if p.llm is not None:
        lm, out = llm_config(p)
        with open(out, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
        if len(lines) < lm.count:
            raise ValueError(f"prompts.llm.out {out!r} holds {len(lines)} prompts, fewer than count={lm.count}: run "
                             f"the pipeline (it writes them first) or `fast3d datagen prompts`")
        return lines[index], t2i_seed, mv_seed
    if p.file is not None:
        return _file_prompts(p)[index], t2i_seed, mv_seed
    template = p.templates[int(torch.randint(len(p.templates), (), generator=g))]
    words = {}
    for slot in _slots(template):
        if slot not in words:
            words[slot] = p.vocab[slot][int(torch.randint(len(p.vocab[slot]), (), generator=g))]
    return template.format(**words), t2i_seed, mv_seed


def _file_prompts(p: PromptsConfig) -> list[str]:
    with open(p.file, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines if p.count is None else lines[: p.count]


def _slots(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ValueError(f"prompts.templates: {template!r} is not a valid template ({e})") from None


def llm_config(p: PromptsConfig):
    """(PromptLMConfig, prompts file) of ``prompts.llm``; ValueError naming the key when malformed."""
    from fast3d.datagen.prompts_llm import PromptLMConfig

    if not isinstance(p.llm, dict):
        raise ValueError(f"prompts.llm must be a mapping of PromptLMConfig fields and out; got {p.llm!r}")
    fields = {k: v for k, v in p.llm.items() if k != "out"}
    out = p.llm.get("out")
    if not isinstance(out, str) or not out:
        raise ValueError(f"prompts.llm.out must name the prompts file to write; got {out!r}")
    return dataclass_from_dict(PromptLMConfig, fields, what="pipeline config 'prompts.llm'"), out


def _check_prompts(p: PromptsConfig) -> None:
    if p.llm is not None:
        if p.file is not None or p.templates or p.vocab or p.count is not None:
            raise ValueError("prompts: give one of llm, file, or templates + vocab + count")
        lm, _ = llm_config(p)
        try:
            lm.validate()
        except ValueError as e:
            raise ValueError(f"prompts.llm.{e}") from None
        return
    if p.count is not None:
        _int("prompts.count", p.count, 1)
    if p.file is not None:
        if p.templates or p.vocab:
            raise ValueError("prompts: give either file or templates + vocab, not both")
        if not isinstance(p.file, str) or not os.path.isfile(p.file):
            raise ValueError(f"prompts.file must be a text file; got {p.file!r}, which is not a file")
        try:
            n = len(_file_prompts(dataclasses.replace(p, count=None)))
        except UnicodeDecodeError as e:
            raise ValueError(f"prompts.file {p.file!r}: not UTF-8 ({e})") from None
        if n == 0 or (p.count is not None and p.count > n):
            raise ValueError(f"prompts.file {p.file!r} has {n} prompts; expected at least {p.count or 1}")
        return
    if not p.templates or not all(isinstance(t, str) and t.strip() for t in p.templates):
        raise ValueError(f"prompts.templates must be a non-empty list of strings (or give prompts.file); "
                         f"got {p.templates!r}")
    if p.count is None:
        raise ValueError("prompts.count is required with prompts.templates; got null")
    if not isinstance(p.vocab, dict):
        raise ValueError(f"prompts.vocab must be a mapping slot -> list of words; got {type(p.vocab).__name__}")
    for slot, words in p.vocab.items():
        if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w for w in words):
            raise ValueError(f"prompts.vocab[{slot!r}] must be a non-empty list of strings; got {words!r}")
    used = set()
    for t in p.templates:
        for slot in _slots(t):
            if not slot.isidentifier():
                raise ValueError(f"prompts.templates: slot {{{slot}}} in {t!r} must be a plain name")
            if slot not in p.vocab:
                raise ValueError(f"prompts.templates: slot {{{slot}}} in {t!r} has no prompts.vocab list; "
                                 f"vocab has {sorted(p.vocab)}")
            used.add(slot)
    if set(p.vocab) - used:
        raise ValueError(f"prompts.vocab: lists {sorted(set(p.vocab) - used)} fill no slot of the templates")


def _int(key: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{key} must be an int >= {lo}; got {value!r}")


def _number(key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number; got {value!r}")
    return float(value)
