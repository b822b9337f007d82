"""Markdown tables of evaluation results: one SAE's metrics, or several side by side with ratios.

The input is what :func:`hsae_runtime.training.evaluate.evaluate_many` returns, or the
``"models"`` of an ``hsae-runtime eval --json`` file: ``{name: result}``, each result holding
``"budgets": {"k": {metric: value}}``. Per metric, :func:`compare_tables` prints one table
(rows: models, columns: budgets) and one of the reference model's value divided by each other
model's at each budget ("htopk ÷ topk8" at k = 8 is the Pareto comparison); for metrics that
are differences already (``ce_delta``, ``kl``: small, possibly negative) it adds the
difference in nats. A budget a model was not evaluated at, a NaN, or a ratio over zero shows
as "–". Nothing here imports torch, so scripts can tabulate JSON files cheaply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

COMPARE_METRICS: tuple[str, ...] = (
    "fvu", "fvu_token", "mse", "ce_delta", "kl", "l0", "dead_fraction",
)
"""Metrics :func:`compare_tables` shows by default, in this order."""

DIFFERENCE_METRICS: frozenset[str] = frozenset({"ce_delta", "kl"})
"""Metrics whose reference-minus-other difference (nats) is shown next to the ratio."""

_FORMATS = {
    "fvu": ".4f", "fvu_token": ".4f", "explained_variance": ".4f", "mse": ".4g", "l0": ".1f",
    "dead_fraction": ".3f", "ce": ".4f", "ce_delta": "+.4f", "ce_recovered": ".3f",
    "kl": ".4f",
}

_MISSING = "–"


def _cell(value: float | None, fmt: str) -> str:
    if value is None or not math.isfinite(value):
        return _MISSING
    return format(value, fmt)


def _value(result: Mapping[str, Any], metric: str, k: int) -> float | None:
    entry = result["budgets"].get(str(k))
    return None if entry is None or metric not in entry else float(entry[metric])


def _budgets(results: Mapping[str, Mapping[str, Any]]) -> list[int]:
    return sorted({int(k) for r in results.values() for k in r["budgets"]})


def _markdown(corner: str, budgets: Sequence[int], rows: Sequence[tuple[str, list[str]]]) -> str:
    head = f"| {corner} | " + " | ".join(f"k={k}" for k in budgets) + " |"
    rule = "|---" * (len(budgets) + 1) + "|"
    return "\n".join([head, rule, *(f"| {name} | " + " | ".join(cells) + " |"
                                     for name, cells in rows)])


def metric_table(results: Mapping[str, Mapping[str, Any]], metric: str) -> str:
    """One markdown table of ``metric``: a row per model, a column per budget."""
    budgets = _budgets(results)
    fmt = _FORMATS.get(metric, ".4g")
    rows = [(name, [_cell(_value(r, metric, k), fmt) for k in budgets])
            for name, r in results.items()]
    return _markdown(metric, budgets, rows)


def ratio_table(results: Mapping[str, Mapping[str, Any]], metric: str, reference: str,
                *, difference: bool = False) -> str:
    """``reference ÷ other`` of ``metric`` per budget, a row per other model (``reference −
    other`` with ``difference=True``)."""
    if reference not in results:
        raise ValueError(f"reference model {reference!r} is not among {list(results)}")
    budgets = _budgets(results)
    ref = results[reference]
    rows = []
    for name, r in results.items():
        if name == reference:
            continue
        cells = []
        for k in budgets:
            a, b = _value(ref, metric, k), _value(r, metric, k)
            if a is None or b is None:
                cells.append(_MISSING)
            elif difference:
                cells.append(_cell(a - b, "+.4f"))
            else:
                cells.append(_cell(a / b, ".3f") if b != 0 else _MISSING)
        rows.append((f"{reference} {'−' if difference else '÷'} {name}", cells))
    return _markdown(f"{metric} {'difference (nats)' if difference else 'ratio'}", budgets, rows)


def compare_tables(results: Mapping[str, Mapping[str, Any]], *, reference: str | None = None,
                   metrics: Sequence[str] = COMPARE_METRICS) -> str:
    """Markdown: per metric, the side-by-side table, then (with two or more models) the ratio
    table of ``reference`` (default: the first model) over every other model, and the
    difference table for :data:`DIFFERENCE_METRICS`."""
    if not results:
        raise ValueError("no results to tabulate")
    reference = reference or next(iter(results))
    parts = []
    for metric in metrics:
        parts.append(f"### {metric}\n\n{metric_table(results, metric)}")
        if len(results) > 1:
            parts.append(ratio_table(results, metric, reference))
            if metric in DIFFERENCE_METRICS:
                parts.append(ratio_table(results, metric, reference, difference=True))
    return "\n\n".join(parts) + "\n"


def model_table(result: Mapping[str, Any], metrics: Sequence[str] = COMPARE_METRICS) -> str:
    """One model's metrics as markdown: a row per budget, a column per metric."""
    budgets = sorted(int(k) for k in result["budgets"])
    head = "| k | " + " | ".join(metrics) + " |"
    rule = "|---" * (len(metrics) + 1) + "|"
    rows = [f"| {k} | " + " | ".join(_cell(_value(result, m, k), _FORMATS.get(m, ".4g"))
                                     for m in metrics) + " |" for k in budgets]
    return "\n".join([head, rule, *rows])
