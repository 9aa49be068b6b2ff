"""Bench sweeps: cell expansion, validation, reuse of the full reference, failures, peers, a killed
sweep that resumes without losing or doubling rows, Ray, the CLI, and one real sweep on SmolLM2."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

import flowsieve.cli as fs_cli
import flowsieve.generate as gen
from flowsieve import FlowsieveError
from flowsieve.bench import cells, runner
from flowsieve.bench import config as bench_config
from flowsieve.bench.config import SweepConfig, check_methods, parse_method, plan
from flowsieve.bench.runner import run_sweep
from flowsieve.bench.store import FULL, IDENTITY, Store
from flowsieve.cli.bench import parse_params, parse_peers
from flowsieve.generate import GenResult

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# --- fakes -----------------------------------------------------------------------------------------


class WordTokenizer:
    """Whitespace tokens (what the tasks need to measure lengths)."""

    def __call__(self, text: str, **_: object) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


CALLS: list[tuple[str, ...]] = []
SLEEP = {"s": 0.0}


def needle_answer(context: str, question: str) -> str:
    key = re.search(r"secret code of the (\w+ \w+)\?", question)
    if key is None:
        return "no idea"
    found = re.search(rf"secret code of the {key.group(1)} is (\d+)", context)
    return found.group(1) if found else "no idea"


def _result(text: str, n: int, keep: float) -> GenResult:
    return GenResult(
        text=text,
        token_ids=[7, 8, 9] if keep == 1.0 else [7, 8, 1],
        prompt_tokens=n,
        kept_tokens=round(n * keep),
        kv_bytes=round(1000 * keep),
        kv_bytes_full=1000,
        prefill_s=0.2 * keep,
        decode_tok_s=50.0 / keep,
        peak_rss_mb=100.0,
        new_tokens=3,
    )


def fake_generate(model, tok, context, question=None, *, chat=True, max_new_tokens=32, **kw) -> GenResult:
    """The full-context run: always right."""
    assert not kw.get("sieve"), "the full reference must not get a sieve"
    CALLS.append(("full", context[:40], str(max_new_tokens)))
    time.sleep(SLEEP["s"])
    return _result(needle_answer(context, question), len(context.split()), 1.0)


def fake_run_compressed(
    model, tok, item, method, site, keep, budget, mode, max_new_tokens, *, chat=True, **kw
):
    """A sieve that finds the needle when it keeps at least a quarter of the context."""
    CALLS.append((method, site, str(keep), str(budget), mode))
    time.sleep(SLEEP["s"])
    if method == "broken":
        raise FlowsieveError("this method is broken")
    right = keep is not None and keep >= 0.25
    return _result(
        needle_answer(item.context, item.question) if right else "no idea",
        len(item.context.split()),
        keep or 0.5,
    )


def install_fakes(sleep: float = 0.0) -> None:
    """Replace the model runs (for the subprocess of the kill test)."""
    SLEEP["s"] = sleep
    gen.generate = fake_generate
    cells.run_compressed = fake_run_compressed
    runner.check_methods = lambda config: None


@pytest.fixture
def fakes(monkeypatch):
    CALLS.clear()
    SLEEP["s"] = 0.0
    monkeypatch.setattr(gen, "generate", fake_generate)
    monkeypatch.setattr(cells, "run_compressed", fake_run_compressed)
    monkeypatch.setattr(runner, "check_methods", lambda config: None)  # run_sweep's
    monkeypatch.setattr(bench_config, "check_methods", lambda config: None)  # the CLI's
    return CALLS


def small_config(**kw) -> SweepConfig:
    base = dict(
        model="fake",
        methods=["full", "a"],
        keeps=[0.5, 0.25, 0.1],
        tasks=["needle"],
        lengths=[100],
        limit=2,
        modes=["query_aware", "query_agnostic"],
        threads=2,
    )
    return SweepConfig(**(base | kw))


def sweep(config: SweepConfig, store: Store, **kw):
    return run_sweep(config, store, model=object(), tokenizer=WordTokenizer(), progress=False, **kw)


# --- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"keeps": [0.0]}, r"keep must be in \(0, 1\]"),
        ({"keeps": [1.5]}, r"keep must be in \(0, 1\]"),
        ({"keeps": [True]}, r"keep must be in \(0, 1\]"),
        ({"tasks": ["needel"]}, "did you mean 'needle'"),
        ({"modes": ["query_awre"]}, "did you mean 'query_aware'"),
        ({"sites": ["prefil"]}, "did you mean 'prefill'"),
        ({"peers": {"kvpres": []}}, "did you mean 'kvpress'"),
        ({"peers": {"kvpress": ["snapkvv"]}}, r"kvpress has no method 'snapkvv' \(did you mean 'snapkv'"),
        ({"task_params": {"dept": 0.5}}, "did you mean 'depth'"),
        ({"tasks": ["multidoc_qa"], "lengths": [100]}, "takes a length"),
        ({"limit": 0}, "limit must be an integer >= 1"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"threads": 0}, "threads"),
        ({"budgets": [0]}, "budgets"),
        ({"keeps": [], "budgets": []}, "--keep"),
        ({"seeds": []}, "no seed"),
        ({"model": " "}, "model name is empty"),
    ],
)
def test_config_rejects_bad_settings(kw, msg):
    with pytest.raises(FlowsieveError, match=msg):
        small_config(**kw)


def test_config_normalises():
    cfg = small_config(methods=["a", "a"], keeps=[0.5, 0.50000001, 0.1], seeds=[1, 1])
    assert cfg.methods == (FULL, "a")  # the reference is always there, once
    assert cfg.keeps == (0.5, 0.1)
    assert cfg.seeds == (1,)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d and d["methods"] == ["full", "a"]


def test_plan_expands_cells_items_outermost():
    cfg = small_config(
        lengths=[100, 150],
        limit=3,
        budgets=[64],
        keeps=[0.5, 0.25],
        peers={"kvpress": ["snapkv"]},
    )
    jobs = plan(cfg, WordTokenizer())
    # per item and mode: full + a x (2 keeps + 1 budget) + kvpress:snapkv x 2 keeps
    assert len(jobs) == 2 * 3 * 2 * (1 + 3 + 2)
    keys = [j.cell.key() for j in jobs]
    assert len(set(keys)) == len(keys)
    assert [j.cell.key() for j in plan(cfg, WordTokenizer())] == keys  # deterministic
    first = jobs[:12]
    assert {j.item.item_id for j in first} == {jobs[0].item.item_id}  # one item at a time
    assert jobs[0].cell.method == FULL and jobs[0].cell.keep == 1.0 and jobs[0].cell.site == "none"
    budget = [j.cell for j in jobs if j.cell.budget]
    assert budget and all(c.keep == 0.0 for c in budget)
    peers = [j.cell for j in jobs if j.cell.system == "kvpress"]
    assert peers and all(c.site == "prefill" for c in peers)
    lengths = {j.task.params()["length"] for j in jobs}
    assert lengths == {100, 150}


# --- sweeps ----------------------------------------------------------------------------------------


def test_sweep_writes_every_cell_and_reuses_the_reference(fakes, tmp_path):
    cfg = small_config()
    with Store(tmp_path / "r.sqlite") as store:
        s = sweep(cfg, store)
        assert (s.planned, s.already, s.written, s.failed) == (16, 0, 16, 0)
        full_calls = [c for c in fakes if c[0] == "full"]
        assert len(full_calls) == 2 * 2  # once per item and mode
        rows = store.rows()
        assert len(rows) == 16
        by = {(r["method"], r["keep"], r["mode"]): r for r in rows if r["item_id"] == rows[0]["item_id"]}
        assert by[(FULL, 1.0, "query_aware")]["score"] == 1.0
        assert by[("a", 0.5, "query_aware")]["score"] == 1.0
        assert by[("a", 0.1, "query_agnostic")]["score"] == 0.0  # scored here, with the task's metric
        r = by[("a", 0.25, "query_aware")]
        assert r["versions"]["torch"] == torch.__version__ and r["git_hash"]
        assert r["run_id"] == s.run_id and r["task_params"]["length"] == 100
        assert r["extra"]["token_ids"] == [7, 8, 1] and "length_tokens" in r["extra"]
        fakes.clear()
        again = sweep(cfg, store)
        assert (again.already, again.written) == (16, 0) and fakes == []
        # a larger limit runs only the new items
        more = sweep(small_config(limit=3), store)
        assert (more.already, more.written) == (16, 8)
        assert len([c for c in fakes if c[0] == "full"]) == 2
        runs = store.runs()
        assert len(runs) == 3 and runs[-1]["cells_written"] == 8 and runs[-1]["machine"]["cpu_count"]


def test_torch_threads_are_set(fakes, tmp_path):
    before = torch.get_num_threads()
    try:
        with Store(tmp_path / "r.sqlite") as store:
            sweep(small_config(methods=["full"], limit=1, threads=1), store)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_failed_cells_are_recorded_and_retried(fakes, tmp_path, monkeypatch):
    cfg = small_config(methods=["full", "broken"], modes=["query_aware"], keeps=[0.5])
    with Store(tmp_path / "r.sqlite") as store:
        s = sweep(cfg, store)
        assert (s.written, s.failed) == (2, 2)
        fails = store.failures()
        assert len(fails) == 2 and all("this method is broken" in f["error"] for f in fails)
        with pytest.raises(FlowsieveError, match="broken"):
            sweep(cfg, store, fail_fast=True)

        def fixed(model, tok, item, method, *a, **kw):
            return fake_run_compressed(model, tok, item, "fixed", *a, **kw)

        monkeypatch.setattr(cells, "run_compressed", fixed)
        s = sweep(cfg, store)
        assert (s.already, s.written, s.failed) == (2, 2, 0)
        assert store.failures() == []


def test_unavailable_method_fails_before_running(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flowsieve.sieve", None)  # as if flowsieve.sieve did not exist
    cfg = small_config(methods=["full", "flowcut"])
    with pytest.raises(FlowsieveError, match="method 'flowcut' is not available"):
        check_methods(cfg)
    item = plan(cfg, WordTokenizer())[0].item
    with pytest.raises(FlowsieveError, match="method 'flowcut' is not available"):
        cells.run_compressed(
            object(), WordTokenizer(), item, "flowcut", "prefill", 0.5, None, "query_aware", 8
        )
    with Store(tmp_path / "r.sqlite") as store:
        with pytest.raises(FlowsieveError, match="not available"):
            run_sweep(cfg, store, model=object(), tokenizer=WordTokenizer(), progress=False)
        assert len(store) == 0


def test_methods_are_checked_against_the_sieve_registry():
    with pytest.raises(FlowsieveError, match=r"unknown method 'flowcutt' \(did you mean 'flowcut'"):
        check_methods(small_config(methods=["flowcutt"]))
    check_methods(small_config(methods=["full", "flowcut", "snapkv"]))


def test_real_sieve_on_a_tiny_model(tmp_path):
    """Full and compressed cells through the real Sieve and generate, on a tiny random Llama."""
    model, tok = tiny_loader("tiny")
    cfg = SweepConfig(
        model="tiny",
        methods=["full", "recent"],
        keeps=[0.5],
        budgets=[120],
        tasks=["needle"],
        lengths=[300],
        limit=1,
        modes=["query_aware", "query_agnostic"],
        max_new_tokens=3,
        chat=False,
        threads=2,
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = run_sweep(cfg, store, model=model, tokenizer=tok, progress=False)
        assert (s.planned, s.written, s.failed) == (6, 6, 0), store.failures()
        rows = {(r["method"], r["keep"], r["budget"], r["mode"]): r for r in store.rows()}
    for mode in ("query_aware", "query_agnostic"):
        full, half = rows[(FULL, 1.0, 0, mode)], rows[("recent", 0.5, 0, mode)]
        assert half["kv_bytes"] < 0.75 * full["kv_bytes"] and half["kv_bytes_full"] == full["kv_bytes"]
        assert half["kept_tokens"] < full["kept_tokens"] == full["prompt_tokens"]
        assert rows[("recent", 0.0, 120, mode)]["kv_bytes"] < half["kv_bytes"]


def test_shared_prefill_sweep_writes_the_same_rows(tmp_path):
    """--share-prefill: one observed prefill per item and mode, same predictions and kept counts;
    a method that replays the context (kvzip) runs on its own."""
    model, tok = tiny_loader("tiny")
    base = dict(
        model="tiny",
        methods=["full", "snapkv", "h2o", "streamingllm", "selfinfo", "kvzip"],
        keeps=[0.5, 0.25],
        tasks=["needle"],
        lengths=[300],
        limit=2,
        modes=["query_aware", "query_agnostic"],
        max_new_tokens=3,
        chat=False,
    )
    out = {}
    for share in (False, True):
        with Store(tmp_path / f"r{share}.sqlite") as store:
            s = run_sweep(
                SweepConfig(**base, share_prefill=share), store, model=model, tokenizer=tok, progress=False
            )
            assert (s.planned, s.written, s.failed) == (44, 44, 0), store.failures()
            out[share] = {
                (r["method"], r["keep"], r["mode"], r["item_id"]): (
                    r["prediction"],
                    r["kept_tokens"],
                    r["kv_bytes"],
                )
                for r in store.rows()
            }
            shared = [r for r in store.rows() if (r["extra"] or {}).get("shared_prefill")]
            assert len(shared) == (32 if share else 0)
            assert not any(
                (r["extra"] or {}).get("shared_prefill") for r in store.rows() if r["method"] == "kvzip"
            )
    assert out[True] == out[False]


@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_prompt_site_compresses_then_answers(tmp_path, mode):
    """The prompt site: a prompt scorer shortens the context, the model answers the shorter prompt."""
    model, tok = tiny_loader("tiny")
    cfg = SweepConfig(
        model="tiny",
        methods=["lexrank"],
        sites=["prompt"],
        keeps=[0.5],
        tasks=["needle"],
        lengths=[300],
        limit=1,
        modes=[mode],
        max_new_tokens=3,
        chat=False,
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = run_sweep(cfg, store, model=model, tokenizer=tok, progress=False)
        assert (s.planned, s.written, s.failed) == (2, 2, 0), store.failures()
        rows = {r["method"]: r for r in store.rows()}
    full, comp = rows[FULL], rows["lexrank"]
    assert comp["site"] == "prompt" and comp["prompt_tokens"] == full["prompt_tokens"]
    assert comp["kept_tokens"] < 0.7 * full["prompt_tokens"]
    assert comp["kv_bytes"] < 0.7 * comp["kv_bytes_full"] and comp["kv_bytes_full"] == full["kv_bytes"]
    assert 0.4 < comp["extra"]["compress_ratio"] < 0.6 and comp["extra"]["compress_s"] >= 0


def test_method_options_in_the_name():
    assert parse_method("fastv@layer=6@flag=true@kind=max") == (
        "fastv",
        {"layer": 6, "flag": True, "kind": "max"},
    )
    assert parse_method("snapkv") == ("snapkv", {})
    with pytest.raises(FlowsieveError, match="NAME=VALUE"):
        parse_method("snapkv@kernel")
    with pytest.raises(FlowsieveError, match="bad option for method 'snapkv'"):
        check_methods(SweepConfig(methods=["snapkv@kernal=3"]))


def test_method_options_reach_the_sieve(tmp_path):
    """snapkv@kernel=1 (no pooling) runs as its own cell, next to the default snapkv."""
    model, tok = tiny_loader("tiny")
    cfg = SweepConfig(
        model="tiny",
        methods=["snapkv", "snapkv@kernel=1"],
        keeps=[0.25],
        tasks=["needle"],
        lengths=[300],
        limit=1,
        max_new_tokens=2,
        chat=False,
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = run_sweep(cfg, store, model=model, tokenizer=tok, progress=False)
        assert (s.planned, s.written, s.failed) == (3, 3, 0), store.failures()
        assert {r["method"] for r in store.rows()} == {"full", "snapkv", "snapkv@kernel=1"}


def test_prompt_site_rejects_kv_methods_and_budgets():
    with pytest.raises(FlowsieveError, match=r"not a prompt scorer.*did you mean"):
        check_methods(SweepConfig(methods=["selfinf"], sites=["prompt"]))
    with pytest.raises(FlowsieveError, match="keep ratios"):
        check_methods(SweepConfig(methods=["lexrank"], sites=["prompt"], keeps=[], budgets=[100]))


def test_run_compressed_goes_through_the_sieve(monkeypatch):
    seen = {}

    class Sieve:
        def __init__(self, method, *, keep=None, budget=None, site="prefill"):
            seen["sieve"] = (method, keep, budget, site)

    def generate_with_sieve(model, tok, context, question=None, *, sieve=None, mode=None, **kw):
        seen["generate"] = (type(sieve).__name__, mode, kw["max_new_tokens"])
        return _result("x", 10, 0.5)

    monkeypatch.setitem(sys.modules, "flowsieve.sieve", types.SimpleNamespace(Sieve=Sieve))
    monkeypatch.setattr(gen, "generate", generate_with_sieve)
    item = plan(small_config(), WordTokenizer())[0].item
    out = cells.run_compressed(object(), None, item, "tova", "decode", None, 64, "query_agnostic", 12)
    assert out.text == "x"
    assert seen == {"sieve": ("tova", None, 64, "decode"), "generate": ("Sieve", "query_agnostic", 12)}


def test_peer_runner_missing_is_reported(fakes, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "flowsieve.bench.peers", None)
    cfg = small_config(
        methods=["full"], modes=["query_aware"], peers={"kvpress": ["snapkv"], "llmlingua": []}
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = sweep(cfg, store)
        assert s.written == 2 and {r["system"] for r in store.rows()} == {"flowsieve"}
        assert set(s.peer_errors) == {"kvpress", "llmlingua"}
        assert all("peer runner not available" in v for v in s.peer_errors.values())
        fails = store.failures()
        assert {f["system"] for f in fails} == {"kvpress", "llmlingua"}
        assert all("peer runner not available" in f["error"] for f in fails)


def test_peer_rows_are_scored_here(fakes, monkeypatch, tmp_path):
    calls = []

    def run_peer(system, items, method, keep, model_name, mode, max_new_tokens):
        calls.append((system, method, keep, model_name, mode, max_new_tokens, len(items)))
        rows = []
        for it in items[1:]:  # the first item gets no row
            rows.append(
                {
                    "item_id": it.item_id,
                    "prediction": needle_answer(it.context, it.question),
                    "score": 0.123,  # ignored: scoring is done with the task's metric
                    "prompt_tokens": 100,
                    "kept_tokens": 50,
                    "kv_bytes": 500,
                    "kv_bytes_full": 1000,
                    "peak_rss_mb": 900.0,
                    "prefill_s": 0.3,
                    "decode_tok_s": 20.0,
                    "new_tokens": 4,
                    "extra": {"press": method},
                    "versions": {"kvpress": "0.9", "transformers": "5.2"},
                }
            )
        return rows

    peers = types.ModuleType("flowsieve.bench.peers")
    peers.run_peer = run_peer
    monkeypatch.setitem(sys.modules, "flowsieve.bench.peers", peers)
    cfg = small_config(
        methods=["full"], modes=["query_aware"], keeps=[0.5], limit=3, peers={"kvpress": ["snapkv"]}
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = sweep(cfg, store)
        assert calls == [("kvpress", "snapkv", 0.5, "fake", "query_aware", 32, 3)]
        peer_rows = store.rows(system="kvpress")
        assert len(peer_rows) == 2 and all(r["score"] == 1.0 for r in peer_rows)
        assert all(r["site"] == "prefill" and r["versions"]["kvpress"] == "0.9" for r in peer_rows)
        assert all(r["versions"]["transformers"] == "5.2" and r["versions"]["flowsieve"] for r in peer_rows)
        assert s.failed == 1 and "no row" in s.peer_errors["kvpress"]
        again = sweep(cfg, store)
        assert calls[-1][-1] == 1  # only the missing item is asked for again
        assert again.written == 0 and again.failed == 1


def test_prompt_peer_with_a_compressor_is_answered_by_the_sweep_model(fakes, monkeypatch, tmp_path):
    """--compressor: llmlingua compresses with that model; the sweep's model answers its context."""
    calls = []

    def run_peer(system, items, method, keep, model_name, mode, max_new_tokens, chat=True):
        calls.append((system, model_name, chat))
        return [
            {
                "item_id": it.item_id,
                "prediction": "the compressor's own answer",
                "prompt_tokens": 100,
                "kept_tokens": 33,
                "kv_bytes": 330,
                "kv_bytes_full": 1000,
                "peak_rss_mb": 900.0,
                "prefill_s": 0.3,
                "decode_tok_s": 20.0,
                "new_tokens": 4,
                "extra": {"compressed_context": it.context, "compress_s": 2.0},
            }
            for it in items
        ]

    peers = types.ModuleType("flowsieve.bench.peers")
    peers.run_peer = run_peer
    monkeypatch.setitem(sys.modules, "flowsieve.bench.peers", peers)
    monkeypatch.setattr(runner, "build_prompt", lambda tok, c, q, chat=True: list(range(len(c.split()) + 5)))
    monkeypatch.setattr(runner, "full_kv_bytes", lambda model, n: 10 * n)
    cfg = small_config(
        methods=["full"],
        modes=["query_aware"],
        keeps=[0.33],
        limit=2,
        chat=False,
        compressor="small",
        peers={"llmlingua": ["llmlingua"]},
    )
    with Store(tmp_path / "r.sqlite") as store:
        s = sweep(cfg, store)
        assert s.failed == 0, store.failures()
        assert calls == [("llmlingua", "small", True)]
        rows = store.rows(system="llmlingua")
    assert len(rows) == 2 and all(r["score"] == 1.0 for r in rows)  # the sweep model's (right) answer
    for r in rows:
        assert r["extra"]["compressor_answer"] == "the compressor's own answer"
        assert r["extra"]["answered_by"] == "fake" and r["extra"]["compressor"] == "small"
        assert r["prefill_s"] >= 2.0  # compression time counts into the time to first token


