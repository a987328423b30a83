"""``fast3d boost demo``: MVBoost end to end at tiny size on this machine, measured in one run.

Stages (each resumable: a rerun skips the finished ones, and training resumes from its newest
checkpoint):

1. ``data``: procedural objects (:mod:`fast3d.datagen.procedural`, orbit16 rig): a training set
   for the multi-view diffusion model and the base LGM, other objects whose first view (RGBA, with
   the object's caption beside it) is an input image of the boost, and held-out objects (with their
   Gaussians as reference geometry) for the evaluation;
2. ``mvdiff``: a tiny image-conditioned multi-view diffusion model (``train/configs/mvdiff_tiny.yaml``,
   lgm4 rig), trained briefly with DeepSpeed on ``ranks`` CPU ranks (or ``mv_model``: one given);
3. ``lgm``: the tiny base LGM (``train/configs/lgm_tiny.yaml``), trained likewise (or ``base``);
4. ``pseudo``: for each noise strength s, ``fast3d datagen boost``: MVBoost's pseudo ground truth
   (diffusion views -> base LGM -> renders -> SDEdit refinement at strength s);
5. ``boost``: for each s, ``fast3d train lgm --lora RANK --init-from BASE`` on that pseudo ground
   truth (``train/configs/lgm_boost_tiny.yaml``; LoRA on the cross-view self-attention, merged at
   export);
6. ``eval``: the base LGM and every boosted one on the held-out objects with the same settings,
   one side-by-side report (:func:`fast3d.evaluation.report.evaluate_side_by_side`) with MVBoost's
   published GSO numbers quoted as a labelled reference row. Several strengths make it MVBoost's
   noise-strength ablation (0.8, 0.9, 0.95, 1.0 in the paper's discussion).

Every finished stage leaves ``stages/<stage>.json`` with the settings it ran with; a rerun whose
settings differ for a finished stage stops naming the stage and the setting (``redo`` reruns a stage
and every stage after it). At tiny sizes the boost need not help: the point is that every stage runs
and is measured; the report says what the numbers are, whichever way they go.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

from fast3d import checks

STAGES = ("data", "mvdiff", "lgm", "pseudo", "boost", "eval")
CONFIGS = {"mvdiff": "train/configs/mvdiff_tiny.yaml", "lgm": "train/configs/lgm_tiny.yaml",
           "boost": "train/configs/lgm_boost_tiny.yaml"}
INPUT_VIEWS = (0, 4, 8, 12)   # the held-out objects' views the LGMs take (orbit16: azimuths 0, 90, 180, 270)
EVAL_VIEWS = 16               # the held-out views scored are the other 12
PAPER = "mvboost"


@dataclass(frozen=True)
class DemoConfig:
    """The demo's sizes and settings (the defaults run in a few minutes on 2 CPU cores)."""
    strengths: tuple[float, ...] = (0.95,)  # SDEdit noise strengths of the pseudo ground truth, each in (0, 1]
    train_objects: int = 16        # procedural objects the diffusion model and the base LGM train on
    boost_images: int = 8          # procedural objects whose first view is an input image of the boost
    heldout_objects: int = 4       # procedural objects the base and the boosted LGMs are scored on
    resolution: int = 64           # pixels of the procedural views (the tiny LGM's render size)
    gaussians: int = 1000          # Gaussians of a procedural object
    mvdiff_steps: int = 40         # training steps of the tiny diffusion model
    lgm_steps: int = 40            # training steps of the tiny base LGM
    boost_steps: int = 20          # LoRA training steps of each boost
    sampler_steps: int = 20        # `datagen boost --steps` (the refinement runs int(steps x strength) of them)
    guidance: float = 3.0          # `datagen boost --guidance`
    lora: int = 32                 # LoRA rank (MVBoost's 32)
    ranks: int = 2                 # DeepSpeed ranks of each training
    seed: int = 0
    lpips_backbone: str = "random"  # evaluation LPIPS: random (offline stand-in, reported as lpips_random) | imagenet | file
    mv_model: str | None = None    # an existing mvdiff model instead of the mvdiff stage
    base: str | None = None        # an existing base LGM instead of the lgm stage

    def validate(self) -> None:
        """ValueError naming the argument for a setting out of range."""
        if not isinstance(self.strengths, tuple) or not self.strengths:
            raise ValueError(f"--strengths must list at least one strength; got {self.strengths!r}")
        for s in self.strengths:
            checks.real("--strengths", s, 0, 1, lo_open=True, note="every strength")
        if len(set(self.strengths)) != len(self.strengths):
            raise ValueError(f"--strengths must not repeat a strength; got {list(self.strengths)}")
        for name in ("train_objects", "boost_images", "heldout_objects", "mvdiff_steps", "lgm_steps", "boost_steps",
                     "sampler_steps", "lora", "ranks"):
            checks.positive_int("--" + name.replace("_", "-"), getattr(self, name))
        checks.integer("--resolution", self.resolution, 16)
        checks.integer("--gaussians", self.gaussians, 16)
        checks.real("--guidance", self.guidance, 0)
        checks.nonneg_int("--seed", self.seed)
        ran: dict[int, float] = {}  # the refinement runs the last int(steps x strength) sampler steps
        for s in self.strengths:
            n = int(self.sampler_steps * s)
            if n < 1:
                raise ValueError(f"--strengths x --sampler-steps must reach one sampler step; got --strengths {s}, "
                                 f"--sampler-steps {self.sampler_steps}")
            if n in ran:  # e.g. 0.9 and 0.95 at 8 steps: both 7, one refinement measured twice
                raise ValueError(f"--sampler-steps {self.sampler_steps} makes --strengths {ran[n]} and {s} the same "
                                 f"refinement (the last {n} steps each): raise --sampler-steps (20 tells 0.8, 0.9, "
                                 f"0.95 and 1.0 apart)")
            ran[n] = s
        for name in ("mv_model", "base"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not os.path.isdir(v)):
                raise ValueError(f"--{name.replace('_', '-')} must be a model, checkpoint or run directory; got {v!r}")


