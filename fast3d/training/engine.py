"""DeepSpeed engine set-up shared by the recipes: distributed init (gloo on the CPU, NCCL on GPUs),
the DeepSpeed config with its ``"auto"`` values filled from the run config, and a checkpoint engine
that never unpickles code.
"""

from __future__ import annotations

import copy
import glob
import os

import torch

from fast3d.training.config import RunConfig, read_deepspeed_json


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed() -> tuple[int, int]:
    """Join (or, run without a launcher, form) the process group. Returns (rank, world size)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    else:  # ranks share the cores; oversubscribing them makes every rank slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world)))))
    return rank, world


# DeepSpeed's CPU all-reduce (its shm_comm op) maps one shared-memory segment per rank,
# /dev/shm/deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{rank} (~64 MiB each), and
# never unlinks it: every CPU run, and every killed one, would leave them behind until /dev/shm fills.
_SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_{uid}_*_{port}_*"


def release_cpu_comm_buffers(port: int | str) -> int:
    """Unlink the DeepSpeed CPU all-reduce segments of the run on master port `port` (call once
    every rank has exited). Returns how many were removed."""
    removed = 0
    for path in glob.glob(_SHM_BUFFERS.format(uid=os.getuid(), port=int(port))):
        try:
            os.unlink(path)
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it): the rendezvous port of a launch.

    Returns:
        The port number.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed JSON the config names, with ``"auto"`` (and missing) values filled in: batch
    sizes, precision, clipping, AdamW, and a linear warm-up to a constant learning rate."""
    ds = copy.deepcopy(read_deepspeed_json(cfg))

    def fill(d: dict, key: str, value):
        if d.get(key, "auto") == "auto":
            d[key] = value

    fill(ds, "train_micro_batch_size_per_gpu", cfg.batch_size)
    fill(ds, "gradient_accumulation_steps", cfg.grad_accum)
    fill(ds, "train_batch_size", cfg.batch_size * cfg.grad_accum * world_size)
    fill(ds, "gradient_clipping", cfg.grad_clip)
    for name in ("bf16", "fp16"):
        ds.setdefault(name, {})
        fill(ds[name], "enabled", cfg.precision == name)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    fill(params, "lr", cfg.lr)
    fill(params, "weight_decay", cfg.weight_decay)
    fill(params, "betas", list(cfg.betas))
    sched = ds.setdefault("scheduler", {"type": "WarmupLR", "params": {}})
    sp = sched.setdefault("params", {})
    fill(sp, "warmup_min_lr", cfg.lr / max(1, cfg.warmup_steps))  # step 1 learns too (0 would waste it)
    fill(sp, "warmup_max_lr", cfg.lr)
    fill(sp, "warmup_num_steps", max(1, cfg.warmup_steps))
    fill(sp, "warmup_type", "linear")
    if sched["type"] == "WarmupDecayLR":
        fill(sp, "total_num_steps", cfg.max_steps)
    ds.setdefault("steps_per_print", 10 ** 9)  # progress is ours; DeepSpeed's is noise
    if not torch.cuda.is_available() and ds.get("zero_optimization", {}).get("offload_optimizer"):
        raise ValueError("deepspeed: offload_optimizer needs a GPU run")
    bad = [k for k, v in _walk(ds) if v == "auto"]
    if bad:
        raise ValueError(f"deepspeed: fast3d cannot fill these 'auto' values: {bad}")
    if ds["train_batch_size"] != ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size:
        raise ValueError(f"deepspeed: train_batch_size {ds['train_batch_size']} != micro batch "
                         f"{ds['train_micro_batch_size_per_gpu']} x accumulation "
                         f"{ds['gradient_accumulation_steps']} x {world_size} ranks")
    return ds


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def build_engine(model: torch.nn.Module, cfg: RunConfig, world_size: int):
    """``deepspeed.initialize`` on the trainable ``model`` (frozen encoders stay outside it, so ZeRO-3
    never partitions them). Returns (engine, ds_config)."""
    import deepspeed

    ds = deepspeed_config(cfg, world_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    engine.checkpoint_engine = _safe_checkpoint_engine()
    return engine, ds


# The only non-tensor classes DeepSpeed's checkpoints hold (plain records and enums).
_DEEPSPEED_SAFE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                           "deepspeed.runtime.zero.config.ZeroStageEnum",
                           "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def _safe_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, loading with ``weights_only=True`` and an allow-list
    instead of a full unpickle."""
    import importlib

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allowed = []
    for qual in _DEEPSPEED_SAFE_GLOBALS:
        mod, name = qual.rsplit(".", 1)
        allowed.append(getattr(importlib.import_module(mod), name))

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 (any unpickling failure is the same bad file)
                raise ValueError(f"checkpoint file {path} is not a plain DeepSpeed checkpoint: {e}") from None

    return WeightsOnlyCheckpointEngine(None)
