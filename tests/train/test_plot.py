"""``minivlm plot RUN_DIR``: curves from ``metrics.jsonl``."""

from __future__ import annotations

import json

import pytest

from minivlm.train.plot import moving_mean, plot_run, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, records) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_run_writes_a_png_of_train_and_eval_curves(tmp_path):
    records = [{"step": s, "loss": 5.0 / s, "lr": 1e-3} for s in range(1, 31)]
    records[7] = {"step": 8, "loss": None, "lr": 1e-3, "skipped": "nonfinite"}
    records += [{"step": 10, "eval": {"accuracy": 0.4}}, {"step": 20, "eval": {"accuracy": 0.6}}]
    _write_metrics(tmp_path, records)
    out = plot_run(tmp_path)
    assert out == tmp_path / "loss.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 5000


def test_plot_run_writes_where_asked(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}])
    out = plot_run(tmp_path, tmp_path / "curves" / "x.png")
    assert out == tmp_path / "curves" / "x.png" and out.read_bytes().startswith(PNG_SIGNATURE)


def test_read_metrics_splits_train_and_eval_records(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 1, "eval": {"a": 1.0}}])
    train, evals = read_metrics(tmp_path)
    assert train == [{"step": 1, "loss": 2.0}] and evals == [{"step": 1, "eval": {"a": 1.0}}]


def test_missing_or_corrupt_metrics_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON record"):
        read_metrics(tmp_path)


def test_moving_mean():
    assert moving_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_the_contrastive_loss_is_drawn_beside_the_generation_loss(tmp_path):
    plain = [{"step": s, "loss": 4.0 / s} for s in range(1, 21)]
    with_contrastive = [dict(r, contrastive_loss=3.0 / r["step"]) for r in plain]
    _write_metrics(tmp_path, plain)
    without = plot_run(tmp_path, tmp_path / "plain.png").read_bytes()
    _write_metrics(tmp_path, with_contrastive)
    drawn = plot_run(tmp_path, tmp_path / "contrastive.png").read_bytes()
    assert drawn.startswith(PNG_SIGNATURE) and drawn != without


def test_an_evaluation_without_metrics_plots_without_a_warning(tmp_path):
    import warnings

    _write_metrics(tmp_path, [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}, {"step": 2, "eval": {}}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plot_run(tmp_path).read_bytes().startswith(PNG_SIGNATURE)
