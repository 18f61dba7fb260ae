"""Attention kernels on the VLM mask family: every backend x mask kind -> ms and TFLOP/s of useful work.

Run: ``python -m benchmarks.attention [--small | --full] [--out DIR]`` from the repository root.

Mask kinds (``AttentionMask.kind``), full shapes (the DESIGN.md reference measurements):

* ``causal``: plain causal text, B4 H16 S4096 Dh64;
* ``prefix_lm``: the same, with one image span of S/4 tokens after a 16-token prompt that attends
  bidirectionally within itself (:class:`minivlm.fusion.prefix.PrefixFusion`);
* ``documents``: 8 packed documents per row, causal inside each, lengths drawn once (seed 0);
* ``padded_causal``: right padding of 0, 1/8, 1/4, 3/8 of each row's length;
* ``bidirectional``: ViT-shaped self-attention, B16 H12 S1024 Dh64.

Backends: every entry of ``minivlm.kernels.dispatch.BACKENDS`` (``math``, ``sdpa``, ``flex``,
``triton``), called through the entry point :func:`minivlm.kernels.dispatch.attention` with the
backend forced. Reference rows: ``sdpa_per_document`` (one flash-eligible causal SDPA call per
packed document: the "varlen ideal" of DESIGN.md, Python loop included) and, where torch has it on
CUDA, ``varlen_attn`` (``torch.nn.attention.varlen``, FlashAttention's varlen kernel: one call for
all documents).

Useful work counts only allowed (query, key) pairs: ``4 * Dh`` FLOPs per pair and head forward
(``QK^T`` and ``PV``), 3.5x that for forward + backward (the backward's five matmuls against the
forward's two; the FlashAttention-2 benchmark convention). Pairs are counted from the dense mask;
padding queries count nothing. A kernel that computes masked-out pairs gets no credit for them,
so the numbers compare kernels on the work the model actually needs.

CPU (``--small``): fp32, tiny shapes, flex forward only (its CPU backward raises), Triton skipped
(it runs on CPU only in its interpreter, which checks correctness, not speed).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Budget,
    Report,
    RunSettings,
    base_parser,
    measured_row,
    resolve_settings,
    time_ms,
)
from benchmarks.tables import format_table
from minivlm.kernels.dispatch import BACKENDS, attention
from minivlm.kernels.mask import AttentionMask

MASK_KINDS = ("causal", "prefix_lm", "documents", "padded_causal", "bidirectional")
MODES = ("fwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 3.5
N_DOCUMENTS = 8
PROMPT_TOKENS = 16


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    def label(self) -> str:
        gqa = f"/{self.kv_heads}" if self.kv_heads != self.heads else ""
        return f"B{self.batch} H{self.heads}{gqa} S{self.seq} D{self.head_dim}"


FULL_SHAPES = {"text": Shape(4, 16, 16, 4096, 64), "vit": Shape(16, 12, 12, 1024, 64)}
SMALL_SHAPES = {"text": Shape(1, 2, 2, 256, 32), "vit": Shape(2, 2, 2, 128, 32)}


@dataclass
class MaskCase:
    """A mask of one kind over a shape, with the bookkeeping the reference rows need."""

    kind: str
    shape: Shape
    mask: AttentionMask
    useful_pairs: int  # allowed (query, key) pairs summed over batch and query heads
    document_lengths: list[list[int]] | None = None  # per row, for the per-document reference


def document_lengths(seq: int, n_documents: int, generator: torch.Generator, minimum: int = 16) -> list[int]:
    """``n_documents`` lengths >= ``minimum`` summing to ``seq`` (uniform random cut points)."""
    if seq < n_documents * minimum:
        raise ValueError(f"cannot split {seq} tokens into {n_documents} documents of >= {minimum}")
    spare = seq - n_documents * minimum
    cuts = sorted(torch.randint(0, spare + 1, (n_documents - 1,), generator=generator).tolist())
    edges = [0, *cuts, spare]
    return [minimum + edges[i + 1] - edges[i] for i in range(n_documents)]


def build_case(kind: str, shape: Shape, device: torch.device) -> MaskCase:
    """The mask of ``kind`` for ``shape`` and its count of useful pairs."""
    B, S = shape.batch, shape.seq
    generator = torch.Generator().manual_seed(0)
    lengths = None
    query_valid = None
    if kind == "causal":
        mask = AttentionMask.causal_lm()
    elif kind == "bidirectional":
        mask = AttentionMask.bidirectional()
    elif kind == "prefix_lm":
        span_ids = torch.zeros(B, S, dtype=torch.long)
        span_ids[:, PROMPT_TOKENS:PROMPT_TOKENS + S // 4] = 1
        mask = AttentionMask.causal_lm(span_ids=span_ids.to(device))
    elif kind == "documents":
        lengths = [document_lengths(S, N_DOCUMENTS, generator) for _ in range(B)]
        ids = torch.cat([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row))[None] for row in lengths])
        mask = AttentionMask.causal_lm(document_ids=ids.to(device))
    elif kind == "padded_causal":
        key_valid = torch.ones(B, S, dtype=torch.bool)
        for row in range(B):
            key_valid[row, S - (row % 4) * S // 8:] = False
        mask = AttentionMask.causal_lm(key_valid=key_valid.to(device))
        query_valid = mask.key_valid
    else:
        raise ValueError(f"unknown mask kind {kind!r}; expected one of {MASK_KINDS}")
    dense = mask.dense(S, S, device).expand(B, 1, S, S)
    if query_valid is not None:
        dense = dense & query_valid[:, None, :, None]
    pairs = int(dense.sum()) * shape.heads
    return MaskCase(kind, shape, mask, pairs, lengths)


def useful_tflops(case: MaskCase, mode: str, ms: float) -> float:
    flops = 4 * case.shape.head_dim * case.useful_pairs * (BACKWARD_FLOP_FACTOR if mode == "fwd+bwd" else 1.0)
    return flops / (ms * 1e-3) / 1e12


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, requires_grad: bool):
    g = torch.Generator(device=device).manual_seed(1)
    q = torch.randn(shape.batch, shape.heads, shape.seq, shape.head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(shape.batch, shape.kv_heads, shape.seq, shape.head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(shape.batch, shape.kv_heads, shape.seq, shape.head_dim, device=device, dtype=dtype, generator=g)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def _runner(attend: Callable[..., torch.Tensor], shape: Shape, mode: str, dtype: torch.dtype,
            device: torch.device) -> Callable[[], None]:
    """A closure running one forward (no grad) or forward + backward of ``attend(q, k, v)``."""
    q, k, v = make_inputs(shape, dtype, device, requires_grad=mode == "fwd+bwd")
    if mode == "fwd":
        def run() -> None:
            with torch.no_grad():
                attend(q, k, v)
    else:
        grad_out = torch.randn_like(q)

        def run() -> None:
            q.grad = k.grad = v.grad = None
            attend(q, k, v).backward(grad_out)
    return run


def per_document_sdpa(case: MaskCase) -> Callable[..., torch.Tensor]:
    """The varlen ideal: a flag-only causal SDPA call per document (flash-eligible, no mask tensor)."""
    spans = [[(sum(row[:i]), sum(row[:i + 1])) for i in range(len(row))] for row in case.document_lengths]
    gqa = case.shape.heads != case.shape.kv_heads

    def attend(q, k, v):
        rows = []
        for b, row_spans in enumerate(spans):
            pieces = [F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                                     is_causal=True, enable_gqa=gqa) for s, e in row_spans]
            rows.append(torch.cat(pieces, dim=2))
        return torch.cat(rows, dim=0)

    return attend


def varlen_flash(case: MaskCase) -> Callable[..., torch.Tensor] | None:
    """``torch.nn.attention.varlen.varlen_attn`` over all documents at once, or None where absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:  # torch 2.9-2.10
        causal = {"is_causal": True}
    elif "window_size" in parameters:  # later releases express causal as a window
        causal = {"window_size": (-1, 0)}
    else:
        return None
    lengths = [n for row in case.document_lengths for n in row]
    B, S = case.shape.batch, case.shape.seq

    def attend(q, k, v):
        device = q.device
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        packed = [t.transpose(1, 2).reshape(B * S, t.shape[1], t.shape[3]) for t in (q, k, v)]
        out = varlen_attn(*packed, cu, cu, max(lengths), max(lengths), **causal)
        return out.reshape(B, S, q.shape[1], q.shape[3]).transpose(1, 2)

    return attend


