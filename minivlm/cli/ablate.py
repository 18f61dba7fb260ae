"""``minivlm ablate GRID_FILE``: run an architecture ablation grid (see :mod:`minivlm.ablate`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ablate", help="train and evaluate a grid of config variants under one budget; write tables and plots",
        description="Train every variant of a grid (YAML/JSON) with the same data order, seeds and budget, "
                    "then write results.csv, results.md, loss_curves.png and metrics.png. Finished runs are "
                    "skipped on a re-run; interrupted runs resume from their checkpoint.")
    p.add_argument("grid_file", help="grid file (.yaml, .yml or .json), e.g. benchmarks/ablations/projectors.yaml")
    p.add_argument("--out", help="result directory (default runs/ablations/<grid name>)")
    p.add_argument("--seeds", type=int, help="run seeds 0..N-1 (replaces the grid's seeds)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=A,B",
                   help="add or replace an axis, e.g. --grid encoder.feature_layer=-1,-2 (repeatable)")
    p.add_argument("--steps", type=int, help="step budget (replaces the grid's steps or tokens)")
    p.add_argument("--eval-limit", type=int, help="test samples per task (replaces the grid's eval_limit)")
    p.add_argument("--shard", metavar="I/N", default="0/1",
                   help="run every N-th run starting at the I-th, so N processes share the sweep "
                        "(e.g. --shard 0/2 and --shard 1/2 side by side on 2 cores)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state; train nothing")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables and figures from the runs finished so far in --out; train nothing "
                        "(e.g. while another process runs the sweep)")
    p.set_defaults(func=cmd_ablate)


def cmd_ablate(args: argparse.Namespace) -> int:
    from minivlm.ablate import AblationGrid, check_output_dir, is_finished, parse_shard, run_ablation, write_report
    from minivlm.ablate.grid import GRID_FILE
    from minivlm.ablate.run import assign_runs

    first, every = shard = parse_shard(args.shard)
    grid = AblationGrid.load(args.grid_file).with_axes(args.grid).with_budget(args.steps, args.eval_limit)
    if args.seeds is not None:
        grid = grid.with_seeds(args.seeds)
    out_dir = Path(args.out) if args.out else Path("runs") / "ablations" / grid.name
    if args.dry_run:
        plans, twins = assign_runs(grid, out_dir, shard)
        print(f"grid {grid.name}: {len(grid.variants())} variants x {len(grid.seeds)} seeds -> {out_dir}"
              + (f" (shard {first}/{every}: {len(plans)} runs)" if every > 1 else ""))
        for run_dir, twin in twins.items():
            state = ("finished" if is_finished(run_dir) else
                     f"to copy from {twin}" + ("" if is_finished(twin) else " once it finishes there"))
            print(f"  {run_dir.parent.name}/{run_dir.name}: {state}")
        for plan in plans:
            state = ("finished" if is_finished(plan.run_dir) else
                     f"invalid: {plan.error}" if plan.config is None else f"to run, {plan.config.train.steps} steps")
            print(f"  {plan.variant.name}/seed_{plan.seed}: {state}")
        return 0
    if args.report_only:
        if not (out_dir / GRID_FILE).is_file():
            raise FileNotFoundError(f"{out_dir} is not an ablation result directory (no {GRID_FILE}): "
                                    f"run the grid into it first, or pass the --out it ran into")
        check_output_dir(grid, out_dir)
        reports = write_report(grid, out_dir)
        print(reports["results_md"].read_text())
        for name, path in reports.items():
            print(f"{name}: {path}")
        return 0
    outcome = run_ablation(grid, out_dir, shard=shard)
    print(outcome.reports["results_md"].read_text())
    print(f"ran {len(outcome.ran)}, skipped {len(outcome.skipped)} finished, {len(outcome.failed)} failed"
          + (f", copied {len(outcome.reused)} from {grid.reuse_runs_from}" if outcome.reused else ""))
    for tag, error in outcome.failed.items():
        print(f"  failed {tag}: {error}")
    for name, path in outcome.reports.items():
        print(f"{name}: {path}")
    if outcome.interrupted:
        print("interrupted: run the same command again to resume")
        return 130
    return 0
