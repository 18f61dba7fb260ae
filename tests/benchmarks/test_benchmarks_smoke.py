"""The benchmarks stay runnable: each runs at small size on CPU, prints its table, writes its JSON;
``gpu_check.sh --dry-run`` goes end to end; the measuring and counting pieces are exact.

The benchmarks are modules of the repository's ``benchmarks`` package (run as
``python -m benchmarks.<name>`` from the root), so the root is put on ``sys.path`` here.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.attention import Shape, build_case, document_lengths, target_ratios  # noqa: E402
from benchmarks.common import LiveTensorMemory  # noqa: E402
from benchmarks.models import (  # noqa: E402
    FlopModel,
    benchmark_config,
    build_idefics3,
    build_minivlm,
    count_parameters,
)
from benchmarks.summary import junit_counts  # noqa: E402
from benchmarks.tables import format_table  # noqa: E402
from benchmarks.train_step import SMALL_SHAPE, pack_stream, variable_samples  # noqa: E402
from minivlm.data.collate import plan_packing  # noqa: E402
from minivlm.registry import image_seq_len  # noqa: E402
from minivlm.summary import summarize  # noqa: E402

# One thread: on a shared 2-core machine, two busy processes with two threads each slow down many-fold.
SMALL_RUN = ["--small", "--device", "cpu", "--threads", "1", "--warmup", "1", "--reps", "1"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """``--threads`` sets torch's thread count for the process: give the next test its own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# -------------------------------------------------------------------------------------------
# Every benchmark at small size
# -------------------------------------------------------------------------------------------
def _run_small(name: str, out_dir: Path, capsys) -> dict:
    """Run ``benchmarks.<name>`` at small size; check what every benchmark must produce."""
    module = importlib.import_module(f"benchmarks.{name}")
    module.main([*SMALL_RUN, "--out", str(out_dir)])
    printed = capsys.readouterr().out
    payload = json.loads((out_dir / f"{name}.json").read_text())
    assert printed.startswith(f"== {name} (small shapes) on CPU")
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["environment"]["device"].startswith("CPU") and payload["environment"]["date_utc"]
    assert payload["rows"]
    errors = [row for row in payload["rows"] if str(row.get("note") or "").startswith("error")]
    assert not errors, errors
    return payload


@pytest.mark.parametrize("name, result_key", [("attention", "targets"), ("decode", "targets"),
                                              ("norm_rope", "decisions")])
def test_benchmark_runs_small_on_cpu_prints_a_table_and_writes_json(name, result_key, tmp_path, capsys):
    assert _run_small(name, tmp_path, capsys)[result_key]


def test_train_step_compares_models_of_identical_size_packing_more_samples(tmp_path, capsys):
    payload = _run_small("train_step", tmp_path, capsys)
    measured = [row for row in payload["rows"] if row.get("tokens_per_s")]
    assert {row["implementation"] for row in measured} == {"minivlm", "idefics3"}
    assert len({row["params"] for row in measured}) == 1  # the peer is built at the same shapes
    variable = {row["implementation"]: row for row in measured if row["data"] == "variable"}
    # packing puts more samples into a step than padding 2 samples does
    assert variable["minivlm"]["samples_per_step"] > variable["idefics3"]["samples_per_step"]
    assert [r["data"] for r in payload["ratios"]] == ["fixed", "variable"]


def test_the_memory_benchmark_meets_the_loss_layer_target(tmp_path, capsys):
    ratios = _run_small("memory", tmp_path, capsys)["ratios"]
    loss_layer = [r for r in ratios if r["what"] == "loss layer"]
    assert {r["device"] for r in loss_layer} == {"cpu", "meta"}
    assert all(r["met"] for r in loss_layer), loss_layer


def test_gpu_check_dry_run_goes_end_to_end(tmp_path):
    """The script's mechanics (stages, limits, log, summary) on its quickest stages; a full dry run
    (every stage) takes about a minute here and is done by hand before a GPU session."""
    env = {**os.environ, "GPU_CHECK_STAGES": "norm_rope", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stages = [line.split("\t")[:2] for line in (tmp_path / "stages.tsv").read_text().splitlines()]
    assert stages == [["stage", "exit"], ["norm_rope", "0"]]
    assert {"norm_rope.json", "gpu_check.log", "summary.json", "summary.txt"} <= {p.name for p in tmp_path.iterdir()}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["missing"] == ["attention", "train_step", "decode", "memory"]
    assert any("rmsnorm" in target["what"] for target in summary["targets"])
    assert result.stdout.rstrip().splitlines()[-1].startswith("Triton rope fwd+bwd")  # the table comes last


def test_gpu_check_refuses_to_run_full_size_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "no CUDA device" in result.stdout


# -------------------------------------------------------------------------------------------
# Measuring and counting
# -------------------------------------------------------------------------------------------
def test_live_tensor_memory_counts_storages_once_and_releases_them():
    with LiveTensorMemory() as memory:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:]  # same storage: not counted again
        b = a + 1  # a new 4000-byte storage
        assert memory.current_bytes == 8000
        del a, b
        assert memory.current_bytes == 4000  # the view keeps a's storage alive
        del view
    assert memory.current_bytes == 0 and memory.peak_bytes == 8000


