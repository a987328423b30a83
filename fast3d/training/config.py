"""Training-run configuration: one YAML file per run (``train/configs/<recipe>_<size>.yaml``).

The file has the run's common settings (the fields of :class:`RunConfig`) and three sections the
recipe reads and validates itself: ``model``, ``data`` and ``loss``. The DeepSpeed JSON it names
(``deepspeed:``, relative to the YAML file) holds the engine settings; its ``"auto"`` values are
filled from this file (:func:`fast3d.training.engine.deepspeed_config`), so batch size, learning
rate and clipping have one source of truth. YAML goes through ``yaml.safe_load``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from fast3d._yaml import load_yaml

PRECISIONS = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class RunConfig:
    recipe: str
    deepspeed: str = "ds_zero2.json"     # DeepSpeed JSON, relative to the YAML file
    precision: str = "bf16"              # bf16 | fp16 | fp32 (fp32 on CPU demos: exact resumes)
    batch_size: int = 8                  # per rank, per micro step
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 4e-4
    weight_decay: float = 0.05
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.0               # 0 disables the EMA copy of the weights
    activation_checkpointing: bool = False
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    data_workers: int = 0
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    loss: dict = field(default_factory=dict)
    source: str = ""                     # the YAML file it came from (for relative paths)

    def __post_init__(self):
        def positive(name, integer=True):
            v = getattr(self, name)
            if (integer and (not isinstance(v, int) or isinstance(v, bool))) or not v > 0:
                raise ValueError(f"{name} must be a positive {'integer' if integer else 'number'}; got {v!r}")

        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "ckpt_every", "keep_checkpoints"):
            positive(name)
        positive("lr", integer=False)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"warmup_steps must be an integer >= 0; got {self.warmup_steps!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1); got {self.ema_decay!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: no clipping); got {self.grad_clip!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1); got {self.betas!r}")
        for name in ("model", "data", "loss"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"{name} must be a mapping; got {type(getattr(self, name)).__name__}")

    def path(self, p: str) -> str:
        """A path from the config, relative to the YAML file's folder."""
        return p if os.path.isabs(p) or not self.source else os.path.join(os.path.dirname(self.source), p)

    def replace(self, **kw) -> RunConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(d["betas"])
        return d


def load_config(path: str, recipe: str | None = None) -> RunConfig:
    """Read and validate a run's YAML; ``recipe``, when given, must match the file's."""
    if not os.path.isfile(path):
        raise ValueError(f"config {path!r} does not exist")
    return run_config_from_dict(load_yaml(path), source=path, recipe=recipe)


def run_config_from_dict(d, source: str = "", recipe: str | None = None) -> RunConfig:
    if not isinstance(d, dict):
        raise ValueError(f"config {source or '<dict>'}: expected a mapping at the top level; got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(RunConfig)} - {"source"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"config {source or '<dict>'}: unknown keys {unknown}; expected some of {sorted(known)}")
    if "recipe" not in d:
        raise ValueError(f"config {source or '<dict>'}: missing 'recipe'")
    if recipe is not None and d["recipe"] != recipe:
        raise ValueError(f"config {source or '<dict>'} is for recipe {d['recipe']!r}, not {recipe!r}")
    d = dict(d)
    if "betas" in d:
        d["betas"] = tuple(d["betas"])
    for k in ("lr", "weight_decay", "grad_clip", "ema_decay"):
        if isinstance(d.get(k), str):  # YAML reads 4e-4 (no dot) as a string
            try:
                d[k] = float(d[k])
            except ValueError:
                raise ValueError(f"config {source}: {k} must be a number; got {d[k]!r}") from None
    return RunConfig(**d, source=source)


def read_deepspeed_json(cfg: RunConfig) -> dict:
    path = cfg.path(cfg.deepspeed)
    if not os.path.isfile(path):
        raise ValueError(f"deepspeed: {path!r} (named by {cfg.source or 'the config'}) does not exist")
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"deepspeed: {path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"deepspeed: {path} must hold a JSON object")
    return d