# Named sizes: "demo" (the defaults above: a few minutes on 2 CPU cores when they are free) and
# "smoke" (every stage runs in the fewest steps: CI's README run; its numbers mean nothing).
PRESETS = {
    "demo": {},
    "smoke": dict(train_objects=8, boost_images=4, heldout_objects=1, resolution=32, gaussians=300, mvdiff_steps=2,
                  lgm_steps=2, boost_steps=2, sampler_steps=12),  # 12: 0.8/0.9/0.95/1.0 run 9/10/11/12 steps
}


def preset(name: str, **overrides) -> DemoConfig:
    """The ``name`` sizes of ``PRESETS`` with ``overrides`` (fields of :class:`DemoConfig`) on top."""
    checks.one_of("--preset", name, tuple(PRESETS))
    return DemoConfig(**{**PRESETS[name], **overrides})


def strength_tag(s: float) -> str:
    """``s0.95``: a strength's part of the stage, folder and row names."""
    return f"s{s:g}"


def _say(msg: str) -> None:
    print(f"[fast3d boost demo] {msg}", file=sys.stderr, flush=True)


class _Stages:
    """The ``stages/<name>.json`` markers: a finished stage and the settings it ran with."""

    def __init__(self, out: str):
        self.dir = os.path.join(out, "stages")
        os.makedirs(self.dir, exist_ok=True)

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.json")

    def done(self, name: str, settings: dict) -> bool:
        """Whether ``name`` finished with these settings; ValueError if it finished with others."""
        p = self._path(name)
        if not os.path.isfile(p):
            return False
        with open(p, encoding="utf-8") as f:
            old = json.load(f)["settings"]
        if old != settings:
            diff = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in dict.fromkeys([*old, *settings])
                    if old.get(k) != settings.get(k)]
            stage = name.split("_", 1)[0]
            raise ValueError(f"stage {name!r} in this --out ran with other settings ({'; '.join(diff)}): pass "
                             f"--redo {stage} to run it and the stages after it again, or use another --out")
        return True

    def finish(self, name: str, settings: dict, seconds: float, **result) -> None:
        from fast3d.io.atomic import atomic_open

        with atomic_open(self._path(name)) as f:
            json.dump({"settings": settings, "seconds": seconds, **result}, f, indent=1)

    def seconds(self, name: str) -> float | None:
        p = self._path(name)
        if not os.path.isfile(p):
            return None
        with open(p, encoding="utf-8") as f:
            return json.load(f).get("seconds")