# --- a real sweep killed midway --------------------------------------------------------------------

KILL_CONFIG = dict(methods=["full", "a"], keeps=[0.5, 0.25, 0.1], lengths=[100], limit=4)

_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import test_bench_runner as t
from flowsieve.bench.runner import run_sweep
from flowsieve.bench.store import Store
t.install_fakes(sleep=float(sys.argv[2]))
with Store(sys.argv[1]) as store:
    s = run_sweep(t.small_config(**t.KILL_CONFIG), store, model=object(), tokenizer=t.WordTokenizer(), progress=False)
print(json.dumps({{"planned": s.planned, "already": s.already, "written": s.written}}))
"""


def _count(db: Path) -> int:
    try:
        con = sqlite3.connect(db, timeout=5)
        try:
            return con.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    db = tmp_path / "r.sqlite"
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(_CHILD.format(tests=str(TESTS))))
    expected = {j.cell.key() for j in plan(small_config(**KILL_CONFIG), WordTokenizer())}
    assert len(expected) == 4 * 2 * 4
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    child = subprocess.Popen([sys.executable, str(script), str(db), "0.15"], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _count(db) < 8:
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the sweep wrote nothing"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    at_kill = _count(db)
    assert 8 <= at_kill < len(expected)

    out = subprocess.run(
        [sys.executable, str(script), str(db), "0"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == {"planned": len(expected), "already": at_kill, "written": len(expected) - at_kill}
    con = sqlite3.connect(db)
    keys = [tuple(r) for r in con.execute(f"SELECT {', '.join(IDENTITY)} FROM results")]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected


# --- Ray -------------------------------------------------------------------------------------------


class CharTok:
    """One token per ASCII character, with offsets (enough for plain-text prompts)."""

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, **_):
        enc = {"input_ids": [min(ord(c), 127) for c in text]}
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return enc

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def tiny_loader(name: str):
    """A tiny random Llama (loaded in each Ray worker)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=2048,
        eos_token_id=None,
        bos_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval(), CharTok()


