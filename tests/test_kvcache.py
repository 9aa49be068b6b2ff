"""SieveCache: an evicted cache behaves exactly like the full sequence with the evicted keys masked out."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import TINY, tiny_gemma3, tiny_llama
from transformers import DynamicCache

from flowsieve.errors import FlowsieveError
from flowsieve.kvcache import SieveCache, SieveLayer

P = 20  # prefill length
EVICT = list(range(4, 12))  # middle positions dropped after prefill
KEEP = torch.tensor([i for i in range(P) if i not in EVICT])


def _ids(T: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, T), generator=g)


def _masks(model, allowed_full: torch.Tensor):
    """The ``attention_mask`` argument for a full forward: allowed_full (B|1, H|1, T, T) bool for the
    full-attention layers; Gemma-3 sliding layers get their plain causal window mask."""
    cfg = model.config
    if "sliding_attention" not in (getattr(cfg, "layer_types", None) or []):
        return allowed_full
    T = allowed_full.shape[-1]
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    sliding = ((j <= i) & (i - j < cfg.sliding_window))[None, None]
    return {"full_attention": allowed_full, "sliding_attention": sliding}


def _hide(T: int, start: int, hidden: torch.Tensor) -> torch.Tensor:
    """Causal mask (..., T, T) also hiding the keys marked in ``hidden`` (..., T) from queries >= start."""
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    causal = j <= i
    late = (i >= start)[None, None]  # (1,1,T,1)
    return causal & ~(late & hidden[..., None, :])


def _run_chunks(model, ids: torch.Tensor, cache, bounds: list[int]) -> torch.Tensor:
    """Feed ids[:, bounds[k]:bounds[k+1]] step by step on ``cache``; logits concatenated over time."""
    outs = [model(ids[:, a:b], cache=cache).logits for a, b in itertools.pairwise(bounds)]
    return torch.cat(outs, dim=1)


# --------------------------------------------------------------------------------- 1. no eviction


@torch.no_grad()
def test_no_eviction_matches_dynamic_cache(tiny_causal):
    _, model = tiny_causal
    ids = _ids(P + 9)
    bounds = [0, P, P + 5, *range(P + 6, P + 10)]  # prefill, a 5-token chunk, single tokens
    ref = _run_chunks(model, ids, DynamicCache(config=model.config), bounds)
    cache = SieveCache(model)
    got = _run_chunks(model, ids, cache, bounds)
    assert (got - ref).abs().max().item() <= 1e-6
    assert cache.get_seq_length() == P + 9
    assert all(cache.layers[i].stored_length == P + 9 for i in cache.sieve_layers)


def test_layers_follow_config():
    llama, gemma = SieveCache(tiny_llama()), SieveCache(tiny_gemma3().config)
    assert llama.sieve_layers == [0, 1]
    assert gemma.sieve_layers == [2]  # sliding layers stay stock DynamicSlidingWindowLayer
    assert [type(x).__name__ for x in gemma.layers[:2]] == ["DynamicSlidingWindowLayer"] * 2
    with pytest.raises(FlowsieveError, match="needs a model or a config, got str"):
        SieveCache("llama")  # type: ignore[arg-type]


# ------------------------------------------------------------------ 2. shared eviction == 4D mask


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_shared_eviction_matches_masked_full_forward(name):
    model = TINY[name]()
    T = P + 5 + 3
    ids = _ids(T)
    cache = SieveCache(model)
    prefill = model(ids[:, :P], cache=cache).logits
    for i in cache.sieve_layers:
        cache.keep(i, KEEP)
    rest = _run_chunks(model, ids, cache, [P, P + 5, P + 6, P + 7, P + 8])
    got = torch.cat([prefill, rest], dim=1)

    hidden = torch.zeros(1, 1, T, dtype=torch.bool)
    hidden[..., EVICT] = True
    ref = model(ids, attention_mask=_masks(model, _hide(T, P, hidden))).logits
    assert (got - ref).abs().max().item() <= 1e-5
    # not vacuous: the evicted keys did matter
    assert (model(ids).logits[:, P:] - got[:, P:]).abs().max().item() > 1e-3
    assert cache.get_seq_length() == T
    assert cache.stored_lengths()[cache.sieve_layers[0]] == len(KEEP) + 8


# ------------------------------------------------------------------------ 3. per-KV-head eviction


@torch.no_grad()
def test_per_head_eviction_matches_per_head_mask():
    """Different kept sets per batch row and KV head; the reference is a per-query-head 4D mask
    (query head h reads KV head h // g), which SDPA broadcasts over (B, H, T, T)."""
    model = tiny_llama()
    cfg = model.config
    H, Hk = cfg.num_attention_heads, cfg.num_key_value_heads
    g = H // Hk
    B, T, n_keep = 2, P + 5 + 2, 12
    ids = _ids(T, batch=B)
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack(
        [torch.stack([torch.randperm(P, generator=gen)[:n_keep] for _ in range(Hk)]) for _ in range(B)]
    )

    cache = SieveCache(model)
    prefill = model(ids[:, :P], cache=cache).logits
    for i in cache.sieve_layers:
        cache.keep(i, idx)
    rest = _run_chunks(model, ids, cache, [P, P + 5, P + 6, P + 7])
    got = torch.cat([prefill, rest], dim=1)

    hidden_kv = torch.ones(B, Hk, T, dtype=torch.bool)
    hidden_kv[..., P:] = False
    hidden_kv.scatter_(-1, idx, False)
    hidden = hidden_kv.repeat_interleave(g, dim=1)  # (B, H, T)
    ref = model(ids, attention_mask=_hide(T, P, hidden)).logits
    assert (got - ref).abs().max().item() <= 1e-5
    layer = cache.layer(0)
    assert layer.positions is not None and layer.positions.shape == (B, Hk, n_keep + 7)
    assert torch.equal(layer.positions[..., :n_keep], idx.sort(-1).values)
    assert torch.equal(layer.positions[..., n_keep:], torch.arange(P, T).expand(B, Hk, -1))


# ------------------------------------------------------------------------ 4. bookkeeping


@torch.no_grad()
def test_positions_lengths_bytes_extras():
    model = tiny_llama()
    ids = _ids(P + 2)
    cache = SieveCache(model)
    model(ids[:, :P], cache=cache)
    layer = cache.layer(0)
    full_k, full_v = layer.keys.clone(), layer.values.clone()
    full_bytes, full_total = layer.nbytes(), cache.kv_bytes()
    layer.extras["score"] = torch.arange(P, dtype=torch.float32).expand(1, 2, P).clone()

    shuffled = KEEP[torch.randperm(len(KEEP))]
    cache.keep(0, shuffled)  # indices are sorted, so entries stay in token order
    assert layer.stored_length == len(KEEP) and cache.get_seq_length() == P and layer.get_seq_length() == P
    assert torch.equal(layer.keys, full_k[:, :, KEEP]) and torch.equal(layer.values, full_v[:, :, KEEP])
    assert torch.equal(layer.positions, KEEP.view(1, 1, -1))
    assert torch.equal(layer.extras["score"][0, 0], KEEP.float())
    assert layer.nbytes() * P == full_bytes * len(KEEP)
    assert cache.kv_bytes() == full_total - full_bytes + layer.nbytes()
    assert layer.get_mask_sizes(5) == (len(KEEP) + 5, P - len(KEEP))

    model(ids[:, P : P + 1], cache=cache)  # one decode step: new entry at the end, absolute position P
    assert layer.stored_length == len(KEEP) + 1 and cache.get_seq_length() == P + 1
    assert layer.positions[0, 0, -1].item() == P
    assert layer.extras["score"][0, 0, -1].item() == 0.0  # new entries start at zero

    before_pos, before_k = layer.positions.clone(), layer.keys.clone()
    per_head = torch.tensor([[[0, 2, 4, 6, 8, 12], [1, 3, 5, 7, 9, 12]]])  # (1, Hk, 6)
    cache.keep(0, per_head)
    assert layer.positions.shape == (1, 2, 6) and layer.keys.shape[-2] == 6
    for h in range(2):
        assert torch.equal(layer.positions[0, h], before_pos[0, 0, per_head[0, h]])
        assert torch.equal(layer.keys[0, h], before_k[0, h, per_head[0, h]])
    assert layer.extras["score"].shape == (1, 2, 6)
    assert cache.get_seq_length() == P + 1


def test_keep_rejects_bad_indices():
    model = tiny_llama()
    cache = SieveCache(model)
    with torch.no_grad():
        model(_ids(10), cache=cache)
    for bad, msg in (
        (torch.tensor([0, 10]), r"must lie in \[0, 10\)"),  # out of range
        (torch.tensor([1, 1, 2]), "must not repeat"),  # repeated
        (torch.tensor([[0, 1]]), r"indices of shape .* got \(1, 2\)"),  # 2-D
        (torch.zeros(1, 3, 2, dtype=torch.long), r"Hk=2; got \(1, 3, 2\)"),  # wrong head count
        (torch.tensor([0.0, 1.0]), "needs integer indices"),  # not integer
    ):
        with pytest.raises(FlowsieveError, match=msg):
            cache.keep(0, bad)
    assert cache.layer(0).stored_length == 10
    with pytest.raises(FlowsieveError, match="not an evictable full-attention layer"):
        SieveCache(tiny_gemma3()).keep(0, torch.tensor([0]))  # a sliding layer


@torch.no_grad()
def test_unequal_layer_lengths():
    """Different budgets per layer: fine for single-token steps (SDPA builds no mask), refused for chunks."""
    model = tiny_llama()
    ids = _ids(P + 6)
    cache = SieveCache(model)
    model(ids[:, :P], cache=cache)
    cache.keep(0, torch.arange(10))
    cache.keep(1, torch.arange(14))
    model(ids[:, P : P + 1], cache=cache)
    assert cache.stored_lengths() == [11, 15]
    with pytest.raises(FlowsieveError, match="same count"):
        model(ids[:, P + 1 : P + 6], cache=cache)


# ---------------------------------------------------------------------------------- 5. generate


def _sink_recent(n_sink: int, n_recent: int, log: list[tuple[int, int]]):
    def policy(layer: SieveLayer) -> None:
        S = layer.stored_length
        if S > n_sink + n_recent:
            layer.keep(torch.cat([torch.arange(n_sink), torch.arange(S - n_recent, S)]))
        log.append((S, layer.stored_length))

    return policy


@torch.no_grad()
def _greedy_reference(model, prompt: torch.Tensor, n_new: int, allowed) -> torch.Tensor:
    """Greedy decoding by full forwards with an explicit mask ``allowed(T) -> (T, T) bool``."""
    ids = prompt
    for _ in range(n_new):
        T = ids.shape[1]
        logits = model(ids, attention_mask=_masks(model, allowed(T)[None, None])).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


GEN = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_generate(name):
    model = TINY[name]()
    prompt = _ids(P)
    plain = model.generate(prompt, **GEN)
    cache = SieveCache(model)
    assert torch.equal(model.generate(prompt, cache=cache, **GEN), plain)
    assert cache.get_seq_length() == P + 4  # the last generated token is never fed back

    log: list[tuple[int, int]] = []
    bounded = SieveCache(model, policy=_sink_recent(4, 8, log))
    out = model.generate(prompt, cache=bounded, **GEN)
    assert len(log) == 5 * len(bounded.sieve_layers)  # prefill + 4 decode steps, every full layer
    assert all(after <= 12 for _, after in log)
    assert [before for before, _ in log[:: len(bounded.sieve_layers)]] == [P, 13, 13, 13, 13]
    assert bounded.get_seq_length() == P + 4

    def allowed(T: int) -> torch.Tensor:
        i = torch.arange(T)[:, None]
        j = torch.arange(T)[None, :]
        return (j <= i) & ((i < P) | (j < 4) | (j >= i - 8))

    assert torch.equal(out, _greedy_reference(model, prompt, 5, allowed))


# ------------------------------------------------------------------------------------- 6. clone


@pytest.mark.parametrize("name", sorted(TINY))
@torch.no_grad()
def test_clone_serves_independent_questions(name):
    model = TINY[name]()
    ctx, qa, qb = _ids(P, seed=1), _ids(6, seed=2), _ids(4, seed=3)
    cache = SieveCache(model)
    model(ctx, cache=cache)
    for i in cache.sieve_layers:
        cache.keep(i, KEEP)
    snapshot = [(x.keys.clone(), x.values.clone()) for x in cache.layers]
    stored = cache.stored_lengths()

    def answer(c: SieveCache, q: torch.Tensor) -> torch.Tensor:
        return _run_chunks(model, q, c, [0, q.shape[1] - 2, q.shape[1] - 1, q.shape[1]])

    ca, cb = cache.clone(), cache.copy()
    for a, b in zip(ca.layers, cb.layers, strict=True):
        assert a.keys.data_ptr() != b.keys.data_ptr()
    la = answer(ca, qa)
    lb = answer(cb, qb)
    la2 = answer(ca, qb)  # ca grows further; cb and the original are untouched
    assert cache.stored_lengths() == stored and cache.get_seq_length() == P
    for x, (k, v) in zip(cache.layers, snapshot, strict=True):
        assert torch.equal(x.keys, k) and torch.equal(x.values, v)
    assert (answer(cache.clone(), qa) - la).abs().max().item() <= 1e-6
    assert (answer(cache.clone(), qb) - lb).abs().max().item() <= 1e-6
    assert ca.get_seq_length() == P + 10 and cb.get_seq_length() == P + 4
    assert (la2[:, -1] - lb[:, -1]).abs().max().item() > 1e-4  # different history, different answer

    # generate continues a compressed context given the full ids (it feeds only the unseen tail)
    def allowed(T: int) -> torch.Tensor:
        hidden = torch.zeros(T, dtype=torch.bool)
        hidden[EVICT] = True
        return _hide(T, P, hidden)[0, 0]

    prompt = torch.cat([ctx, qa], 1)
    ref = _greedy_reference(model, prompt, 5, allowed)
    for _ in range(2):
        assert torch.equal(model.generate(prompt, cache=cache.clone(), **GEN), ref)
    assert cache.get_seq_length() == P
