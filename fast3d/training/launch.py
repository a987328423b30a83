"""``fast3d train RECIPE``: run a recipe in this process, or start it on N ranks with the DeepSpeed
launcher (``deepspeed --num_gpus N --module fast3d.cli train ...``; on a machine without a GPU the
ranks are CPU processes talking over gloo, ``DS_ACCELERATOR=cpu``). For several nodes, call the
DeepSpeed launcher yourself with a hostfile: ``deepspeed --hostfile H --module fast3d.cli train ...``.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess

import torch

from fast3d.training.config import load_config

RECIPES = {
    "lgm": "fast3d.training.recipes.lgm:LGMRecipe",
    "lrm": "fast3d.training.recipes.lrm:LRMRecipe",
    "mvllm": "fast3d.training.recipes.mvllm:MVLLMRecipe",
    "mvvideo": "fast3d.training.recipes.mvvideo:MVVideoRecipe",
    "ttr": "fast3d.training.recipes.ttr:TTRRecipe",
    "mvdiff": "fast3d.training.recipes.mvdiff:MVDiffRecipe",
    "magicboost": "fast3d.training.recipes.magicboost:MagicBoostRecipe",
}


def recipe_class(name: str):
    """A registered recipe name, or ``package.module:Class`` for one defined elsewhere."""
    spec = RECIPES.get(name, name)
    if ":" not in spec:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)} or 'module:Class'; got {name!r}")
    mod, cls = spec.split(":", 1)
    try:
        return getattr(importlib.import_module(mod), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"recipe {name!r}: cannot import {spec} ({e})") from None


def _under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def run(recipe: str, config: str, output: str, max_steps: int | None = None, resume: bool = False,
        ranks: int | None = None, lora: int | None = None, init_from: str | None = None,
        master_port: int | None = None) -> int:
    cfg = load_config(config)
    cls = recipe_class(recipe)
    if cls.name and cfg.recipe != cls.name:
        raise ValueError(f"config {config} is for recipe {cfg.recipe!r}, not {recipe!r}")
    if max_steps is not None:
        if max_steps <= 0:
            raise ValueError(f"--max-steps must be positive; got {max_steps}")
        cfg = cfg.replace(max_steps=max_steps)
    if lora is not None:
        if cfg.recipe != "lgm" or lora <= 0:
            raise ValueError(f"--lora takes a positive rank and the lgm recipe; got {lora} for {cfg.recipe!r}")
        cfg = cfg.replace(model={**cfg.model, "lora_rank": lora})
    if init_from is not None:
        if cfg.recipe not in ("lgm", "lrm", "mvdiff"):
            raise ValueError(f"--init-from takes the lgm, lrm or mvdiff recipe; got {cfg.recipe!r}")
        # relative to the working directory here (model.init_from in the YAML is relative to the YAML)
        init_from = os.path.abspath(init_from)
        cfg = cfg.replace(model={**cfg.model, "init_from": init_from})
    if ranks is None:
        ranks = torch.cuda.device_count() or 1
    if ranks < 1:
        raise ValueError(f"--ranks must be >= 1; got {ranks}")
    from fast3d.training.engine import free_port, release_cpu_comm_buffers

    if _under_launcher():
        from fast3d.training.loop import train

        train(cls(cfg), output, resume=resume)
        # Leave the process group before the interpreter exits: torn down by static destructors
        # instead, gloo's threads can die joinable (std::terminate, exit code 250 after a finished run).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        return 0
    port = master_port or int(os.environ.get("MASTER_PORT", 0)) or free_port()
    if ranks == 1:
        from fast3d.training.loop import train

        os.environ.setdefault("MASTER_PORT", str(port))
        try:
            train(cls(cfg), output, resume=resume)
        finally:
            release_cpu_comm_buffers(os.environ["MASTER_PORT"])
        return 0
    launcher = shutil.which("deepspeed")
    if launcher is None:
        raise ValueError("--ranks > 1 needs the DeepSpeed launcher (`deepspeed` on PATH; pip install deepspeed)")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [launcher, "--num_gpus", str(ranks), "--master_port", str(port), "--module",
           "--no_local_rank", "fast3d.cli", "train", recipe, "--config", config, "--output", output]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    if resume:
        cmd.append("--resume")
    if lora is not None:
        cmd += ["--lora", str(lora)]
    if init_from is not None:
        cmd += ["--init-from", init_from]
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:  # every rank has exited, cleanly or not
        release_cpu_comm_buffers(port)
