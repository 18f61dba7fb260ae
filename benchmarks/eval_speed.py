"""What makes the main job's evaluation fast on a small CPU, each measured A/B, interleaved, in one process.

Run from the repository root, on a model the main job trained (``make demo`` writes one)::

    python -m benchmarks.eval_speed --model runs/main_job/seed0/model [--rounds 2] [--threads 1] [--out DIR]

Rows:

* ``encode``: the whole evaluation of ``minivlm train`` (:func:`minivlm.train.recipe.evaluate_run`:
  all 9,673 easy-VQA test questions plus 200 of each synthetic task), each distinct image of a
  generation batch encoded once (:meth:`VisionLanguageModel.encode_images` without gradients) vs
  every image row encoded (easy-VQA asks ~9 questions about each image, each its own conversation);
* ``render``: one processor call on 64 easy-VQA generation prompts, the batch sharing one
  :class:`~minivlm.text.processor.MediaCache` (each image object preprocessed once) vs every
  prompt rendered on its own.

A trained model matters: an untrained one never stops before ``max_new_tokens``, so its generation
times say nothing about the main job's. The ``encode`` row also checks that both ways score every
metric the same. Note the load (``uptime``) with the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from benchmarks.common import environment
from benchmarks.cpu_speed import interleaved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a trained model directory (runs/<name>/model)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the main job's loaded run used 1)")
    parser.add_argument("--eval-limit", type=int, default=None, help="easy-VQA questions (default: all 9,673)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"eval_speed: no model at {args.model} (expected a directory with config.json; "
              f"`minivlm train` writes runs/<name>/model)", file=sys.stderr)
        return 2

    from minivlm.data import build_dataset
    from minivlm.data.collate import pad_collate
    from minivlm.eval.runner import prompt_of
    from minivlm.model import VisionLanguageModel
    from minivlm.train.recipe import evaluate_run

    torch.set_num_threads(args.threads)
    model = VisionLanguageModel.from_pretrained(args.model).eval()
    rows, reports = [], {}

    def evaluate(distinct_once: bool):
        if distinct_once:
            model.__dict__.pop("encode_images", None)  # the class's method
        else:
            model.encode_images = model._encode  # every row through the encoder, as before
        reports[distinct_once] = evaluate_run(model, model.config, eval_limit=args.eval_limit)

    try:
        rows.append(("evaluation: each distinct image encoded once / every image row",
                     *interleaved(lambda: evaluate(True), lambda: evaluate(False), args.rounds)))
    finally:
        model.__dict__.pop("encode_images", None)
    same_metrics = reports[True].metrics == reports[False].metrics

    processor = model.processor
    data = build_dataset("easy_vqa", "test", seed=0, image_size=model.config.encoder.image_size)
    prompts = [prompt_of(data[i]) for i in range(64)]

    def each_alone():
        samples = [processor.render(p, add_generation_prompt=True) for p in prompts]
        return pad_collate(samples, processor.tokenizer.pad_id, "left")

    batched = processor(prompts, add_generation_prompt=True, padding_side="left")
    if not torch.equal(batched["pixel_values"], each_alone()["pixel_values"]):
        raise AssertionError("the batch's shared media cache changed the pixels")
    rows.append(("processor call on 64 easy-VQA prompts: one media cache / each alone",
                 *interleaved(lambda: processor(prompts, add_generation_prompt=True, padding_side="left"),
                              each_alone, args.rounds * 5)))

    load = os.getloadavg()
    lines = [f"evaluation A/B, interleaved, {args.rounds} rounds, {args.threads} thread(s) "
             f"(load after: {load[0]:.2f}); metrics identical both ways: {same_metrics}",
             "| what | A s | B s | A / B |", "|---|---|---|---|"]
    lines += [f"| {name} | {a:.4g} | {b:.4g} | {a / b:.2f} |" for name, a, b in rows]
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval_speed.json").write_text(json.dumps(
            {"environment": environment(torch.device("cpu")), "load": load, "threads": args.threads,
             "model": str(args.model), "same_metrics": same_metrics,
             "metrics": reports[True].metrics,
             "rows": [{"what": n, "a_s": a, "b_s": b} for n, a, b in rows]}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
