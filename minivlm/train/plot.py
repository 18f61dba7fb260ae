"""Loss and evaluation curves of a run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` of a run directory.

    Raises:
        FileNotFoundError: the directory has no ``metrics.jsonl``.
        ValueError: a line of it is not JSON (the message gives the line number).
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a minivlm run directory?)")
    train, evals = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not a JSON record: {err}") from None
        (evals if "eval" in rec else train).append(rec)
    return train, evals


def moving_mean(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``loss.png`` (or ``out``): training loss, raw and smoothed, and evaluation metrics.

    Steps without a loss (skipped for a non-finite loss) are left out of the curve.
    """
    # A bare Figure draws without pyplot: no process-wide backend switch (a notebook that trains
    # keeps showing its own plots inline), nothing to close; as ablate and explain do.
    from matplotlib.figure import Figure

    train, evals = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(11 if evals else 6, 4))
    ax = fig.subplots(1, 2 if evals else 1, squeeze=False)
    points = [(r["step"], r["loss"]) for r in train if r.get("loss") is not None]
    steps, losses = [s for s, _ in points], [v for _, v in points]
    ax[0, 0].plot(steps, losses, alpha=0.35, label="loss")
    if len(losses) >= 5:
        window = max(2, len(losses) // 20)
        ax[0, 0].plot(steps, moving_mean(losses, window), label=f"moving mean ({window})")
    contrastive = [(r["step"], r["contrastive_loss"]) for r in train if r.get("contrastive_loss") is not None]
    if contrastive:  # train.retrieval_weight > 0: the image-caption objective beside generation
        ax[0, 0].plot(*zip(*contrastive), alpha=0.6, label="contrastive (image-caption)")
    positive = all(v > 0 for v in losses + [v for _, v in contrastive])
    ax[0, 0].set(xlabel="step", ylabel="training loss (per supervised token)", yscale="log" if positive else "linear",
                 title=Path(run_dir).name)
    ax[0, 0].legend()
    if evals:
        keys = sorted({k for e in evals for k in e["eval"]})
        for key in keys:
            ax[0, 1].plot([e["step"] for e in evals], [e["eval"].get(key) for e in evals], marker="o", label=key)
        ax[0, 1].set(xlabel="step", ylabel="metric", title="evaluation")
        if keys:  # evaluations that returned no metric draw nothing to label
            ax[0, 1].legend(fontsize=7)
    fig.tight_layout()
    from minivlm.io_atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix[1:] or "png")
    return out
