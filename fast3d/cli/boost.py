"""``fast3d datagen boost``: MVBoost's pseudo ground truth (multi-view diffusion -> LGM -> renders
refined by SDEdit) into ``boost`` shards (:mod:`fast3d.datagen.boost`), added to the ``datagen``
group of :mod:`fast3d.cli`."""

from __future__ import annotations

import json


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


def register(sub, fail) -> None:
    """Add ``boost`` to the ``datagen`` subcommands of the top-level parser ``sub``."""
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
