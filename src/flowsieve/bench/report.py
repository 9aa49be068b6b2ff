"""The bench report: PNG plots and one self-contained ``index.html`` from a results store.

:func:`write_report` reads every row of a :class:`~flowsieve.bench.store.Store` and writes, per
(model, task variant):

- ``score_vs_keep_*.png``: mean score against the keep ratio, one line per method (and site) or
  peer method, one panel per mode, the full-context score as a dashed horizontal line;
- ``pareto_*.png``: mean score against mean prefill time and against mean KV-cache bytes, one
  point per (method, keep), the Pareto frontier (faster/smaller and better) drawn through them;

and ``index.html`` with the plots embedded as ``data:`` URIs, the tables (mean score per method ×
keep with item counts; the best flowsieve method against each peer's best at every keep; speed and
memory ratios against the full-context run of the same items, with the rows' token agreement over
the full run's first N tokens and KL at the answer start; for the teacher-forced ``lm`` task, bits
per byte (lower is better) and Information Capacity), the settings (models, versions,
git hashes, machines, sweeps) and the cells or peers that failed, with the reason. Every string
that comes from the store is escaped; the page runs no script.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flowsieve.bench.report_data import (
    Group,
    Section,
    _div,
    _ratio,
    _setting_label,
    _setting_order,
    information_capacity,
    line_label,
    ratios,
    sections,
)
from flowsieve.bench.report_plots import _colors, plot_pareto, plot_score_vs_keep
from flowsieve.bench.store import FULL, Store, now

PEER_NOTE = (
    "Peers run in their own environments (their own transformers version); their time and memory "
    "ratios are against flowsieve's full-context run of the same items."
)


# --- HTML ------------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table; ``header`` and cells are HTML already (escape before)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _score_cell(g: Group | None) -> str:
    if g is None:
        return ""
    return f"{_f(g.mean('score'))} <span class=n>n={len(g.rows)}</span>"


def score_table(sec: Section, mode: str) -> str:
    """Mean score per method line × keep (or budget), with item counts."""
    groups = sec.modes[mode]
    settings = sorted({g.setting for g in groups.values()}, key=_setting_order)
    lines = sorted({g.line for g in groups.values()}, key=lambda s: (s != FULL, ":" in s, s))
    rows = []
    for line in lines:
        rows.append([_e(line), *(_score_cell(groups.get((line, s))) for s in settings)])
    header = ["method", *(_e(_setting_label(s)) for s in settings)]
    return _table(header, rows, "scores")


def best_table(sec: Section, mode: str) -> str:
    """At every keep: the full score, the best flowsieve method and each peer's best."""
    groups = sec.modes[mode]
    systems = sorted({g.system for g in groups.values()}, key=lambda s: (s != "flowsieve", s))
    keeps = sorted(
        {g.setting for g in groups.values() if g.line != FULL and not g.setting[1]}, key=_setting_order
    )
    full = sec.full(mode)
    rows = []
    for s in keeps:
        cells = [_e(_setting_label(s)), _f(full.mean("score")) if full else "—"]
        for system in systems:
            cands = [g for g in groups.values() if g.system == system and g.setting == s and g.line != FULL]
            cands = [g for g in cands if g.mean("score") is not None]
            if not cands:
                cells.append("—")
                continue
            best = max(cands, key=lambda g: (g.mean("score"), -len(g.line)))
            cells.append(f"{_f(best.mean('score'))} <span class=n>{_e(best.line)}, n={len(best.rows)}</span>")
        rows.append(cells)
    if not rows:
        return ""
    header = ["setting", "full context", *(f"best {_e(s)}" for s in systems)]
    return _table(header, rows, "best")


def _has_bits(sec: Section) -> bool:
    return any(
        r.get("bits_per_byte") is not None for gs in sec.modes.values() for g in gs.values() for r in g.rows
    )


