"""MVBoost's commands:

* ``fast3d datagen boost``: the pseudo ground truth (multi-view diffusion -> LGM -> renders refined
  by SDEdit) into ``boost`` shards (:mod:`fast3d.datagen.boost`), added to the ``datagen`` group;
* ``fast3d boost demo``: the whole method at tiny size in one resumable run (procedural objects ->
  tiny multi-view diffusion -> tiny base LGM -> pseudo ground truth -> LoRA boost on 2 CPU ranks ->
  base and boosted LGM side by side on held-out objects), ``--strengths`` sweeping the noise
  strength as MVBoost's ablation does (:mod:`fast3d.cli._boost_demo`)."""

from __future__ import annotations

import json
import os
import sys


def _boost(fail):
    def cmd(args) -> int:
        from fast3d.datagen.boost import BoostConfig, run
        from fast3d.inference.generate import parse_views

        try:
            views = None
            if args.views is not None:  # indices checked against the model's views when it is loaded
                views = tuple(parse_views(args.views, 1 << 30))
            cfg = BoostConfig(strength=args.strength, seed=args.seed, steps=args.steps, guidance=args.guidance,
                              scheduler=args.scheduler, views=views, samples_per_shard=args.samples_per_shard,
                              preview=args.preview)
            results = run(args.images, args.mv_model, args.recon, args.out, cfg, workers=args.workers,
                          device=args.device)
        except ValueError as e:
            return fail("datagen boost", str(e))
        total = {k: sum(r[k] for r in results) for k in ("shards_written", "shards_skipped", "samples",
                                                           "resumed_items")}
        total["bad_images"] = {p: e for r in results for p, e in r["bad_images"].items()}
        print(json.dumps(total, indent=1))
        return 0
    return cmd


def _demo(fail):
    def cmd(args) -> int:
        from fast3d.cli import _boost_demo as boost_demo

        try:
            r = boost_demo.run(args.out, boost_demo.config_from_args(args), until=args.until, redo=args.redo,
                               device=args.device)
        except ValueError as e:
            return fail("boost demo", str(e))
        except RuntimeError as e:  # a training that failed: a rerun resumes it
            print(f"fast3d boost demo: failed: {e}", file=sys.stderr)
            return 1
        print("stages (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in r["stages"].items()))
        if "table" in r:
            print(r["table"], end="")
            print(f"report: {os.path.join(r['out'], 'eval', 'report.json')} (and report.md beside it)")
        else:
            print(f"stopped after --until {args.until}: {r['out']}")
        return 0
    return cmd


def register(sub, fail) -> None:
    """Add ``boost`` to the ``datagen`` subcommands of the top-level parser ``sub``, and the
    ``boost`` command group (``boost demo``)."""
    from fast3d.cli._boost_demo import STAGES, DemoConfig

    b = sub.add_parser("boost", help="MVBoost at tiny size: the end-to-end demo and its noise-strength sweep")
    bsub = b.add_subparsers(dest="boost_cmd", required=True)
    d0 = DemoConfig()
    m = bsub.add_parser("demo", help="procedural objects -> tiny MV diffusion -> tiny base LGM -> pseudo ground "
                                     "truth -> LoRA boost (DeepSpeed) -> base vs boosted on held-out objects, in one "
                                     "resumable run")
    m.add_argument("--out", required=True, help="demo directory (data/, runs/, configs/, stages/, eval/report.json)")
    m.add_argument("--preset", default="demo", help="sizes: demo (the defaults below; a few minutes on 2 free CPU "
                                                    "cores) | smoke (every stage in the fewest steps: CI)")
    m.add_argument("--strengths", type=float, nargs="+",
                   help="SDEdit noise strengths in (0, 1], one boost each (default 0.95; the ablation: 0.8 0.9 0.95 1.0)")
    m.add_argument("--train-objects", type=int, help=f"procedural training objects (default {d0.train_objects})")
    m.add_argument("--boost-images", type=int, help=f"input images of the boost (default {d0.boost_images})")
    m.add_argument("--heldout-objects", type=int, help=f"held-out objects scored (default {d0.heldout_objects})")
    m.add_argument("--resolution", type=int, help=f"procedural view pixels (default {d0.resolution})")
    m.add_argument("--gaussians", type=int, help=f"Gaussians a procedural object (default {d0.gaussians})")
    m.add_argument("--mvdiff-steps", type=int, help=f"diffusion model training steps (default {d0.mvdiff_steps})")
    m.add_argument("--lgm-steps", type=int, help=f"base LGM training steps (default {d0.lgm_steps})")
    m.add_argument("--boost-steps", type=int, help=f"LoRA training steps a boost (default {d0.boost_steps})")
    m.add_argument("--sampler-steps", type=int, help=f"datagen boost --steps (default {d0.sampler_steps})")
    m.add_argument("--guidance", type=float, help=f"datagen boost --guidance (default {d0.guidance:g})")
    m.add_argument("--lora", type=int, help=f"LoRA rank (default {d0.lora}, MVBoost's)")
    m.add_argument("--ranks", type=int, help=f"DeepSpeed ranks of each training (default {d0.ranks})")
    m.add_argument("--seed", type=int, help=f"seed of the data, the trainings and the sampling (default {d0.seed})")
    m.add_argument("--lpips-backbone", help="evaluation LPIPS: random (offline stand-in, reported as lpips_random; "
                                            "the default) | imagenet | a VGG-16 weights file")
    m.add_argument("--mv-model", help="an existing mvdiff model (lgm4 rig) instead of training one")
    m.add_argument("--base", help="an existing base LGM instead of training one")
    m.add_argument("--until", default="eval", help=f"the last stage to run: {' | '.join(STAGES)} (default eval)")
    m.add_argument("--redo", help=f"run this stage and every one after it again: {' | '.join(STAGES)}")
    m.add_argument("--device", help="cuda | cpu for the pseudo ground truth and the evaluation")
    m.set_defaults(fn=_demo(fail))

    d = sub.choices["datagen"].subcommands.add_parser(
        "boost", help="MVBoost pseudo ground truth: multi-view diffusion -> LGM -> renders refined by SDEdit, "
                      "into boost shards (resumable, seeded)")
    d.add_argument("--images", nargs="+", required=True,
                   help="a folder of images, image files, or a .txt/.lst file listing image paths")
    d.add_argument("--mv-model", required=True, help="image-conditioned multi-view diffusion model (mvdiff) dir")
    d.add_argument("--recon", required=True, help="LGM dir whose input rig takes the multi-view model's views")
    d.add_argument("--out", required=True, help="dataset dir (boost-NNNNNN.tar, dataset.json, preview/)")
    d.add_argument("--strength", type=float, default=0.95, help="SDEdit noise strength in (0, 1] (default 0.95)")
    d.add_argument("--views", help="the multi-view model's views the LGM takes, e.g. 0,2,3,4 (default: all)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=30, help="sampler steps (the refinement runs steps x strength)")
    d.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance weight")
    d.add_argument("--scheduler", default="ddim", help="ddim | euler | dpm")
    d.add_argument("--samples-per-shard", type=int, default=16)
    d.add_argument("--preview", type=int, default=4, help="items with a side-by-side preview PNG (the first ones)")
    d.add_argument("--workers", type=int, default=1, help="local worker processes")
    d.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    d.set_defaults(fn=_boost(fail))
