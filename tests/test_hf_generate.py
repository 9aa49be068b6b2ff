"""``Sieve.generate``: ``model.generate`` continuing from a prefill-site sieve's compressed cache gives,
greedily, token for token what the measured path ``flowsieve.generate.generate`` gives (token and
sentence units, refeed, chunked prefill, both modes); keep = 1 is plain generation; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import sharpen, tiny_llama
from transformers import GenerationConfig

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate
from flowsieve.inputs import MODES, build_prompt
from flowsieve.sieve import Sieve

CTX = (
    "The quick brown fox jumps over the lazy dog. The lamp keeper sleeps all day. "
    "Then the storm came in at night. A ship was lost near the rocks. "
    "The keeper woke up and lit the lamp."
)
Q = "who sleeps?"
N_NEW = 12
KW = dict(chat=False, max_new_tokens=N_NEW)


def _model(name: str = "llama", seed: int = 2):
    from conftest import TINY

    model = sharpen(TINY[name](seed), qk=4.0)  # sharper attention: eviction changes the tokens
    model.generation_config = GenerationConfig(eos_token_id=None)  # no early stop: compare 12 tokens
    return model


def _pair(model, tok, sieve, mode):
    ref = generate(model, tok, CTX, Q, sieve=sieve, mode=mode, **KW).token_ids
    got = sieve.generate(model, tok, CTX, Q, mode=mode, do_sample=False, **KW)
    return ref, got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("units", ["token", "sentence"])
@pytest.mark.parametrize("method", ["snapkv", "h2o", "flowcut"])
def test_same_tokens_as_measured_path(char_tok, method, units, mode):
    for seed in (1, 2):
        model = _model(seed=seed)
        ref, got = _pair(model, char_tok, Sieve(method, keep=0.25, window=8, units=units), mode)
        assert len(got) == N_NEW
        assert got == ref, (method, units, mode, seed)


@pytest.mark.parametrize("method", ["snapkv", "flowcut"])
@pytest.mark.parametrize("units", ["token", "sentence"])
def test_refeed_same_tokens(char_tok, method, units):
    for seed in (1, 2):
        model = _model(seed=seed)
        sieve = Sieve(method, keep=0.25, window=8, units=units, refeed=True)
        ref, got = _pair(model, char_tok, sieve, "query_aware")
        assert got == ref, (method, units, seed)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_and_sliding_layers(char_tok, mode):
    """A chunked prefill, and Gemma-3's sliding-window layers next to the compressed ones."""
    for name in ("llama", "gemma3"):
        model = _model(name)
        ref, got = _pair(model, char_tok, Sieve("snapkv", keep=0.25, window=8, chunk=32), mode)
        assert got == ref, name
        ref, got = _pair(model, char_tok, Sieve("snapkv", keep=0.25, window=8, units="sentence"), mode)
        assert got == ref, name


@pytest.mark.parametrize(
    ("mode", "refeed"), [("query_aware", False), ("query_agnostic", False), ("query_aware", True)]
)
def test_keep_all_is_no_compression(char_tok, mode, refeed):
    model = _model()
    sieve = Sieve("snapkv", keep=1.0, window=8, units="sentence", refeed=refeed)
    got = sieve.generate(model, char_tok, CTX, Q, mode=mode, do_sample=False, **KW)
    full = generate(model, char_tok, CTX, Q, sieve=None, mode=mode, **KW).token_ids
    ids = torch.tensor([build_prompt(char_tok, CTX, Q, chat=False).ids])
    plain = model.generate(ids, max_new_tokens=N_NEW, do_sample=False)[0, ids.shape[1] :].tolist()
    assert got == full == plain


@pytest.mark.parametrize("mode", MODES)
def test_not_vacuous(char_tok, mode):
    """Compression changes the tokens here; in query-aware mode the first token comes from the
    prefill's own logits (over the full context), not from a pass over the evicted cache."""
    model = _model()
    full = generate(model, char_tok, CTX, Q, sieve=None, mode=mode, **KW).token_ids
    outs = [
        Sieve(m, keep=0.25, window=8, units=u).generate(model, char_tok, CTX, Q, mode=mode, **KW)
        for m in ("snapkv", "h2o", "flowcut")
        for u in ("token", "sentence")
    ]
    assert sum(o != full for o in outs) >= 3
    if mode == "query_aware":
        assert all(o[0] == full[0] for o in outs)
        refed = Sieve("snapkv", keep=0.25, window=8, refeed=True).generate(model, char_tok, CTX, Q, **KW)
        assert refed != full