def ratio_table(sec: Section, mode: str) -> str:
    """Per method and keep, against the full-context rows of the same items."""
    groups = sec.modes[mode]
    bits = _has_bits(sec)
    rows = []
    for g in sorted(
        groups.values(), key=lambda g: (g.line != FULL, ":" in g.line, g.line, _setting_order(g.setting))
    ):
        if g.line == FULL:
            rows.append(
                [
                    _e(g.line),
                    "",
                    str(len(g.rows)),
                    _f(g.mean("score")),
                    _f(g.mean("score")),
                    _f(g.mean("prefill_s"), 3) + " s",
                    _f(g.mean("decode_tok_s"), 1) + " tok/s",
                    _f(_div(g.mean("kv_bytes"), 2**20), 2) + " MiB",
                    _f(g.mean("peak_rss_mb"), 0) + " MB",
                    "1.00",
                    "1.00",
                    _f(_ratio(g.mean("kept_tokens"), g.mean("prompt_tokens")), 2),
                    _f(g.mean("token_agreement"), 2),
                    _f(g.mean("kl_answer_start"), 4),
                    *([_f(g.mean("bits_per_byte"), 4), _f(information_capacity(g.rows), 4)] if bits else []),
                ]
            )
            continue
        r = ratios(sec, mode, g)
        rows.append(
            [
                _e(g.line),
                _e(_setting_label(g.setting)),
                str(r.n),
                _f(r.score),
                _f(r.score_full),
                _x(r.prefill),
                _x(r.decode),
                _x(r.kv),
                _x(r.rss),
                _f(r.agreement, 2),
                _f(r.word_agreement, 2),
                _f(r.kept, 2),
                _f(r.agree_n, 2),
                _f(r.kl, 4),
                *([_f(r.bpb, 4), _f(r.ic, 4)] if bits else []),
            ]
        )
    n = sorted({(r.get("extra") or {}).get("agree_tokens") for g in groups.values() for r in g.rows} - {None})
    header = [
        "method",
        "setting",
        "items paired",
        "score",
        "full score (same items)",
        "prefill time",
        "decode tok/s",
        "KV bytes",
        "peak RSS",
        "token agreement",
        "word agreement",
        "kept / prompt tokens",
        f"token agreement, first {_e('/'.join(map(str, n)) or 'N')} tokens",
        "KL at answer start (nats)",
        *(["bits / byte (lower is better)", "Information Capacity"] if bits else []),
    ]
    return _table(header, rows, "ratios")


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _json_brief(value: Any) -> str:
    return _e(json.dumps(value, sort_keys=True, default=str))


