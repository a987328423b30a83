"""``fast3d refine``: Magic-Boost's SDS refinement of a coarse 3DGS asset with the multi-view
conditioned diffusion model and the Anchor Iterative Update (:mod:`fast3d.inference.refine`)."""

from __future__ import annotations


def register(sub, fail) -> None:
    """Add ``refine`` to the top-level subparsers ``sub``; argument errors go through ``fail``."""
    from fast3d.inference.refine import RefineSettings

    d = RefineSettings()
    s = sub.add_parser("refine", help="Magic-Boost: refine a coarse 3DGS asset by SDS from a multi-view conditioned "
                                      "diffusion model (refined.ply, before/after turntable.gif, report.json)")
    s.add_argument("--ply", required=True, help="the coarse asset: a 3DGS PLY (fast3d infer / generate's gaussians.ply)")
    s.add_argument("--anchors", nargs="+", required=True, metavar="DIR_OR_IMAGES",
                   help="the K anchor views: one folder (images sorted by name) or the image files")
    s.add_argument("--cameras", required=True, metavar="JSON",
                   help="the anchors' cameras: {viewmats | c2w, Ks[, width, height]} (fast3d infer's format)")
    s.add_argument("--model", required=True, metavar="DIR", help="a Magic-Boost model (fast3d train magicboost)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (a killed run resumes from it)")
    s.add_argument("--steps", type=int, default=d.steps, help=f"optimisation steps (default {d.steps})")
    s.add_argument("--t-range", type=float, nargs=2, default=d.t_range, metavar=("LO", "HI"),
                   help=f"SDS timesteps as fractions of the schedule, in (0, 1) (default {d.t_range[0]} "
                        f"{d.t_range[1]})")
    s.add_argument("--views-per-step", type=int, default=d.views_per_step,
                   help=f"random views rendered per step (default {d.views_per_step})")
    s.add_argument("--guidance", type=float, default=d.guidance_scale,
                   help=f"classifier-free guidance scale (default {d.guidance_scale})")
    s.add_argument("--sds-weight", type=float, default=d.sds_weight,
                   help=f"the SDS loss's weight (0: the anchor loss alone; default {d.sds_weight})")
    s.add_argument("--elevation", type=float, nargs=2, default=d.elevation_deg, metavar=("LO", "HI"),
                   help=f"the random views' elevation range in degrees (default {d.elevation_deg[0]:g} "
                        f"{d.elevation_deg[1]:g})")
    s.add_argument("--aiu", action="store_true", default=d.aiu,
                   help="the Anchor Iterative Update loss (the default)")
    s.add_argument("--no-aiu", dest="aiu", action="store_false", help="SDS alone")
    s.add_argument("--aiu-every", type=int, default=d.aiu_every,
                   help=f"steps between anchor updates (default {d.aiu_every})")
    s.add_argument("--aiu-strength", type=float, default=d.aiu_strength,
                   help=f"the fraction of --aiu-denoise-steps an anchor update runs (its noise level), in (0, 1] "
                        f"(default {d.aiu_strength})")
    s.add_argument("--aiu-denoise-steps", type=int, default=d.aiu_denoise_steps,
                   help=f"DDIM steps over the whole schedule for an anchor update (default {d.aiu_denoise_steps})")
    s.add_argument("--aiu-loss", default=d.aiu_loss, help="l1 | mse (default l1)")
    s.add_argument("--aiu-weight", type=float, default=d.aiu_weight, help=f"(default {d.aiu_weight})")
    s.add_argument("--lr-scale", type=float, default=d.lr_scale, help="scales every learning rate (default 1)")
    s.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help=f"steps between checkpoints (default {d.checkpoint_every})")
    s.add_argument("--frames", type=int, default=d.turntable_frames,
                   help=f"turntable frames (default {d.turntable_frames})")
    s.add_argument("--seed", type=int, default=d.seed, help=f"(default {d.seed})")
    s.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    s.set_defaults(fn=lambda args: cmd_refine(args, fail))


def cmd_refine(args, fail) -> int:
    from fast3d.inference.refine import RefineSettings, refine

    try:
        settings = RefineSettings(steps=args.steps, t_range=tuple(args.t_range), views_per_step=args.views_per_step,
                                  guidance_scale=args.guidance, sds_weight=args.sds_weight,
                                  elevation_deg=tuple(args.elevation), aiu=args.aiu, aiu_every=args.aiu_every,
                                  aiu_strength=args.aiu_strength, aiu_denoise_steps=args.aiu_denoise_steps,
                                  aiu_loss=args.aiu_loss, aiu_weight=args.aiu_weight,
                                  lr_scale=args.lr_scale, checkpoint_every=args.checkpoint_every, seed=args.seed,
                                  turntable_frames=args.frames)
        refine(args.ply, args.anchors, args.cameras, args.model, args.out, settings, device=args.device)
    except ValueError as e:
        return fail("refine", str(e))
    return 0
