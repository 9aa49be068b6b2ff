"""``Sieve(refeed=True)``: the question is fed again over the compressed context. Its invariants:
keep = 1 is plain generation; the next tokens equal a full forward in which the question and every
later token cannot see the evicted context entries; the shared-prefill path agrees; clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer
from test_sieve import _per_layer_reference, _prompt, sliding_masks
from transformers import GenerationConfig

from flowsieve.errors import FlowsieveError
from flowsieve.generate import decode_greedy, generate, generate_many
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache


@pytest.mark.parametrize("method", ["snapkv", "flowcut", "h2o"])
def test_keep_all_is_plain_generation(tiny_causal, method):
    _, model = tiny_causal
    p = _prompt(40, 3, 30)
    pre = prefill_cache(model, p, Sieve(method, keep=1.0, window=8, refeed=True), "query_aware")
    assert pre.kept == 40 and pre.extra["refeed_tokens"] == 10
    got, _ = decode_greedy(model, pre.cache, pre.logits, 6, eos=set())
    ref = model.generate(torch.tensor([p.ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 40:]
    assert got == ref.tolist()


@pytest.mark.parametrize("method", ["snapkv", "flowcut", "h2o"])
@pytest.mark.parametrize("units", ["token", "sentence"])
def test_question_sees_only_the_kept_context(tiny_causal, method, units):
    """Logits of the question's last position and of 4 more tokens equal a full forward where rows
    from the question on cannot see the evicted context entries (per layer, per KV head)."""
    _, model = tiny_causal
    T, c0, c1 = 48, 3, 38
    p = _prompt(T, c0, c1)
    if units == "sentence":
        from flowsieve.inputs import Prompt

        p = Prompt(
            ids=p.ids,
            context=p.context,
            question=p.question,
            split=p.split,
            sentences=tuple(t // 5 for t in range(T)),
        )
    sieve = Sieve(method, keep=0.5, window=12, refeed=True, units=units)
    pre = prefill_cache(model, p, sieve, "query_aware")
    cache, logits = pre.cache, pre.logits
    more = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    got = torch.cat([logits[:, -1:], model(more, cache=cache).logits], 1)  # (1, 5, V)
    ids = torch.cat([torch.tensor([p.ids]), more], dim=1)
    N = ids.shape[1]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    H = model.config.num_attention_heads
    allowed = {}
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions  # (1|B, 1|Hk, S)
        Hk = pos.shape[1]
        kept_ctx = pos[..., pos[0, 0] < c1] if Hk == 1 else pos
        hidden = torch.ones(1, Hk, N, dtype=torch.bool)
        hidden[..., c1:] = False
        hidden.scatter_(-1, kept_ctx[..., kept_ctx[0, 0] < c1].expand(1, Hk, -1), False)
        assert int((~hidden[0, 0, :c1]).sum()) == pre.kept - (T - c1)
        hidden = hidden.repeat_interleave(H // Hk, dim=1) if Hk > 1 else hidden
        late = i >= c1
        allowed[li] = (j <= i) & ~(late & hidden[..., None, :])
    allowed.update(sliding_masks(model, N))
    ref = _per_layer_reference(model, ids, allowed)[:, T - 1 :]
    assert (got - ref).abs().max().item() <= 1e-5


def test_shared_prefill_agrees(tiny_causal, char_tok):
    _, model = tiny_causal
    model.generation_config = GenerationConfig(eos_token_id=None)
    ctx = "The quick brown fox jumps over the lazy dog while the lamp keeper sleeps. " * 2
    sieves = [Sieve(m, keep=0.4, window=8, refeed=r) for m in ("snapkv", "flowcut") for r in (False, True)]
    kw = dict(chat=False, max_new_tokens=6, instruction=None)
    shared = generate_many(model, char_tok, ctx, "who sleeps?", sieves, **kw)
    for s, r in zip(sieves, shared, strict=True):
        ref = generate(model, char_tok, ctx, "who sleeps?", sieve=s, **kw)
        assert (r.kept_tokens, r.kv_bytes, r.token_ids) == (ref.kept_tokens, ref.kv_bytes, ref.token_ids), s


def test_refused_where_it_cannot_run(tiny_llama_model):
    model = tiny_llama_model
    p = _prompt(40, 3, 30)
    with pytest.raises(FlowsieveError, match="unchunked prefill-site"):
        Sieve("snapkv", keep=0.5, refeed=True, chunk=32)
    with pytest.raises(FlowsieveError, match="unchunked prefill-site"):
        Sieve("h2o", keep=0.5, refeed=True, site="decode")
    with pytest.raises(FlowsieveError, match="query-aware mode"):
        prefill_cache(model, p, Sieve("snapkv", keep=0.5, refeed=True), "query_agnostic")
    with pytest.raises(FlowsieveError, match="does not refeed"):
        prefill_cache(model, p, Sieve("kvzip", keep=0.5, refeed=True), "query_aware", CharTokenizer(), False)