def settings_html(rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> str:
    models = sorted({r["model"] for r in rows})
    versions = sorted({json.dumps(r.get("versions") or {}, sort_keys=True) for r in rows})
    hashes = sorted({str(r.get("git_hash")) for r in rows})
    items = [
        ("models", ", ".join(_e(m) for m in models) or "—"),
        ("package versions", "<br>".join(_e(v) for v in versions) or "—"),
        ("git hashes", "<br>".join(_e(h) for h in hashes) or "—"),
        ("rows", str(len(rows))),
        ("report made", f"{_e(now())} on {_e(platform.platform())}"),
    ]
    out = "<dl>" + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"
    run_rows = []
    for run in runs:
        m = run.get("machine") or {}
        machine = (
            f"{_e(m.get('platform', '?'))}, {_e(m.get('cpu_count', '?'))} CPUs, "
            f"{_e(m.get('torch_threads', '?'))} torch threads, {_e(m.get('memory_gb', '?'))} GB"
        )
        run_rows.append(
            [
                _e(run["id"]),
                _e(run["started_at"]),
                _e(run.get("finished_at") or "did not finish"),
                _e(run.get("cells_planned") if run.get("cells_planned") is not None else "—"),
                _e(run.get("cells_written") if run.get("cells_written") is not None else "—"),
                _e(run.get("cells_failed") if run.get("cells_failed") is not None else "—"),
                machine,
                _e(run.get("git_hash", "")),
                f"<code>{_json_brief(run.get('config') or {})}</code>",
            ]
        )
    if run_rows:
        header = ["sweep", "started", "finished", "cells", "written", "failed", "machine", "git", "settings"]
        out += "<h3>Sweeps</h3>" + _table(header, run_rows, "runs")
    return out


def failures_html(failures: Sequence[Mapping[str, Any]]) -> str:
    peers = [f for f in failures if f["system"] != "flowsieve"]
    cells = [f for f in failures if f["system"] == "flowsieve"]
    out = "<h3>Peers that failed</h3>"
    if peers:
        rows = [
            [
                _e(f["system"]),
                _e(f["method"]),
                _e("all" if f["keep"] < 0 else f"{f['keep']:g}"),
                _e(f["mode"]),
                _e(f["task"]),
                _e(f["error"]),
                _e(f["created_at"]),
            ]
            for f in peers
        ]
        out += _table(["peer", "method", "keep", "mode", "task", "why", "when"], rows, "peer-failures")
    else:
        out += "<p>None.</p>"
    out += "<h3>Cells that failed</h3>"
    if cells:
        grouped: dict[tuple[str, str, str], list[Mapping[str, Any]]] = defaultdict(list)
        for f in cells:
            grouped[(f["method"], f["site"], f["error"])].append(f)
        rows = [
            [_e(m), _e(s), str(len(fs)), _e(err), _e(fs[0]["item_id"])]
            for (m, s, err), fs in sorted(grouped.items())
        ]
        out += _table(["method", "site", "cells", "error", "first item"], rows, "cell-failures")
        out += "<p>Failed cells are retried by the next sweep over the same store.</p>"
    else:
        out += "<p>None.</p>"
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;
color:#1f2937}
h1{font-size:1.5em}h2{border-bottom:1px solid #e5e7eb;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
th,td{border:1px solid #e5e7eb;padding:3px 8px;text-align:right;vertical-align:top}
th{background:#f3f4f6}td:first-child,th:first-child{text-align:left}
.n{color:#6b7280;font-size:11px}img{max-width:100%;border:1px solid #e5e7eb;margin:6px 0}
dl{display:grid;grid-template-columns:max-content auto;gap:4px 16px}dt{font-weight:600}
code{font-size:11px;word-break:break-all}.note{color:#4b5563;font-size:13px}
table.runs td{text-align:left}
"""


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:60] or "x"


def _md_cell(sec: Section, mode: str, g: Group | None) -> str:
    if g is None:
        return ""
    if g.line == FULL:
        return f"{_f(g.mean('score'), 2)} (n={len(g.rows)})"
    r = ratios(sec, mode, g)
    rel = _ratio(r.score, r.score_full)
    return f"{_f(g.mean('score'), 2)} ({_f(rel, 2)} of full, n={len(g.rows)})"


def markdown_tables(rows: Iterable[Mapping[str, Any]]) -> str:
    """The score tables as Markdown: per (model, task variant) and mode, method × keep; each cell is
    the mean score, its share of the full-context score over the same items, and the item count;
    then the best flowsieve method and each peer's best at every keep, with the KV-bytes ratio."""
    out: list[str] = []
    for sec in sections(rows):
        for mode, groups in sec.modes.items():
            settings = sorted({g.setting for g in groups.values() if g.line != FULL}, key=_setting_order)
            lines = sorted({g.line for g in groups.values()}, key=lambda s: (s != FULL, ":" in s, s))
            out.append(f"#### {sec.model} · {sec.label} · {mode}\n")
            out.append("| method | " + " | ".join(_setting_label(s) for s in settings) + " |")
            out.append("|---" * (len(settings) + 1) + "|")
            full = sec.full(mode)
            for line in lines:
                if line == FULL:
                    out.append(f"| full context | {_md_cell(sec, mode, full)} |" + " |" * (len(settings) - 1))
                    continue
                cells = [_md_cell(sec, mode, groups.get((line, s))) for s in settings]
                out.append(f"| {line} | " + " | ".join(cells) + " |")
            out.append("")
            out.append(
                "Agreement with the full-context answer (share of its words reproduced before the first difference):\n"
            )
            out.append("| method | " + " | ".join(_setting_label(s) for s in settings) + " |")
            out.append("|---" * (len(settings) + 1) + "|")
            for line in lines:
                if line == FULL:
                    continue
                cells = []
                for st in settings:
                    g = groups.get((line, st))
                    cells.append("" if g is None else _f(ratios(sec, mode, g).word_agreement, 2))
                out.append(f"| {line} | " + " | ".join(cells) + " |")
            if _has_bits(sec):
                out.append("")
                out.append(
                    "Bits per byte of the held-out continuation (lower is better), Information Capacity:\n"
                )
                cols = [(1.0, 0), *(st for st in settings if st != (1.0, 0))]
                out.append("| method | " + " | ".join(_setting_label(st) for st in cols) + " |")
                out.append("|---" * (len(cols) + 1) + "|")
                for line in lines:
                    cells = []
                    for st in cols:
                        g = groups.get((line, st))
                        bpb = None if g is None else g.mean("bits_per_byte")
                        ic = None if g is None or bpb is None else information_capacity(g.rows)
                        cells.append("" if bpb is None else f"{_f(bpb, 3)} (IC {_f(ic, 3)})")
                    out.append(f"| {line} | " + " | ".join(cells) + " |")
            systems = sorted({g.system for g in groups.values()}, key=lambda x: (x != "flowsieve", x))
            out.append("")
            out.append("| keep | " + " | ".join(f"best {x} (score, KV bytes / full)" for x in systems) + " |")
            out.append("|---" * (len(systems) + 1) + "|")
            for st in settings:
                cells = []
                for system in systems:
                    cands = [
                        g
                        for g in groups.values()
                        if g.system == system
                        and g.setting == st
                        and g.line != FULL
                        and g.mean("score") is not None
                    ]
                    if not cands:
                        cells.append("—")
                        continue
                    best = max(cands, key=lambda g: (g.mean("score"), -len(g.line)))
                    r = ratios(sec, mode, best)
                    cells.append(f"{best.line} {_f(best.mean('score'), 2)} (KV ×{_f(r.kv, 2)})")
                out.append(f"| {_setting_label(st)} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def write_report(db: str | Path, out: str | Path) -> Path:
    """Render the store at ``db`` into ``out/`` (PNG plots, ``index.html`` and the score tables as
    ``results.md``); returns the page's path."""
    with Store(db, create=False) as store:
        rows = store.rows()
        runs = store.runs()
        failures = store.failures()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    secs = sections(rows)
    colors = _colors(line_label(r) for r in rows)
    parts: list[str] = []
    toc: list[str] = []
    for i, sec in enumerate(secs):
        anchor = f"s{i}"
        toc.append(f'<li><a href="#{anchor}">{_e(sec.model)} · {_e(sec.label)}</a></li>')
        slug = _slug(f"{sec.model}_{sec.label}")
        kp = plot_score_vs_keep(sec, out / f"score_vs_keep_{i:02d}_{slug}.png", colors)
        pp = plot_pareto(sec, out / f"pareto_{i:02d}_{slug}.png", colors)
        parts.append(f'<section id="{anchor}"><h2>{_e(sec.model)} · {_e(sec.label)}</h2>')
        parts.append(_img(kp, f"score vs keep, {sec.label}"))
        parts.append(_img(pp, f"Pareto, {sec.label}"))
        for mode in sec.modes:
            parts.append(f"<h3>{_e(mode)}: mean score</h3>")
            parts.append(score_table(sec, mode))
            best = best_table(sec, mode)
            if best:
                parts.append(f"<h3>{_e(mode)}: best at each keep</h3>{best}")
            parts.append(f"<h3>{_e(mode)}: against the full context (same items)</h3>")
            parts.append(ratio_table(sec, mode))
        parts.append("</section>")
    if not secs:
        parts.append("<p>The store holds no results yet.</p>")
    title = "flowsieve bench report"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_e(title)}</h1>
<p class=note>Scores are means over items (each task's own metric, in [0, 1]). Ratios divide a
method's mean by the full-context mean over the same items: prefill time and KV bytes below 1× and
decode speed above 1× are better. Word agreement: share of the full run's answer words (normalised)
reproduced before the first difference, for every system. Token agreement: share of the full run's generated tokens
reproduced before the first difference; "first N tokens": the same over the full run's first N
tokens, measured by the runner. KL at answer start: KL(full ‖ method), in nats, of the next-token
distribution that picks the first answer token (0 by construction where that token is chosen by an
uncompressed prefill pass: query-aware prefill and decode sites). Bits per byte (lm task): negative
log2-likelihood of a held-out continuation per UTF-8 byte, lower is better; its score is
2<sup>−bits/byte</sup>. Information Capacity (text-compression gain per log2 of decode FLOPs per token), from the same rows and the model's
decode FLOPs per token. {_e(PEER_NOTE)}</p>
<ul>{"".join(toc)}</ul>
{"".join(parts)}
<section id="settings"><h2>Settings</h2>{settings_html(rows, runs)}</section>
<section id="failures"><h2>Failures</h2>{failures_html(failures)}</section>
</body></html>
"""
    (out / "results.md").write_text(markdown_tables(rows), encoding="utf-8")
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(index)
    return index


__all__ = [
    "best_table",
    "markdown_tables",
    "ratio_table",
    "score_table",
    "write_report",
]
