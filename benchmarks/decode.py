"""Greedy decoding speed: minivlm ``generate`` against transformers' Idefics3 ``generate``.

Run: ``python -m benchmarks.decode [--small | --full] [--out DIR] [--compile {auto,off,inductor,eager}]``.

Each row decodes ``new_tokens`` tokens greedily (128 at full size) for ``batch`` rows (1 and 8)
after a prompt of one image and 16 text tokens, on models with random weights built at the same
shapes (:mod:`benchmarks.models`; ``nanovlm-460m`` at full size), bf16 weights on CUDA, fp32 on
CPU. The end-of-sequence token is disabled on both sides (minivlm: no ``eos_ids``; the peer:
``min_new_tokens``), so every row generates exactly ``new_tokens`` tokens.

The time is the whole ``generate`` call (image encoding, prefill and every decode step) and
tokens/s = ``batch * new_tokens / time``, the median over ``reps`` calls after warm-up (one
call each by default: 128 tokens already average over 128 steps). Rows, batch 1 first:

* minivlm eager: :func:`minivlm.generate.generate` with its static KV cache;
* minivlm compiled: the same with ``GenerationConfig(compile=True)``, the decode step through
  ``torch.compile`` (``mode="reduce-overhead"``: CUDA graphs) when the backend is inductor on CUDA;
* the peer: ``Idefics3ForConditionalGeneration.generate`` with its default dynamic cache, SDPA.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch

from benchmarks.common import (
    Budget,
    Report,
    RunSettings,
    base_parser,
    measured_row,
    resolve_settings,
    synchronize,
)
from benchmarks.models import benchmark_config, build_idefics3, build_minivlm, text_token_range
from benchmarks.tables import format_table
from minivlm.config import VLMConfig
from minivlm.registry import image_seq_len

PROMPT_TEXT_TOKENS = 16
BATCHES = (1, 8)
FULL_NEW_TOKENS, SMALL_NEW_TOKENS = 128, 8
#: Batch-1 decode target of the issue on nanovlm-460m (tokens/s).
TARGET_TOKENS_PER_S = 1000.0


def make_prompt(config: VLMConfig, batch: int, device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids [B, image_seq_len + 16]`` (placeholders first) and ``pixels [B, C, H, W]``."""
    generator = torch.Generator().manual_seed(0)
    low, high = text_token_range(config)
    text = torch.randint(low, high, (batch, PROMPT_TEXT_TOKENS), generator=generator)
    placeholders = torch.full((batch, image_seq_len(config)), config.image_token_id)
    e = config.encoder
    pixels = torch.randn(batch, e.pixel_channels, e.image_size, e.image_size, generator=generator)
    return torch.cat([placeholders, text], dim=1).to(device), pixels.to(device=device, dtype=dtype)


def minivlm_generate(model, input_ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int,
                     compile_backend: str | None) -> Callable[[], int]:
    """A closure running one ``generate`` call; returns the tokens it produced per row."""
    from minivlm.generate import GenerationConfig, generate

    options: dict[str, Any] = {"max_new_tokens": new_tokens}
    if compile_backend is not None:
        fields = {f.name for f in dataclasses.fields(GenerationConfig)}
        if "compile" not in fields:
            raise NotImplementedError("this minivlm.generate has no GenerationConfig.compile")
        options["compile"] = True
        options["compile_backend"] = compile_backend
        if compile_backend == "inductor" and input_ids.is_cuda:
            options["compile_mode"] = "reduce-overhead"
    config = GenerationConfig(**options)
    mask = torch.ones_like(input_ids, dtype=torch.bool)

    def run() -> int:
        return len(generate(model, input_ids, mask, pixels, config).tokens[0])

    return run


def peer_generate(model, input_ids: torch.Tensor, pixels: torch.Tensor, new_tokens: int) -> Callable[[], int]:
    mask = torch.ones_like(input_ids)

    def run() -> int:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels[:, None],
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
        return out.shape[1] - input_ids.shape[1]

    return run


def time_generate(run: Callable[[], int], settings: RunSettings) -> tuple[float, float, int]:
    """``(first call s, median s over reps, tokens per row)``."""
    t0 = time.perf_counter()
    produced = run()
    synchronize(settings.device)
    first = time.perf_counter() - t0
    for _ in range(settings.warmup - 1):
        run()
    times = []
    for _ in range(settings.reps):
        synchronize(settings.device)
        t0 = time.perf_counter()
        produced = run()
        synchronize(settings.device)
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), produced


