"""The pre-declared aggregate: shares against the full context, cells that measure nothing left
out, bits per byte inverted, failures count 0, peers never the default."""

from __future__ import annotations

import pytest

from flowsieve.bench.choose import MIN_FULL, markdown, shares, standings, winners
from flowsieve.errors import FlowsieveError


def row(
    method, score, *, system="flowsieve", task="needle", keep=0.25, mode="query_aware", model="m", bpb=None
):
    return {
        "system": system,
        "method": method,
        "task": task,
        "task_params": {"length": 100},
        "keep": 1.0 if method == "full" else keep,
        "mode": mode,
        "model": model,
        "score": score,
        "bits_per_byte": bpb,
    }


def test_share_is_the_kept_part_of_the_full_score_capped_at_one():
    rows = [row("full", 1.0), row("full", 0.0), row("a", 0.0), row("a", 0.5), row("b", 1.0), row("b", 1.0)]
    s = shares(rows)["query_aware"]
    assert s[("flowsieve", "a")] == {("m", "needle[length=100]", 0.25): pytest.approx(0.5)}
    assert s[("flowsieve", "b")] == {("m", "needle[length=100]", 0.25): 1.0}  # 1.0 / 0.5, capped


def test_cells_where_the_full_context_fails_are_left_out():
    low = MIN_FULL / 2
    rows = [row("full", low), row("a", low)]
    assert shares(rows) == {}


def test_bits_per_byte_lower_is_better():
    rows = [row("full", None, task="lm", bpb=1.0), row("a", None, task="lm", bpb=1.25)]
    ((_, share),) = shares(rows)["query_aware"][("flowsieve", "a")].items()
    assert share == pytest.approx(0.8)


def test_aggregate_counts_missing_cells_as_zero_and_peers_over_their_own():
    rows = [row("full", 1.0), row("full", 1.0, model="n"), row("a", 1.0), row("a", 1.0, model="n")]
    rows += [row("b", 1.0)]  # b failed on model n
    rows += [row("snapkv", 0.5, system="kvpress")]  # the peer only runs model m
    table = {s.label: s for s in standings(rows)["query_aware"]}
    assert table["a"].aggregate == 1.0
    assert table["b"].aggregate == 0.5
    assert table["kvpress:snapkv"].aggregate == 0.5 and table["kvpress:snapkv"].cells == 1
    assert winners(rows)["query_aware"].method == "a"
    assert "| a | **100.0** | 2 |" in markdown(rows)


def test_a_peer_is_never_the_default():
    rows = [row("full", 1.0), row("snapkv", 1.0, system="kvpress"), row("a", 0.2)]
    assert standings(rows)["query_aware"][0].system == "kvpress"
    assert winners(rows)["query_aware"].method == "a"
    with pytest.raises(FlowsieveError, match="no flowsieve candidate"):
        winners([row("full", 1.0), row("snapkv", 1.0, system="kvpress")])


def test_choose_command_prints_the_table_and_winners(tmp_path, capsys):
    from flowsieve.bench.store import Store
    from flowsieve.cli import main

    db = tmp_path / "r.sqlite"
    measures = dict.fromkeys(
        ("prompt_tokens", "kept_tokens", "kv_bytes", "kv_bytes_full", "peak_rss_mb", "prefill_s"), None
    )
    measures |= dict.fromkeys(("decode_tok_s", "new_tokens", "token_agreement", "kl_answer_start"), None)
    with Store(db) as store:
        for i, (method, score) in enumerate([("full", 1.0), ("a", 0.5), ("b", 1.0)]):
            r = row(method, score)
            r |= {"site": "prefill", "budget": 0, "item_id": f"x{i}", "seed": 0, "max_new_tokens": 4}
            r |= {"prediction": "", **measures}
            store.add(r)
    assert main(["choose", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "| b | **100.0** | 1 |" in out and "winner (query_aware): b" in out
    assert main(["choose", "--db", str(tmp_path / "missing.sqlite")]) == 2


def test_headline_table_and_plots(tmp_path):
    from flowsieve.bench.headline import PLOT_PREFIX, markdown_table, write

    rows = [row("full", 1.0), row("a", 0.5), row("b", 1.0), row("c", 0.2), row("d", 0.1)]
    rows += [row("a", 0.5, keep=0.1), row("b", 0.5, keep=0.1), row("snapkv", 0.3, system="kvpress")]
    for r in rows:
        r |= {"kv_bytes": 25, "kv_bytes_full": 100}
    text = markdown_table(rows)
    assert "`b` (75.0%)" in text
    assert (
        "| query_aware | needle[length=100] | m | 0.25 | **100%** | kvpress:snapkv | 30% | 0.25, 0.25 |"
        in text
    )
    stale = tmp_path / f"{PLOT_PREFIX}old.png"
    stale.write_bytes(b"x")
    paths = write(rows, tmp_path)
    assert not stale.exists()
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 1 and pngs[0].read_bytes()[:4] == b"\x89PNG"
