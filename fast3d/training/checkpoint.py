"""Checkpoints of a training run, laid out under ``OUT/checkpoints/``:

    latest                      the tag of the newest complete checkpoint (written last, atomically)
    step00000100/               DeepSpeed's files (model, optimizer and scheduler states, per rank)
        rank00000.safetensors   fast3d's state of each rank: RNG states, data position, EMA part
        model/                  the weights alone, for inference (config.yaml + model.safetensors)
        model_ema/              the EMA weights, when the run keeps an EMA

A kill at any moment leaves ``latest`` naming a complete checkpoint, so a resumed run loses at
most the steps since it. Nothing here is unpickled: fast3d's files are safetensors, DeepSpeed's are
read with ``weights_only=True`` (fast3d.training.engine). The layout itself (and how a reader finds
the newest model in it) is fast3d.models.checkpoints'.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import Tensor

from fast3d.io.atomic import atomic_open, atomic_path
from fast3d.models.checkpoints import LATEST, checkpoint_root, latest_tag, tag_of


def _rank_file(out: str, tag: str, rank: int) -> str:
    return os.path.join(checkpoint_root(out), tag, f"rank{rank:05d}.safetensors")


def save(engine, out: str, step: int, rank: int, world: int, tensors: dict[str, Tensor], meta: dict,
         keep: int, export=None) -> str:
    """Save step ``step`` (every rank calls this). ``tensors``/``meta``: this rank's own state;
    ``export(path_kind)``, if given, is called on every rank to write the inference weights (it
    gathers under ZeRO-3; rank 0 writes). Returns the tag."""
    from safetensors.torch import save_file

    root, tag = checkpoint_root(out), tag_of(step)
    os.makedirs(os.path.join(root, tag), exist_ok=True)
    f = _rank_file(out, tag, rank)
    meta = dict(meta, step=step, world_size=world)
    with atomic_path(f) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"fast3d": json.dumps(meta)})
    engine.save_checkpoint(root, tag=tag, client_state={"fast3d_step": step}, save_latest=False)
    if export is not None:
        export(os.path.join(root, tag))
    torch.distributed.barrier()
    if rank == 0:
        with atomic_open(os.path.join(root, LATEST)) as fh:
            fh.write(tag)
        tags = sorted(t for t in os.listdir(root) if t.startswith("step") and os.path.isdir(os.path.join(root, t)))
        for old in tags[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    torch.distributed.barrier()
    return tag


def read_rank_state(out: str, rank: int, world: int) -> tuple[str, dict[str, Tensor], dict]:
    """This rank's part of the newest checkpoint: (tag, tensors, meta). Read before the engine
    loads anything, so a mismatched run fails before any work."""
    from safetensors import SafetensorError, safe_open

    tag = latest_tag(out)
    if tag is None:
        raise ValueError(f"--resume: {checkpoint_root(out)} holds no checkpoint")
    f = _rank_file(out, tag, rank)
    if not os.path.isfile(f):
        raise ValueError(f"--resume: {f} is missing (was the run saved with fewer ranks?)")
    try:
        with safe_open(f, "pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("fast3d", "{}"))
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--resume: {f} is not a readable safetensors file ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"--resume: {f} lacks fast3d's metadata")
    if meta.get("world_size") != world:
        raise ValueError(f"--resume: checkpoint {tag} was written by {meta.get('world_size')} ranks; "
                         f"this run has {world} (resume with the same number)")
    return tag, tensors, meta


def load_engine(engine, out: str, tag: str, step: int) -> None:
    """Restore DeepSpeed's part (weights, optimizer, scheduler) of checkpoint ``tag``."""
    path, client = engine.load_checkpoint(checkpoint_root(out), tag=tag)
    if path is None:
        raise ValueError(f"--resume: DeepSpeed could not load {os.path.join(checkpoint_root(out), tag)}")
    if (client or {}).get("fast3d_step") != step:
        raise ValueError(f"--resume: checkpoint {tag} is inconsistent (DeepSpeed's step "
                         f"{(client or {}).get('fast3d_step')} vs fast3d's {step})")
