"""The training loop every recipe runs: DeepSpeed steps, per-rank data and RNG streams, EMA,
metrics, checkpoints and exact resume, NaN guard, progress lines.

A recipe (fast3d.training.recipes) supplies the model, the data and the loss; this module owns the
rest. Exact resume: each rank's data position (epoch, batches taken in it) and RNG states (the
global torch RNG and the recipe's generator) are saved with every checkpoint and restored, so a
killed-and-resumed run computes the same losses as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from abc import ABC, abstractmethod
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from fast3d.training import checkpoint
from fast3d.training.config import RunConfig
from fast3d.training.ema import EMA
from fast3d.training.engine import build_engine, device, init_distributed
from fast3d.training.metrics import MetricsWriter


@dataclass
class StepContext:
    """What a recipe's loss needs besides the batch."""
    step: int
    device: torch.device
    dtype: torch.dtype            # the engine's compute dtype: cast float inputs to it
    generator: torch.Generator    # this rank's stream (augmentation, noise, timesteps), resumed exactly
    rank: int
    world_size: int


class Recipe(ABC):
    """Base of the training recipes. Subclasses set ``name`` and implement the abstract methods."""
    name = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The module DeepSpeed trains (frozen parts belong to ``prepare``, outside ZeRO)."""

    def prepare(self, device: torch.device) -> None:  # noqa: B027 -- optional hook, a no-op by default
        """Load frozen parts (encoders, LPIPS) and check the data before the first step."""

    @abstractmethod
    def dataset(self, rank: int, world: int):
        """An iterable dataset of samples for this rank; ``set_epoch`` is called on it if present."""

    def collate(self, samples: list):
        return torch.utils.data.default_collate(samples)

    @abstractmethod
    def loss(self, model, batch, ctx: StepContext) -> tuple[torch.Tensor, dict]:
        """-> (scalar loss, {metric name: float or 0-dim tensor}) for this rank's micro batch."""

    def lr_factor(self, step: int) -> float:
        """Multiplier on the scheduler's learning rate for step ``step`` (1-based), e.g. a training
        stage's warm-up restart."""
        return 1.0

    @abstractmethod
    def export(self, module: torch.nn.Module, path: str) -> None:
        """Write the weights for inference (``save_pretrained``) to ``path`` (rank 0 only)."""

    def batch_keys(self, batch) -> list:
        return list(batch.get("key", [])) if isinstance(batch, dict) else []


def _dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class _Batches:
    """An endless stream of batches with a resumable position: (epoch, batches taken this epoch)."""

    def __init__(self, recipe: Recipe, rank: int, world: int, epoch: int = 0, taken: int = 0):
        self.recipe, self.rank = recipe, rank
        self.data = recipe.dataset(rank, world)
        self.loader = DataLoader(self.data, batch_size=recipe.cfg.batch_size, drop_last=True,
                                 num_workers=recipe.cfg.data_workers, collate_fn=recipe.collate)
        self.epoch, self.taken = epoch, 0
        self._start()
        for _ in range(taken):
            self.next()

    def _start(self):
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self.epoch)
        self.it = iter(self.loader)

    def next(self):
        for _ in range(2):
            try:
                b = next(self.it)
                self.taken += 1
                return b
            except StopIteration:
                if self.taken == 0:
                    break
                self.epoch, self.taken = self.epoch + 1, 0
                self._start()
        raise ValueError(f"data: rank {self.rank} got no full batch of {self.recipe.cfg.batch_size} from its part "
                         f"of the dataset (too few samples or shards for this many ranks and this batch size?)")


def _rng_tensors(gen: torch.Generator) -> dict:
    t = {"rng.torch": torch.get_rng_state(), "rng.generator": gen.get_state()}
    if torch.cuda.is_available():
        t["rng.cuda"] = torch.cuda.get_rng_state()
    return t


def _restore_rng(t: dict, gen: torch.Generator) -> None:
    torch.set_rng_state(t["rng.torch"])
    gen.set_state(t["rng.generator"])
    if torch.cuda.is_available() and "rng.cuda" in t:
        torch.cuda.set_rng_state(t["rng.cuda"])


def _reduce_mean(values: dict[str, float], world: int) -> dict[str, float]:
    """Means over ranks of each metric (a metric a rank lacks counts as absent there, not as 0)."""
    keys = sorted(values)
    objs = [None] * world
    torch.distributed.all_gather_object(objs, {k: values[k] for k in keys})
    out: dict[str, list] = {}
    for o in objs:
        for k, v in o.items():
            out.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in out.items()}


