"""Architecture ablations: a grid of config variants, trained and evaluated under one budget.

A *grid* (YAML or JSON) names a base preset, the training data, a budget and the axes to sweep::

    name: projectors
    base: tiny
    data: shapes:0.5,easy_vqa_dialogues:0.5
    steps: 120                 # or  tokens: 2000000  (steps then follow each variant's tokens/step)
    eval_limit: 200
    seeds: 1                   # a count (seeds 0..N-1) or a list, e.g. [0, 1, 2]
    overrides: {train.batch_size: 16, train.lr: 1e-3}
    axes:
      projector: [linear, mlp, pixel_shuffle, resampler]
      fusion: [splice, cross_attention, prefix]

With ``design: one_at_a_time`` the variants are the base config plus each axis value changed on
its own (for axes too many to cross); the default ``product`` crosses them all.

Axis keys are anything :func:`minivlm.config.apply_overrides` accepts: a part name sets its kind
(``projector: [...]``), dotted keys set fields (``encoder.feature_layer: [-1, -2]``,
``data.resize: [resize, letterbox]``, ``train.stage: [align, full]``).

Fairness: every variant of a seed trains on the same data in the same order from the same
initial RNG state, for the same number of steps (or, with ``tokens``, the same number of
training tokens), and is scored on the same test samples; a preset's wall-clock limit
(``train.max_minutes``) is switched off. Each run goes through :func:`minivlm.train.recipe.run`
into ``OUT/<variant>/seed_<s>/``, plus ``eval_loss.json`` and ``run_info.json`` (date, machine,
wall time, the minivlm commit: :func:`minivlm.provenance.source_commit`).

Resumable: a run is finished when its ``eval.json`` exists and is then skipped; an unfinished
run continues from its newest checkpoint. A variant that raises is recorded (``error.json``,
and the message in the results) and the sweep moves on. ``reuse_runs_from: <another sweep's
output>`` copies the runs that train exactly as one there (a baseline two grids share) instead of
training them again.

Output in ``OUT``: ``runs.csv`` (one row per run), ``results.csv`` and ``results.md`` (one row
per variant, mean and standard deviation over seeds), ``loss_curves.png``, ``metrics.png``, and
``accuracy_vs_flops.png`` (cost against quality, one point per variant), and ``grid.json`` +
``base_config.json`` (what the runs were made from; a later invocation with other settings is
refused rather than mixed in). Tables give the mean ± standard error over seeds, and
``results.md`` lists as *findings* the differences from the baseline variant that exceed twice
their standard error (:mod:`~minivlm.ablate.findings`).

One idea per module: :mod:`~minivlm.ablate.grid` (the grid file and its variants),
:mod:`~minivlm.ablate.run` (running the sweep), :mod:`~minivlm.ablate.reuse` (runs taken from
another sweep), :mod:`~minivlm.ablate.results` (collecting runs
per variant), :mod:`~minivlm.ablate.findings` (what the differences support),
:mod:`~minivlm.ablate.report` (tables and figures).
"""

from minivlm.ablate.grid import (
    BASE_CONFIG_FILE,
    GRID_FILE,
    AblationGrid,
    GridError,
    Variant,
    override_value,
)
from minivlm.ablate.run import (
    DEFAULT_EVAL_LOSS_SAMPLES,
    TOKEN_ESTIMATE_SAMPLES,
    PlannedRun,
    SweepOutcome,
    check_output_dir,
    estimate_tokens_per_step,
    log,
    parse_shard,
    plan_runs,
    run_ablation,
    steps_for_tokens,
    write_eval_loss,
)
from minivlm.ablate.results import (
    ERROR_FILE,
    EVAL_FILE,
    EVAL_LOSS_FILE,
    FINAL_LOSS_FRACTION,
    RUN_INFO_FILE,
    RunRecord,
    SeedStat,
    VariantShape,
    VariantSummary,
    collect,
    detail_metrics,
    headline_metrics,
    is_finished,
    machine_description,
    read_run,
    run_dir_of,
    variant_shape,
)
from minivlm.ablate.findings import FINDING_SE, Comparison, compare, findings_markdown
from minivlm.ablate.report import (
    MAX_DEFAULT_PANELS,
    accuracy_vs_flops_figure,
    load_results,
    loss_curves_figure,
    metric_bars_figure,
    results_markdown,
    write_report,
)

__all__ = [
    "AblationGrid",
    "Comparison",
    "FINDING_SE",
    "SeedStat",
    "accuracy_vs_flops_figure",
    "compare",
    "findings_markdown",
    "BASE_CONFIG_FILE",
    "DEFAULT_EVAL_LOSS_SAMPLES",
    "ERROR_FILE",
    "EVAL_FILE",
    "EVAL_LOSS_FILE",
    "FINAL_LOSS_FRACTION",
    "GRID_FILE",
    "GridError",
    "MAX_DEFAULT_PANELS",
    "PlannedRun",
    "RUN_INFO_FILE",
    "RunRecord",
    "SweepOutcome",
    "TOKEN_ESTIMATE_SAMPLES",
    "Variant",
    "VariantShape",
    "VariantSummary",
    "check_output_dir",
    "collect",
    "detail_metrics",
    "estimate_tokens_per_step",
    "headline_metrics",
    "is_finished",
    "load_results",
    "log",
    "loss_curves_figure",
    "machine_description",
    "metric_bars_figure",
    "override_value",
    "parse_shard",
    "plan_runs",
    "read_run",
    "results_markdown",
    "run_ablation",
    "run_dir_of",
    "steps_for_tokens",
    "variant_shape",
    "write_eval_loss",
    "write_report",
]
