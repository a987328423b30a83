"""``fast3d sample mvdiff``: the rig's views of the object in one image from a trained image-conditioned
multi-view diffusion model (:mod:`fast3d.inference.mvdiff`), added to the ``sample`` group of
:mod:`fast3d.cli`. Writes ``OUT/view<i>.png`` and ``OUT/cameras.json`` (``viewmats``, ``Ks``,
``width``, ``height``; OpenCV convention, the input's view first). The image is taken as it is
(alpha composited over the model's background): centring and background removal are
``fast3d generate``'s."""

from __future__ import annotations

import argparse
import json
import os


def _sample(fail):
    def cmd(args) -> int:
        from PIL import Image

        from fast3d.inference.common import load_image
        from fast3d.inference.mvdiff import load_mvdiff, sample_views
        from fast3d.io.atomic import atomic_open, atomic_path
        from fast3d.io.images import to_uint8

        try:
            model = load_mvdiff(args.checkpoint, device=args.device)
            image = load_image(args.image, background=model.config.background)     # [3, H, W]
            out = sample_views(model, image, steps=args.steps, guidance_scale=args.guidance_scale,
                               scheduler=args.scheduler, seed=args.seed)
        except ValueError as e:
            return fail("sample mvdiff", str(e).replace("model_dir", "--checkpoint", 1))
        os.makedirs(args.out, exist_ok=True)
        paths = []
        for i, view in enumerate(out["images"]):
            path = os.path.join(args.out, f"view{i}.png")
            with atomic_path(path) as tmp:
                Image.fromarray(to_uint8(view)).save(tmp, format="PNG")
            paths.append(path)
        R = out["images"].shape[-1]
        with atomic_open(os.path.join(args.out, "cameras.json")) as f:
            json.dump({"viewmats": out["viewmats"].tolist(), "Ks": out["Ks"].tolist(), "width": R, "height": R,
                       "rig": model.config.rig}, f)
        print(json.dumps({"views": paths, "cameras": os.path.join(args.out, "cameras.json")}))
        return 0
    return cmd


def register(sub, fail) -> None:
    """Add ``mvdiff`` to the ``sample`` subcommands of the top-level parser ``sub``."""
    sample = sub.choices["sample"]
    ssub = next(a for a in sample._actions if isinstance(a, argparse._SubParsersAction))
    s = ssub.add_parser("mvdiff", help="the rig's views of the object in one image (image-conditioned multi-view "
                                       "diffusion)")
    s.add_argument("--checkpoint", required=True, help="model dir, checkpoint dir or training run dir")
    s.add_argument("--image", required=True, help="the input view (the object centred on the model's background)")
    s.add_argument("--out", required=True, help="output directory: view<i>.png, cameras.json")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--guidance-scale", type=float, default=3.0)
    s.add_argument("--scheduler", default="ddim", help="ddim | euler | dpm")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    s.set_defaults(fn=_sample(fail))
