"""``fast3d magicboost demo``: Magic-Boost's demonstration at tiny size (a held-out procedural
object degraded, refined with the Anchor Iterative Update on and off, held-out-view PSNR before and
after; :mod:`fast3d.inference.refine_demo`)."""

from __future__ import annotations

import json


def _demo(fail):
    def cmd(args) -> int:
        from fast3d.inference.refine_demo import demo

        try:
            r = demo(args.model, args.heldout, args.out, args.steps, args.seed, device=args.device)
        except ValueError as e:
            return fail("magicboost demo", str(e))
        print(f"held-out-view PSNR (dB), 12 views: true asset {r['true asset']:.2f} | degraded {r['degraded']:.2f} | "
              f"refined, AIU on {r['refined, AIU on']:.2f} | refined, AIU off {r['refined, AIU off']:.2f}")
        print(json.dumps(r))
        return 0
    return cmd


def register(sub, fail) -> None:
    """Add the ``magicboost`` command group (``magicboost demo``) to the top-level parser ``sub``."""
    m = sub.add_parser("magicboost", help="Magic-Boost at tiny size: the refinement demonstration")
    msub = m.add_subparsers(dest="magicboost_cmd", required=True)
    d = msub.add_parser("demo", help="degrade a held-out procedural object, refine it with AIU on and off, print "
                                     "held-out-view PSNR before and after")
    d.add_argument("--model", required=True, help="a Magic-Boost model directory or training run")
    d.add_argument("--heldout", required=True, help="procedural shards with PLYs (its first object is used)")
    d.add_argument("--out", required=True, help="output directory (anchors/, coarse.ply, aiu/, sds/)")
    d.add_argument("--steps", type=int, default=200, help="refinement steps of each run (default 200)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    d.set_defaults(fn=_demo(fail))
