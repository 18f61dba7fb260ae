"""Plain-text tables for the benchmarks' output (no torch import: ``benchmarks.summary`` stays quick)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01 or magnitude == 0:
            return f"{value:.2f}"
        return f"{value:.2e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Rows as an aligned plain-text table (numbers right-aligned), optionally titled."""
    cells = [[format_value(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(r[i]) for r in cells]) for i, column in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values: Iterable[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [title] if title else []
    out.append(line(columns))
    out.append(line("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)
