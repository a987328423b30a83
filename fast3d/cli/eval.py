"""``fast3d eval``: one command for every model kind, reported as the papers report them.

* reconstructors (``lgm``, ``lrm``): ``--data`` (fast3d shards or a GSO-style folder) -> novel-view
  PSNR / SSIM / MS-SSIM / LPIPS, Chamfer distance and F-score against the reference geometry, and
  with ``--clip`` VFusion3D's CLIP image (renders vs input) and text (renders vs caption) similarity;
* the multi-view DiT (``mvdit``, TTR): ``--prompts`` -> 4 views a prompt -> CLIP-R precision and
  CLIP text similarity per ``--clip`` backbone, FID of all views against ``--reference``;
* multi-view diffusion (``mvdiff``): ``--images`` (and ``--prompts`` paired with them, optional)
  -> the rig's views -> CLIP image similarity (and CLIP-R / text similarity), FID;
* whole pipelines (``--mv-model`` and ``--recon`` instead of ``--checkpoint``): ``fast3d generate``
  on each prompt or image -> 3D -> its turntable's ``--frames`` renders -> the same metrics as the
  multi-view models (Bootstrap3D scores 3D renders so). The renders are read from the turntable GIF:
  256 colours a frame, which FID sees.

The report is ``--out`` (JSON: per-sample rows, means, backbones, commit) with a Markdown table beside
it; a killed run resumes from its ``.rows.jsonl``. ``--compare A.json B.json`` prints two reports side
by side with the differences (and with ``--out`` writes them as one side-by-side report).

``--baseline DIR`` (reconstructors): the baseline and ``--checkpoint`` (e.g. the base LGM and its
MVBoost boost) are scored on the same ``--data`` with the same settings, each into its own resumable
report (``<out>.baseline.json``, ``<out>.checkpoint.json``), and ``--out`` is ONE report with both
side by side, the checkpoint's difference to the baseline and on how many samples it is better;
``--paper mvboost`` quotes the paper's published GSO numbers beside them as a labelled reference row.
"""

from __future__ import annotations

import json
import os

KINDS = ("lgm", "lrm", "mvdit", "mvdiff")


def _image_list(items: list[str]) -> list[str]:
    from fast3d.evaluation.sets import list_images

    out = []
    for p in items:
        out += list_images(p) if os.path.isdir(p) else [p]
    if not out:
        raise ValueError(f"--images {items} holds no images")
    return out


def _generative(args, kind: str, model_dir: str) -> dict:
    from fast3d.evaluation.generative import evaluate_generated
    from fast3d.evaluation.sets import read_prompts

    prompts = read_prompts(args.prompts) if args.prompts else None
    images = _image_list(args.images) if args.images else None
    if not args.clip:
        raise ValueError("--clip: name at least one CLIP backbone (a local transformers CLIP directory; "
                         "random-tiny for tests)")
    guidance = args.guidance_scale
    if kind == "mvdit":
        if prompts is None or images is not None:
            raise ValueError("an mvdit model (text to multi-view) takes --prompts and no --images")
        from fast3d.inference import ttr
        from fast3d.inference.common import save_image
        from fast3d.models.mvdit import split_grid

        guidance = 4.5 if guidance is None else guidance
        pipe, cfg = ttr.load_pipeline(model_dir, args.device)  # once, for every prompt

        def generate(i, prompt, image, stem):
            grid = ttr.sample_grid(pipe, cfg, prompt, steps=args.steps, guidance_scale=guidance, seed=args.seed)
            paths = []
            for v, view in enumerate(split_grid(grid[None].cpu())[0]):  # the 2x2 grid's 4 views
                paths.append(f"{stem}_view{v}.png")
                save_image(view, paths[-1])
            return paths
    else:
        if images is None:
            raise ValueError("an mvdiff model (image to multi-view) takes --images (and --prompts paired with them)")
        from fast3d.inference import mvdiff
        from fast3d.inference.common import load_image, save_image

        guidance = 3.0 if guidance is None else guidance
        model = mvdiff.load_mvdiff(model_dir, args.device)

        def generate(i, prompt, image, stem):
            out = mvdiff.sample_views(model, load_image(image, background=model.config.background),
                                      steps=args.steps, guidance_scale=guidance, seed=args.seed)
            paths = []
            for v, view in enumerate(out["images"]):
                paths.append(f"{stem}_view{v}.png")
                save_image(view, paths[-1])
            return paths
    data = args.prompts or (args.images[0] if len(args.images) == 1 else os.path.dirname(images[0]))
    settings = {"steps": args.steps, "guidance_scale": guidance, "seed": args.seed}
    return evaluate_generated(generate, prompts, args.out, model=model_dir, data=data, kind=kind, clips=args.clip,
                              fid_backbone=args.fid_backbone, reference=args.reference, images=images,
                              max_samples=args.max_samples, device=args.device or "cpu", settings=settings)


