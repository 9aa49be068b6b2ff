"""Which queries observe a compression (``Sieve.rows``) and which entries it protects, at every site."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate, generate_many
from flowsieve.inputs import Prompt, build_prompt
from flowsieve.observe import ObserveSpec
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache
from flowsieve.sites.base import protect_mask

CTX = "The lamp keeper slept while the storm broke the shutters of the old mill. " * 2
LONG_Q = "Which of the people in the story was asleep while the storm broke the shutters of the mill?"


@pytest.fixture
def seen(monkeypatch) -> list[tuple[int, ...]]:
    """The observation rows of every ``Sieve.observe_spec`` call, in order."""
    rows: list[tuple[int, ...]] = []
    real = Sieve.observe_spec

    def spy(self: Sieve, window: tuple[int, ...], layers=None) -> ObserveSpec:
        rows.append(tuple(window))
        return real(self, window, layers)

    monkeypatch.setattr(Sieve, "observe_spec", spy)
    return rows


def test_question_rows_are_the_whole_question_span(char_tok):
    p = build_prompt(char_tok, CTX, LONG_Q, chat=False)
    s = Sieve("snapkv", keep=0.5, window=8)
    rows = s.observation_rows(len(p), p.question)
    assert rows == tuple(range(p.question[0], len(p)))
    assert len(rows) > s.window  # a question longer than the window is observed whole
    assert Sieve("snapkv", keep=0.5, window=8, rows="window").observation_rows(len(p), p.question) == tuple(
        range(len(p) - 8, len(p))
    )
    # no question (query-agnostic head): the last window tokens
    assert s.observation_rows(p.split, None) == tuple(range(p.split - 8, p.split))
    # the last chunk of a chunked prefill observes only what it fed
    assert s.observation_rows(len(p), p.question, start=len(p) - 3) == tuple(range(len(p) - 3, len(p)))


def test_query_aware_protects_no_context_token(char_tok):
    p = build_prompt(char_tok, CTX, LONG_Q, chat=False)
    c0, c1 = p.context
    rows = Sieve("snapkv", keep=0.5).observation_rows(len(p), p.question)
    prot = protect_mask(p, len(p), rows)
    assert not prot[c0:c1].any() and prot[c1:].all() and prot[:c0].all()
    win = Sieve("snapkv", keep=0.5, rows="window").observation_rows(len(p), (c1, len(p)))
    prot_w = protect_mask(p, len(p), tuple(range(c1 - 5, c1)))
    assert prot_w[c1 - 5 : c1].all() and not prot_w[c0 : c1 - 5].any() and len(win) == 32


def test_prefill_observes_the_question_span(tiny_causal, char_tok, seen):
    _, model = tiny_causal
    p = build_prompt(char_tok, CTX, LONG_Q, chat=False)
    pre = prefill_cache(model, p, Sieve("flowcut", keep=0.5, window=8), "query_aware")
    cache, extra = pre.cache, pre.extra
    assert seen == [tuple(range(p.question[0], len(p)))]
    # protected: exactly what lies outside the context
    c0, c1 = p.context
    assert extra["protected"] == len(p) - (c1 - c0)
    kept = cache.layer(cache.sieve_layers[0]).positions.flatten().tolist()
    assert set(range(c1, len(p))) <= set(kept) and len(kept) == round(0.5 * len(p))


def test_shared_prefill_with_different_rows_equals_separate_runs(tiny_llama_model, char_tok):
    model = tiny_llama_model
    model.generation_config = GenerationConfig(eos_token_id=None)
    sieves = [
        Sieve("snapkv", keep=0.4, window=8),
        Sieve("snapkv", keep=0.4, window=8, rows="window"),
        Sieve("flowcut", keep=0.4, window=8, options={"normalise": "all"}, rows="window"),
        Sieve("h2o", keep=0.4, window=8),
    ]
    kw = dict(chat=False, max_new_tokens=5, instruction=None)
    shared = generate_many(model, char_tok, CTX, LONG_Q, sieves, **kw)
    for s, r in zip(sieves, shared, strict=True):
        ref = generate(model, char_tok, CTX, LONG_Q, sieve=s, **kw)
        assert (r.kept_tokens, r.token_ids, r.extra["protected"]) == (
            ref.kept_tokens,
            ref.token_ids,
            ref.extra["protected"],
        ), (s.method, s.rows)


def test_rows_change_what_is_kept(tiny_llama_model, char_tok):
    p = build_prompt(char_tok, CTX, LONG_Q, chat=False)
    kept = {}
    for rows in ("question", "window"):
        cache = prefill_cache(
            tiny_llama_model, p, Sieve("snapkv", keep=0.6, window=8, rows=rows), "query_aware"
        ).cache
        kept[rows] = cache.layer(0).positions.clone()
    assert not torch.equal(kept["question"], kept["window"])


def test_on_observes_the_declared_question(tiny_llama_model, seen):
    ids = torch.arange(1, 61)[None] % 120
    for protect_last, want in ((12, range(48, 60)), (0, range(56, 60))):
        with Sieve("snapkv", keep=0.5, window=4).on(tiny_llama_model, protect_last=protect_last):
            tiny_llama_model(input_ids=ids, use_cache=True)
        assert seen.pop() == tuple(want)


def test_bad_rows():
    with pytest.raises(FlowsieveError, match=r"unknown rows 'questions'.*did you mean 'question'"):
        Sieve("snapkv", keep=0.5, rows="questions")


def test_flowcut_normalise_option():
    with pytest.raises(FlowsieveError, match="normalise must be 'candidates' or 'all'"):
        Sieve("flowcut", keep=0.5, options={"normalise": "none"})


def test_prompt_without_question_protects_the_window():
    p = Prompt(ids=tuple(range(40)), context=(2, 40), question=None, split=40)
    rows = Sieve("snapkv", keep=0.5, window=6).observation_rows(40, p.question)
    assert rows == tuple(range(34, 40))
    prot = protect_mask(p, 40, rows)
    assert prot.tolist() == [True, True] + [False] * 32 + [True] * 6


def test_flowcut_prefill_options_are_refused_at_the_layer_site():
    with pytest.raises(FlowsieveError, match="option 'kernel' applies at the prefill site only"):
        Sieve("flowcut", keep=0.5, site="layer", options={"kernel": 5})