def _settings(cfg: DemoConfig, stage: str, strength: float | None = None) -> dict:
    """The settings stage ``stage`` (and every stage before it) depends on."""
    d = {k: getattr(cfg, k) for k in ("seed", "train_objects", "boost_images", "heldout_objects", "resolution",
                                      "gaussians")}
    if stage in ("mvdiff", "pseudo", "boost", "eval"):
        d.update(mvdiff_steps=cfg.mvdiff_steps, mv_model=cfg.mv_model and os.path.abspath(cfg.mv_model))
    if stage in ("lgm", "pseudo", "boost", "eval"):
        d.update(lgm_steps=cfg.lgm_steps, base=cfg.base and os.path.abspath(cfg.base))
    if stage in ("pseudo", "boost"):
        d.update(strength=strength, sampler_steps=cfg.sampler_steps, guidance=cfg.guidance)
    if stage == "boost":
        d.update(boost_steps=cfg.boost_steps, lora=cfg.lora)
    if stage == "eval":
        d.update(sampler_steps=cfg.sampler_steps, guidance=cfg.guidance, boost_steps=cfg.boost_steps, lora=cfg.lora,
                 lpips_backbone=cfg.lpips_backbone)
    return d


def _procedural(out: str, n: int, seed: int, cfg: DemoConfig, ply: bool) -> None:
    from fast3d.datagen import procedural

    procedural.run(out, procedural.ProceduralConfig(num_objects=n, views=16, rig="orbit16", resolution=cfg.resolution,
                                                    seed=seed, gaussians_per_object=cfg.gaussians,
                                                    samples_per_shard=1, batch_size=4, save_ply=ply))


