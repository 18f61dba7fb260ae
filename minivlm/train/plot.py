"""Loss and evaluation curves of a run, drawn from its ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl (not a minivlm run directory?)")
    train, evals = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            (evals if "eval" in rec else train).append(rec)
    return train, evals


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``loss.png``: training loss (raw and smoothed) and learning rate over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    ax[0, 0].plot(steps, losses, alpha=0.35, label="loss")
    if len(losses) >= 5:
        k = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]
        ax[0, 0].plot(steps, smooth, label=f"moving mean ({k + 1})")
    ax[0, 0].set(xlabel="step", ylabel="training loss (per supervised token)", yscale="log", title=Path(run_dir).name)
    ax[0, 0].legend()
    if evals:
        keys = sorted({k for e in evals for k in e["eval"]})
        for key in keys:
            ax[0, 1].plot([e["step"] for e in evals], [e["eval"].get(key) for e in evals], marker="o", label=key)
        ax[0, 1].set(xlabel="step", ylabel="metric", title="evaluation")
        ax[0, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