def _pipeline(args) -> dict:
    """``fast3d generate`` (--mv-model, --recon) on each prompt or image; its turntable frames are the renders scored."""
    import numpy as np
    import torch
    from PIL import Image, ImageSequence

    from fast3d.evaluation.generative import evaluate_generated
    from fast3d.evaluation.sets import read_prompts
    from fast3d.inference import generate as gen
    from fast3d.inference.common import save_image

    prompts = read_prompts(args.prompts) if args.prompts else None
    images = _image_list(args.images) if args.images else None
    if not args.clip:
        raise ValueError("--clip: name at least one CLIP backbone (a local transformers CLIP directory; "
                         "random-tiny for tests)")
    if prompts is None and images is None:
        raise ValueError("a pipeline takes --prompts (text to 3D) or --images (image to 3D, --prompts paired optional)")
    mv = gen.load_multiview(args.mv_model, "image" if images is not None else "prompt", args.device)
    recon = gen.load_reconstructor(args.recon, args.device)
    settings = gen.Settings(steps=args.steps, guidance=args.guidance_scale, seed=args.seed,
                            turntable_frames=args.frames, point_grid=64, mesh_grid=64)
    s = settings.resolved(mv.kind)
    gen.check_rig(mv, recon, None)

    def generate(i, prompt, image, stem):
        item = {"name": os.path.basename(stem), **({"image": image} if image is not None else {"prompt": prompt})}
        out = stem + "_3d"
        if not os.path.isfile(os.path.join(out, gen.REPORT)):
            gen.generate_item(mv, recon, item, out, settings)
        paths = []
        with Image.open(os.path.join(out, "turntable.gif")) as gif:
            for j, frame in enumerate(ImageSequence.Iterator(gif)):
                rgb = torch.from_numpy(np.asarray(frame.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                paths.append(f"{stem}_render{j:03d}.png")
                save_image(rgb, paths[-1])
        return paths

    return evaluate_generated(generate, prompts, args.out, model=f"{mv.path} -> {recon.path}",
                              data=args.prompts or os.path.dirname(images[0]), kind=f"generate ({mv.kind} -> {recon.kind})",
                              clips=args.clip, fid_backbone=args.fid_backbone, reference=args.reference,
                              images=images, max_samples=args.max_samples, device=args.device or "cpu",
                              settings={"mv_model": mv.path, "recon": recon.path, "frames": args.frames,
                                        "steps": s["steps"], "guidance_scale": s["guidance"], "seed": s["seed"]})


def _reconstructor(args, kind: str):
    """``evaluate(model_dir, out_json) -> report`` of an lgm / lrm with the command's data and settings."""
    if kind == "lgm":
        from fast3d.inference.lgm import evaluate

        views = args.views or 16
    else:
        from fast3d.inference.lrm import evaluate

        views = args.views or 4

    def run(model_dir: str, out_json: str) -> dict:
        return evaluate(model_dir, args.data, out_json, views=views, resolution=args.resolution,
                        lpips_backbone=args.lpips_backbone, device=args.device, max_samples=args.max_samples,
                        clip=args.clip or ())
    return run


def _compare(args) -> int:
    from fast3d.evaluation.report import compare_reports, side_by_side_markdown, write_side_by_side
    from fast3d.evaluation.sets import read_json

    a, b = (read_json(p, "--compare report") for p in args.compare)
    for p, r in zip(args.compare, (a, b)):
        if not isinstance(r, dict) or not isinstance(r.get("mean"), dict) or not isinstance(r.get("per_sample"), list):
            raise ValueError(f"--compare {p!r} is not a fast3d eval report (no 'mean' and 'per_sample')")
    if not args.out:
        if args.paper:
            raise ValueError("--paper quotes a paper's numbers in a written report: give --out with --compare")
        print(compare_reports(a, b), end="")
        return 0
    names = [os.path.splitext(os.path.basename(p))[0] for p in args.compare]
    if names[0] == names[1]:
        names = ["A", "B"]
    r = write_side_by_side(args.out, list(zip(names, (a, b))), args.paper)
    print(side_by_side_markdown(r), end="")
    print(f"wrote {args.out}")
    return 0


def _side_by_side(args, kind: str, model_dir: str) -> int:
    from fast3d.evaluation.report import evaluate_side_by_side, markdown_path, side_by_side_markdown
    from fast3d.models import checkpoints

    base_dir = checkpoints.resolve_checkpoint(args.baseline)
    base_kind = checkpoints.model_type(base_dir)
    if base_kind != kind:
        raise ValueError(f"--baseline {args.baseline!r} holds a {base_kind!r} model; --checkpoint holds a {kind!r} "
                         f"one: side by side needs two models of one kind")
    r = evaluate_side_by_side(_reconstructor(args, kind), [("baseline", base_dir), ("checkpoint", model_dir)],
                              args.out, paper=args.paper)
    print(side_by_side_markdown(r), end="")
    print(f"wrote {args.out} and {markdown_path(args.out)}")
    return 0


def cmd_eval(args, fail) -> int:
    try:
        if args.compare:
            return _compare(args)
        if not args.out:
            raise ValueError("--out is required (or --compare A.json B.json)")
        if args.mv_model or args.recon:
            if args.baseline or args.paper:
                raise ValueError("--baseline/--paper are for reconstructors (--checkpoint with --data), not pipelines")
            if not (args.mv_model and args.recon) or args.checkpoint or args.data:
                raise ValueError("a pipeline is --mv-model and --recon together, without --checkpoint or --data")
            r = _pipeline(args)
            return _done(r, args.out)
        if not args.checkpoint:
            raise ValueError("--checkpoint is required (or --mv-model and --recon, or --compare A.json B.json)")
        from fast3d.models import checkpoints

        model_dir = checkpoints.resolve_checkpoint(args.checkpoint)
        kind = checkpoints.model_type(model_dir)
        if kind not in KINDS:
            raise ValueError(f"--checkpoint {args.checkpoint!r} holds a {kind!r} model; fast3d eval takes "
                             f"{', '.join(KINDS)}")
        if kind in ("lgm", "lrm"):
            if not args.data:
                raise ValueError(f"an {kind} model is evaluated on --data (fast3d shards or a GSO-style folder)")
            if args.prompts or args.images or args.reference or args.fid_backbone:
                raise ValueError(f"--prompts/--images/--reference/--fid-backbone are for generators; an {kind} model "
                                 f"takes --data (and --clip)")
            if args.baseline:
                return _side_by_side(args, kind, model_dir)
            if args.paper:
                raise ValueError("--paper quotes a paper's numbers beside a side-by-side report: give --baseline "
                                 "(or --compare A.json B.json --out)")
            r = _reconstructor(args, kind)(model_dir, args.out)
        else:
            if args.data:
                raise ValueError(f"--data is for reconstructors; a {kind} model takes --prompts / --images")
            if args.baseline or args.paper:
                raise ValueError(f"--baseline/--paper are for reconstructors (lgm, lrm); got a {kind} model")
            r = _generative(args, kind, model_dir)
    except ValueError as e:
        return fail("eval", str(e))
    return _done(r, args.out)


def _done(r: dict, out: str) -> int:
    from fast3d.evaluation.report import markdown_path

    print(json.dumps({"samples": r["samples"], "mean": r["mean"], "set_metrics": r["set_metrics"],
                      "backbones": r["backbones"]}, indent=1))
    print(f"wrote {out} and {markdown_path(out)}")
    return 0


def register(sub, fail) -> None:
    s = sub.add_parser("eval", help="evaluate a model as the papers report it (LGM/LRM: novel views and geometry; "
                                    "mvdit/mvdiff: CLIP-R, CLIP similarity, FID); --compare two reports")
    s.add_argument("--checkpoint", help="model dir, checkpoint dir or training run dir")
    s.add_argument("--mv-model", help="pipeline: the multi-view model of fast3d generate (mvdiff or mvdit)")
    s.add_argument("--recon", help="pipeline: the reconstructor of fast3d generate (lgm or lrm)")
    s.add_argument("--frames", type=int, default=8, help="pipeline: turntable renders scored a sample")
    s.add_argument("--out", help="report JSON path (a Markdown table is written beside it)")
    s.add_argument("--data", help="lgm/lrm: multi-view shard directory or GSO-style object folder")
    s.add_argument("--prompts", help="mvdit/mvdiff: prompt list (.txt one a line, .json, .jsonl)")
    s.add_argument("--images", nargs="+", help="mvdiff: input images (files or folders), paired with --prompts")
    s.add_argument("--clip", action="append", help="CLIP backbone: local transformers CLIP directory "
                                                   "(repeatable: one column per backbone; random-tiny: tests only); "
                                                   "lgm/lrm: CLIP image/text similarity of the renders")
    s.add_argument("--fid-backbone", help="Inception weights file for FID: the FID Inception "
                   "(pt_inception-2015-12-05-6726825d.pth) or torchvision's; random-tiny: tests only")
    s.add_argument("--reference", help="folder of reference images for FID")
    s.add_argument("--steps", type=int, default=20, help="mvdit/mvdiff: sampler steps")
    s.add_argument("--guidance-scale", type=float, help="mvdit/mvdiff: guidance (default 4.5 / 3.0)")
    s.add_argument("--seed", type=int, default=0, help="mvdit/mvdiff: noise seed of every sample")
    s.add_argument("--views", type=int, help="lgm/lrm: views a sample (the inputs and the held-out views scored; "
                                             "default 16 for lgm, 4 for lrm: its input and 3 novel views)")
    s.add_argument("--resolution", type=int, help="lgm/lrm: evaluation resolution (default: the model's)")
    s.add_argument("--lpips-backbone", default="imagenet", help="imagenet | random | VGG-16 weights file")
    s.add_argument("--max-samples", type=int, help="evaluate at most this many samples")
    s.add_argument("--device", help="cuda | cpu")
    s.add_argument("--baseline", help="lgm/lrm: a second model of the same kind (e.g. the base of a boost), scored on "
                                      "the same --data with the same settings; --out is one report with both side "
                                      "by side and the checkpoint's difference to it")
    s.add_argument("--paper", help="with --baseline or --compare ... --out: quote a paper's published numbers as a "
                                   "labelled reference row (mvboost: MVBoost's GSO results)")
    s.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two reports side by side (with --out: write them as one side-by-side report)")
    s.set_defaults(fn=lambda args: cmd_eval(args, fail))
