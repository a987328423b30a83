"""``fast3d datagen mvllm-records``: instruction-tuning records for ``fast3d train mvllm`` from the
captions of multi-view shards (:func:`fast3d.datagen.mvllm.caption_records`), so the recipe's tiny
demo runs on procedural data without the paper's GPT-4V annotations."""

from __future__ import annotations

import json


def _records(fail):
    def cmd(args) -> int:
        from fast3d.datagen.mvllm import caption_records

        try:
            r = caption_records(args.data, args.out, score=args.score, seed=args.seed)
        except ValueError as e:
            return fail("datagen mvllm-records", str(e))
        print(json.dumps(r))
        return 0
    return cmd


def register(sub, fail) -> None:
    """Add ``mvllm-records`` to the ``datagen`` subcommands of the top-level parser ``sub``."""
    d = sub.choices["datagen"].subcommands.add_parser(
        "mvllm-records", help="JSONL records (key, description, score, reasoning) for `fast3d train mvllm` from "
                              "the captions of multi-view shards (a demo stand-in for GPT-4V's annotations)")
    d.add_argument("--data", required=True, help="directory of multi-view shards (e.g. datagen procedural)")
    d.add_argument("--out", required=True, help="the JSONL file to write")
    d.add_argument("--score", type=int, help="the grade of every record, 1..5 (default: seeded random grades)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random grades")
    d.set_defaults(fn=_records(fail))