def row_specs(compile_backend: str | None) -> list[tuple[str, str | None, int]]:
    """``(implementation, compile backend, batch)`` in priority order: batch 1 (the target) first,
    the compiled minivlm path first of all, so a time budget cuts the least important rows."""
    specs: list[tuple[str, str | None, int]] = []
    for batch in BATCHES:
        if compile_backend:
            specs.append(("minivlm", compile_backend, batch))
        specs += [("idefics3", None, batch), ("minivlm", None, batch)]
    return specs


def resolve_compile(choice: str, device: torch.device) -> str | None:
    if choice == "auto":
        return "inductor" if device.type == "cuda" else None
    return None if choice == "off" else choice


def run(settings: RunSettings, compile_choice: str = "auto") -> Report:
    config = benchmark_config(settings.small)
    device = settings.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new_tokens = SMALL_NEW_TOKENS if settings.small else FULL_NEW_TOKENS
    compile_backend = resolve_compile(compile_choice, device)
    report = Report("decode", settings, {
        "preset": config.name, "new_tokens": new_tokens, "prompt": f"1 image + {PROMPT_TEXT_TOKENS} text tokens",
        "dtype": str(dtype).removeprefix("torch."), "compile_backend": compile_backend,
        "warmup": settings.warmup, "reps": settings.reps,
    })
    budget = Budget(settings.budget_s)
    models: dict[str, torch.nn.Module] = {}
    for implementation, backend, batch in row_specs(compile_backend):
        label = f"{implementation} {'compiled' if backend else 'eager'}"
        row: dict[str, Any] = {"row": label, "batch": batch, "new_tokens": new_tokens, "note": None}
        if budget.spent:
            row["note"] = "skipped: time budget spent"
            report.add(row)
            continue
        with measured_row(report, row, device):
            if implementation not in models:
                build = build_minivlm if implementation == "minivlm" else build_idefics3
                models[implementation] = build(config, device, dtype=dtype).eval()
            model = models[implementation]
            input_ids, pixels = make_prompt(config, batch, device, dtype)
            runner = (minivlm_generate(model, input_ids, pixels, new_tokens, backend) if implementation == "minivlm"
                      else peer_generate(model, input_ids, pixels, new_tokens))
            first, seconds, produced = time_generate(runner, settings)
            row.update(seconds=seconds, tokens_per_s=batch * produced / seconds,
                       ms_per_step=seconds / produced * 1e3, first_call_s=first)
            if produced != new_tokens:
                row["note"] = f"generated {produced} tokens per row, not {new_tokens}"
    report.payload["targets"] = targets(report.rows)
    report.save()
    return report


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Batch-1 decode >= 1000 tokens/s (issue 6; meaningful at full size on the GPU)."""
    best = max((r for r in rows if r["row"].startswith("minivlm") and r["batch"] == 1 and r.get("tokens_per_s")),
               key=lambda r: r["tokens_per_s"], default=None)
    peer = next((r for r in rows if r["row"].startswith("idefics3") and r["batch"] == 1 and r.get("tokens_per_s")),
                None)
    value = best["tokens_per_s"] if best else None
    return [{
        "target": "batch-1 decode >= 1000 tokens/s", "minivlm": best["row"] if best else None,
        "tokens_per_s": value, "vs_peer": value / peer["tokens_per_s"] if value and peer else None,
        "goal": TARGET_TOKENS_PER_S, "met": None if value is None else value >= TARGET_TOKENS_PER_S,
    }]


def main(argv: list[str] | None = None) -> Report:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", choices=("auto", "off", "inductor", "eager"), default="auto",
                        help="compiled minivlm rows (auto: inductor + CUDA graphs on CUDA, none on CPU)")
    args = parser.parse_args(argv)
    settings = resolve_settings(args, warmup=(1, 1), reps=(1, 1))
    report = run(settings, args.compile)
    print(report.header())
    print(format_table(report.rows, ["row", "batch", "new_tokens", "tokens_per_s", "ms_per_step", "seconds",
                                     "first_call_s", "note"], title="greedy decode after a 1-image prompt"))
    print()
    print(format_table(report.payload["targets"], ["target", "minivlm", "tokens_per_s", "vs_peer", "goal", "met"],
                       title="targets (issue 6)"))
    return report


if __name__ == "__main__":
    main()