def test_ray_sweep_rows_equal_a_serial_run(tmp_path, monkeypatch):
    """A real local Ray (one CPU, no dashboard), started and stopped by the runner: its rows equal a
    serial run's cell for cell (timings aside), and a rerun finds every cell done."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tiny_loader, in each worker
    # the runner calls ray.init(include_dashboard=False, log_to_driver=False); one CPU here, and
    # every call recorded, so a sweep that quietly ran serially would fail below
    inits, ray_init = [], ray.init
    monkeypatch.setattr(ray, "init", lambda **kw: inits.append(kw) or ray_init(num_cpus=1, **kw))
    cfg = SweepConfig(
        model="tiny",
        methods=["full", "snapkv"],
        keeps=[0.5],
        tasks=["needle"],
        lengths=[200],
        limit=2,
        max_new_tokens=3,
        chat=False,
        threads=1,
    )
    timing = {"peak_rss_mb", "prefill_s", "decode_tok_s", "versions", "git_hash", "run_id", "created_at"}

    def cells(store):
        rows = sorted(store.rows(), key=lambda r: [str(r[c]) for c in IDENTITY])
        for r in rows:
            r["extra"] = {k: v for k, v in r["extra"].items() if not k.endswith("_s")}
        return [{c: v for c, v in r.items() if c not in timing} for r in rows], rows

    with Store(tmp_path / "serial.sqlite") as store:
        s = run_sweep(cfg, store, loader=tiny_loader, progress=False)
        assert (s.planned, s.written, s.failed) == (4, 4, 0), store.failures()
        serial, _ = cells(store)
    assert not ray.is_initialized() and inits == []
    with Store(tmp_path / "ray.sqlite") as store:
        s = run_sweep(cfg, store, loader=tiny_loader, progress=False, ray_address="local")
        assert (s.planned, s.written, s.failed) == (4, 4, 0), store.failures()
        assert inits == [{"include_dashboard": False, "log_to_driver": False}]
        assert not ray.is_initialized()  # the runner stops the Ray it started
        on_ray, rows = cells(store)
        again = run_sweep(cfg, store, loader=tiny_loader, progress=False, ray_address="local")
        assert (again.already, again.written) == (4, 0)
    assert on_ray == serial
    assert {(r["method"], r["keep"]) for r in rows} == {(FULL, 1.0), ("snapkv", 0.5)}
    assert len({r["item_id"] for r in rows}) == 2
    assert all(r["prefill_s"] > 0 and r["new_tokens"] == 3 for r in rows)
    snap = [r for r in rows if r["method"] == "snapkv"]
    assert all(r["kept_tokens"] < r["prompt_tokens"] and r["kv_bytes"] < r["kv_bytes_full"] for r in snap)


def test_more_ray_workers_than_cpus_is_a_clear_error(tmp_path, monkeypatch):
    """An actor holds its CPUs for life: workers beyond the cluster's CPUs would wait forever."""
    import ray

    ray_init = ray.init
    monkeypatch.setattr(ray, "init", lambda **kw: ray_init(num_cpus=1, **kw))
    cfg = SweepConfig(model="tiny", methods=["full"], tasks=["needle"], lengths=[200], limit=2, threads=1)
    with (
        Store(tmp_path / "ray.sqlite") as store,
        pytest.raises(FlowsieveError, match="2 Ray workers need 2 CPUs"),
    ):
        run_sweep(cfg, store, loader=tiny_loader, progress=False, ray_address="local", ray_workers=2)
    assert not ray.is_initialized()


