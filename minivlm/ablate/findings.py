"""Which differences between variants an ablation can claim: each variant against the grid's
baseline, per metric, with the standard error of the difference.

A difference of means over seeds is a *finding* when it exceeds twice its standard error,
``|mean_v - mean_b| > 2 * sqrt(se_v**2 + se_b**2)`` (roughly a 95% interval that excludes
zero), and both sides have at least two finished seeds. The two standard errors are combined as
for independent samples, which is conservative here: runs of one seed share their data order
and initial RNG state, so their differences vary less than independent runs would.

A share of ``n`` evaluated items (an accuracy, a recall@k) moves in steps of ``1 / n``, so a few
seeds can agree exactly by chance: 199/200 on both seeds of one variant and 200/200 on both of the
other is a spread of zero, not a certainty. Each side's spread over seeds is therefore taken as at
least one such step (:attr:`Comparison.resolution`): a difference of a single item is never a
finding, however well the seeds agree. Retrieval ranks have steps too: a mean rank over ``n``
queries moves by ``1 / n`` when one query moves one place, and a median of integer ranks moves in
half ranks (median rank 2 on every seed against 1 on every seed is a real but finite difference).
Caption scores (BLEU-4, CIDEr) are continuous and keep their measured spread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from minivlm.ablate.results import RunRecord, SeedStat, VariantSummary


#: A difference counts as a finding above this many standard errors.
FINDING_SE = 2.0
#: Fewest finished seeds on each side before a difference can be called a finding.
MIN_SEEDS = 2
#: Continuous scores: no step, their spread over seeds is what it measures.
SCORES = ("_bleu4", "_cider")
#: The step of a median of integer ranks.
MEDIAN_RANK_STEP = 0.5
#: Share of comparisons with no true difference that still exceed FINDING_SE (normal errors).
CHANCE_RATE = 0.0455


@dataclass(frozen=True)
class Comparison:
    """One variant against the baseline on one metric; ``delta = variant - baseline``."""

    variant: str
    metric: str
    variant_stat: SeedStat
    baseline_stat: SeedStat
    #: The metric's smallest step (one evaluated item, ``1 / items``; half a rank for a median
    #: rank; 0 for a caption score): the least spread over seeds each side is taken to have.
    resolution: float = 0.0

    @property
    def delta(self) -> float:
        return self.variant_stat.mean - self.baseline_stat.mean

    @property
    def se(self) -> float:
        return math.hypot(*(max(stat.std, self.resolution) / math.sqrt(stat.n)
                            for stat in (self.variant_stat, self.baseline_stat)))

    @property
    def is_finding(self) -> bool:
        if min(self.variant_stat.n, self.baseline_stat.n) < MIN_SEEDS:
            return False
        return abs(self.delta) > FINDING_SE * self.se

    @property
    def standard_errors(self) -> float:
        """``|delta| / se``; infinite when the seeds of a caption score (no resolution) agree
        exactly on different means."""
        if self.se == 0:
            return math.inf if self.delta else 0.0
        return abs(self.delta) / self.se


def metric_value(run: RunRecord, metric: str) -> float | None:
    """A run's value of ``metric``: an evaluation metric, or ``eval_loss``."""
    return run.eval_loss if metric == "eval_loss" else run.metrics.get(metric)


def compare(summaries: Sequence[VariantSummary], baseline: str, metrics: Sequence[str]) -> list[Comparison]:
    """Every other variant against ``baseline`` (a variant name) on each metric both measured."""
    base = next((s for s in summaries if s.variant.name == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {[s.variant.name for s in summaries]}")
    out = []
    for s in summaries:
        if s is base:
            continue
        for metric in metrics:
            mine = s.stat(lambda r, m=metric: metric_value(r, m))
            theirs = base.stat(lambda r, m=metric: metric_value(r, m))
            if mine is not None and theirs is not None:
                out.append(Comparison(s.variant.label, metric, mine, theirs, resolution(metric, s, base)))
    return out


def resolution(metric: str, *summaries: VariantSummary) -> float:
    """The smallest step of ``metric``: half a rank for a median rank; else one item (or one query
    moving one place, for a mean rank) on the smaller evaluation of ``summaries``; 0 for a caption
    score or when the runs did not record how many items they evaluated."""
    if metric.endswith(SCORES):
        return 0.0
    if metric.endswith("_median_rank"):
        return MEDIAN_RANK_STEP
    items = [n for n in (s.fewest_items(metric) for s in summaries) if n]
    return 1.0 / min(items) if items else 0.0


def findings_markdown(comparisons: Sequence[Comparison], baseline_label: str) -> list[str]:
    """The report's findings section: each difference beyond 2 SE, largest first, then a count
    of those that are not."""
    lines = ["## Findings", "",
             f"Each variant against the baseline `{baseline_label}`: difference of means ± its standard "
             f"error; listed when it exceeds {FINDING_SE:g} standard errors with >= {MIN_SEEDS} seeds on each side.", ""]
    found = sorted((c for c in comparisons if c.is_finding), key=lambda c: -c.standard_errors)
    if not comparisons:
        return lines + ["No variant has results to compare with the baseline yet."]
    if not found:
        lines.append(f"None: no difference among the {len(comparisons)} compared exceeds {FINDING_SE:g} standard errors.")
    for c in found:
        lines.append(f"- `{c.variant}`: {c.metric} {c.variant_stat.mean:.3f} vs {c.baseline_stat.mean:.3f} "
                     f"({c.delta:+.3f} ± {c.se:.3f}, {_times(c.standard_errors)} SE)")
    rest = len(comparisons) - len(found)
    if found and rest:
        lines += ["", f"The other {rest} differences are within {FINDING_SE:g} standard errors: not findings."]
    if found:
        # Two standard errors is a ~95% interval for one comparison; a table makes many.
        lines += ["", f"Of {len(comparisons)} comparisons about {CHANCE_RATE * len(comparisons):.0f} would pass "
                      f"{FINDING_SE:g} SE by chance alone (more with few seeds, whose standard errors are themselves "
                      "uncertain): a finding that recurs across related metrics or variants is the one to trust."]
    return lines


def _times(n: float) -> str:
    return "inf" if math.isinf(n) else f"{n:.1f}"
