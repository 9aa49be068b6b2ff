"""The headline of a choice: the winner of each mode against the best peer, as one Markdown table and
one plot per (model, task, mode), written by ``flowsieve choose --out DIR`` from the result stores.

Table: per mode, task, model and keep, the share of the full context's result kept
(:mod:`flowsieve.bench.choose`) by the mode's winner and by the peer of highest aggregate, and the
KV bytes each keeps relative to the full cache. Plots: share of the full result against keep, with at
most six series — the winner, the two next flowsieve candidates, the best peer and the full context
(1 by definition). Plots of an earlier run in ``DIR`` are removed first, so none is left stale.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flowsieve.bench.choose import Standing, standings, winners

PLOT_PREFIX = "share_vs_keep_"


def _kv_ratio(rows: list[Mapping[str, Any]]) -> dict[tuple, float]:
    """(mode, system, method, model, task, keep) -> mean kv_bytes / kv_bytes_full."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get("kv_bytes") and r.get("kv_bytes_full"):
            key = (r["mode"], r["system"], r["method"], r["model"], r["task"], float(r["keep"]))
            acc[key].append(r["kv_bytes"] / r["kv_bytes_full"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _series(table: list[Standing]) -> list[Standing]:
    ours = [s for s in table if s.system == "flowsieve"][:3]
    peers = [s for s in table if s.system != "flowsieve"][:1]
    return ours + peers


def markdown_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """Winner against best peer per mode, task, model and keep (percent of full; KV bytes / full)."""
    rows = list(rows)
    kv = _kv_ratio(rows)
    table = standings(rows)
    win = winners(rows)
    lines = [
        "| mode | task | model | keep | winner: share of full | best peer | peer: share of full "
        "| KV bytes / full (winner, peer) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, w in win.items():
        peer = next((s for s in table[mode] if s.system != "flowsieve"), None)
        for model, task, keep in sorted(w.shares):
            p = peer.shares.get((model, task, keep)) if peer else None
            base = task.split("[")[0]
            kw = kv.get((mode, w.system, w.method, model, base, keep))
            kp = kv.get((mode, peer.system, peer.method, model, base, keep)) if peer else None
            lines.append(
                f"| {mode} | {task} | {model} | {keep:g} | **{100 * w.shares[(model, task, keep)]:.0f}%** "
                f"| {peer.label if peer else '–'} | {'–' if p is None else f'{100 * p:.0f}%'} "
                f"| {'–' if kw is None else f'{kw:.2f}'}, {'–' if kp is None else f'{kp:.2f}'} |"
            )
    head = [f"Winners: {', '.join(f'{m}: `{w.label}` ({100 * w.aggregate:.1f}%)' for m, w in win.items())}."]
    return "\n".join([*head, "", *lines]) + "\n"


def write(rows: Iterable[Mapping[str, Any]], out: str | Path) -> list[Path]:
    """Write ``headline.md`` and the plots into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rows = list(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PLOT_PREFIX}*.png"):
        old.unlink()
    written = [out / "headline.md"]
    written[0].write_text(markdown_table(rows), encoding="utf-8")
    for mode, table in standings(rows).items():
        series = _series(table)
        cells = sorted({(m, t) for s in series for m, t, _ in s.shares})
        for model, task in cells:
            fig = Figure(figsize=(5.5, 3.6), layout="constrained")
            ax = fig.add_subplot()
            keeps = sorted({k for s in series for m, t, k in s.shares if (m, t) == (model, task)})
            ax.plot(keeps, [1.0] * len(keeps), color="black", linestyle="--", label="full context")
            for i, s in enumerate(series):
                pts = [(k, s.shares[(model, task, k)]) for k in keeps if (model, task, k) in s.shares]
                if pts:
                    marker = "o" if s.system == "flowsieve" else "s"
                    size = 9 - 1.5 * i  # equal values stay visible: later series draw smaller
                    ax.plot(*zip(*pts, strict=True), marker=marker, markersize=size, label=s.label)
            ax.set_xscale("log")
            ax.set_xticks(keeps, [f"{k:g}" for k in keeps])
            ax.minorticks_off()
            ax.set_ylim(0, 1.05)
            ax.set_xlabel("keep (share of KV entries)")
            ax.set_ylabel("share of the full context's result")
            ax.set_title(f"{model} · {task} · {mode}", fontsize=9)
            ax.legend(fontsize=7, loc="lower right")
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{PLOT_PREFIX}{model}_{task}_{mode}").strip("_")
            path = out / f"{name}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    return written
