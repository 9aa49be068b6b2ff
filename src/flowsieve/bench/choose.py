"""The pre-declared aggregate that chooses the default sieve per mode.

The rule, fixed before any candidate ran on the headline data:

* a **cell** is one (model, task with its parameters, keep, mode) — one group of items the full
  context also answered;
* in a cell, a candidate's **share** is the share of the full context's result it keeps:
  ``min(1, candidate mean score / full mean score)`` for scored tasks and
  ``min(1, full bits per byte / candidate bits per byte)`` for ``lm``;
* a cell whose full-context mean score is below :data:`MIN_FULL` measures nothing and is left out;
* a flowsieve candidate's **aggregate** per mode is its mean share over all the mode's cells; a
  cell it has no rows in (a failure) counts 0. A peer's is its mean over the cells it supports
  (kvpress and LLMLingua do not run every model or task); the table gives its cell count;
* the **winner** of a mode is the flowsieve candidate of highest aggregate (peers are ranked beside
  it but cannot be the default); a tie goes to the cheaper candidate listed first.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from flowsieve.errors import FlowsieveError

MIN_FULL = 0.15
FULL = "full"


@dataclass(frozen=True)
class Standing:
    """One candidate's aggregate in one mode."""

    system: str
    method: str
    mode: str
    aggregate: float
    cells: int
    shares: dict[tuple[str, str, float], float]  # (model, task label, keep) -> share

    @property
    def label(self) -> str:
        return self.method if self.system == "flowsieve" else f"{self.system}:{self.method}"


def _task_label(row: Mapping[str, Any]) -> str:
    params = row.get("task_params") or {}
    if isinstance(params, str):
        params = json.loads(params)
    extra = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if v is not None)
    return f"{row['task']}[{extra}]" if extra else str(row["task"])


def _mean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def _value(row: Mapping[str, Any]) -> float | None:
    if row["task"] == "lm":
        return row.get("bits_per_byte")
    return row.get("score")


def shares(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[tuple[str, str], dict[tuple, float]]]:
    """Per mode, per candidate ``(system, method)``, per cell ``(model, task label, keep)``: the share
    of the full context's result kept (see the module docstring). Cells the full context fails are
    left out."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    full: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        v = _value(r)
        if v is None:
            continue
        mode, model, task = r["mode"], r["model"], _task_label(r)
        if r["method"] == FULL:
            full[(mode, model, task)].append(v)
        else:
            groups[(mode, r["system"], r["method"], model, task, float(r["keep"]))].append(v)
    out: dict[str, dict[tuple[str, str], dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for (mode, system, method, model, task, keep), vals in groups.items():
        f, m = _mean(full.get((mode, model, task), [])), _mean(vals)
        if f is None or m is None:
            continue
        if task.split("[")[0] == "lm":
            share = min(1.0, f / m) if m > 0 else 0.0
        else:
            if f < MIN_FULL:
                continue
            share = min(1.0, m / f)
        out[mode][(system, method)][(model, task, keep)] = share
    return {k: dict(v) for k, v in out.items()}


def standings(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Standing]]:
    """Per mode, every candidate's aggregate, best first (ties keep the order of first appearance)."""
    rows = list(rows)
    by_mode = shares(rows)
    order = {}
    for r in rows:
        order.setdefault((r["system"], r["method"]), len(order))
    out: dict[str, list[Standing]] = {}
    for mode, cands in by_mode.items():
        cells = sorted({c for per in cands.values() for c in per})
        table = []
        for (system, method), per in cands.items():
            over = cells if system == "flowsieve" else sorted(per)
            agg = sum(per.get(c, 0.0) for c in over) / len(over)
            table.append(Standing(system, method, mode, agg, len(per), dict(per)))
        table.sort(key=lambda s: (-s.aggregate, order[(s.system, s.method)]))
        out[mode] = table
    return out


def winners(rows: Iterable[Mapping[str, Any]]) -> dict[str, Standing]:
    """The flowsieve candidate of highest aggregate per mode."""
    out = {}
    for mode, table in standings(rows).items():
        ours = [s for s in table if s.system == "flowsieve"]
        if not ours:
            raise FlowsieveError(f"no flowsieve candidate has rows in mode '{mode}'")
        out[mode] = ours[0]
    return out


def markdown(rows: Iterable[Mapping[str, Any]]) -> str:
    """One table per mode: every candidate's aggregate and its share per cell (percent)."""
    parts = []
    for mode, table in standings(rows).items():
        cells = sorted({c for s in table for c in s.shares})
        head = ["candidate", "aggregate", "cells", *[f"{m} {t} @{k:g}" for m, t, k in cells]]
        lines = [f"### {mode}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in table:
            vals = [f"{100 * s.shares[c]:.0f}" if c in s.shares else "–" for c in cells]
            row = [s.label, f"**{100 * s.aggregate:.1f}**", str(s.cells), *vals]
            lines.append("| " + " | ".join(row) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
