"""Peak memory of the loss layer and of a whole training step, naive logits path vs fused loss.

Run: ``python -m benchmarks.memory [--small | --full] [--out DIR]``.

* **loss layer**: ``hidden [N, D] -> loss`` forward + backward through the LM head, naive
  (:func:`~minivlm.kernels.fused_ce.naive_linear_cross_entropy`: full ``[N, V]`` logits, fp32
  cross-entropy) against :func:`~minivlm.kernels.fused_ce.fused_linear_cross_entropy`. Full size:
  16k tokens x 49,218 vocabulary x 960 width (nanoVLM's head), bf16 autocast over fp32 weights on
  CUDA. Measured on the device (``torch.cuda.max_memory_allocated`` above what existed before),
  and, on any machine, on the meta device at that size (``benchmarks.common.LiveTensorMemory``:
  what the code allocates, no arithmetic), in fp32 and bf16.
* **whole step**: one minivlm training step (forward, loss, backward; :mod:`benchmarks.train_step`'s
  fixed-length batch) with either loss layer, after a warm-up step so that gradients already
  exist; peak above the memory held before the step (weights, gradients, optimizer state).

The issue's target: loss-layer peak <= 0.25x the naive path at 16k tokens x 49k vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from benchmarks.common import (
    LiveTensorMemory,
    Report,
    RunSettings,
    base_parser,
    mib,
    peak_memory_bytes,
    release_memory,
    resolve_settings,
    time_ms,
)
from benchmarks.models import benchmark_config, build_minivlm
from benchmarks.tables import format_table
from benchmarks.train_step import FULL_SHAPE, SMALL_SHAPE, fixed_samples, minivlm_batch, minivlm_loss
from minivlm.kernels.fused_ce import fused_linear_cross_entropy, naive_linear_cross_entropy

LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {"naive": naive_linear_cross_entropy, "fused": fused_linear_cross_entropy}
FULL_LOSS_SHAPE = (16384, 960, 49218)  # tokens, width, vocabulary
SMALL_LOSS_SHAPE = (2048, 64, 16384)
SMALL_CHUNK = 256  # the small shape fits one default chunk; a smaller one shows the chunking at work
TARGET_RATIO = 0.25


def loss_inputs(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n_tokens, width, vocab = shape
    if device.type == "meta":
        hidden = torch.empty(n_tokens, width, device=device, dtype=dtype)
        weight = torch.empty(vocab, width, device=device, dtype=dtype)
        targets = torch.zeros(n_tokens, device=device, dtype=torch.long)
    else:
        generator = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(n_tokens, width, device=device, dtype=dtype, generator=generator)
        weight = torch.randn(vocab, width, device=device, dtype=dtype, generator=generator) * width**-0.5
        targets = torch.randint(0, vocab, (n_tokens,), device=device, generator=generator)
    return hidden.requires_grad_(), weight.requires_grad_(), targets


def loss_layer_run(name: str, hidden, weight, targets, autocast_dtype: torch.dtype | None,
                   chunk_size: int | None) -> Callable[[], None]:
    fn = LOSSES[name]
    kwargs = {"chunk_size": chunk_size} if name == "fused" else {}

    def run() -> None:
        hidden.grad = weight.grad = None
        if autocast_dtype is not None:
            with torch.autocast(hidden.device.type, dtype=autocast_dtype):
                loss = fn(hidden, weight, targets, **kwargs)
        else:
            loss = fn(hidden, weight, targets, **kwargs)
        loss.backward()

    return run


def loss_layer_rows(settings: RunSettings) -> list[dict[str, Any]]:
    rows = []
    device = settings.device
    shape = SMALL_LOSS_SHAPE if settings.small else FULL_LOSS_SHAPE
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    chunk = SMALL_CHUNK if settings.small else None
    hidden, weight, targets = loss_inputs(shape, device, torch.float32)
    for name in LOSSES:
        run = loss_layer_run(name, hidden, weight, targets, autocast_dtype, chunk)
        ms = time_ms(run, device, settings.warmup, settings.reps)
        peak = peak_memory_bytes(run, device)
        rows.append({"what": "loss layer", "path": name, "device": device.type,
                     "shape": f"N{shape[0]} D{shape[1]} V{shape[2]}",
                     "dtype": "bf16 autocast" if autocast_dtype else "fp32", "peak_mib": mib(peak), "ms": ms})
        release_memory(device)
    del hidden, weight, targets
    for dtype in (torch.float32, torch.bfloat16):
        hidden, weight, targets = loss_inputs(FULL_LOSS_SHAPE, torch.device("meta"), dtype)
        for name in LOSSES:
            with LiveTensorMemory() as memory:
                loss_layer_run(name, hidden, weight, targets, None, None)()
            rows.append({"what": "loss layer", "path": name, "device": "meta",
                         "shape": "N{} D{} V{}".format(*FULL_LOSS_SHAPE), "dtype": str(dtype).removeprefix("torch."),
                         "peak_mib": mib(memory.peak_bytes), "ms": None})
    return rows


def whole_step_rows(settings: RunSettings) -> list[dict[str, Any]]:
    device = settings.device
    config = benchmark_config(settings.small)
    shape = SMALL_SHAPE if settings.small else FULL_SHAPE
    samples = fixed_samples(config, shape, shape.batch, torch.Generator().manual_seed(0))
    batch = minivlm_batch(samples, pad_id=0).to(device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    model = build_minivlm(config, device).train()
    rows = []
    for name in LOSSES:
        def step() -> None:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(**batch.inputs, return_logits=False)
                loss = minivlm_loss(model, out.hidden, batch.labels, fused=name == "fused")
            loss.backward()

        step()  # gradients exist from here on, as in training
        peak = peak_memory_bytes(step, device)
        ms = time_ms(step, device, 0, settings.reps)
        model.zero_grad(set_to_none=True)
        rows.append({"what": "whole step", "path": name, "device": device.type,
                     "shape": f"{config.name} B{shape.batch} T{shape.seq_len}",
                     "dtype": "bf16 autocast" if autocast_dtype else "fp32", "peak_mib": mib(peak), "ms": ms})
        release_memory(device)
    return rows


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """fused / naive peak for every (what, device, shape, dtype) measured both ways."""
    out = []
    for row in rows:
        if row["path"] != "fused":
            continue
        naive = next((r for r in rows if r["path"] == "naive" and
                      all(r[k] == row[k] for k in ("what", "device", "shape", "dtype"))), None)
        if naive is None or not naive["peak_mib"]:
            continue
        ratio = row["peak_mib"] / naive["peak_mib"]
        target = row["what"] == "loss layer"
        out.append({"what": row["what"], "device": row["device"], "shape": row["shape"], "dtype": row["dtype"],
                    "naive_mib": naive["peak_mib"], "fused_mib": row["peak_mib"], "ratio": ratio,
                    "goal": TARGET_RATIO if target else None,
                    "met": (ratio <= TARGET_RATIO) if target else None})
    return out


def run(settings: RunSettings) -> Report:
    report = Report("memory", settings, {"loss_shape": SMALL_LOSS_SHAPE if settings.small else FULL_LOSS_SHAPE,
                                         "meta_loss_shape": FULL_LOSS_SHAPE, "reps": settings.reps})
    for row in loss_layer_rows(settings):
        report.add(row)
    for row in whole_step_rows(settings):
        report.add(row)
    report.payload["ratios"] = ratios(report.rows)
    report.save()
    return report


def main(argv: list[str] | None = None) -> Report:
    parser = base_parser(__doc__.splitlines()[0])
    settings = resolve_settings(parser.parse_args(argv), warmup=(1, 1), reps=(1, 3))
    report = run(settings)
    print(report.header())
    print(format_table(report.rows, ["what", "path", "device", "shape", "dtype", "peak_mib", "ms"],
                       title="peak memory above what existed before (MiB)"))
    print()
    print(format_table(report.payload["ratios"], ["what", "device", "shape", "dtype", "naive_mib", "fused_mib",
                                                  "ratio", "goal", "met"],
                       title="fused / naive peak (target: loss layer <= 0.25x)"))
    return report


if __name__ == "__main__":
    main()
