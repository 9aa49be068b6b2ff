"""The report's PNG plots: mean score against the keep ratio (:func:`plot_score_vs_keep`), and
against prefill time and KV-cache bytes with the Pareto frontier (:func:`plot_pareto`). Drawn with
matplotlib's Agg canvas (no display)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowsieve.bench.report_data import Section, _setting_label
from flowsieve.bench.store import FULL


def _colors(lines: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    names = sorted(set(lines) - {FULL})
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    out: dict[str, Any] = {FULL: "black"}
    for i, n in enumerate(names):
        out[n] = cmap(i % cmap.N)
    return out


def _marker(line: str) -> str:
    return "o" if ":" not in line else "s"  # peers get squares


def _legend(fig: Any, handles: list[Any], labels: list[str], per_column: int = 18) -> None:
    """A legend right of the axes, in as many columns as needed for every entry to fit the
    figure's height (the figure widens by one column's width per extra column)."""
    ncol = max(1, math.ceil(len(labels) / per_column))
    if ncol > 1:
        w, h = fig.get_size_inches()
        fig.set_size_inches(w + 2.6 * (ncol - 1), h)
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, ncol=ncol)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_score_vs_keep(sec: Section, path: Path, colors: Mapping[str, Any]) -> Path:
    """Mean score against keep ratio, one panel per mode; budget cells are left out."""
    modes = list(sec.modes)
    fig = _figure(5.2 * len(modes) + 2.2, 4.2)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        groups = sec.modes[mode]
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for g in groups.values():
            keep, budget = g.setting
            score = g.mean("score")
            if g.line != FULL and not budget and score is not None:
                lines[g.line].append((keep, score))
        for line in sorted(lines):
            pts = sorted(lines[line])
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=_marker(line),
                linestyle="--" if ":" in line else "-",
                color=colors.get(line),
                label=line,
            )
        full = sec.full(mode)
        if full is not None and full.mean("score") is not None:
            ax.axhline(full.mean("score"), color="black", linestyle=":", linewidth=1.5, label="full context")
        ax.set_title(f"{mode}", fontsize=10)
        ax.set_xlabel("keep ratio")
        ax.set_ylabel("mean score")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        _legend(fig, handles, labels)
    fig.suptitle(f"{sec.model} · {sec.label}: score vs keep", fontsize=11)
    fig.savefig(path, format="png")
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (lower x, higher y), by increasing x."""
    front: list[tuple[float, float]] = []
    best = -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_pareto(sec: Section, path: Path, colors: Mapping[str, Any]) -> Path:
    """Score against prefill seconds and against KV bytes, one row per mode, frontier drawn."""
    modes = list(sec.modes)
    fig = _figure(11.5, 3.8 * len(modes) + 0.4)
    axes = fig.subplots(len(modes), 2, squeeze=False)
    seen: dict[str, Any] = {}
    for row, mode in zip(axes, modes):
        groups = sec.modes[mode]
        for ax, column, xlabel in (
            (row[0], "prefill_s", "mean prefill time (s)"),
            (row[1], "kv_bytes", "mean KV-cache size (MiB)"),
        ):
            scale = 2**20 if column == "kv_bytes" else 1.0
            pts = []
            for g in groups.values():
                x, y = g.mean(column), g.mean("score")
                if x is None or y is None:
                    continue
                x /= scale
                pts.append((x, y))
                h = ax.scatter(
                    [x],
                    [y],
                    color=colors.get(g.line),
                    marker="*" if g.line == FULL else _marker(g.line),
                    s=140 if g.line == FULL else 40,
                    zorder=3,
                    label=g.line,
                )
                seen.setdefault(g.line, h)
                if g.line != FULL:
                    ax.annotate(
                        _setting_label(g.setting).replace("keep ", ""),
                        (x, y),
                        textcoords="offset points",
                        xytext=(4, 3),
                        fontsize=6,
                    )
            front = pareto_front(pts)
            if front:
                fx, fy = [p[0] for p in front], [p[1] for p in front]
                ax.step(fx, fy, where="post", color="grey", alpha=0.6, zorder=2)
                ax.scatter(fx, fy, s=150, facecolors="none", edgecolors="grey", linewidths=1.2, zorder=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("mean score")
            ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{mode}", fontsize=10)
            ax.grid(alpha=0.3)
    if seen:
        _legend(fig, list(seen.values()), list(seen))
    fig.suptitle(f"{sec.model} · {sec.label}: score vs cost (Pareto frontier ringed in grey)", fontsize=11)
    fig.savefig(path, format="png")
    return path


__all__ = ["pareto_front", "plot_pareto", "plot_score_vs_keep"]
