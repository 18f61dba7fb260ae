"""``minivlm eval``: one table (or JSON) with the right metric for each task of a spec."""

from __future__ import annotations

import json

import pytest

import minivlm.retrieval
from minivlm.cli import main
from minivlm.eval.runner import evaluate_spec


def test_json_report_has_each_tasks_metric(capsys, checkpoint, model):
    code = main(["eval", "--model", str(checkpoint), "--data", "shapes:0.5,retrieval:0.5", "--limit", "4",
                 "--max-new-tokens", "6", "--json", "--samples", "2"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    metrics, counts = report["metrics"], report["counts"]
    # shapes: closed questions (exact match) and captions; retrieval: captions and, with the
    # checkpoint's retrieval head, recall@k over the same 4 pairs.
    assert {"retrieval/caption_bleu4", "retrieval/caption_cider", "retrieval/t2i_r@1", "retrieval/i2t_r@5",
            "retrieval/t2i_median_rank"} <= set(metrics)
    assert any(k.startswith("shapes/") for k in metrics)
    assert counts["retrieval/t2i_r@1"] == counts["retrieval/caption_bleu4"] == 4
    assert counts.get("shapes/accuracy", 0) + counts.get("shapes/caption_bleu4", 0) == 4
    assert metrics["retrieval/i2t_r@5"] == 1.0  # 4 pairs: every image is in the top 5
    assert len(report["predictions"]) == 2
    expected = evaluate_spec(model, "shapes,retrieval", limit=4, max_new_tokens=6)
    assert metrics == pytest.approx(expected.metrics)


def test_table_output(capsys, checkpoint):
    code = main(["eval", "--model", str(checkpoint), "--data", "video", "--limit", "2", "--max-new-tokens", "4",
                 "--no-progress", "--samples", "1"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["metric", "value", "n"]
    assert lines[1].split()[0] == "video/accuracy" and lines[1].split()[2] == "2"
    assert "[video] 'Which way does the shape move?'" in out


@pytest.mark.parametrize("argv, message", [
    (["--data", "shapez"], "unknown dataset 'shapez'"),
    (["--data", "shapes", "--limit", "0"], "--limit must be >= 1"),
])
def test_bad_arguments_exit_with_2_before_loading_the_model(capsys, monkeypatch, checkpoint, argv, message):
    monkeypatch.setattr(minivlm.retrieval, "load_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["eval", "--model", str(checkpoint), *argv])
    assert code == 2 and message in capsys.readouterr().err
