"""KVzip's replay scoring: scores equal an explicit eager-attention reference, the replay leaves the
cache as a plain prefill left it, and the method is refused where it cannot run."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import SieveCache
from flowsieve.methods import ScoreContext
from flowsieve.methods.kvzip import FIRST_REQUEST, NEXT_REQUEST
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache
from flowsieve.sites.prefill import replay_observe


def _ids(T: int, seed: int = 2) -> list[int]:
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _eager_reference(
    model, head: list[int], c0: int, c1: int, size: int, overlap: int
) -> dict[int, torch.Tensor]:
    """Per full-attention layer (B, Hk, T): max over the replay queries of every chunk (one eager
    forward of head + that chunk's replay ids each) and over the KV head's query heads."""
    tok = CharTokenizer()
    first = tok(FIRST_REQUEST)["input_ids"]
    nxt = tok(NEXT_REQUEST)["input_ids"]
    T = len(head)
    prev = model.config._attn_implementation
    model.set_attn_implementation("eager")
    out: dict[int, torch.Tensor] = {}
    try:
        for a in range(c0, c1, size):
            b = min(a + size, c1)
            req = first if a == c0 else nxt + head[max(c0, a - overlap) : a]
            ids = head + req + head[a:b]
            att = model(torch.tensor([ids]), output_attentions=True).attentions
            types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(att)
            for li, t in enumerate(types):
                if t != "full_attention":
                    continue
                A = att[li][:, :, T:, :T].amax(2)  # (B, H, T): replay rows only
                B, H, _ = A.shape
                Hk = model.config.num_key_value_heads
                A = A.view(B, Hk, H // Hk, T).amax(2)
                out[li] = A if li not in out else torch.maximum(out[li], A)
    finally:
        model.set_attn_implementation(prev)
    return out


@pytest.mark.parametrize("size", [64, 9])
def test_scores_equal_eager_reference(tiny_causal, size):
    """One chunk and several chunks (each later request led by the previous chunk's last tokens)."""
    _, model = tiny_causal
    T, c0, c1 = 40, 3, 34
    head = _ids(T)
    sieve = Sieve("kvzip", keep=0.5, window=4, options={"chunk_size": size, "n_sink": 0})
    cache = SieveCache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([head]), cache=cache, use_cache=True)
    obs = replay_observe(model, CharTokenizer(), cache, head, (c0, c1), sieve, chat=False)
    ref = _eager_reference(model, head, c0, c1, size, 8)
    H, Hk = model.config.num_attention_heads, model.config.num_key_value_heads
    for li in cache.sieve_layers:
        ctx = ScoreContext(T, tuple(range(T - 4, T)), H, Hk, li, model.config.num_hidden_layers)
        got = sieve.scorer.score(obs.layer(li), ctx)
        torch.testing.assert_close(got, ref[li], atol=1e-5, rtol=1e-4)


def test_replay_leaves_the_prefilled_cache_unchanged(tiny_causal):
    """Every layer (sliding windows included) holds exactly what the plain prefill stored."""
    _, model = tiny_causal
    head = _ids(40)
    a, b = SieveCache(model), SieveCache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([head]), cache=a, use_cache=True)
        model(input_ids=torch.tensor([head]), cache=b, use_cache=True)
    sieve = Sieve("kvzip", keep=0.5, window=4, options={"chunk_size": 10})
    replay_observe(model, CharTokenizer(), b, head, (3, 34), sieve, chat=False)
    assert a.get_seq_length() == b.get_seq_length() == 40
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_sinks_kept_and_scores_shared_by_no_question(tiny_llama_model):
    """The first n_sink entries are always kept; query-aware and query-agnostic runs of the same
    context keep the same context entries (the score never sees the question)."""
    model = tiny_llama_model
    T, c0, c1 = 48, 0, 38
    p = Prompt(ids=tuple(_ids(T)), context=(c0, c1), question=(c1, T), split=c1)
    sieve = Sieve("kvzip", keep=0.3, window=4)
    pre = prefill_cache(model, p, sieve, "query_agnostic", CharTokenizer(), chat=False)
    cache = pre.cache
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions[..., : pre.kept - (T - c1)]
        for row in pos.reshape(-1, pos.shape[-1]):
            assert set(range(4)) <= set(row.tolist())


class _ChatTok(CharTokenizer):
    chat_template = "x"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "<u>" + messages[0]["content"] + "</u><a>"


def test_chat_prompt_closes_the_user_turn_only_when_open(tiny_llama_model, monkeypatch):
    """A query-agnostic chat prefix ends inside the user turn: the request is followed by the turn
    end; a query-aware prompt already opened the assistant turn: nothing is added."""
    model = tiny_llama_model
    seen: list[list[int]] = []
    real = model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return real(*args, **kwargs)

    tok = _ChatTok()
    end = tok("</u><a>")["input_ids"]
    for head, opened in (
        (tok("<u>some context here")["input_ids"], False),
        (tok("<u>ctx?</u><a>")["input_ids"], True),
    ):
        cache = SieveCache(model)
        with torch.inference_mode():
            model(input_ids=torch.tensor([head]), cache=cache, use_cache=True)
        seen.clear()
        monkeypatch.setattr(model, "forward", spy)
        replay_observe(
            model, tok, cache, head, (3, len(head) - (7 if opened else 0)), Sieve("kvzip", keep=0.5), True
        )
        monkeypatch.setattr(model, "forward", real)
        req = tok(FIRST_REQUEST)["input_ids"]
        assert seen[0][: len(req)] == req
        assert (seen[0][len(req) : len(req) + len(end)] == end) is not opened


def test_refused_where_it_cannot_run(tiny_llama_model):
    model = tiny_llama_model
    p = Prompt(ids=tuple(_ids(40)), context=(0, 30), question=(30, 40), split=30)
    with pytest.raises(FlowsieveError, match="needs the tokenizer"):
        prefill_cache(model, p, Sieve("kvzip", keep=0.5), "query_aware")
    with pytest.raises(FlowsieveError, match="no chunked prefill"):
        prefill_cache(model, p, Sieve("kvzip", keep=0.5, chunk=32), "query_aware", CharTokenizer(), False)
    with pytest.raises(FlowsieveError, match=r"not Sieve\.on"):
        with Sieve("kvzip", keep=0.5).on(model):
            pass
    with pytest.raises(FlowsieveError, match="chunk_size"):
        Sieve("kvzip", keep=0.5, options={"chunk_size": 0})
    with pytest.raises(FlowsieveError, match="does not support site"):
        Sieve("kvzip", keep=0.5, site="decode")
