"""Model directories and where training runs keep them; the one place that knows both layouts.

A model directory holds ``config.yaml`` (its dataclass config and model type) and
``model.safetensors`` (its weights). A training run keeps its checkpoints under
``OUT/checkpoints/``: ``latest`` names the newest complete one, ``stepNNNNNNNN/`` holds it, with the
inference weights in ``model/`` (and ``model_ema/`` when the run keeps an EMA). Training writes that
layout (fast3d.training.checkpoint); inference and ``--init-from`` read it through
:func:`resolve_checkpoint`. Loading never unpickles: configs go through ``yaml.safe_load``, weights
through safetensors."""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import yaml

from fast3d._yaml import load_yaml
from fast3d.io.atomic import atomic_open, atomic_path

CONFIG_FILE, WEIGHTS_FILE = "config.yaml", "model.safetensors"
LATEST = "latest"


def checkpoint_root(out: str) -> str:
    """The checkpoints folder of training run ``out``."""
    return os.path.join(out, "checkpoints")


def tag_of(step: int) -> str:
    """The checkpoint directory name of step ``step``."""
    return f"step{step:08d}"


def latest_tag(out: str) -> str | None:
    """The tag ``OUT/checkpoints/latest`` names, or None when the run has no checkpoint yet."""
    f = os.path.join(checkpoint_root(out), LATEST)
    if not os.path.isfile(f):
        return None
    tag = open(f).read().strip()
    if not tag.startswith("step") or not os.path.isdir(os.path.join(checkpoint_root(out), tag)):
        raise ValueError(f"{f} names {tag!r}, which is not a checkpoint directory beside it")
    return tag


def resolve_checkpoint(path: str, prefer_ema: bool = True, what: str = "--checkpoint") -> str:
    """Find the model directory a user means.

    Args:
        path: a model directory (``config.yaml`` + ``model.safetensors``), a checkpoint directory
            (``.../checkpoints/stepN``) or a training run's output directory (its newest checkpoint).
        prefer_ema: take the EMA weights when the checkpoint kept them.
        what: the argument's name in error messages.

    Returns:
        The model directory.
    """
    if not os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        return path
    if os.path.isfile(os.path.join(checkpoint_root(path), LATEST)):
        path = os.path.join(checkpoint_root(path), latest_tag(path))
    for name in (("model_ema", "model") if prefer_ema else ("model",)):
        if os.path.isfile(os.path.join(path, name, CONFIG_FILE)):
            return os.path.join(path, name)
    raise ValueError(f"{what} {path!r} holds no model: expected config.yaml + model.safetensors, a "
                     f"checkpoint directory with model/, or a training run with checkpoints/latest")


def model_type(model_dir: str) -> str:
    """The ``model_type`` a model directory's ``config.yaml`` names."""
    with open(os.path.join(model_dir, CONFIG_FILE)) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict) or not isinstance(d.get("model_type"), str):
        raise ValueError(f"{model_dir}/{CONFIG_FILE} names no model_type")
    return d["model_type"]


def dataclass_from_dict(cls, d, what: str = "config"):
    """Build dataclass ``cls`` from a dict, naming unknown keys (the dataclass checks values)."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a mapping; got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{what}: unknown keys {unknown}; expected some of {sorted(fields)}")
    # YAML has no tuples: sequences come back as lists, and configs hold tuples
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def save_pretrained(path: str, model_type: str, config, state_dict: dict) -> None:
    """Write ``path/config.yaml`` and ``path/model.safetensors`` (atomically, each)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = {"model_type": model_type, "config": _plain(dataclasses.asdict(config))}
    with atomic_open(os.path.join(path, CONFIG_FILE)) as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(os.path.join(path, WEIGHTS_FILE)) as tmp:
        save_file(tensors, tmp)


def read_config(path: str, model_type: str, cls):
    """The dataclass config saved in ``path``; ValueError if it is missing or of another model."""
    f = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(f):
        raise ValueError(f"checkpoint {path!r} has no {CONFIG_FILE}; expected a directory written by save_pretrained")
    d = load_yaml(f)
    if not isinstance(d, dict) or "model_type" not in d or "config" not in d:
        raise ValueError(f"{f}: expected keys 'model_type' and 'config'")
    if d["model_type"] != model_type:
        raise ValueError(f"checkpoint {path!r} holds a {d['model_type']!r} model, not {model_type!r}")
    return dataclass_from_dict(cls, d["config"], what=f"{f} config")


def read_weights(path: str, prefix: str | None = None) -> dict:
    """The tensors of model directory ``path`` (its safetensors file); with ``prefix``, only those
    whose names start with it (read alone, the prefix taken off). ValueError if the file is missing
    or unreadable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    f = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(f):
        raise ValueError(f"checkpoint {path!r} has no {WEIGHTS_FILE}")
    try:
        if prefix is None:
            return load_file(f)
        with safe_open(f, framework="pt") as fh:
            return {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{f}: not a readable safetensors file ({e})") from None


def load_state(module: torch.nn.Module, state: dict, path: str) -> None:
    """Load ``state`` strictly, turning missing/unexpected/mis-shaped keys into one clear error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path!r} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict(state)


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


@contextlib.contextmanager
def seeded(seed: int):
    """Draw module initialisations from ``seed`` without touching the global CPU generator."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def local_model_dir(source: str, field: str, subfolder: str) -> str:
    """The directory holding a model: ``source/subfolder`` when a pipeline directory has it, else
    ``source``; ``field`` names the config key in the error when ``source`` is not a directory."""
    if not os.path.isdir(source):
        raise ValueError(f"{field} must be a local directory or a random source; got {source!r}, which is not a "
                         f"directory (weights are never downloaded)")
    sub = os.path.join(source, subfolder)
    return sub if os.path.isdir(sub) else source

