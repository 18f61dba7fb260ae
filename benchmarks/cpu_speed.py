"""What makes the main job's steps fast on a small CPU, each measured A/B, interleaved, in one process.

Run from the repository root::

    python -m benchmarks.cpu_speed [--rounds 5] [--out DIR]

Rows (``tiny``, the main job's data, real rendered batches):

* ``adamw``: one optimizer step, the fused AdamW kernel vs the default for-each path;
* ``render``: rendering one grouped easy-VQA item (~10 questions about one image), its image
  preprocessed once for the group (:class:`minivlm.text.processor.MediaCache`) vs once per question;
* ``step``: one whole training step (forward, backward, optimizer) under 1 vs 2 (all) threads:
  which is faster depends on what else the machine runs, which is why the trainer measures it
  (:mod:`minivlm.train.threads`);
* ``contrastive``: one training step with and without the contrastive image-caption term
  (``train.retrieval_weight``, :mod:`minivlm.train.contrastive`): what retrieval costs the main job;
* ``precision``: one training step under bf16 autocast vs fp32 (``train.precision``): CPUs with
  AVX-512 BF16 or AMX multiply bf16 ~3x faster than fp32 at the main job's shapes;
* ``layer_norm``: one bf16 training step with the encoder's :class:`minivlm.layers.norms.LayerNorm`
  (bf16 input normalised in fp32) vs PyTorch's ``nn.LayerNorm``; after the table, how far each
  one's weight and bias gradients are from an fp32 reference on one batch (relative L2), beside
  the median over all other parameters: why the encoder does not use PyTorch's as it is.

Each row alternates A B A B for ``--rounds`` rounds and reports the medians and their ratio.
Note the load (``uptime``) with the numbers: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment


def interleaved(a, b, rounds: int, repeat: int = 1) -> tuple[float, float]:
    """Median seconds of ``a()`` and of ``b()``, called alternately ``rounds`` times each."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for _ in range(rounds):
        for name, fn in (("a", a), ("b", b)):
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - t0) / repeat)
    return statistics.median(times["a"]), statistics.median(times["b"])


def use_norm(norms, cls) -> None:
    """Make every module of ``norms`` a ``cls`` (minivlm's LayerNorm or ``nn.LayerNorm``: same state)."""
    for m in norms:
        m.__class__ = cls


