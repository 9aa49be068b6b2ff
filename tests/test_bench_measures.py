"""Comparisons with the full run (token agreement, KL at the answer start) and the teacher-forced
``lm`` task (bits per byte), on a tiny random Llama with a character tokenizer."""

from __future__ import annotations

import math
import sqlite3

import pytest
import torch
from test_bench_runner import tiny_loader  # the tiny Llama + character tokenizer of the runner tests

from flowsieve.bench import cells, references
from flowsieve.bench.config import Cell, Job, SweepConfig
from flowsieve.bench.runner import run_sweep
from flowsieve.bench.store import ADDED, FULL, Store
from flowsieve.bench.tasks import get_task
from flowsieve.inputs import build_prompt


def sweep(tmp_path, name="r", **kw):
    model, tok = tiny_loader("tiny")
    base = dict(model="tiny", tasks=["needle"], lengths=[300], limit=1, max_new_tokens=4, chat=False)
    with Store(tmp_path / f"{name}.sqlite") as store:
        s = run_sweep(SweepConfig(**(base | kw)), store, model=model, tokenizer=tok, progress=False)
        assert s.failed == 0, store.failures()
        return store.rows()


def by_cell(rows):
    return {(r["method"], r["site"], r["keep"], r["mode"]): r for r in rows}


def test_keep_one_agrees_with_the_full_run_and_aggressive_keep_does_not(tmp_path):
    rows = by_cell(
        sweep(
            tmp_path, methods=["full", "snapkv"], keeps=[1.0, 0.25], modes=["query_agnostic"], agree_tokens=3
        )
    )
    full = rows[(FULL, "none", 1.0, "query_agnostic")]
    same = rows[("snapkv", "prefill", 1.0, "query_agnostic")]
    cut = rows[("snapkv", "prefill", 0.25, "query_agnostic")]
    assert full["token_agreement"] == 1.0 and full["kl_answer_start"] == 0.0
    assert same["token_agreement"] == 1.0 and same["kl_answer_start"] == pytest.approx(0.0, abs=1e-6)
    # a random tiny model predicts almost uniformly: small, but far above rounding
    assert cut["kl_answer_start"] > 1e-6 and cut["kl_answer_start"] > 100 * same["kl_answer_start"]
    assert cut["token_agreement"] in (0.0, 1 / 3, 2 / 3, 1.0) and cut["extra"]["agree_tokens"] == 3
    assert all(r["bits_per_byte"] is None for r in rows.values())


def test_query_aware_prefill_answer_start_is_the_uncompressed_one(tmp_path):
    """At the prefill site with the question in the prompt, the first token is chosen by the
    prefill pass, before anything is evicted: its distribution is the full run's."""
    rows = by_cell(sweep(tmp_path, methods=["full", "snapkv"], keeps=[0.25], modes=["query_aware"]))
    assert rows[("snapkv", "prefill", 0.25, "query_aware")]["kl_answer_start"] == pytest.approx(0.0, abs=1e-6)


def test_shared_prefill_records_the_same_measures(tmp_path):
    kw = dict(methods=["full", "snapkv", "h2o"], keeps=[0.5, 0.25], modes=["query_aware", "query_agnostic"])
    one = by_cell(sweep(tmp_path, "one", **kw))
    shared = by_cell(sweep(tmp_path, "shared", share_prefill=True, **kw))
    assert sum(bool(r["extra"].get("shared_prefill")) for r in shared.values()) == 8
    for key, r in one.items():
        s = shared[key]
        assert s["kl_answer_start"] is not None and r["kl_answer_start"] is not None, key
        assert s["kl_answer_start"] == pytest.approx(r["kl_answer_start"], abs=1e-5), key
        assert s["token_agreement"] == r["token_agreement"], key


def test_a_missing_reference_is_recomputed(tmp_path):
    """A cell whose full run is not in memory (a resumed sweep) computes it again: same numbers."""
    rows = by_cell(sweep(tmp_path, methods=["full", "snapkv"], keeps=[0.25], modes=["query_agnostic"]))
    model, tok = tiny_loader("tiny")
    task = get_task("needle", length=300)
    item = task.items(tok, 1)[0]
    cell = Cell(
        "tiny", "flowsieve", "snapkv", "prefill", 0.25, 0, "needle", item.item_id, "query_agnostic", 0, 4
    )
    references._REFERENCES.clear()
    row = cells.execute(Job(cell, task, item), model, tok, chat=False)
    want = rows[("snapkv", "prefill", 0.25, "query_agnostic")]
    assert row["kl_answer_start"] == pytest.approx(want["kl_answer_start"], rel=1e-5)
    assert row["token_agreement"] == want["token_agreement"]


