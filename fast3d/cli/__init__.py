"""The `fast3d` command: info | bench | report | profile | datagen | train | infer | sample | demo,
plus the command groups of this package's modules.

A command group that lives in its own module (``fast3d/cli/<name>.py``) defines
``register(sub, fail)``: it adds its parsers to ``sub`` (the top-level subparsers) and reports
argument errors through ``fail(cmd, msg)``. Modules are found by name, so a new command is one new
file; they import their implementation inside the command functions so ``fast3d --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys


def _fail(cmd: str, msg: str) -> int:
    print(f"fast3d {cmd}: error: {msg}", file=sys.stderr)
    return 2


NOT_IMPLEMENTED = "no such backend of this op (not implemented)"


def cmd_info(args) -> int:
    from fast3d import _native, backends
    from fast3d.bench import environment as env

    ops = {}
    for op in backends.ops():
        avail, table = backends.availability(op), backends.backends(op)
        ops[op] = {name: {"available": avail.get(name, NOT_IMPLEMENTED) is None,
                          "reason": avail.get(name, NOT_IMPLEMENTED),
                          "doc": table[name].doc if name in table else None} for name in backends.BACKEND_NAMES}
    info = {"versions": env.versions(), "build": _native.build_info(), "ops": ops}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print("fast3d", info["versions"]["fast3d"])
    for k, v in info["versions"].items():
        if k != "fast3d":
            print(f"  {k:<13} {v}")
    b = info["build"]
    cuda = (f"CUDA kernels for sm_{', sm_'.join(b['cuda_archs'])} ({len(b['cuda_sources'])} .cu files)"
            if b.get("cuda") else f"no CUDA kernels ({b.get('cuda_how', 'build info missing')})")
    native = _native.unavailable_reason() or f"fast3d._C loaded; {cuda}"
    print(f"  {'native':<13} {native}")
    names = backends.BACKEND_NAMES
    print()
    width = max(len(op) for op in ops) if ops else 2
    print(f"{'op':<{width}}  " + "  ".join(f"{n:<9}" for n in names))
    for op, table in ops.items():
        cells = ["-" if table[n]["reason"] == NOT_IMPLEMENTED else ("yes" if table[n]["available"] else "no")
                 for n in names]
        print(f"{op:<{width}}  " + "  ".join(f"{c:<9}" for c in cells))
    print(f"(-: {NOT_IMPLEMENTED})")
    print("\nbackends:")
    for op, table in ops.items():
        for n, t in table.items():
            if t["doc"] is not None:
                print(f"  {op}/{n}: {t['doc']}")
    reasons = [(op, n, t["reason"]) for op, table in ops.items() for n, t in table.items()
               if t["reason"] and t["reason"] != NOT_IMPLEMENTED]
    if reasons:
        print("\nunavailable:")
        for op, n, r in reasons:
            print(f"  {op}/{n}: {r}")
    return 0


def cmd_bench(args) -> int:
    from fast3d.bench import runner
    from fast3d.bench.workloads import specs

    if args.list:
        for op, spec in specs().items():
            for w in spec.workloads:
                print(f"{op}:{w.name}  {w.params}  (quick: {w.quick})  -- {w.source}")
        return 0
    cfg = runner.BenchConfig(ops=args.ops, workloads=args.workload or [], backends=args.backend or [],
                             passes=args.passes or list(runner.PASSES), quick=args.quick,
                             out=args.out or runner.DEFAULT_OUT, seed=args.seed)
    try:
        runner.validate(cfg)
    except ValueError as e:
        return _fail("bench", str(e))
    rows, failures = runner.run(cfg)
    if failures:
        print(f"fast3d bench: {failures} measurement(s) failed (see above)", file=sys.stderr)
        return 1
    return 0


def cmd_report(args) -> int:
    from fast3d.bench.report import write_report
    from fast3d.bench.runner import DEFAULT_OUT

    path = write_report(args.results or DEFAULT_OUT)
    print(f"wrote {path}")
    return 0


def cmd_profile(args) -> int:
    from fast3d.bench import profile

    try:
        profile.plan(args.workload, args.op, args.backend)
    except ValueError as e:
        return _fail("profile", str(e))
    profile.profile_workload(args.workload, op=args.op, backend=args.backend, quick=args.quick,
                             out=args.out or profile.DEFAULT_TRACES)
    return 0


def cmd_datagen_procedural(args) -> int:
    from fast3d.datagen import procedural

    cfg = procedural.ProceduralConfig(
        num_objects=args.num_objects, views=args.views, rig=args.rig, resolution=args.resolution, seed=args.seed,
        gaussians_per_object=args.gaussians, samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
        background=args.background, save_ply=not args.no_ply)
    try:
        cfg.validate()
        procedural.prepare_output(args.out, cfg)
    except ValueError as e:
        return _fail("datagen procedural", str(e))
    results = procedural.run(args.out, cfg, workers=args.workers)
    n = sum(r["samples"] for r in results)
    secs = max(r["seconds"] for r in results)
    render = sum(r["render_seconds"] for r in results)
    skipped = sum(r["shards_skipped"] for r in results)
    print(f"wrote {n} samples in {sum(r['shards_written'] for r in results)} shards to {args.out} "
          f"({n / max(secs, 1e-9):.1f} samples/s, {render:.1f} s rendering); {skipped} complete shards kept")
    return 0


def cmd_train(args) -> int:
    from fast3d.training import launch

    try:
        if args.recipe != "ttr-extract" and not args.output:
            raise ValueError("--output is required")
        if args.recipe == "ttr-extract":
            from fast3d.training.config import load_config
            from fast3d.training.recipes.ttr_extract import extract_features

            rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
            r = extract_features(load_config(args.config, recipe="ttr"), args.output, rank, world)
            print(json.dumps(r))
            return 0
        return launch.run(args.recipe, args.config, args.output, max_steps=args.max_steps, resume=args.resume,
                          ranks=args.ranks, lora=args.lora, init_from=args.init_from)
    except ValueError as e:
        return _fail(f"train {args.recipe}", str(e))


def _model_kind(cmd: str, checkpoint: str):
    from fast3d.models import checkpoints

    model_dir = checkpoints.resolve_checkpoint(checkpoint)
    kind = checkpoints.model_type(model_dir)
    if kind not in ("lgm", "lrm"):
        raise ValueError(f"--checkpoint {checkpoint!r} holds a {kind!r} model; fast3d {cmd} takes LGM or LRM")
    return model_dir, kind


def cmd_infer(args) -> int:
    try:
        model_dir, kind = _model_kind("infer", args.checkpoint)
        if kind == "lgm":
            from fast3d.inference import lgm

            lgm.infer(model_dir, args.images, args.out, cameras_json=args.cameras, device=args.device,
                      turntable_frames=args.frames, resolution=args.resolution,
                      refine_pose_steps=args.refine_pose, lpips_backbone=args.lpips_backbone)
        else:
            from fast3d.inference import lrm

            if len(args.images) != 1:
                raise ValueError(f"--images: an LRM takes one image; got {len(args.images)}")
            camera = None
            if args.cameras:
                with open(args.cameras) as f:
                    camera = json.load(f)
            lrm.infer(model_dir, args.images[0], args.out, camera=camera, device=args.device,
                      turntable_frames=args.frames, resolution=args.resolution, point_grid=args.point_grid,
                      mesh_grid=args.mesh_grid)
    except ValueError as e:
        return _fail("infer", str(e))
    return 0


def cmd_sample_ttr(args) -> int:
    from fast3d.inference.ttr import sample
    from fast3d.models.checkpoints import resolve_checkpoint

    try:
        paths = sample(resolve_checkpoint(args.checkpoint), args.prompt, args.out, steps=args.steps,
                       guidance_scale=args.guidance_scale, seed=args.seed, device=args.device)
    except ValueError as e:
        return _fail("sample ttr", str(e))
    print("\n".join(f"wrote {p}" for p in paths))
    return 0


def cmd_demo(args) -> int:
    from fast3d import demo

    try:
        demo.run(args.out, config=args.config, steps=args.steps, ranks=args.ranks, train_objects=args.objects)
    except ValueError as e:
        return _fail("demo", str(e))
    except RuntimeError as e:
        print(f"fast3d demo: failed: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_datagen_pipeline(args) -> int:
    from fast3d.datagen.pipeline import run_config

    try:
        results = run_config(args.config, args.out, workers=args.workers)
    except ValueError as e:
        return _fail("datagen pipeline", str(e))
    n = sum(r["samples"] for r in results)
    print(f"wrote {n} samples ({sum(r['kept'] for r in results)} kept, {sum(r['rejected'] for r in results)} "
          f"rejected by the filter, {sum(r['rejected_unscored'] for r in results)} of them without a score) in "
          f"{sum(r['shards_written'] for r in results)} shards to {args.out}; "
          f"{sum(r['shards_skipped'] for r in results)} complete shards kept")
    return 0


def cmd_datagen_train_filter(args) -> int:
    from fast3d.datagen.quality import train_filter

    try:
        m = train_filter(args.data, args.labels, args.out, dinov2=args.dinov2, threshold=args.threshold,
                         elevation=not args.no_elevation, seed=args.seed, views=args.views)
    except ValueError as e:
        return _fail("datagen train-filter", str(e))
    print(json.dumps(m, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fast3d", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("info", help="versions, GPU, and which backend of each op can run here")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("bench", help="time every op x workload x backend x pass; append rows to results")
    s.add_argument("ops", nargs="*", help="ops to run (default: all)")
    s.add_argument("--workload", action="append", help="workload name (repeatable; default: all)")
    s.add_argument("--backend", action="append", help="backend or baseline name (repeatable; default: all)")
    s.add_argument("--pass", dest="passes", action="append", help="forward | backward | forward+backward")
    s.add_argument("--quick", action="store_true", help="shrunk workloads: the whole CPU run in under a minute")
    s.add_argument("--out", help="results folder (default: profiling/results)")
    s.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    s.add_argument("--list", action="store_true", help="list the ops' workloads and exit")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("report", help="render committed results into REPORT.md with plots")
    s.add_argument("--results", help="results folder (default: profiling/results)")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("profile", help="torch.profiler trace of a workload's forward+backward")
    s.add_argument("workload", help="workload name, or OP:WORKLOAD")
    s.add_argument("--op", help="only this op")
    s.add_argument("--backend", default="auto", help="backend to profile (default: what auto picks)")
    s.add_argument("--quick", action="store_true", help="the shrunk workload")
    s.add_argument("--out", help="traces folder (default: profiling/traces)")
    s.set_defaults(fn=cmd_profile)

    s = sub.add_parser("datagen", help="synthetic multi-view data")
    dsub = s.add_subparsers(dest="datagen_cmd", required=True)
    s.subcommands = dsub  # command modules' register() add `datagen` subcommands here
    d = dsub.add_parser("procedural", help="procedural Gaussian assets rendered into multi-view shards "
                                           "(resumable: a rerun writes only the missing shards)")
    d.add_argument("--out", required=True, help="output directory (shards, assets/*.ply, dataset.json)")
    d.add_argument("--num-objects", type=int, default=64)
    d.add_argument("--views", type=int, default=16)
    d.add_argument("--rig", default="orbit16", help="orbit16 | zero123pp | mvdream | random")
    d.add_argument("--resolution", type=int, default=256)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--gaussians", type=int, default=20_000, help="Gaussians per object")
    d.add_argument("--samples-per-shard", type=int, default=16)
    d.add_argument("--batch-size", type=int, default=4, help="objects per rasterization call")
    d.add_argument("--background", default="white", help="white | random")
    d.add_argument("--no-ply", action="store_true", help="do not write assets/<key>.ply")
    d.add_argument("--workers", type=int, default=1, help="local processes (each on its share of the threads)")
    d.set_defaults(fn=cmd_datagen_procedural)
    d = dsub.add_parser("pipeline", help="pretrained models: prompts -> text-to-image -> image-to-multi-view -> "
                                         "quality filter -> recaption -> synthetic shards (resumable)")
    d.add_argument("--config", required=True, help="pipeline YAML, e.g. train/configs/datagen_pipeline.yaml")
    d.add_argument("--out", required=True, help="output directory (shards, dataset.json)")
    d.add_argument("--workers", type=int, default=1, help="local processes")
    d.set_defaults(fn=cmd_datagen_pipeline)
    d = dsub.add_parser("train-filter", help="VFusion3D's quality filter (DINOv2 features + linear SVM) and "
                                             "elevation MLP, from labelled multi-view samples")
    d.add_argument("--data", nargs="+", required=True, help="multi-view shard directories")
    d.add_argument("--labels", required=True, help="JSON {key: 0|1} or CSV key,label")
    d.add_argument("--out", required=True, help="output directory for the filter and the elevation MLP")
    d.add_argument("--dinov2", default="random-tiny", help="local DINOv2 directory (random-tiny: tests only)")
    d.add_argument("--threshold", type=float, default=0.0, help="keep samples scoring above this")
    d.add_argument("--views", type=int, default=8, help="frames averaged per sample by the filter, spread uniformly "
                                                        "(VFusion3D: 8; the elevation MLP averages 4)")
    d.add_argument("--no-elevation", action="store_true", help="skip the elevation MLP")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_datagen_train_filter)

    s = sub.add_parser("train", help="train a recipe with DeepSpeed (lgm | lrm | ttr)")
    s.add_argument("recipe", help="lgm | lrm | ttr (or module:Class); ttr-extract: encode the config's "
                                  "data.raw into its feature cache (VAE latents, T5 embeddings)")
    s.add_argument("--config", required=True, help="run config, e.g. train/configs/lgm_tiny.yaml")
    s.add_argument("--output", help="run directory: checkpoints/, metrics.jsonl, tensorboard/ "
                                    "(ttr-extract: the cache directory, default the config's data.cache)")
    s.add_argument("--max-steps", type=int, help="override the config's max_steps")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    s.add_argument("--ranks", type=int, help="processes to launch (default: the GPUs, or 1 on a CPU machine); "
                                              "ignored under a launcher")
    s.add_argument("--lora", type=int, nargs="?", const=32, metavar="RANK",
                   help="lgm: train LoRA adapters of this rank (without a value: 32, MVBoost's) on the cross-view "
                        "self-attention, from the base weights of --init-from or model.init_from; merged at export")
    s.add_argument("--init-from", metavar="DIR", help="lgm, lrm, mvdiff: start from these weights (a model, checkpoint or "
                                                      "training run directory); overrides model.init_from")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("infer", help="image(s) to 3D with a trained LGM (4 posed views) or LRM (1 view)")
    s.add_argument("--checkpoint", required=True, help="model dir, checkpoint dir or training run dir")
    s.add_argument("--images", nargs="+", required=True, help="input images (PNG/JPEG, square, same size)")
    s.add_argument("--cameras", help="JSON cameras of the inputs (default: the model's canonical input rig): "
                                     "{viewmats|c2w, Ks}; an LRM also takes {azimuth_deg, elevation_deg, "
                                     "distance, fov_y_deg}")
    s.add_argument("--point-grid", type=int, default=128, help="LRM: density grid of the point export")
    s.add_argument("--mesh-grid", type=int, default=128, help="LRM: density grid of the marching-cubes mesh.ply "
                                                              "(0: no mesh)")
    s.add_argument("--refine-pose", type=int, default=0, metavar="STEPS",
                   help="LGM: refine the input cameras by this many LPIPS steps and redo the reconstruction from "
                        "them (MVBoost); cameras_refined.json gives the LPIPS before and after")
    s.add_argument("--lpips-backbone", default="imagenet", help="imagenet | random | VGG-16 weights file")
    s.add_argument("--out", required=True,
                   help="output dir: gaussians.ply (LGM) or points.ply + mesh.ply (LRM), turntable.gif")
    s.add_argument("--frames", type=int, default=36, help="turntable frames")
    s.add_argument("--resolution", type=int, help="turntable resolution (default: the model's render size)")
    s.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    s.set_defaults(fn=cmd_infer)

    s = sub.add_parser("sample", help="sample a trained multi-view diffusion model")
    ssub = s.add_subparsers(dest="sample_cmd", required=True)
    t = ssub.add_parser("ttr", help="4 views (a 2x2 grid) from a prompt with a TTR-trained transformer")
    t.add_argument("--checkpoint", required=True, help="model dir, checkpoint dir or training run dir")
    t.add_argument("--prompt", required=True)
    t.add_argument("--out", required=True, help="grid PNG path (the 4 views are written beside it)")
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--guidance-scale", type=float, default=4.5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", help="cuda | cpu")
    t.set_defaults(fn=cmd_sample_ttr)

    s = sub.add_parser("demo", help="end to end: data, DeepSpeed training of a tiny LGM, evaluation, turntable")
    s.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    s.add_argument("--config", default="train/configs/lgm_tiny.yaml", help="base LGM run config")
    s.add_argument("--steps", type=int, help="training steps (default: 300 on CPU, 2000 on GPU)")
    s.add_argument("--ranks", type=int, help="DeepSpeed ranks (default: 2 on CPU, every GPU)")
    s.add_argument("--objects", type=int, help="training objects (default: 64 on CPU, 512 on GPU)")
    s.set_defaults(fn=cmd_demo)

    for mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{mod}").register(sub, _fail)
    return p


def _stdout_reader_gone() -> bool:
    """Whether the read end of stdout's pipe is closed (``fast3d info | head`` after head exits):
    poll reports an error on the write end of such a pipe."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # stdout closed, replaced, or no poll here
        return False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe (a worker's, a socket): a real error
        # The reader of stdout left: say nothing more (and let the interpreter's final flush of
        # the buffered output go to /dev/null rather than raise again at exit).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