def norm_gradient_errors(model, norms, batch) -> dict:
    """Relative L2 error of bf16-autocast gradients against fp32 ones on ``batch``: the (min, max)
    over the weights and biases of ``norms`` as minivlm's LayerNorm and as ``nn.LayerNorm``, and
    the median over every other parameter (with minivlm's)."""
    from minivlm.layers.norms import LayerNorm
    from minivlm.train.precision import autocast

    def grads(precision: str) -> dict:
        model.zero_grad(set_to_none=True)
        with autocast(precision, torch.device("cpu")):
            loss = model(**batch).loss
        loss.backward()
        return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}

    def rel(a, ref):
        return ((a - ref).norm() / ref.norm().clamp_min(1e-12)).item()

    norm_params = {id(p) for m in norms for p in m.parameters()}
    in_norms = {name for name, p in model.named_parameters() if id(p) in norm_params}
    reference = grads("fp32")
    errors: dict = {}
    for cls, label in ((LayerNorm, "LayerNorm"), (torch.nn.LayerNorm, "nn.LayerNorm")):
        use_norm(norms, cls)
        g = grads("bf16")
        errs = [rel(g[n], reference[n]) for n in in_norms]
        errors[label] = (min(errs), max(errs))
        if cls is LayerNorm:
            errors["others"] = statistics.median(rel(g[n], reference[n]) for n in g if n not in in_norms)
    model.zero_grad(set_to_none=True)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    from minivlm.config import preset
    from minivlm.data import build_dataset
    from minivlm.layers.norms import LayerNorm
    from minivlm.model import VisionLanguageModel
    from minivlm.text.processor import MediaCache
    from minivlm.train.data import make_loader
    from minivlm.train.recipe import attach_tokenizer, build_processor, build_tokenizer
    from minivlm.train.trainer import Trainer

    cfg = preset("tiny")
    data = build_dataset(cfg.data.mixture, "train", seed=0, image_size=cfg.encoder.image_size)
    tokenizer = build_tokenizer(data, cfg.decoder.vocab_size)
    processor = build_processor(attach_tokenizer(cfg, tokenizer), tokenizer)
    torch.manual_seed(0)
    model = VisionLanguageModel(cfg.validate())
    rows = []

    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    fused, foreach = (torch.optim.AdamW(params, lr=1e-4, fused=f) for f in (True, False))
    rows.append(("adamw: fused / for-each", *interleaved(fused.step, foreach.step, args.rounds, repeat=10)))

    groups = build_dataset("easy_vqa_grouped", "train", seed=0, image_size=cfg.encoder.image_size)
    items = [groups[i] for i in range(40)]

    def render(shared: bool):
        for item in items:
            cache = MediaCache() if shared else None
            for sample in item:
                processor.render(sample["messages"], for_training=True, media_cache=cache)

    once, each = interleaved(lambda: render(True), lambda: render(False), args.rounds)
    rows.append(("render a grouped item: image once / per question", once / len(items), each / len(items)))

    with tempfile.TemporaryDirectory() as run_dir:
        cfg.train.save_every = 0
        trainer = Trainer(model, processor, data, run_dir, progress=False)
        sampler, dataset = trainer._sampler_and_data()
        loader = make_loader(dataset, processor, sampler, packing=cfg.data.packing, max_length=cfg.data.max_length,
                             loss_weighting=cfg.train.loss_weighting)
        batches = iter(loader)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

        def step(threads: int):
            torch.set_num_threads(threads)
            trainer._train_step(batches)

        step(cores)  # warm-up
        rows.append((f"train step: 1 thread / {cores} threads",
                     *interleaved(lambda: step(1), lambda: step(cores), args.rounds)))

        objective = trainer.contrastive  # tiny trains retrieval beside generation (train.retrieval_weight)

        def step_with(contrastive: bool):
            trainer.contrastive = objective if contrastive else None
            step(cores)

        rows.append((f"train step ({cores} threads): with / without the contrastive term "
                     f"({cfg.train.retrieval_batch_size} pairs)",
                     *interleaved(lambda: step_with(True), lambda: step_with(False), args.rounds)))
        trainer.contrastive = objective  # the precision row times the main job's whole step

        def step_in(precision: str):
            trainer.precision = precision
            step(cores)

        rows.append((f"train step ({cores} threads): bf16 autocast / fp32",
                     *interleaved(lambda: step_in("bf16"), lambda: step_in("fp32"), args.rounds)))

        norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]

        def step_with_norm(cls):
            use_norm(norms, cls)
            step_in("bf16")

        rows.append((f"train step ({cores} threads, bf16): minivlm LayerNorm / nn.LayerNorm",
                     *interleaved(lambda: step_with_norm(LayerNorm), lambda: step_with_norm(torch.nn.LayerNorm),
                                  args.rounds)))
        easy = build_dataset("easy_vqa", "train", seed=0, image_size=cfg.encoder.image_size)
        errors = norm_gradient_errors(model, norms, processor([easy[i]["messages"] for i in range(48)]))
        use_norm(norms, LayerNorm)

    load = os.getloadavg()
    lines = [f"CPU A/B, interleaved, {args.rounds} rounds (load before/after: {load[0]:.2f})",
             "| what | A ms | B ms | A / B |", "|---|---|---|---|"]
    lines += [f"| {name} | {1000 * a:.2f} | {1000 * b:.2f} | {a / b:.2f} |" for name, a, b in rows]
    lines += ["", "bf16 autocast gradients against fp32 on one batch of 48 easy-VQA questions (relative L2):",
              f"encoder layer norms' weight and bias: minivlm LayerNorm {errors['LayerNorm'][0]:.3f}-"
              f"{errors['LayerNorm'][1]:.3f}, nn.LayerNorm {errors['nn.LayerNorm'][0]:.3f}-{errors['nn.LayerNorm'][1]:.3f}; "
              f"every other parameter: median {errors['others']:.3f}"]
    text = "\n".join(lines)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "cpu_speed.json").write_text(json.dumps(
            {"environment": environment(torch.device("cpu")), "load": load,
             "rows": [{"what": n, "a_s": a, "b_s": b} for n, a, b in rows],
             "norm_gradient_errors": errors}, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
