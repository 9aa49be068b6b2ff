"""The rows of a results store grouped for the report: by (model, task variant), mode and method
line × keep (:func:`sections`), with labels, means and the ratios against the full-context rows of
the same items (:func:`ratios`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from flowsieve.bench.store import FULL, MODES


def task_label(task: str, params: Mapping[str, Any]) -> str:
    """``needle (length=2000)``: the task and its parameters that are set."""
    parts = [f"{k}={v}" for k, v in sorted(params.items()) if v is not None]
    return f"{task} ({', '.join(parts)})" if parts else task


def line_label(row: Mapping[str, Any]) -> str:
    """How a row's method is named in plots and tables: ``full``, ``snapkv@prefill``, ``kvpress:tova``."""
    if row["system"] == "flowsieve":
        return FULL if row["method"] == FULL else f"{row['method']}@{row['site']}"
    return f"{row['system']}:{row['method']}"


def _setting(row: Mapping[str, Any]) -> tuple[float, int]:
    return (float(row["keep"]), int(row["budget"]))


def _setting_label(setting: tuple[float, int]) -> str:
    keep, budget = setting
    return f"budget {budget}" if budget else f"keep {keep:g}"


def _setting_order(setting: tuple[float, int]) -> tuple[int, float]:
    keep, budget = setting
    return (1, budget) if budget else (0, -keep)


def _mean(values: Iterable[float | None]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return fmean(v) if v else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def _div(a: float | None, b: float) -> float | None:
    return None if a is None else a / b


def _prefix_agreement(ids: Sequence[int] | None, ref: Sequence[int] | None) -> float | None:
    """The share of the reference's tokens generated identically before the first difference."""
    if not ids or not ref:
        return None
    n = 0
    for a, b in zip(ids, ref):
        if a != b:
            break
        n += 1
    return n / len(ref)


def _words(text: str | None) -> list[str] | None:
    """The normalised words of an answer (what every system reports, peers included)."""
    if not text:
        return None
    from flowsieve.bench.tasks.base import normalize

    return normalize(text).split() or None


def information_capacity(rows: Iterable[Mapping[str, Any]]) -> float | None:
    """Information Capacity (text compression relative to compute) of teacher-forced rows (``lm``), from their
    ``extra`` (``nll_bits``, ``scored_tokens``, ``scored_bytes``, ``flops_per_token``); None when
    the rows carry none (other tasks, peers) or disagree on the model's FLOPs."""
    from flowsieve.bench.tasks.lm import information_capacity as ic

    samples, flops = [], set()
    for r in rows:
        e = r.get("extra") or {}
        if r.get("bits_per_byte") is None or e.get("nll_bits") is None or not e.get("scored_tokens"):
            continue
        samples.append((float(e["nll_bits"]), int(e["scored_tokens"]), int(e["scored_bytes"])))
        flops.add(e.get("flops_per_token"))
    if not samples or len(flops) != 1 or None in flops:
        return None
    return ic(samples, float(flops.pop()))


@dataclass
class Group:
    """The rows of one (model, task variant, mode, method line, keep/budget)."""

    line: str
    system: str
    setting: tuple[float, int]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def mean(self, column: str) -> float | None:
        return _mean(r.get(column) for r in self.rows)


@dataclass
class Section:
    """The rows of one (model, task variant), by mode."""

    model: str
    task: str
    label: str
    modes: dict[str, dict[tuple[str, tuple[float, int]], Group]] = field(default_factory=dict)
    ref: dict[tuple[str, str, int, int], dict[str, Any]] = field(default_factory=dict)
    """(item_id, mode, seed, max_new_tokens) -> the full-context row."""

    def full(self, mode: str) -> Group | None:
        return self.modes.get(mode, {}).get((FULL, (1.0, 0)))


def sections(rows: Iterable[Mapping[str, Any]]) -> list[Section]:
    """Rows grouped by (model, task variant), then mode, then (line, setting)."""
    out: dict[tuple[str, str], Section] = {}
    for r in rows:
        label = task_label(r["task"], r.get("task_params") or {})
        sec = out.get((r["model"], label))
        if sec is None:
            sec = out[(r["model"], label)] = Section(r["model"], r["task"], label)
        line = line_label(r)
        key = (line, _setting(r))
        groups = sec.modes.setdefault(r["mode"], {})
        g = groups.get(key)
        if g is None:
            g = groups[key] = Group(line, r["system"], _setting(r))
        g.rows.append(dict(r))
        if line == FULL:
            sec.ref[(r["item_id"], r["mode"], int(r["seed"]), int(r["max_new_tokens"]))] = dict(r)
    for sec in out.values():
        sec.modes = {m: sec.modes[m] for m in sorted(sec.modes, key=_mode_order)}
    return sorted(out.values(), key=lambda s: (s.model, s.label))


def _mode_order(mode: str) -> tuple[int, str]:
    return (MODES.index(mode), mode) if mode in MODES else (len(MODES), mode)


@dataclass
class Ratios:
    """A group against the full-context rows of the same items (only items that have both)."""

    n: int
    score: float | None
    score_full: float | None
    prefill: float | None
    decode: float | None
    kv: float | None
    rss: float | None
    agreement: float | None
    word_agreement: float | None
    kept: float | None
    agree_n: float | None = None
    """Mean ``token_agreement`` of the rows (the full run's first N tokens)."""
    kl: float | None = None
    """Mean ``kl_answer_start`` (nats)."""
    bpb: float | None = None
    """Mean ``bits_per_byte`` (lm)."""
    ic: float | None = None
    """Information Capacity of the rows (lm)."""


def ratios(sec: Section, mode: str, g: Group) -> Ratios:
    pairs = []
    for r in g.rows:
        ref = sec.ref.get((r["item_id"], mode, int(r["seed"]), int(r["max_new_tokens"])))
        if ref is not None:
            pairs.append((r, ref))
    a = [p[0] for p in pairs]
    b = [p[1] for p in pairs]

    def m(rows: list[dict[str, Any]], c: str) -> float | None:
        return _mean(r.get(c) for r in rows)

    kv = _ratio(m(a, "kv_bytes"), m(b, "kv_bytes"))
    agree = _mean(
        _prefix_agreement((r.get("extra") or {}).get("token_ids"), (f.get("extra") or {}).get("token_ids"))
        for r, f in pairs
    )
    return Ratios(
        n=len(pairs),
        score=m(a, "score"),
        score_full=m(b, "score"),
        prefill=_ratio(m(a, "prefill_s"), m(b, "prefill_s")),
        decode=_ratio(m(a, "decode_tok_s"), m(b, "decode_tok_s")),
        kv=kv,
        rss=_ratio(m(a, "peak_rss_mb"), m(b, "peak_rss_mb")),
        agreement=agree,
        word_agreement=_mean(
            _prefix_agreement(_words(r.get("prediction")), _words(f.get("prediction"))) for r, f in pairs
        ),
        kept=_ratio(m(a, "kept_tokens"), m(a, "prompt_tokens")),
        agree_n=m(a, "token_agreement"),
        kl=m(a, "kl_answer_start"),
        bpb=m(a, "bits_per_byte"),
        ic=information_capacity(a),
    )


__all__ = [
    "Group",
    "Ratios",
    "Section",
    "information_capacity",
    "line_label",
    "ratios",
    "sections",
    "task_label",
]
