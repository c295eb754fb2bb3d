"""A metrics file (metrics/metrics.json) as Markdown, rendered generically: whatever keys
evaluate writes appear, each number with its `<name>_low`/`<name>_high` interval when the file
has one, and every table-shaped dict (per_class; operating points by name) as a table. The
model card (card.py) shows its test metrics this way.
"""
from __future__ import annotations

import math
from typing import Any, Iterator


def number(value: Any) -> str:
    """A metric as the card prints it: integers whole, other numbers to 4 decimals, None n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def interval(low: Any, high: Any) -> str:
    return "" if low is None or high is None else f"[{number(low)}, {number(high)}]"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


def _is_table(value: Any) -> bool:
    """A dict of flat dicts that share their keys (per_class; operating points by name): a table."""
    if not isinstance(value, dict) or not value or not all(isinstance(v, dict) and v for v in value.values()):
        return False
    keys = [tuple(v) for v in value.values()]
    return len(set(keys)) == 1 and all(_scalar(x) for v in value.values() for x in v.values())


def metric_rows(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any, Any, Any]]:
    """(dotted name, value, low, high) of every numeric metric outside tables, each with its
    `<name>_low`/`<name>_high` interval when the file has one (those keys are not rows)."""
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if not _is_table(value):
                yield from metric_rows(value, f"{name}.")
            continue
        if not _scalar(value) or isinstance(value, bool):
            continue
        if key.endswith(("_low", "_high")) and key.rsplit("_", 1)[0] in metrics:
            continue
        yield name, value, metrics.get(f"{key}_low"), metrics.get(f"{key}_high")


def metric_tables(metrics: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, dict[str, dict[str, Any]]]]:
    """(dotted name, the dict) of every table-shaped dict in the metrics."""
    for key, value in metrics.items():
        if _is_table(value):
            yield f"{prefix}{key}", value
        elif isinstance(value, dict):
            yield from metric_tables(value, f"{prefix}{key}.")



def markdown_table(name: str, rows: dict[str, dict[str, Any]]) -> list[str]:
    """A table-shaped dict (metric_tables) as a Markdown table titled `name`, intervals beside values."""
    fields = [f for f in next(iter(rows.values())) if not (f.endswith(("_low", "_high")) and f.rsplit("_", 1)[0] in
                                                           next(iter(rows.values())))]
    out = [f"`{name}`:", "", "| | " + " | ".join(fields) + " |", "|---|" + "--:|" * len(fields)]
    for row, values in rows.items():
        cells = []
        for f in fields:
            shown = number(values[f])
            span = interval(values.get(f"{f}_low"), values.get(f"{f}_high"))
            cells.append(f"{shown} {span}".rstrip())
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out + [""]
