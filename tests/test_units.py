"""Sentence units at the prefill site: the sentence map, whole-sentence ranking and its errors."""

from __future__ import annotations

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt, build_prompt
from flowsieve.methods.base import unit_pool
from flowsieve.methods.selection import select_topk
from flowsieve.sentences import sentence_index
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache


def test_sentence_index_cuts_after_end_marks_and_before_line_breaks():
    text = 'One two. Three "four." Five!\nSix seven? Eight'
    words = ["One", " two.", " Three", ' "four."', " Five!", "\nSix", " seven?", " Eight"]
    starts, pos = [], 0
    for w in words:
        starts.append(text.index(w, pos))
        pos = starts[-1] + len(w)
    got = sentence_index(text, starts)
    # sentences: [One two.] [Three "four."] [Five!] [Six seven?] [Eight]
    groups = [got[0]] * 2 + [got[2]] * 2 + [got[4]] + [got[5]] * 2 + [got[7]]
    assert list(got) == groups
    assert len(set(got)) == 5 and list(got) == sorted(got)


def test_build_prompt_maps_every_token(char_tok):
    p = build_prompt(char_tok, "Ab. Cd. Ef", "Q?", chat=False)
    assert len(p.sentences) == len(p.ids)
    s = p.sentence_units()
    assert s[0] == s[2] and s[2] != s[4] and s[4] != s[8]  # "Ab." | " Cd." | " Ef"


def test_unit_pool_keeps_best_units_whole_in_order():
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.4, 0.35, 0.8, 0.05]])
    units = torch.tensor([[[0, 0, 0, 1, 1, 1, 2, 2]]])
    ranked = unit_pool(scores, units)
    # unit maxima: u0 0.9, u2 0.8, u1 0.4 -> u0 whole, then u2 whole, then u1's best entry
    prot = torch.zeros(8, dtype=torch.bool)
    assert select_topk(ranked, prot, 3).tolist() == [0, 1, 2]
    assert select_topk(ranked, prot, 5).tolist() == [0, 1, 2, 6, 7]
    assert select_topk(ranked, prot, 6).tolist() == [0, 1, 2, 4, 6, 7]


def test_unit_pool_per_head_and_inf():
    scores = torch.tensor([[[1.0, 0.0, float("-inf"), 2.0], [0.0, 3.0, 0.5, float("-inf")]]])
    units = torch.tensor([[[0, 0, 1, 1]]])
    ranked = unit_pool(scores, units)
    assert ranked.shape == (1, 2, 4)
    top = select_topk(ranked, torch.zeros(4, dtype=torch.bool), 2)
    assert top.tolist() == [[[2, 3], [0, 1]]]  # a -inf entry still goes with its unit


def _sentence_prompt(T: int, c0: int, c1: int, sent: int = 5) -> Prompt:
    g = torch.Generator().manual_seed(3)
    ids = tuple(torch.randint(0, 128, (T,), generator=g).tolist())
    return Prompt(
        ids=ids, context=(c0, c1), question=(c1, T), split=c1, sentences=tuple(t // sent for t in range(T))
    )


@pytest.mark.parametrize("method", ["snapkv", "flowcut", "h2o", "tova"])
def test_sentence_units_keep_whole_sentences_and_exact_count(tiny_causal, method):
    _, model = tiny_causal
    T, c0, c1, w = 60, 2, 50, 6
    p = _sentence_prompt(T, c0, c1)
    sieve = Sieve(method, keep=0.5, window=w, units="sentence")
    pre = prefill_cache(model, p, sieve, "query_aware")
    cache = pre.cache
    k = round(0.5 * T)
    assert pre.kept == k
    protect = set(range(c0)) | set(range(c1, T)) | set(range(T - w, T))
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions
        for row in pos.reshape(-1, pos.shape[-1]):
            kept = set(row.tolist())
            assert len(kept) == k and protect <= kept
            ctx = sorted(kept - protect)
            # every context sentence is kept whole or not at all, except at most one (the budget cut)
            partial = 0
            for s in {t // 5 for t in ctx}:
                members = {t for t in range(s * 5, s * 5 + 5) if t not in protect}
                if not members <= kept:
                    partial += 1
            assert partial <= 1


def test_sentence_units_keep_all_is_identity(tiny_causal):
    from flowsieve.generate import decode_greedy

    _, model = tiny_causal
    p = _sentence_prompt(40, 3, 30)
    pre = prefill_cache(model, p, Sieve("snapkv", keep=1.0, window=8, units="sentence"), "query_aware")
    assert pre.kept == 40
    got, _ = decode_greedy(model, pre.cache, pre.logits, 5, eos=set())
    ref = model.generate(torch.tensor([p.ids]), max_new_tokens=5, do_sample=False, min_new_tokens=5)[0, 40:]
    assert got == ref.tolist()


def test_sentence_units_errors(tiny_causal):
    _, model = tiny_causal
    with pytest.raises(FlowsieveError, match="did you mean 'sentence'"):
        Sieve("snapkv", keep=0.5, units="sentences")
    with pytest.raises(FlowsieveError, match="prefill site only"):
        Sieve("h2o", keep=0.5, site="decode", units="sentence")
    with pytest.raises(FlowsieveError, match="sentence map"):
        with Sieve("snapkv", keep=0.5, units="sentence").on(model):
            pass
    p = Prompt(ids=tuple(range(1, 41)), context=(0, 30), question=(30, 40), split=30)  # no map
    with pytest.raises(FlowsieveError, match="sentence map"):
        prefill_cache(model, p, Sieve("snapkv", keep=0.5, window=8, units="sentence"), "query_aware")


def test_bench_method_spelling_sets_units():
    from flowsieve.bench.config import _make_sieve

    s = _make_sieve(Sieve, "flowcut@kernel=5@units=sentence", 0.25, None, "prefill")
    assert s.units == "sentence" and s.scorer.kernel == 5


def test_bench_checks_accept_units():
    from flowsieve.bench.config import SweepConfig, check_methods

    cfg = SweepConfig(
        model="smollm2",
        methods=("flowcut@kernel=5@units=sentence",),
        sites=("prefill",),
        keeps=(0.25,),
        tasks=("needle",),
    )
    check_methods(cfg)
    bad = SweepConfig(
        model="smollm2", methods=("flowcut@units=word",), sites=("prefill",), keeps=(0.25,), tasks=("needle",)
    )
    with pytest.raises(FlowsieveError, match="unknown units 'word'"):
        check_methods(bad)