def train(recipe: Recipe, out: str, resume: bool = False, progress: bool = True) -> dict:
    """Run ``recipe`` to ``cfg.max_steps`` writing to ``out``. Returns the last logged metrics."""
    cfg = recipe.cfg
    rank, world = init_distributed()
    dev = device()
    torch.manual_seed(cfg.seed * 7919 + rank)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)

    start, tag, state, meta = 0, None, {}, {}
    if resume and checkpoint.latest_tag(out) is not None:
        tag, state, meta = checkpoint.read_rank_state(out, rank, world)
        saved = meta.get("config", {})
        for k in ("recipe", "model", "data", "loss"):  # what the weights and the data position depend on
            if saved.get(k) != cfg.to_dict()[k]:
                raise ValueError(f"--resume: checkpoint {tag} in {out} was trained with {k}={saved.get(k)!r}; "
                                 f"this config has {k}={cfg.to_dict()[k]!r}")
        start = int(meta["step"])
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=1)

    model = recipe.build_model().to(dev)
    recipe.prepare(dev)
    engine, _ = build_engine(model, cfg, world)
    ema = EMA(engine.module, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if tag is not None:
        checkpoint.load_engine(engine, out, tag, start)
        _restore_rng(state, gen)
        if ema is not None:
            ema.load_state_dict(state)
    batches = _Batches(recipe, rank, world, int(meta.get("epoch", 0)), int(meta.get("taken", 0)))
    metrics = MetricsWriter(out, start if tag is not None else None, enabled=rank == 0)
    dtype = _dtype(cfg.precision)

    def save(step: int) -> None:
        tensors = _rng_tensors(gen) | (ema.state_dict() if ema is not None else {})

        def export(path):
            _export(recipe, engine, ema, path, rank)

        checkpoint.save(engine, out, step, rank, world, tensors,
                        {"epoch": batches.epoch, "taken": batches.taken, "config": cfg.to_dict()},
                        cfg.keep_checkpoints, export)

    if rank == 0 and progress:
        print(f"[fast3d train {recipe.name}] {world} rank(s) on {dev}, steps {start}..{cfg.max_steps}, "
              f"global batch {cfg.batch_size * cfg.grad_accum * world}, output {out}", file=sys.stderr, flush=True)
    last: dict = {}
    acc: dict[str, float] = {}
    n_acc, t_log, t_first = 0, time.perf_counter(), time.perf_counter()
    engine.train()
    step = start
    while step < cfg.max_steps:
        f = recipe.lr_factor(step + 1)
        if f != 1.0:  # on the scheduler's rate for this step, recomputed each time: never compounds
            for g, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_lr()):
                g["lr"] = lr * f
        lr_now = float(engine.optimizer.param_groups[0]["lr"])  # the rate this step applies
        for _ in range(cfg.grad_accum):
            batch = batches.next()
            ctx = StepContext(step, dev, dtype, gen, rank, world)
            loss, m = recipe.loss(engine, batch, ctx)
            ok = torch.tensor([float(torch.isfinite(loss.detach()).all())])
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if ok.item() < 1:
                mine = "" if torch.isfinite(loss.detach()).all() else f"; this rank's batch: {recipe.batch_keys(batch)}"
                raise FloatingPointError(f"non-finite loss at step {step + 1} on some rank{mine}; stopping. The last "
                                         f"checkpoint ({checkpoint.latest_tag(out)}) is intact")
            engine.backward(loss)
            engine.step()
            for k, v in m.items():  # tensors stay on the device until the logging step (no sync per step)
                acc[k] = acc.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            n_acc += 1
        step += 1
        if ema is not None:
            ema.update()
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            dt = time.perf_counter() - t_log
            row = {"step": step, **_reduce_mean({k: float(v) / n_acc for k, v in acc.items()}, world),
                   "lr": lr_now,
                   "samples_per_s": n_acc * cfg.batch_size * world / max(dt, 1e-9),
                   "epoch": batches.epoch}
            metrics.write(row)
            last = row
            if rank == 0 and progress:
                eta = (time.perf_counter() - t_first) / max(step - start, 1) * (cfg.max_steps - step)
                print(f"step {step}/{cfg.max_steps}  loss {row.get('loss', float('nan')):.4f}  "
                      f"{row['samples_per_s']:.1f} samples/s  eta {eta:.0f}s", file=sys.stderr, flush=True)
            acc, n_acc, t_log = {}, 0, time.perf_counter()
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save(step)
    metrics.close()
    return last


def _export(recipe: Recipe, engine, ema: EMA | None, path: str, rank: int) -> None:
    """Inference weights of the checkpoint: ``model/`` and, with an EMA, ``model_ema/``. Under
    ZeRO-3 every rank joins the gather; rank 0 writes."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    zero3 = hasattr(params[0], "ds_id")

    def write(name: str) -> None:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext():
            if rank == 0:
                recipe.export(module, os.path.join(path, name))

    write("model")
    if ema is not None:
        with ema.swapped_in():
            write("model_ema")
