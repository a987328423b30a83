"""``fast3d generate``: an image or a prompt in, 3D out (fast3d.inference.generate)."""

from __future__ import annotations

import sys


def register(sub, fail) -> None:
    """Add ``generate`` to the top-level subparsers ``sub``; argument errors go through ``fail``."""
    s = sub.add_parser("generate", help="image or prompt to 3D: multi-view diffusion -> LGM / LRM "
                                        "(views, cameras.json, gaussians.ply or mesh.ply, turntable.gif)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", nargs="+", help="input image(s), or one folder of images (batch: OUT/<name>/ each)")
    src.add_argument("--prompt", help="a text prompt (the prompt path: a TTR multi-view DiT)")
    src.add_argument("--prompts", metavar="FILE", help="a text file of prompts, one a line (batch)")
    s.add_argument("--mv-model", required=True, metavar="DIR",
                   help="multi-view model: 'mvdiff' (fast3d train mvdiff) for --image, 'mvdit' (fast3d train ttr) "
                        "for --prompt")
    s.add_argument("--recon", required=True, metavar="DIR", help="reconstructor: an LGM or LRM model/run directory")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (batch: one subdirectory an item)")
    s.add_argument("--steps", type=int, help="sampler steps (default: 30 for --image, 20 for --prompt)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: 3.0 image, 4.5 prompt)")
    s.add_argument("--scheduler", help="--image sampler: ddim | euler | dpm (DPM-Solver++) (default: ddim)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler's noise (default: 0)")
    s.add_argument("--views", metavar="I,J,...", help="the views the reconstructor takes (default: all; they must "
                                                      "match its input rig)")
    bg = s.add_mutually_exclusive_group()
    bg.add_argument("--remove-background", metavar="MODEL_DIR",
                    help="background-removal model (a local transformers segmentation model) for opaque images")
    bg.add_argument("--keep-background", action="store_true",
                    help="use the whole image as it is (no cut-out, no re-centring)")
    s.add_argument("--frames", type=int, default=36, help="turntable frames (default: 36)")
    s.add_argument("--resolution", type=int, help="turntable resolution (default: the reconstructor's)")
    s.add_argument("--point-grid", type=int, default=128, help="LRM: density grid of points.ply")
    s.add_argument("--mesh-grid", type=int, default=128, help="LRM: marching-cubes grid of mesh.ply (0: no mesh)")
    s.add_argument("--refine-pose", type=int, default=0, metavar="STEPS",
                   help="LGM: refine the input cameras by this many LPIPS steps and redo the reconstruction from "
                        "them (MVBoost); writes cameras_refined.json with the LPIPS before and after")
    s.add_argument("--lpips-backbone", default="imagenet",
                   help="--refine-pose's LPIPS: imagenet | random | a VGG-16 weights file")
    s.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    s.set_defaults(fn=lambda args: cmd_generate(args, fail))


def cmd_generate(args, fail) -> int:
    from fast3d.inference import generate

    settings = generate.Settings(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, seed=args.seed,
                                 views=args.views, keep_background=args.keep_background,
                                 turntable_frames=args.frames, turntable_resolution=args.resolution,
                                 point_grid=args.point_grid, mesh_grid=args.mesh_grid,
                                 refine_pose=args.refine_pose, lpips_backbone=args.lpips_backbone)
    try:
        r = generate.run(args.mv_model, args.recon, args.out, images=args.image, prompt=args.prompt,
                         prompts_file=args.prompts, settings=settings, device=args.device,
                         remove_background=args.remove_background)
    except ValueError as e:
        return fail("generate", str(e))
    if r["failed"]:
        print(f"fast3d generate: {len(r['failed'])} item(s) failed: {', '.join(r['failed'])}", file=sys.stderr)
        return 1
    return 0
