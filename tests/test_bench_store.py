"""The results store: one row per cell, resumable, failures and runs, CSV/Parquet round trips."""

from __future__ import annotations

import math
import sqlite3

import pytest

from flowsieve import FlowsieveError
from flowsieve.bench.store import COLUMNS, IDENTITY, Store, identity_of, read_export


def row(**kw) -> dict:
    base = {
        "model": "smollm2",
        "system": "flowsieve",
        "method": "flowcut",
        "site": "prefill",
        "keep": 0.25,
        "budget": 0,
        "task": "needle",
        "item_id": "needle-abc-0",
        "mode": "query_aware",
        "seed": 0,
        "max_new_tokens": 32,
        "task_params": {"length": 2000, "depth": None},
        "prediction": "The code is 4817.",
        "score": 1.0,
        "prompt_tokens": 2040,
        "kept_tokens": 510,
        "kv_bytes": 123456,
        "kv_bytes_full": 493824,
        "peak_rss_mb": 912.5,
        "prefill_s": 1.25,
        "decode_tok_s": 31.5,
        "new_tokens": 9,
        "versions": {"torch": "2.13.0", "transformers": "5.24.0", "flowsieve": "0.1.0"},
        "git_hash": "abc123",
        "run_id": 1,
        "extra": {"token_ids": [1, 2, 3], "depth": 0.3},
    }
    return base | kw


def test_one_row_per_cell(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        assert s.add(row()) is True
        assert s.add(row(prediction="something else", score=0.0)) is False  # the first row stays
        assert len(s) == 1 and s.rows()[0]["prediction"] == "The code is 4817."
        assert s.add(row(keep=0.1)) and s.add(row(mode="query_agnostic")) and s.add(row(system="kvpress"))
        assert s.add(row(budget=512, keep=0.0)) and s.add(row(seed=1)) and s.add(row(max_new_tokens=8))
        assert len(s) == 7
        assert s.add(row(keep=0.1 + 0.15)) is False  # 0.25 within float noise is the same cell
        assert row() in s and row(keep=0.5) not in s
        assert len(s.keys()) == 7 and identity_of(row()) in s.keys()


def test_rows_decode_json_and_filter(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.add(row())
        s.add(row(method="h2o", extra={"x": math.nan}, decode_tok_s=math.inf, prefill_s=None))
        r = s.rows(method="h2o")[0]
        assert r["extra"] == {"x": None} and r["decode_tok_s"] is None and r["prefill_s"] is None
        assert s.rows(method="flowcut")[0]["task_params"] == {"length": 2000, "depth": None}
        assert r["created_at"].endswith("Z") and set(r) == set(COLUMNS)
        with pytest.raises(FlowsieveError, match="did you mean 'method'"):
            s.rows(metod="x")


@pytest.mark.parametrize(
    ("bad", "msg"),
    [
        ({"system": "kvpres"}, "did you mean 'kvpress'"),
        ({"mode": "aware"}, "mode must be one of"),
        ({"score": 1.5}, r"score must be a number in \[0, 1\]"),
        ({"score": None}, "score must be"),
        ({"keep": 2.0}, "keep must be in"),
    ],
)
def test_bad_rows_are_refused(tmp_path, bad, msg):
    with Store(tmp_path / "r.sqlite") as s:
        with pytest.raises(FlowsieveError, match=msg):
            s.add(row(**bad))
        r = row()
        del r["item_id"]
        with pytest.raises(FlowsieveError, match="lacks item_id"):
            s.add(r)
        assert len(s) == 0


def test_rows_survive_reopening_and_a_second_writer(tmp_path):
    path = tmp_path / "r.sqlite"
    with Store(path) as s:
        s.add(row())
        assert s._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    a, b = Store(path), Store(path)
    try:
        assert len(a) == 1
        assert a.add(row(keep=0.5)) and not b.add(row(keep=0.5))  # two processes, one row
        assert len(b) == 2
    finally:
        a.close()
        b.close()


def test_missing_or_foreign_databases(tmp_path):
    with pytest.raises(FlowsieveError, match=r"no results database at .*run `flowsieve bench"):
        Store(tmp_path / "none.sqlite", create=False)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all, just some bytes" * 100)
    with pytest.raises(FlowsieveError, match="not a SQLite results database"):
        Store(junk)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE people (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(FlowsieveError, match="not a flowsieve results database"):
        Store(other)


def test_failures_upsert_and_clear_on_success(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        s.add_failure({"model": "smollm2", "system": "kvpress"}, "peer runner not available")
        s.add_failure({"model": "smollm2", "system": "kvpress"}, "peer runner not available (again)")
        cell = {k: v for k, v in row(method="broken").items() if k in IDENTITY}
        s.add_failure(cell, "RuntimeError: boom", run_id=3)
        fails = s.failures()
        assert len(fails) == 2
        peer = next(f for f in fails if f["system"] == "kvpress")
        assert peer["error"].endswith("(again)") and peer["method"] == "*" and peer["keep"] == -1
        s.add(row(method="broken"))  # the cell succeeded later
        assert [f["system"] for f in s.failures()] == ["kvpress"]
        assert s.clear_failures(system="kvpress") == 1 and s.failures() == []


def test_runs_are_recorded(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        rid = s.start_run({"methods": ["full"], "keeps": [0.5]}, {"cpu_count": 2}, {"torch": "x"}, "abc")
        assert s.runs()[0]["finished_at"] is None
        s.finish_run(rid, planned=10, written=7, failed=1)
        r = s.runs()[0]
        assert r["id"] == rid and r["config"]["keeps"] == [0.5] and r["machine"]["cpu_count"] == 2
        assert (r["cells_planned"], r["cells_written"], r["cells_failed"]) == (10, 7, 1) and r["finished_at"]


HOSTILE = 'He said "4817",\nthen: <b>&amp;</b>; naïve — ☃\r\n\t'


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_round_trip(tmp_path, suffix):
    with Store(tmp_path / "r.sqlite") as s:
        s.add(row())
        s.add(row(keep=0.1, prediction=HOSTILE, score=0.0, extra={"note": HOSTILE, "ids": [1, 2]}))
        s.add(row(keep=0.5, prediction="", prefill_s=None, kv_bytes=None, run_id=None))
        s.add(row(system="llmlingua", site="prompt", method="llmlingua", budget=0, seed=-3))
        want = s.rows()
        out = s.export(tmp_path / "sub" / f"results{suffix}")
    assert out.is_file() and not list(out.parent.glob(".*tmp"))
    got = read_export(out)
    assert got == want
    assert [r["prediction"] for r in got][1] == HOSTILE


def test_export_empty_and_bad_suffix(tmp_path):
    with Store(tmp_path / "r.sqlite") as s:
        for suffix in (".csv", ".parquet"):
            assert read_export(s.export(tmp_path / f"empty{suffix}")) == []
        with pytest.raises(FlowsieveError, match=r"\.csv or \.parquet"):
            s.export(tmp_path / "r.xlsx")