def _input_images(shards: str, folder: str, resolution: int) -> int:
    """Each object's view 0 as an RGBA PNG (its colour over white, its alpha) and its caption as
    ``<name>.txt`` beside it: the single images the boost starts from. Returns how many."""
    import numpy as np
    import torch
    from PIL import Image

    from fast3d.data.dataset import MultiViewDataset
    from fast3d.io.atomic import atomic_path

    os.makedirs(folder, exist_ok=True)
    n = 0
    for s in MultiViewDataset(shards, views=16, resolution=resolution, rank=0, world_size=1):
        rgba = torch.cat([s["images"][0], s["alphas"][0]]).clamp(0, 1)            # [4, R, R]
        arr = (rgba.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        with atomic_path(os.path.join(folder, f"{s['key']}.png")) as tmp:
            Image.fromarray(arr, mode="RGBA").save(tmp, format="PNG")
        with open(os.path.join(folder, f"{s['key']}.txt"), "w", encoding="utf-8") as f:
            f.write(s["caption"] + "\n")
        n += 1
    return n


def _train_config(template: str, out_yaml: str, data: str, steps: int, seed: int, model: dict | None = None) -> str:
    """``template`` (a tiny config of the checkout) with this run's data, steps and seed, written to
    ``out_yaml`` (its deepspeed JSON made absolute)."""
    import yaml

    from fast3d.demo import find_config
    from fast3d.training.config import load_config

    base = load_config(find_config(template))
    d = base.to_dict()
    d.pop("source")
    d.update(max_steps=steps, seed=seed, deepspeed=os.path.abspath(base.path(base.deepspeed)),
             ckpt_every=max(1, steps // 2), log_every=max(1, min(10, steps // 4)))
    d["data"] = dict(d["data"], train=os.path.abspath(data))
    if model is not None:
        d["model"] = dict(d["model"], **model)
    os.makedirs(os.path.dirname(out_yaml), exist_ok=True)
    with open(out_yaml, "w", encoding="utf-8") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    load_config(out_yaml)  # what the training reads is valid before any rank starts
    return out_yaml


def _check_batches(cfg: DemoConfig) -> None:
    """Every rank of each training gets a full batch: one sample a shard, so ``ranks`` x the
    config's batch size samples at least (ValueError naming the argument otherwise)."""
    from fast3d.demo import find_config
    from fast3d.training.config import load_config

    needs = [("--boost-images", cfg.boost_images, "boost")]
    if cfg.mv_model is None:
        needs.append(("--train-objects", cfg.train_objects, "mvdiff"))
    if cfg.base is None:
        needs.append(("--train-objects", cfg.train_objects, "lgm"))
    for name, have, stage in needs:
        batch = load_config(find_config(CONFIGS[stage])).batch_size
        if have < batch * cfg.ranks:
            raise ValueError(f"{name} must be at least {batch * cfg.ranks} ({cfg.ranks} rank(s) x the {stage} "
                             f"training's batch of {batch}, {CONFIGS[stage]}); got {have}")


def _lgm_overrides(model_dir: str) -> dict:
    """The base LGM's configuration as ``model.overrides`` (lists for tuples): the boost's LGM is the
    base's, whatever size the base has (the recipe refuses base weights of another configuration)."""
    from fast3d.models.checkpoints import read_config
    from fast3d.models.lgm import LGMConfig

    c = dataclasses.asdict(read_config(model_dir, "lgm", LGMConfig))
    c.pop("activation_checkpointing")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in c.items()}


def _train(recipe: str, config: str, run_dir: str, ranks: int, lora: int | None = None,
           init_from: str | None = None) -> str:
    """A DeepSpeed training (resumed where it has a checkpoint) as its own ``fast3d train`` process,
    even on one rank: a process group formed in this process would outlive the training and hold
    its port (and MASTER_PORT) for every later one; returns its exported model dir."""
    import subprocess

    from fast3d.models.checkpoints import resolve_checkpoint

    cmd = [sys.executable, "-m", "fast3d.cli", "train", recipe, "--config", config, "--output", run_dir,
           "--ranks", str(ranks)]
    if os.path.isfile(os.path.join(run_dir, "checkpoints", "latest")):
        cmd.append("--resume")
    if lora is not None:
        cmd += ["--lora", str(lora)]
    if init_from is not None:
        cmd += ["--init-from", init_from]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RuntimeError(f"training {recipe} ({run_dir}) exited with code {rc}; rerun the demo to resume it")
    return resolve_checkpoint(run_dir)


def _redo(out: str, stage: str) -> None:
    """Remove the markers and outputs of ``stage`` and every stage after it (all under ``out``)."""
    later = STAGES[STAGES.index(stage):]
    marks = os.path.join(out, "stages")
    if os.path.isdir(marks):
        for f in os.listdir(marks):
            if f.split("_", 1)[0].removesuffix(".json") in later:
                os.unlink(os.path.join(marks, f))
    dirs = {"data": ["data"], "mvdiff": ["runs/mvdiff"], "lgm": ["runs/lgm"], "pseudo": ["data/pseudo"],
            "boost": ["runs/boost"], "eval": ["eval"]}
    for st in later:
        for d in dirs[st]:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True)


def run(out: str, cfg: DemoConfig, until: str = "eval", redo: str | None = None, device: str | None = None) -> dict:
    """The demo (module docstring) into ``out``.

    Args:
        out: the demo's directory (data/, runs/, configs/, stages/, eval/).
        cfg: sizes and settings.
        until: the last stage to run (one of ``STAGES``).
        redo: a stage to run again, with every stage after it (its outputs under ``out`` are removed).
        device: where the pseudo ground truth and the evaluation run (default: CUDA when there is one).

    Returns:
        ``{"out", "report", "stages": {stage: seconds}, "models": {name: dir}, "table"}``; "report"
        (the side-by-side evaluation) and "table" (its Markdown) only when ``until`` is "eval".
    """
    cfg.validate()
    checks.one_of("--until", until, STAGES)
    if redo is not None:
        checks.one_of("--redo", redo, STAGES)
    if not isinstance(out, str) or not out:
        raise ValueError(f"--out must be a directory path; got {out!r}")
    from fast3d.models import checkpoints

    for name, kind in (("mv_model", "mvdiff"), ("base", "lgm")):
        v = getattr(cfg, name)
        if v is not None:
            got = checkpoints.model_type(checkpoints.resolve_checkpoint(v))
            if got != kind:
                raise ValueError(f"--{name.replace('_', '-')} {v!r} holds a {got!r} model; expected an {kind!r} one")
    _check_batches(cfg)
    out = os.path.abspath(out)
    if redo is not None:
        _redo(out, redo)
    os.makedirs(out, exist_ok=True)
    marks = _Stages(out)
    last = STAGES.index(until)
    paths = {k: os.path.join(out, "data", k) for k in ("train", "boost_src", "images", "heldout")}
    models: dict[str, str] = {}
    timing: dict[str, float] = {}

    def stage(name: str, key: str, strength: float | None, fn) -> None:
        settings = _settings(cfg, name, strength)
        if marks.done(key, settings):
            _say(f"{key}: done ({marks.seconds(key):.0f} s earlier), skipped")
            timing[key] = marks.seconds(key)
            return
        t0 = time.perf_counter()
        result = fn() or {}
        timing[key] = time.perf_counter() - t0
        marks.finish(key, settings, timing[key], **result)
        _say(f"{key}: finished in {timing[key]:.0f} s")

    def data():
        n = cfg.train_objects + cfg.boost_images + cfg.heldout_objects
        _say(f"data: {n} procedural objects ({cfg.train_objects} train, {cfg.boost_images} boost images, "
             f"{cfg.heldout_objects} held out), 16 views at {cfg.resolution} px")
        _procedural(paths["train"], cfg.train_objects, cfg.seed, cfg, ply=False)
        _procedural(paths["boost_src"], cfg.boost_images, cfg.seed + 1_000_003, cfg, ply=False)
        _procedural(paths["heldout"], cfg.heldout_objects, cfg.seed + 2_000_006, cfg, ply=True)
        return {"images": _input_images(paths["boost_src"], paths["images"], cfg.resolution)}

    stage("data", "data", None, data)
    if last == 0:
        return _result(out, timing, models)

    if cfg.mv_model is not None:
        models["mvdiff"] = checkpoints.resolve_checkpoint(cfg.mv_model)
    else:
        run_dir = os.path.join(out, "runs", "mvdiff")

        def mvdiff():
            _say(f"mvdiff: training the tiny multi-view diffusion model for {cfg.mvdiff_steps} steps on "
                 f"{cfg.ranks} rank(s) -> {run_dir}")
            yml = _train_config(CONFIGS["mvdiff"], os.path.join(out, "configs", "mvdiff.yaml"), paths["train"],
                                cfg.mvdiff_steps, cfg.seed)
            _train("mvdiff", yml, run_dir, cfg.ranks)

        stage("mvdiff", "mvdiff", None, mvdiff)
        models["mvdiff"] = checkpoints.resolve_checkpoint(run_dir)
    if last == 1:
        return _result(out, timing, models)

    if cfg.base is not None:
        models["base"] = checkpoints.resolve_checkpoint(cfg.base)
    else:
        run_dir = os.path.join(out, "runs", "lgm")

        def lgm():
            _say(f"lgm: training the tiny base LGM for {cfg.lgm_steps} steps on {cfg.ranks} rank(s) -> {run_dir}")
            yml = _train_config(CONFIGS["lgm"], os.path.join(out, "configs", "lgm.yaml"), paths["train"],
                                cfg.lgm_steps, cfg.seed)
            _train("lgm", yml, run_dir, cfg.ranks)

        stage("lgm", "lgm", None, lgm)
        models["base"] = checkpoints.resolve_checkpoint(run_dir)
    if last == 2:
        return _result(out, timing, models)

    from fast3d.datagen.boost import BoostConfig
    from fast3d.datagen.boost import run as boost_data

    for s in cfg.strengths:
        tag = strength_tag(s)
        pseudo = os.path.join(out, "data", "pseudo", tag)

        def make(s=s, tag=tag, pseudo=pseudo):
            _say(f"pseudo_{tag}: datagen boost at strength {s} ({cfg.sampler_steps} sampler steps) -> {pseudo}")
            bc = BoostConfig(strength=s, seed=cfg.seed, steps=cfg.sampler_steps, guidance=cfg.guidance,
                             samples_per_shard=1, preview=2)  # a shard an image: every rank gets its share
            res = boost_data(paths["images"], models["mvdiff"], models["base"], pseudo, bc, device=device)
            return {"samples": sum(r["samples"] for r in res), "bad_images": sum(len(r["bad_images"]) for r in res)}

        stage("pseudo", f"pseudo_{tag}", s, make)
    if last == 3:
        return _result(out, timing, models)

    for s in cfg.strengths:
        tag = strength_tag(s)
        run_dir = os.path.join(out, "runs", "boost", tag)

        def boost(tag=tag, run_dir=run_dir):
            _say(f"boost_{tag}: LoRA rank {cfg.lora} on the base LGM's cross-view self-attention, "
                 f"{cfg.boost_steps} steps on {cfg.ranks} rank(s) -> {run_dir}")
            yml = _train_config(CONFIGS["boost"], os.path.join(out, "configs", f"boost_{tag}.yaml"),
                                os.path.join(out, "data", "pseudo", tag), cfg.boost_steps, cfg.seed,
                                model={"init_from": models["base"], "lora_rank": cfg.lora,
                                       "overrides": _lgm_overrides(models["base"])})
            _train("lgm", yml, run_dir, cfg.ranks, lora=cfg.lora, init_from=models["base"])

        stage("boost", f"boost_{tag}", s, boost)
        models[f"boost {tag}"] = checkpoints.resolve_checkpoint(run_dir)
    if last == 4:
        return _result(out, timing, models)

    report_path = os.path.join(out, "eval", "report.json")
    # Always run: each model's rows resume from its own report (another strength list is another
    # table, the models already scored are not scored again).
    t0 = time.perf_counter()
    import functools

    from fast3d.evaluation.report import evaluate_side_by_side
    from fast3d.inference.lgm import evaluate as lgm_evaluate

    _say(f"eval: the base LGM and {len(cfg.strengths)} boosted one(s) on {cfg.heldout_objects} held-out "
         f"objects ({EVAL_VIEWS - len(INPUT_VIEWS)} novel views each) -> {report_path}")
    ev = functools.partial(_evaluate_one, lgm_evaluate, paths["heldout"], cfg.lpips_backbone, device)
    named = [("base", models["base"])] + [(f"boost {strength_tag(s)}", models[f"boost {strength_tag(s)}"])
                                          for s in cfg.strengths]
    evaluate_side_by_side(ev, named, report_path, paper=PAPER)
    timing["eval"] = time.perf_counter() - t0
    marks.finish("eval", {**_settings(cfg, "eval"), "strengths": list(cfg.strengths)}, timing["eval"])
    return _result(out, timing, models, report_path)


def _evaluate_one(lgm_evaluate, data: str, lpips_backbone: str, device, model_dir: str, out_json: str) -> dict:
    return lgm_evaluate(model_dir, data, out_json, input_views=INPUT_VIEWS, views=EVAL_VIEWS,
                        lpips_backbone=lpips_backbone, device=device)


def _result(out: str, timing: dict, models: dict, report_path: str | None = None) -> dict:
    r = {"out": out, "stages": timing, "models": models}
    if report_path is not None:
        from fast3d.evaluation.report import markdown_path

        with open(report_path, encoding="utf-8") as f:
            r["report"] = json.load(f)
        with open(markdown_path(report_path), encoding="utf-8") as f:
            r["table"] = f.read()
    return r


def config_from_args(args) -> DemoConfig:
    """A :class:`DemoConfig` from the CLI's arguments: ``args.preset``, then every field given."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig) if getattr(args, f.name, None)
          is not None}
    if "strengths" in kw:
        kw["strengths"] = tuple(kw["strengths"])
    return preset(args.preset, **kw)
