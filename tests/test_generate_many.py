"""generate_many (one shared observed prefill, several sieves) equals generate() once per sieve."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate, generate_many
from flowsieve.methods import METHODS
from flowsieve.observe import ObserveSpec
from flowsieve.sieve import Sieve
from flowsieve.sites.prefill import merge_specs

CTX = "The quick brown fox jumps over the lazy dog while the lamp keeper sleeps. " * 2
Q = "who sleeps?"


def _prefill_methods() -> list[str]:
    # methods that replay the context score from their own passes (refused below)
    return [n for n, c in METHODS.items() if "prefill" in c.sites and not c.replays]


@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_shared_prefill_equals_separate_runs(tiny_causal, char_tok, mode):
    _, model = tiny_causal
    model.generation_config = GenerationConfig(eos_token_id=None)
    sieves = [Sieve(m, keep=k, window=8) for m in _prefill_methods() for k in (0.5, 0.25)]
    kw = dict(chat=False, max_new_tokens=6, instruction=None, mode=mode)
    shared = generate_many(model, char_tok, CTX, Q, sieves, **kw)
    assert len(shared) == len(sieves)
    for s, r in zip(sieves, shared, strict=True):
        torch.manual_seed(0)
        ref = generate(model, char_tok, CTX, Q, sieve=s, **kw)
        assert r.extra["shared_prefill"] is True
        assert (r.kept_tokens, r.kv_bytes, r.prompt_tokens) == (
            ref.kept_tokens,
            ref.kv_bytes,
            ref.prompt_tokens,
        ), s.method
        assert r.token_ids == ref.token_ids, (s.method, s.keep)


def test_merge_specs_unites_and_refuses_different_sampling():
    a = ObserveSpec(rows=(3, 4), received=True)
    b = ObserveSpec(rows=(4, 5), norms=True, layers=(1,))
    m = merge_specs([a, b])
    assert m.rows == (3, 4, 5) and m.received and m.norms and m.layers is None
    with pytest.raises(FlowsieveError, match="row_stride"):
        merge_specs([a, ObserveSpec(row_stride=4)])


def test_refuses_other_sites_and_chunks(tiny_llama_model, char_tok):
    with pytest.raises(FlowsieveError, match="unchunked prefill"):
        generate_many(
            tiny_llama_model, char_tok, CTX, Q, [Sieve("snapkv", keep=0.5, window=8, chunk=16)], chat=False
        )
    with pytest.raises(FlowsieveError, match="unchunked prefill"):
        generate_many(tiny_llama_model, char_tok, CTX, Q, [Sieve("h2o", keep=0.5, site="decode")], chat=False)
    with pytest.raises(FlowsieveError, match="own replay passes"):
        generate_many(tiny_llama_model, char_tok, CTX, Q, [Sieve("kvzip", keep=0.5)], chat=False)
