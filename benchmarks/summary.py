"""The short table ``gpu_check.sh`` prints last: stage outcomes and the issue's targets, from OUTDIR.

Run: ``python -m benchmarks.summary OUTDIR``. Reads ``stages.tsv``, the stages' junit XML files and
the benchmarks' JSON files (whatever of them exists: a stage cut short leaves partial results);
prints the table and writes ``OUTDIR/summary.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from benchmarks.tables import format_table, format_value

BENCHMARKS = ("attention", "train_step", "decode", "memory", "norm_rope")


def _load(out_dir: Path, name: str) -> dict[str, Any] | None:
    path = out_dir / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # a stage killed while writing
        return None


def junit_counts(junit: Path) -> str | None:
    """``"12 passed, 1 failed, 3 skipped"`` from a junit XML file, None when absent or unreadable."""
    if not junit.is_file():
        return None
    try:
        root = ElementTree.parse(junit).getroot()
    except ElementTree.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return f"{passed} passed, {total['failures'] + total['errors']} failed, {total['skipped']} skipped"


def stage_rows(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / "stages.tsv"
    if not path.is_file():
        return []
    rows = []
    with path.open() as handle:
        for record in csv.DictReader(handle, delimiter="\t"):
            status = {"0": "ok", "124": "time limit", "137": "time limit", "skipped": "skipped"}.get(
                record["exit"], f"exit {record['exit']}")
            rows.append({"stage": record["stage"], "status": status, "seconds": record["seconds"],
                         "tests": junit_counts(out_dir / f"{record['stage']}.xml")})
    return rows


def target_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per target of issue 6 that this run measured."""
    rows: list[dict[str, Any]] = []
    attention = results.get("attention")
    if attention:
        for t in attention.get("targets", []):
            rows.append({"what": f"attention: {t['target']} ({t['mode']}, {t['backend'] or 'not measured'})",
                         "value": t["ratio"], "goal": t["goal"], "met": t["met"]})
    train = results.get("train_step")
    if train:
        for t in train.get("ratios", []):
            rows.append({"what": f"train tokens/s, {t['data']} length: minivlm / peer",
                         "value": t["ratio"], "goal": t["goal"], "met": t["met"]})
    decode = results.get("decode")
    if decode:
        for t in decode.get("targets", []):
            rows.append({"what": f"decode: {t['target']} ({t['minivlm']})", "value": t["tokens_per_s"],
                         "goal": t["goal"], "met": t["met"]})
    memory = results.get("memory")
    if memory:
        for t in memory.get("ratios", []):
            if t["what"] == "loss layer":
                rows.append({"what": f"loss-layer memory fused / naive ({t['device']}, {t['dtype']})",
                             "value": t["ratio"], "goal": t["goal"], "met": t["met"]})
    norm_rope = results.get("norm_rope")
    if norm_rope:
        for t in norm_rope.get("decisions", []):
            rows.append({"what": f"Triton {t['op']} {t['mode']}: {t['decision']}",
                         "value": t["compiled_of_copy"], "goal": None, "met": None})
    return rows


def summarize(out_dir: Path) -> str:
    results = {name: data for name in BENCHMARKS if (data := _load(out_dir, name)) is not None}
    env = next((data["environment"] for data in results.values()), None)
    lines = []
    if env:
        lines.append(f"gpu_check summary: {env['device']}, torch {env['torch']}, triton {env['triton']}, "
                     f"{env['date_utc']} UTC, commit {env['commit']}")
    stages = stage_rows(out_dir)
    if stages:
        lines.append(format_table(stages, ["stage", "status", "seconds", "tests"]))
    missing = [name for name in BENCHMARKS if name not in results]
    if missing:
        lines.append(f"no results from: {', '.join(missing)}")
    targets = target_rows(results)
    if targets:
        lines.append("")
        lines.append(format_table(targets, ["what", "value", "goal", "met"], title="issue 6 targets (this run)"))
    summary = {"environment": env, "stages": stages, "targets": targets, "missing": missing}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=format_value) + "\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the directory gpu_check.sh wrote")
    args = parser.parse_args(argv)
    if not args.out_dir.is_dir():
        raise SystemExit(f"{args.out_dir} is not a directory")
    text = summarize(args.out_dir)
    print(text)
    return text


if __name__ == "__main__":
    main()
