"""``fast3d convert KIND --weights FILE_OR_DIR --out DIR``: a released checkpoint (LGM, OpenLRM
v1.1, VFusion3D, ImageDream's diffusers-format pipeline; Era3D's pipeline as an initialisation) -> a fast3d model directory for infer /
eval / generate / train --init-from (fast3d.models.convert)."""

from __future__ import annotations

import json

KINDS = ("lgm", "openlrm", "vfusion3d", "imagedream", "era3d")   # fast3d.models.convert.KINDS (not imported: --help stays fast)


def register(sub, fail) -> None:
    s = sub.add_parser("convert", help="a released checkpoint (lgm | openlrm | vfusion3d | imagedream | era3d) -> "
                                          "a fast3d model directory")
    s.add_argument("kind", metavar="KIND", help=f"one of {', '.join(KINDS)}")
    s.add_argument("--weights", required=True, metavar="FILE_OR_DIR",
                   help="the released checkpoint (.safetensors, or .pth/.bin read with torch.load(weights_only=True)), "
                        "or a directory holding it; imagedream, era3d: the diffusers pipeline directory")
    s.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (new or empty)")
    s.add_argument("--variant", help="lgm: fixrot | prefix (default: from the released file name); "
                                     "openlrm: small | base | large (default: from the shapes)")
    s.add_argument("--input-size", type=int, help="lgm: LGM's Options.input_size (default 256, every release's)")
    s.add_argument("--prompt", help="imagedream: the prompt of the fixed text context (default: empty, as LGM runs it)")
    s.add_argument("--negative-prompt", help="imagedream: the negative prompt (default: empty, as LGM runs it)")

    def run(args) -> int:
        if args.kind not in KINDS:
            return fail("convert", f"KIND must be one of {list(KINDS)}; got {args.kind!r}")
        try:
            from fast3d.models.convert import convert

            record = convert(args.kind, args.weights, args.out, variant=args.variant, input_size=args.input_size,
                             prompt=args.prompt, negative_prompt=args.negative_prompt)
        except ValueError as e:
            return fail(f"convert {args.kind}", str(e))
        print(json.dumps({k: record[k] for k in ("kind", "out", "file", "sha256", "dropped") if k in record}, indent=1))
        return 0

    s.set_defaults(fn=run)