def test_live_tensor_memory_sees_saved_activations_until_backward():
    weight = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)
    with LiveTensorMemory() as memory:
        hidden = torch.tanh(x @ weight)  # tanh saves its output for backward
        loss = hidden.sum()
        del hidden
        held = memory.current_bytes
        loss.backward()
    assert held == 128 * 64 * 4 + 4  # the saved tanh output and the loss scalar
    assert memory.current_bytes == 64 * 64 * 4 + 4  # backward freed it and left the weight's gradient
    assert memory.peak_bytes > held


@settings(max_examples=25, deadline=None)
@given(seq=st.integers(128, 600), n_documents=st.integers(1, 8), seed=st.integers(0, 1000))
def test_document_lengths_partition_the_row(seq, n_documents, seed):
    lengths = document_lengths(seq, n_documents, torch.Generator().manual_seed(seed))
    assert sum(lengths) == seq and len(lengths) == n_documents and min(lengths) >= 16


def test_useful_pairs_count_only_allowed_pairs():
    shape = Shape(batch=2, heads=3, kv_heads=3, seq=128, head_dim=16)
    causal = build_case("causal", shape, torch.device("cpu"))
    assert causal.useful_pairs == 2 * 3 * 128 * 129 // 2
    documents = build_case("documents", shape, torch.device("cpu"))
    assert documents.useful_pairs == 3 * sum(n * (n + 1) // 2 for row in documents.document_lengths for n in row)
    prefix = build_case("prefix_lm", shape, torch.device("cpu"))
    span = 128 // 4  # the image span sees itself bidirectionally: span * (span - 1) / 2 extra pairs
    assert prefix.useful_pairs == causal.useful_pairs + 2 * 3 * span * (span - 1) // 2
    padded = build_case("padded_causal", shape, torch.device("cpu"))
    assert padded.useful_pairs == 3 * (128 * 129 // 2 + 112 * 113 // 2)  # row 1 has 16 padding tokens


def test_target_ratios_pick_the_best_fused_backend():
    rows = [
        {"kind": "documents", "backend": "flex", "mode": "fwd", "tflops": 40.0},
        {"kind": "documents", "backend": "triton", "mode": "fwd", "tflops": 100.0},
        {"kind": "documents", "backend": "sdpa_per_document", "mode": "fwd", "tflops": 125.0},
        {"kind": "documents", "backend": "sdpa", "mode": "fwd", "tflops": 20.0},
        {"kind": "prefix_lm", "backend": "flex", "mode": "fwd", "tflops": 270.0},
        {"kind": "causal", "backend": "sdpa", "mode": "fwd", "tflops": 300.0},
    ]
    forward = {t["target"]: t for t in target_ratios(rows) if t["mode"] == "fwd"}
    assert forward["packed documents >= 0.8x per-document ideal"]["ratio"] == pytest.approx(0.8)
    assert forward["packed documents >= 0.8x per-document ideal"]["backend"] == "triton"
    assert forward["packed documents >= 3x SDPA boolean mask"]["met"] is True
    assert forward["prefix-LM >= 0.9x causal flash SDPA"]["ratio"] == pytest.approx(0.9)


def test_flop_model_agrees_with_the_measured_forward_flops():
    """3 x the FlopCounterMode forward of minivlm.summary (all tokens supervised): the documented
    count differs only by what it leaves out (causal half of attention, elementwise ops)."""
    config = benchmark_config(small=True)
    length = image_seq_len(config) + 64
    counted = summarize(config, text_tokens=64).total_flops
    modelled = FlopModel.of(config).step_flops([(length, length)], n_images=1)
    assert modelled == pytest.approx(3 * counted, rel=0.05)


def test_the_peer_has_exactly_minivlms_parameter_count():
    config = benchmark_config(small=True)
    minivlm = build_minivlm(config, torch.device("cpu"))
    peer = build_idefics3(config, torch.device("cpu"))
    assert count_parameters(peer) == count_parameters(minivlm)


def test_packed_step_groups_fit_their_rows():
    config = benchmark_config(small=True)
    samples = variable_samples(config, SMALL_SHAPE, 40, torch.Generator().manual_seed(0))
    groups = pack_stream(samples, SMALL_SHAPE.batch, SMALL_SHAPE.seq_len)
    assert sum(len(g) for g in groups) <= len(samples) and len(groups) >= 2
    for group in groups:
        assert len(plan_packing([len(s["input_ids"]) for s in group], SMALL_SHAPE.seq_len)) <= SMALL_SHAPE.batch


def test_format_table_aligns_numbers_right_and_marks_missing_values():
    table = format_table([{"name": "a", "ms": 1.5}, {"name": "long", "ms": None}], ["name", "ms"], title="t")
    assert table.splitlines() == ["t", "name    ms", "----  ----", "a     1.50", "long     -"]


def test_junit_counts_reads_pytest_xml(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="2"/></testsuites>')
    assert junit_counts(xml) == "2 passed, 1 failed, 2 skipped"
    assert junit_counts(tmp_path / "missing.xml") is None


@pytest.mark.slow
def test_main_job_benchmark_writes_the_per_seed_table(tmp_path):
    """Two seeds of a 3-step main job: one row each with steps, seconds, metrics and the demo chat."""
    from benchmarks import main_job
    from minivlm.train.precision import resolve_precision

    out = tmp_path / "mj"
    code = main_job.main(["--seeds", "0", "1", "--out", str(out), "--eval-limit", "8", "--jobs", "2",
                          "train.steps=3", "data.curriculum_steps=1"])
    report = json.loads((out / "main_job.json").read_text())
    assert code == 0 and [row["seed"] for row in report["rows"]] == [0, 1]
    for row in report["rows"]:
        assert row["exit_code"] == 0 and row["steps"] == 3
        assert row["precision"] == resolve_precision("auto", torch.device("cpu"))  # what the run trained in
        assert 0 <= row["metrics"]["easy_vqa/accuracy"] <= 1 and "charts/max_value" in row["metrics"]
        assert 0 <= row["metrics"]["retrieval/t2i_r@5"] <= 1  # tiny trains its retrieval head too
        assert [c["question"] for c in row["chat"]] == ["what shape is in the image?",
                                                         "What is the highest value in the bar chart?"]
        assert all(c["correct"] == (c["answer"] == c["expected"]) for c in row["chat"])
    table = (out / "main_job.md").read_text()
    assert table.count("\n| 0 |") == 1 and table.count("\n| 1 |") == 1 and "| target |" in table


@pytest.mark.slow
def test_cpu_speed_benchmark_measures_every_row(tmp_path, capsys):
    from benchmarks import cpu_speed

    assert cpu_speed.main(["--rounds", "1", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_speed.json").read_text())["rows"]
    names = [r["what"] for r in rows]
    assert len(rows) == 6 and all(r["a_s"] > 0 and r["b_s"] > 0 for r in rows)
    assert names[0].startswith("adamw") and names[1].startswith("render") and names[2].startswith("train step: 1")
    assert "contrastive" in names[3] and "bf16 autocast / fp32" in names[4] and "LayerNorm" in names[5]
    errors = json.loads((tmp_path / "cpu_speed.json").read_text())["norm_gradient_errors"]
    assert errors["LayerNorm"][1] < errors["nn.LayerNorm"][1]  # the reason the encoder uses its own
    assert "| A / B |" in capsys.readouterr().out


def test_eval_speed_benchmark_times_both_rows_and_checks_the_scores_agree(tmp_path, capsys):
    import minivlm
    from benchmarks import eval_speed

    model, _ = minivlm.build("tiny", "decoder.n_layers=1", "encoder.depth=1")
    model.save_pretrained(tmp_path / "model")
    assert eval_speed.main(["--model", str(tmp_path / "model"), "--rounds", "1", "--eval-limit", "3",
                            "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "eval_speed.json").read_text())
    assert [r["what"].split(":")[0] for r in payload["rows"]] == ["evaluation", "processor call on 64 easy-VQA prompts"]
    assert all(r["a_s"] > 0 and r["b_s"] > 0 for r in payload["rows"])
    assert payload["same_metrics"] is True and payload["metrics"]["easy_vqa/accuracy"] >= 0
    assert "metrics identical both ways: True" in capsys.readouterr().out


def test_eval_speed_benchmark_says_what_it_needs_without_a_model(tmp_path, capsys):
    from benchmarks import eval_speed

    assert eval_speed.main(["--model", str(tmp_path / "none")]) == 2
    assert "no model at" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------
# The three-way decode comparison (nanoVLM from ../shared when present)
# -------------------------------------------------------------------------------------------
def test_decode_peers_runs_and_skips_nanovlm_without_its_source(tmp_path, capsys):
    from benchmarks import decode_peers

    assert decode_peers.main(["--rounds", "1", "--new-tokens", "2", "--no-compile", "--nanovlm", str(tmp_path / "none"),
                              "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "nanoVLM skipped: no models/ in" in printed
    payload = json.loads((tmp_path / "decode_peers.json").read_text())
    names = [row["implementation"] for row in payload["rows"]]
    assert names == ["minivlm eager", "transformers Idefics3 eager"]
    reference = payload["rows"][1]
    assert reference["wall x transformers Idefics3 eager"] == 1.0  # each row is compared with the reference
    assert all(row["wall tok/s"] > 0 for row in payload["rows"])


def test_decode_peers_compares_with_nanovlm_from_its_source(tmp_path, capsys):
    from benchmarks import decode_peers

    if decode_peers.load_nanovlm(decode_peers.DEFAULT_NANOVLM) is None:
        pytest.skip(f"nanoVLM's source is not in {decode_peers.DEFAULT_NANOVLM} (../shared/peers)")
    assert decode_peers.main(["--rounds", "1", "--new-tokens", "2", "--no-compile", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_peers.json").read_text())["rows"]
    assert [r["implementation"] for r in rows] == ["minivlm eager", "nanoVLM eager", "transformers Idefics3 eager"]
    assert rows[1]["cpu x nanoVLM eager"] == 1.0
