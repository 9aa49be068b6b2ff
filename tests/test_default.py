"""The default sieve: method="default" (the Sieve's own default, the CLI's and the bench's) resolves
per mode to DEFAULTS, keeps exactly what the named sieve keeps, and refuses settings it owns."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate, generate_many
from flowsieve.inputs import MODES, Prompt
from flowsieve.sieve import DEFAULT, DEFAULTS, Sieve, describe_default
from flowsieve.sites import prefill_cache


def _prompt(T=60, c1=50, sent=5, seed=1) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(0, 128, (T,), generator=g).tolist())
    return Prompt(
        ids=ids, context=(0, c1), question=(c1, T), split=c1, sentences=tuple(t // sent for t in range(T))
    )


def test_defaults_cover_every_mode_and_resolve():
    assert set(DEFAULTS) == set(MODES)
    s = Sieve(keep=0.25, window=8)
    assert s.method == DEFAULT
    for mode, fields in DEFAULTS.items():
        r = s.resolve(mode)
        want = dataclasses.replace(Sieve(fields["method"], keep=0.25), window=8, **fields)
        assert (r.method, r.units, r.refeed, r.keep, r.window) == (
            want.method,
            want.units,
            want.refeed,
            want.keep,
            want.window,
        )
        assert r.method != DEFAULT and describe_default(mode).startswith(r.method)
    named = Sieve("snapkv", keep=0.25)
    assert named.resolve("query_aware") is named


def test_default_refuses_what_it_chooses():
    for bad in ({"units": "sentence"}, {"refeed": True}, {"options": {"kernel": 3}}):
        with pytest.raises(FlowsieveError, match="chooses its own"):
            Sieve(keep=0.25, **bad)
    with pytest.raises(FlowsieveError, match="the default sieve"):
        Sieve(keep=0.25, site="decode")
    with pytest.raises(FlowsieveError, match="unknown mode"):
        Sieve(keep=0.25).resolve("both")


@pytest.mark.parametrize("mode", MODES)
def test_default_keeps_what_the_named_default_keeps(tiny_llama_model, mode):
    p = _prompt()
    got = prefill_cache(tiny_llama_model, p, Sieve(keep=0.4, window=6), mode)
    ref = prefill_cache(tiny_llama_model, p, Sieve(keep=0.4, window=6).resolve(mode), mode)
    assert got.kept == ref.kept
    for li in ref.cache.sieve_layers:
        assert torch.equal(got.cache.layer(li).positions, ref.cache.layer(li).positions)


@pytest.mark.parametrize("mode", MODES)
def test_generate_and_generate_many_resolve(tiny_llama_model, char_tok, mode):
    text = "The cat sat. A dog ran far away. Birds sing at dawn. Rain fell all night long."
    q = "Who ran?"
    d = Sieve(keep=0.5, window=4)
    a = generate(tiny_llama_model, char_tok, text, q, sieve=d, mode=mode, chat=False, max_new_tokens=4)
    b = generate(
        tiny_llama_model, char_tok, text, q, sieve=d.resolve(mode), mode=mode, chat=False, max_new_tokens=4
    )
    (c,) = generate_many(tiny_llama_model, char_tok, text, q, [d], mode=mode, chat=False, max_new_tokens=4)
    assert a.token_ids == b.token_ids == c.token_ids
    assert a.kept_tokens == b.kept_tokens == c.kept_tokens < a.prompt_tokens


def test_on_points_to_generate_for_sentence_defaults(tiny_llama_model):
    # the defaults keep whole sentences, which needs the prompt's sentence map
    if all(f.get("units", "token") == "token" for f in DEFAULTS.values()):
        pytest.skip("no default uses sentence units")
    with pytest.raises(FlowsieveError, match="sentence map"):
        with Sieve(keep=0.5).on(tiny_llama_model):
            pass


def test_bench_runs_the_default_by_name(tiny_llama_model, char_tok):
    from flowsieve.bench.config import SweepConfig, check_methods
    from flowsieve.bench.runner import run_sweep
    from flowsieve.bench.store import Store

    cfg = SweepConfig(
        methods=["full", "default"],
        tasks=["needle"],
        lengths=[150],
        keeps=[0.5],
        limit=1,
        modes=["query_aware", "query_agnostic"],
        max_new_tokens=2,
        chat=False,
        share_prefill=True,
    )
    check_methods(cfg)
    with Store(":memory:") as store:
        summary = run_sweep(cfg, store, model=tiny_llama_model, tokenizer=char_tok, progress=False)
        rows = [r for r in store.rows() if r["method"] == "default"]
    assert summary.failed == 0 and len(rows) == 2
    assert all(0 < r["kept_tokens"] < r["prompt_tokens"] for r in rows)