def skip_reason(backend: str, mode: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot be timed in ``mode`` on ``device``, or None."""
    if device.type == "cuda":
        return None
    if backend == "triton":
        return "Triton runs on CPU only in its interpreter (correctness, not speed)"
    if backend == "flex" and mode == "fwd+bwd":
        return "flex has no CPU backward"
    return None


def run(settings: RunSettings) -> Report:
    shapes = SMALL_SHAPES if settings.small else FULL_SHAPES
    dtype = torch.bfloat16 if settings.device.type == "cuda" else torch.float32
    report = Report("attention", settings, {
        "shapes": {name: asdict(shape) for name, shape in shapes.items()},
        "dtype": str(dtype).removeprefix("torch."),
        "flops": f"4 * Dh per allowed pair and head (fwd), x{BACKWARD_FLOP_FACTOR} for fwd+bwd",
        "warmup": settings.warmup, "reps": settings.reps,
    })
    budget = Budget(settings.budget_s)
    for kind in MASK_KINDS:
        shape = shapes["vit" if kind == "bidirectional" else "text"]
        case = build_case(kind, shape, settings.device)
        candidates: list[tuple[str, Callable[..., torch.Tensor] | None, str | None]] = [
            (name, lambda q, k, v, _b=name, _m=case.mask: attention(q, k, v, _m, backend=_b), None)
            for name in sorted(BACKENDS)
        ]
        if kind == "documents":
            candidates.append(("sdpa_per_document", per_document_sdpa(case), None))
            if settings.device.type == "cuda":
                varlen = varlen_flash(case)
                missing = None if varlen is not None else "no causal varlen_attn in this torch"
                candidates.append(("varlen_attn", varlen, missing))
        for name, attend, missing in candidates:
            for mode in MODES:
                row: dict[str, Any] = {"kind": kind, "shape": shape.label(), "backend": name, "mode": mode,
                                       "ms": None, "tflops": None, "note": None}
                reason = missing or skip_reason(name, mode, settings.device)
                if reason is None and budget.spent:
                    reason = "skipped: time budget spent"
                if reason is not None:
                    row["note"] = reason
                    report.add(row)
                    continue
                with measured_row(report, row, settings.device):
                    ms = time_ms(_runner(attend, shape, mode, dtype, settings.device), settings.device,
                                 settings.warmup, settings.reps)
                    row.update(ms=ms, tflops=useful_tflops(case, mode, ms))
    report.payload["targets"] = target_ratios(report.rows)
    report.save()
    return report


def _tflops(rows: list[dict[str, Any]], kind: str, backend: str, mode: str) -> float | None:
    return next((r["tflops"] for r in rows if (r["kind"], r["backend"], r["mode"]) == (kind, backend, mode)), None)


def target_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's attention targets, from this run's rows (best fused backend per kind)."""

    def best(kind: str, mode: str) -> tuple[str | None, float | None]:
        options = [(b, _tflops(rows, kind, b, mode)) for b in ("flex", "triton")]
        options = [(b, t) for b, t in options if t is not None]
        return max(options, key=lambda item: item[1]) if options else (None, None)

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    targets = []
    for mode in MODES:
        backend, packed = best("documents", mode)
        ideal = _tflops(rows, "documents", "sdpa_per_document", mode)
        targets.append({"target": "packed documents >= 0.8x per-document ideal", "mode": mode, "backend": backend,
                        "ratio": ratio(packed, ideal), "goal": 0.8})
        targets.append({"target": "packed documents >= 3x SDPA boolean mask", "mode": mode, "backend": backend,
                        "ratio": ratio(packed, _tflops(rows, "documents", "sdpa", mode)), "goal": 3.0})
        backend, prefix = best("prefix_lm", mode)
        targets.append({"target": "prefix-LM >= 0.9x causal flash SDPA", "mode": mode, "backend": backend,
                        "ratio": ratio(prefix, _tflops(rows, "causal", "sdpa", mode)), "goal": 0.9})
    for target in targets:
        target["met"] = None if target["ratio"] is None else target["ratio"] >= target["goal"]
    return targets


def main(argv: list[str] | None = None) -> Report:
    parser = base_parser(__doc__.splitlines()[0])
    settings = resolve_settings(parser.parse_args(argv))
    report = run(settings)
    print(report.header())
    print(format_table(report.rows, ["kind", "shape", "backend", "mode", "ms", "tflops", "note"],
                       title="TFLOP/s of useful work (allowed pairs only)"))
    print()
    print(format_table(report.payload["targets"], ["target", "mode", "backend", "ratio", "goal", "met"],
                       title="targets (issue 6), this run"))
    return report


if __name__ == "__main__":
    main()
