"""More ``fast3d datagen`` subcommands (added to the ``datagen`` group of :mod:`fast3d.cli`):

* ``datagen images``: a folder of 2D images -> ``image2d`` shards for TTR training, tiled 4x, with
  captions from the caption stage (:mod:`fast3d.datagen.image2d`); unreadable files are skipped and
  counted.
* ``datagen prompts``: object-centric prompts from a local causal LM and an in-context template,
  de-duplicated, seeded, resumable (:mod:`fast3d.datagen.prompts_llm`), for the pipeline's
  ``prompts.file``.
"""

from __future__ import annotations

import json


def _images(fail):
    def cmd(args) -> int:
        from fast3d.datagen.image2d import images_to_shards

        try:
            r = images_to_shards(args.images, args.out, args.caption_model, resolution=args.resolution,
                                 samples_per_shard=args.samples_per_shard, max_tokens=args.max_tokens,
                                 batch_size=args.batch_size, device=args.device)
        except ValueError as e:
            return fail("datagen images", str(e))
        print(json.dumps(r, indent=1))
        return 0
    return cmd


def _prompts(fail):
    def cmd(args) -> int:
        from fast3d.datagen.prompts_llm import PromptLMConfig, generate_prompts

        try:
            cfg = PromptLMConfig(model=args.model, count=args.count, template=args.template, examples=args.examples,
                                 shots=args.shots, per_call=args.per_call, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                 max_calls=args.max_calls)
            r = generate_prompts(cfg, args.out, device=args.device)
        except ValueError as e:
            return fail("datagen prompts", str(e))
        print(json.dumps(r))
        return 0
    return cmd


def register(sub, fail) -> None:
    """Add ``images`` and ``prompts`` to the ``datagen`` subcommands of the top-level parser ``sub``."""
    dsub = sub.choices["datagen"].subcommands
    d = dsub.add_parser("images", help="a folder of 2D images (SA-1B-like) into image2d shards for TTR: 4 tiled "
                                       "views, captions from the caption stage (resumable)")
    d.add_argument("--images", required=True, help="folder of image files (searched recursively)")
    d.add_argument("--out", required=True, help="output directory (image2d-NNNNNN.tar, dataset.json)")
    d.add_argument("--caption-model", required=True, help="local BLIP directory (random-tiny: tests only)")
    d.add_argument("--resolution", type=int, default=512, help="side of the square views (default 512)")
    d.add_argument("--samples-per-shard", type=int, default=256)
    d.add_argument("--max-tokens", type=int, default=40, help="caption length limit")
    d.add_argument("--batch-size", type=int, default=16, help="images per captioning call")
    d.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    d.set_defaults(fn=_images(fail))

    d = dsub.add_parser("prompts", help="object-centric prompts from a local causal LM with an in-context template "
                                        "(de-duplicated, seeded, resumable)")
    d.add_argument("--model", required=True, help="local causal-LM directory (random-tiny: tests only)")
    d.add_argument("--out", required=True, help="prompts file to write, one a line (state in OUT.state.json)")
    d.add_argument("--count", type=int, required=True, help="unique prompts wanted")
    d.add_argument("--template", help="template file holding {examples} (default: a built-in one)")
    d.add_argument("--examples", help="file of example prompts, one a line (default: built-in ones)")
    d.add_argument("--shots", type=int, default=4, help="examples per call")
    d.add_argument("--per-call", type=int, default=8, help="continuations sampled per call")
    d.add_argument("--max-new-tokens", type=int, default=40)
    d.add_argument("--temperature", type=float, default=1.0)
    d.add_argument("--top-p", type=float, default=0.95)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--max-calls", type=int, help="give up after this many calls (default: 20 x what count needs)")
    d.add_argument("--device", help="cuda | cpu (default: cuda when there is one)")
    d.set_defaults(fn=_prompts(fail))
