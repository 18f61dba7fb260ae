"""``minivlm eval``: score a checkpoint on test data, each task with its metric.

    minivlm eval --model runs/tiny/model --data easy_vqa,charts,multi_image,video --limit 200
    minivlm eval --model runs/tiny/model --data retrieval --json

Closed answers are scored by normalised exact match (per question type), captions by BLEU-4
and CIDEr-D, image-caption pairs by retrieval recall@k when the model has a retrieval head
(see :mod:`minivlm.eval.runner`).
"""

from __future__ import annotations

import argparse
import json

from minivlm.cli.common import add_model_arguments, load_model


def register(subparsers: argparse._SubParsersAction) -> None:
    from minivlm.data import available_datasets
    from minivlm.eval.runner import SCORING_MODES

    p = subparsers.add_parser(
        "eval", help="score a checkpoint on test data (VQA accuracy, BLEU-4/CIDEr, recall@k)",
        description="Evaluate every source of a dataset spec on its test split and print one table.")
    add_model_arguments(p)
    p.add_argument("--data", required=True, metavar="SPEC",
                   help=f"dataset spec, e.g. easy_vqa,charts or jsonl:path.jsonl; known: {', '.join(available_datasets())}")
    p.add_argument("--limit", type=int, metavar="N", help="score the first N samples of each source")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--scoring", default="generate", choices=SCORING_MODES,
                   help="generate answers greedily, or pick the most likely answer of each question type")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=24, metavar="N", help="longest generated answer")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic test sets")
    p.add_argument("--json", action="store_true", help="print metrics, counts and seconds as JSON")
    p.add_argument("--samples", type=int, default=0, metavar="N", help="also show the first N predictions")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from minivlm.data import parse_spec
    from minivlm.eval.runner import evaluate_spec

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    parse_spec(args.data)  # a misspelt dataset fails before the model loads
    model = load_model(args)
    report = evaluate_spec(model, args.data, split=args.split, limit=args.limit, seed=args.seed,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, scoring=args.scoring,
                           progress=not (args.no_progress or args.json))
    if args.json:
        print(json.dumps(report.to_dict(args.samples), indent=2))
        return 0
    print(report.table())
    for p in report.predictions[: args.samples]:
        mark = "" if p.correct is None else ("  ok" if p.correct else "  WRONG")
        print(f"  [{p.task}] {p.question!r} -> {p.prediction!r} (expected {p.answer!r}){mark}")
    print(f"\n{len(report.predictions)} samples in {report.seconds:.1f} s")
    return 0