def test_generate_settings_apply_from_the_first_token(char_tok):
    """generate's logits processors see the prefill logits too (the first step is generate's own)."""
    model = _model()
    sieve = Sieve("snapkv", keep=0.25, window=8, units="sentence", refeed=True)
    greedy = sieve.generate(model, char_tok, CTX, Q, **KW)
    banned = sieve.generate(model, char_tok, CTX, Q, suppress_tokens=[greedy[0]], **KW)
    assert banned[0] != greedy[0] and greedy[0] not in banned
    short = sieve.generate(model, char_tok, CTX, Q, chat=False, max_new_tokens=3)
    assert short == greedy[:3]


def test_sampling_runs_from_the_compressed_cache(char_tok):
    model = _model()
    sieve = Sieve("snapkv", keep=0.25, window=8, units="sentence", refeed=True)
    draws = []
    for _ in range(2):
        torch.manual_seed(0)
        draws.append(sieve.generate(model, char_tok, CTX, Q, do_sample=True, temperature=2.0, **KW))
    assert draws[0] == draws[1] and len(draws[0]) == N_NEW


def test_stops_at_eos_like_the_measured_path(char_tok):
    model = _model()
    sieve = Sieve("snapkv", keep=0.25, window=8, units="sentence")
    free = sieve.generate(model, char_tok, CTX, Q, **KW)
    model.generation_config = GenerationConfig(eos_token_id=free[3])
    ref = generate(model, char_tok, CTX, Q, sieve=sieve, **KW).token_ids
    got = sieve.generate(model, char_tok, CTX, Q, **KW)
    assert got == ref == free[: free.index(free[3]) + 1]


def test_hooks_are_removed(char_tok):
    model = _model()
    Sieve("snapkv", keep=0.25, window=8).generate(model, char_tok, CTX, Q, **KW)
    with pytest.raises(FlowsieveError, match="one sequence"):
        Sieve("snapkv", keep=0.25, window=8).generate(model, char_tok, CTX, Q, num_beams=2, **KW)
    with pytest.raises(ValueError, match="not_a_generate_kwarg"):  # generate's own, after the prefill
        Sieve("snapkv", keep=0.25, window=8).generate(model, char_tok, CTX, Q, not_a_generate_kwarg=1, **KW)
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_errors(char_tok):
    model = tiny_llama()
    with pytest.raises(FlowsieveError, match=r"prefill-site sieves only.*sieve\.on\(model\)"):
        Sieve("h2o", keep=0.5, site="decode").generate(model, char_tok, CTX, Q, **KW)
    with pytest.raises(FlowsieveError, match="attention_mask, cache"):
        Sieve("snapkv", keep=0.5).generate(model, char_tok, CTX, Q, cache=None, attention_mask=None, **KW)
    with pytest.raises(FlowsieveError, match=r"sentence map.*sieve\.generate"):
        with Sieve("snapkv", keep=0.5, units="sentence").on(model):
            pass
    with pytest.raises(FlowsieveError, match=r"refeed.*sieve\.generate"):
        with Sieve("snapkv", keep=0.5, refeed=True).on(model):
            pass
    with pytest.raises(FlowsieveError, match="use_cache"):
        Sieve("snapkv", keep=0.5).generate(model, char_tok, CTX, Q, use_cache=False, **KW)
    model.generation_config = GenerationConfig(num_beams=2)
    with pytest.raises(FlowsieveError, match="one sequence"):
        Sieve("snapkv", keep=0.5).generate(model, char_tok, CTX, Q, **KW)
    model.generation_config = GenerationConfig()
    with pytest.raises(FlowsieveError, match="refeed needs a question"):
        Sieve("snapkv", keep=0.5, refeed=True).generate(model, char_tok, CTX, Q, mode="query_agnostic", **KW)


@pytest.mark.integration
def test_smollm2_sentence_refeed_same_tokens(smollm2):
    model, tok = smollm2
    ctx = (Path(__file__).resolve().parents[1] / "examples/lighthouse.txt").read_text()
    q = "Who kept the lighthouse lamp burning during the storm?"
    sieve = Sieve("snapkv", keep=0.25, units="sentence", refeed=True)
    ref = generate(model, tok, ctx, q, sieve=sieve, max_new_tokens=24)
    got = sieve.generate(model, tok, ctx, q, max_new_tokens=24, do_sample=False)
    assert got == ref.token_ids
    assert ref.kept_tokens < ref.prompt_tokens // 2
    assert tok.decode(got, skip_special_tokens=True) == ref.text