def test_ray_unavailable_is_a_clear_error(monkeypatch, tmp_path, fakes):
    monkeypatch.setitem(sys.modules, "ray", None)
    with Store(tmp_path / "r.sqlite") as store, pytest.raises(FlowsieveError, match="--ray needs Ray"):
        sweep(small_config(methods=["full"], limit=1), store, ray_address="local")


# --- CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def cli(capsys):
    """The ``flowsieve`` command line (bench and report are wired into flowsieve.cli)."""

    def run(*argv):
        code = fs_cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize(
    ("argv", "msg"),
    [
        (["--keep", "0"], r"keep must be in \(0, 1\]"),
        (["--keep", "0.5,x"], "comma-separated numbers"),
        (["--keep", "1.2"], r"keep must be in \(0, 1\]"),
        (["--tasks", "needel"], "did you mean 'needle'"),
        (["--modes", "agnostic"], "mode must be one of"),
        (["--length", "1e3"], "comma-separated integers"),
        (["--param", "depth"], "NAME=VALUE"),
        (["--export", "out.xlsx"], ".csv or .parquet"),
        (["--peers", "kvpres"], "did you mean .kvpress."),
        (["--limit", "0"], "limit"),
    ],
)
def test_cli_bench_bad_input(cli, tmp_path, argv, msg):
    code, _, err = cli("bench", "--db", str(tmp_path / "r.sqlite"), *argv)
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("flowsieve: error:"), err
    assert re.search(msg, lines[0]), lines[0]