def test_agreement_and_kl_helpers():
    assert references.token_agreement([1, 2, 3, 4], [1, 2, 9, 4], 4) == 0.5
    assert references.token_agreement([1, 2], [1, 2, 3, 4, 5], 2) == 1.0
    assert references.token_agreement([], [1], 3) == 0.0 and references.token_agreement([1], [], 3) is None
    p = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    q = torch.log_softmax(torch.tensor([3.0, 2.0, 1.0]), -1)
    want = float((p.exp() * (p - q)).sum())
    assert references.kl_divergence(p, q) == pytest.approx(want) and references.kl_divergence(p, p) == 0.0
    assert references.kl_divergence(p, None) is None


# --- lm --------------------------------------------------------------------------------------------


def plain_bits_per_byte(model, tok, item) -> float:
    """Bits per byte of the continuation from one plain forward pass over context + continuation."""
    ctx = list(build_prompt(tok, item.context, None, chat=False).ids)
    cont = tok(item.answers[0], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].double()
    lp = torch.log_softmax(logits[len(ctx) - 1 : -1], -1)
    nll = -lp.gather(1, torch.tensor(cont).unsqueeze(1)).sum()
    return float(nll) / math.log(2) / len(item.answers[0].encode("utf-8"))


def test_lm_full_context_bits_per_byte_match_plain_logits():
    model, tok = tiny_loader("tiny")
    item = get_task("lm", length=200, continuation=50).items(tok, 1, seed=3)[0]
    result, first = cells.run_lm(model, tok, item)
    assert abs(result["bits_per_byte"] - plain_bits_per_byte(model, tok, item)) <= 1e-5
    n = len(tok(item.answers[0])["input_ids"])
    assert result["extra"]["scored_tokens"] == n >= 50 and result["new_tokens"] == 0
    assert first.shape == (128,) and result["extra"]["flops_per_token"] > 0


@pytest.mark.parametrize("site", ["prefill", "decode"])
def test_lm_keep_one_matches_the_full_context(site):
    model, tok = tiny_loader("tiny")
    item = get_task("lm", length=200, continuation=30).items(tok, 1)[0]
    full, lp_full = cells.run_lm(model, tok, item)
    same, lp_same = cells.run_lm(model, tok, item, "h2o", site, 1.0)
    assert same["bits_per_byte"] == pytest.approx(full["bits_per_byte"], abs=1e-5)
    assert references.kl_divergence(lp_full, lp_same) == pytest.approx(0.0, abs=1e-6)


def test_lm_sweep_writes_bits_per_byte(tmp_path):
    rows = sweep(
        tmp_path,
        methods=["full", "snapkv", "streamingllm"],
        keeps=[0.25],
        tasks=["lm"],
        lengths=[300],
        task_params={"continuation": 40},
        modes=["query_aware"],
    )
    cells = by_cell(rows)
    assert len(rows) == 3
    full = cells[(FULL, "none", 1.0, "query_aware")]
    for r in rows:
        assert r["bits_per_byte"] > 0 and r["score"] == pytest.approx(2 ** -r["bits_per_byte"])
        assert r["token_agreement"] is None and r["prediction"] == ""
        assert r["extra"]["scored_tokens"] >= 40 and r["extra"]["nll_bits"] > 0
    cut = cells[("snapkv", "prefill", 0.25, "query_aware")]
    # the continuation's first token is predicted by the prefill pass, before eviction
    assert cut["kl_answer_start"] == pytest.approx(0.0, abs=1e-6) and full["kl_answer_start"] == 0.0
    assert cut["kept_tokens"] < full["kept_tokens"] and cut["bits_per_byte"] != full["bits_per_byte"]


def test_lm_rejects_peers():
    with pytest.raises(Exception, match="teacher-forced"):
        SweepConfig(tasks=["lm"], peers={"kvpress": ["snapkv"]})


def test_an_older_store_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path):
        pass
    con = sqlite3.connect(path)
    for c in ADDED:
        con.execute(f"ALTER TABLE results DROP COLUMN {c}")
    con.commit()
    con.close()
    with Store(path) as store:
        have = {r[1] for r in store._db.execute("PRAGMA table_info(results)")}
    assert set(ADDED) <= have
