"""RMSNorm and RoPE, eager against ``torch.compile``: does a hand-written Triton kernel have room to win?

Run: ``python -m benchmarks.norm_rope [--small | --full] [--out DIR] [--compile {auto,off,inductor,eager}]``.

Issue 6 asks for Triton RMSNorm and RoPE kernels only where they beat ``torch.compile``'s own
generated code. Both ops are memory-bound (a few FLOPs per byte), so the ceiling for any kernel
is the device's copy bandwidth: this benchmark times minivlm's own modules
(:class:`minivlm.layers.norms.RMSNorm`, :func:`minivlm.layers.rope.apply_rope`) eager and compiled,
converts each time to achieved GB/s over the bytes the op must move, and compares that with a
device-to-device copy measured in the same run. Where the compiled op already moves its bytes at
close to copy bandwidth (``of_copy`` >= 0.8), a Triton kernel cannot be meaningfully faster and is
not written; the decision column says so.

Shapes at full size are nanovlm-460m's decoder at batch 16 x 1024 tokens, bf16: RMSNorm over
``[16384, 960]``, RoPE on queries ``[16, 15, 1024, 64]``. Bytes moved: forward reads x (and the
norm's weight or RoPE's cos/sin tables) and writes y; forward + backward adds reading dy and x
and writing dx (the weight gradient's reduction is counted as reading dy and x once more).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

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
from minivlm.layers.norms import RMSNorm
from minivlm.layers.rope import RotaryEmbedding, apply_rope

FULL = {"tokens": 16 * 1024, "width": 960, "batch": 16, "heads": 15, "seq": 1024, "head_dim": 64}
SMALL = {"tokens": 512, "width": 192, "batch": 2, "heads": 6, "seq": 128, "head_dim": 32}
ROOFLINE_FRACTION = 0.8


def copy_gb_per_s(n_bytes: int, device: torch.device, settings: RunSettings) -> float:
    """Device copy bandwidth, counting bytes read plus bytes written."""
    source = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source), device, settings.warmup, settings.reps)
    return 2 * n_bytes / (ms * 1e-3) / 1e9


def rmsnorm_case(dims: dict[str, int], dtype: torch.dtype, device: torch.device, backward: bool,
                 compile_backend: str | None) -> tuple[Callable[[], None], int]:
    norm = RMSNorm(dims["width"]).to(device)
    fn = torch.compile(norm, backend=compile_backend) if compile_backend else norm
    x = torch.randn(dims["tokens"], dims["width"], device=device, dtype=dtype, requires_grad=backward)
    element = x.element_size()
    if not backward:
        def run() -> None:
            with torch.no_grad():
                fn(x)
        return run, 2 * x.numel() * element
    grad = torch.randn_like(x)

    def run_backward() -> None:
        x.grad = norm.weight.grad = None
        fn(x).backward(grad)
    # forward (x, y) + backward (dy, x, dx) + weight-gradient reduction (dy, x)
    return run_backward, 7 * x.numel() * element


def rope_case(dims: dict[str, int], dtype: torch.dtype, device: torch.device, backward: bool,
              compile_backend: str | None) -> tuple[Callable[[], None], int]:
    rotary = RotaryEmbedding(dims["head_dim"]).to(device)
    positions = torch.arange(dims["seq"], device=device).expand(dims["batch"], -1)
    cos, sin = rotary(positions)
    fn = torch.compile(apply_rope, backend=compile_backend) if compile_backend else apply_rope
    q = torch.randn(dims["batch"], dims["heads"], dims["seq"], dims["head_dim"], device=device, dtype=dtype,
                    requires_grad=backward)
    element = q.element_size()
    tables = 2 * cos.numel() * cos.element_size()
    if not backward:
        def run() -> None:
            with torch.no_grad():
                fn(q, cos, sin)
        return run, 2 * q.numel() * element + tables
    grad = torch.randn_like(q)

    def run_backward() -> None:
        q.grad = None
        fn(q, cos, sin).backward(grad)
    return run_backward, 4 * q.numel() * element + 2 * tables


def resolve_compile(choice: str, device: torch.device) -> str | None:
    if choice == "auto":
        return "inductor" if device.type == "cuda" else None
    return None if choice == "off" else choice


def run(settings: RunSettings, compile_choice: str = "auto") -> Report:
    device = settings.device
    dims = SMALL if settings.small else FULL
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_backend = resolve_compile(compile_choice, device)
    report = Report("norm_rope", settings, {"dims": dims, "dtype": str(dtype).removeprefix("torch."),
                                            "compile_backend": compile_backend, "roofline_fraction": ROOFLINE_FRACTION})
    copy = copy_gb_per_s(dims["tokens"] * dims["width"] * 2 * 4, device, settings)
    report.payload["copy_gb_per_s"] = copy
    budget = Budget(settings.budget_s)
    variants: list[tuple[str, str | None]] = [("eager", None)]
    if compile_backend:
        variants.append(("compiled", compile_backend))
    for op, case in (("rmsnorm", rmsnorm_case), ("rope", rope_case)):
        for mode in ("fwd", "fwd+bwd"):
            for variant, backend in variants:
                row: dict[str, Any] = {"op": op, "mode": mode, "variant": variant, "note": None}
                if budget.spent:
                    row["note"] = "skipped: time budget spent"
                    report.add(row)
                    continue
                with measured_row(report, row, device):
                    runner, n_bytes = case(dims, dtype, device, mode == "fwd+bwd", backend)
                    ms = time_ms(runner, device, max(settings.warmup, 2 if backend else 1), settings.reps)
                    gb_per_s = n_bytes / (ms * 1e-3) / 1e9
                    row.update(ms=ms, gb_per_s=gb_per_s, of_copy=gb_per_s / copy)
    report.payload["decisions"] = decisions(report.rows, compile_backend is not None)
    report.save()
    return report


def decisions(rows: list[dict[str, Any]], compiled: bool) -> list[dict[str, Any]]:
    """Per op and mode: is there room for a Triton kernel above the compiled code?"""
    out = []
    for op in ("rmsnorm", "rope"):
        for mode in ("fwd", "fwd+bwd"):
            pick = {r["variant"]: r for r in rows if r["op"] == op and r["mode"] == mode and r.get("ms")}
            eager, best = pick.get("eager"), pick.get("compiled")
            if not compiled or best is None:
                verdict = "pending: needs compiled rows on a GPU"
            elif best["of_copy"] >= ROOFLINE_FRACTION:
                verdict = "drop Triton: compiled code is at copy bandwidth"
            else:
                verdict = "room for a Triton kernel"
            out.append({"op": op, "mode": mode,
                        "compile_speedup": eager["ms"] / best["ms"] if eager and best else None,
                        "compiled_of_copy": best["of_copy"] if best else None, "decision": verdict})
    return out


def main(argv: list[str] | None = None) -> Report:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--compile", choices=("auto", "off", "inductor", "eager"), default="auto",
                        help="backend of the compiled rows (auto: inductor on CUDA, none on CPU)")
    args = parser.parse_args(argv)
    settings = resolve_settings(args, warmup=(1, 3), reps=(3, 20))
    report = run(settings, args.compile)
    print(report.header())
    print(f"device copy: {report.payload['copy_gb_per_s']:.0f} GB/s (read + write)")
    print(format_table(report.rows, ["op", "mode", "variant", "ms", "gb_per_s", "of_copy", "note"],
                       title="memory-bound ops: achieved bandwidth"))
    print()
    print(format_table(report.payload["decisions"], ["op", "mode", "compile_speedup", "compiled_of_copy", "decision"],
                       title="Triton RMSNorm / RoPE decision (issue 6)"))
    return report


if __name__ == "__main__":
    main()