def test_cli_unknown_method(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "flowsieve.sieve", None)
    code, _, err = cli("bench", "--db", str(tmp_path / "r.sqlite"), "--methods", "full,snapkv")
    assert code == 2 and "method 'snapkv' is not available" in err
    assert not (tmp_path / "r.sqlite").exists()


def test_cli_report_missing_db(cli, tmp_path):
    code, _, err = cli("report", "--db", str(tmp_path / "none.sqlite"), "--out", str(tmp_path / "out"))
    assert code == 2 and "no results database" in err


def test_cli_bench_runs_and_exports(cli, fakes, monkeypatch, tmp_path):
    import flowsieve.models

    monkeypatch.setattr(flowsieve.models, "load", lambda name, **kw: (object(), WordTokenizer()))
    db, csv_out = tmp_path / "r.sqlite", tmp_path / "out" / "r.csv"
    args = ["bench", "--db", str(db), "--methods", "full,a", "--keep", "0.5,0.1", "--length", "100"]
    args += [
        "--limit",
        "2",
        "--modes",
        "query_aware,query_agnostic",
        "--seed",
        "0,1",
        "--export",
        str(csv_out),
        "-q",
    ]
    code, out, err = cli(*args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["cells"] == summary["written"] == 2 * 2 * 2 * 3 and summary["failed"] == 0
    assert csv_out.is_file() and len(csv_out.read_text().splitlines()) == 1 + summary["cells"]
    code, out, _ = cli(
        "bench",
        "--db",
        str(db),
        "--methods",
        "full,a",
        "--keep",
        "0.5",
        "--length",
        "100",
        "--limit",
        "2",
        "-q",
    )
    assert code == 0 and json.loads(out)["written"] == 0  # a subset of what is stored


def test_parsers():
    assert parse_peers("kvpress,llmlingua") == {"kvpress": [], "llmlingua": []}
    assert parse_peers("kvpress:snapkv+keydiff") == {"kvpress": ["snapkv", "keydiff"]}
    assert parse_params(["depth=0.5", "placement=spread", "num_needles=3"]) == {
        "depth": 0.5,
        "placement": "spread",
        "num_needles": 3,
    }


# --- the bundled model ------------------------------------------------------------------------------


@pytest.mark.integration
def test_real_sweep_on_smollm2(smollm2, tmp_path):
    model, tok = smollm2
    cfg = SweepConfig(model="smollm2", tasks=["needle"], lengths=[500], limit=2, max_new_tokens=16)
    before = torch.get_num_threads()
    try:
        with Store(tmp_path / "r.sqlite") as store:
            s = run_sweep(cfg, store, model=model, tokenizer=tok, progress=False)
            rows = store.rows()
    finally:
        torch.set_num_threads(before)
    assert (s.planned, s.written, s.failed) == (2, 2, 0)
    assert len(rows) == 2 and {r["method"] for r in rows} == {FULL}
    for r in rows:
        assert 0.0 <= r["score"] <= 1.0
        assert 450 <= r["prompt_tokens"] <= 650 and r["kv_bytes"] == r["kv_bytes_full"] > 0
        assert r["prefill_s"] > 0 and 1 <= r["new_tokens"] <= 16 and r["prediction"]
        assert r["versions"]["transformers"] and r["git_hash"] != ""
