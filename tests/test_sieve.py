"""KV sieves at the prefill site: invariants on tiny random models of two families."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.methods import METHODS
from flowsieve.methods.selection import select_topk
from flowsieve.sieve import Sieve, list_methods
from flowsieve.sites import prefill_cache

PREFILL_METHODS = [n for n, c in METHODS.items() if "prefill" in c.sites]


def _prompt(T: int, c0: int, c1: int, seed: int = 1) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(0, 128, (T,), generator=g).tolist())
    return Prompt(ids=ids, context=(c0, c1), question=(c1, T), split=c1)


def _per_layer_reference(model, ids: torch.Tensor, allowed: dict[int, torch.Tensor]) -> torch.Tensor:
    """Full forward where layer i uses the bool mask allowed[i] (B|1, H|1, T, T)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def fn(module, q, k, v, mask, **kw):
        m = allowed.get(module.layer_idx)
        if m is None:
            return sdpa_attention_forward(module, q, k, v, mask, **kw)
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, q, k, v, m, is_causal=False, **kw)

    AttentionInterface.register("test_per_layer", fn)
    AttentionMaskInterface.register("test_per_layer", sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation("test_per_layer")
    try:
        return model(ids).logits
    finally:
        model.set_attn_implementation(prev)


def sliding_masks(model, N: int) -> dict[int, torch.Tensor]:
    """The causal window masks (1, 1, N, N) of a model's sliding-window layers, which no sieve
    compresses (none for models without them)."""
    w = getattr(model.config, "sliding_window", None)
    types = getattr(model.config, "layer_types", None) or []
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    return {
        li: ((j <= i) & (i - j < w))[None, None] for li, t in enumerate(types) if t == "sliding_attention"
    }


@pytest.mark.parametrize("method", PREFILL_METHODS)
def test_keep_all_is_identity(tiny_causal, method):
    """keep = 1.0: the cache is untouched and greedy decoding gives exactly plain generate's tokens."""
    from flowsieve.generate import decode_greedy

    _, model = tiny_causal
    p = _prompt(40, 3, 30)
    pre = prefill_cache(
        model, p, Sieve(method, keep=1.0, window=8), "query_aware", CharTokenizer(), chat=False
    )
    assert pre.kept == 40
    got, _ = decode_greedy(model, pre.cache, pre.logits, 6, eos=set())
    ref = model.generate(torch.tensor([p.ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 40:]
    assert got == ref.tolist()


@pytest.mark.parametrize("method", PREFILL_METHODS)
@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_compression_matches_masked_reference(tiny_causal, method, mode):
    """After compression, kept counts are exact, protected entries are kept, and the next tokens'
    logits equal a full forward in which the evicted keys are hidden from them (per layer, per head)."""
    _, model = tiny_causal
    T, c0, c1 = 48, 3, 38
    p = _prompt(T, c0, c1)
    # merging methods change the kept keys/values (tested on their own): prune-only here
    options = {"recycle_dropped": False} if method == "vflowopt" else {}
    sieve = Sieve(method, keep=0.5, window=6, options=options)
    pre = prefill_cache(model, p, sieve, mode, CharTokenizer(), chat=False)
    cache, extra = pre.cache, pre.extra
    head = c1 if mode == "query_agnostic" else T
    k = round(0.5 * head)
    more = torch.randint(0, 128, (1, 4), generator=torch.Generator().manual_seed(5))
    plan = sieve.scorer.budgets(k, extra["protected"], head, cache.sieve_layers)
    if len(set(plan.values())) > 1:
        # per-layer budgets: layers differ in length, so new tokens go one at a time (no shared mask)
        got = torch.cat([model(more[:, t : t + 1], cache=cache).logits for t in range(4)], 1)
    else:
        got = model(more, cache=cache).logits
    ids = torch.cat([torch.tensor([p.ids]), more], dim=1)
    N = ids.shape[1]
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    allowed = {}
    H = model.config.num_attention_heads
    for li in cache.sieve_layers:
        layer = cache.layer(li)
        pos = layer.positions  # (1|B, 1|Hk, S)
        kl = plan[li]
        assert pos.shape[-1] == kl + (N - head)  # kept + appended
        kept_prompt = pos[..., :kl]
        # protected: everything outside the context and the observation window
        must = set(range(c0)) | set(range(c1, head)) | set(range(head - 6, head))
        for row in kept_prompt.reshape(-1, kl):
            assert must <= set(row.tolist())
            assert row.tolist() == sorted(row.tolist())
        Hk = pos.shape[1]
        hidden = torch.ones(1, Hk, N, dtype=torch.bool)
        hidden[..., head:] = False
        hidden.scatter_(-1, kept_prompt.expand(1, Hk, kl), False)
        hidden = hidden.repeat_interleave(H // Hk, dim=1) if Hk > 1 else hidden
        late = i >= head
        allowed[li] = (j <= i) & ~(late & hidden[..., None, :])
    allowed.update(sliding_masks(model, N))
    ref = _per_layer_reference(model, ids, allowed)[:, head:]
    assert (got - ref[:, -4:]).abs().max().item() <= 1e-5
    assert pre.kept == k + (T - head)


def test_kv_bytes_drop(tiny_causal):
    from flowsieve.kvcache import full_kv_bytes, kv_bytes

    _, model = tiny_causal
    p = _prompt(64, 2, 56)
    cache = prefill_cache(model, p, Sieve("snapkv", keep=0.25, window=4), "query_aware").cache
    ratio = kv_bytes(cache) / full_kv_bytes(model, 64)
    full_layers = len(cache.sieve_layers) / model.config.num_hidden_layers
    # compressed layers hold a quarter; Gemma's sliding layers hold their window
    assert ratio <= 0.25 * full_layers + (1 - full_layers) + 1e-6


def test_select_topk_shared_and_per_head():
    s = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.0]])
    protect = torch.tensor([True, False, False, False, False])
    assert select_topk(s, protect, 3).tolist() == [0, 1, 3]
    s2 = torch.tensor([[[0.1, 0.9, 0.2, 0.8, 0.0], [0.5, 0.0, 0.9, 0.1, 0.7]]])
    assert select_topk(s2, protect, 3).tolist() == [[[0, 1, 3], [0, 2, 4]]]
    with pytest.raises(FlowsieveError, match="batch size 1"):
        select_topk(torch.zeros(2, 5), protect, 3)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"method": "snapkv", "keep": 0.0}, "keep must be in"),
        ({"method": "snapkv", "keep": 1.5}, "keep must be in"),
        ({"method": "snapkv"}, "exactly one of keep"),
        ({"method": "snapkv", "keep": 0.5, "budget": 10}, "exactly one of keep"),
        ({"method": "snapk", "keep": 0.5}, "did you mean 'snapkv'"),
        ({"method": "snapkv", "keep": 0.5, "site": "decode"}, "does not support site 'decode'"),
        ({"method": "snapkv", "keep": 0.5, "site": "prefil"}, "did you mean 'prefill'"),
        ({"method": "snapkv", "keep": 0.5, "options": {"colour": 1}}, "bad option"),
        ({"method": "snapkv", "budget": 0}, "budget must be"),
    ],
)
def test_bad_sieve_arguments(kwargs, msg):
    with pytest.raises(FlowsieveError, match=msg):
        Sieve(**kwargs)


def test_budget_errors(tiny_causal):
    _, model = tiny_causal
    p = _prompt(30, 2, 24)
    with pytest.raises(FlowsieveError, match="larger than the prompt"):
        prefill_cache(model, p, Sieve("recent", budget=31, window=4), "query_aware")
    with pytest.raises(FlowsieveError, match="smaller than the tokens that must be kept"):
        prefill_cache(model, p, Sieve("recent", budget=5, window=4), "query_aware")


def test_every_method_is_listed_with_a_paper():
    rows = list_methods()
    from flowsieve.methods.prompt.base import SCORERS

    assert {r["name"] for r in rows} == set(METHODS) | set(SCORERS)
    assert all(r["paper"] and r["sites"] for r in rows)
    by = {r["name"]: r for r in rows}
    assert "prompt" in by["longllmlingua"]["sites"] and by["selfinfo"]["sites"] == ["prefill", "prompt"]


@pytest.mark.parametrize("method", ["snapkv", "flowcut", "recent"])
def test_chunked_prefill_bounds_the_cache(tiny_causal, method):
    """Chunked prefill never holds more than budget + chunk entries, ends at the budget, keeps the question."""
    _, model = tiny_causal
    T, c0, c1 = 96, 2, 88
    p = _prompt(T, c0, c1)
    sieve = Sieve(method, keep=0.25, window=8, chunk=16)
    pre = prefill_cache(model, p, sieve, "query_aware")
    cache = pre.cache
    k = round(0.25 * T)
    assert pre.extra["peak_entries"] <= k + 16
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions
        assert pos.shape[-1] == k
        kept = set(pos.reshape(-1, k)[0].tolist())
        assert set(range(c1, T)) <= kept and set(range(c0)) <= kept


def test_chunked_keep_all_is_identity(tiny_causal):
    """keep = 1.0 with chunked prefill: the same logits as one full forward (chunking only changes
    float summation order, so logits are compared, not near-tied greedy tokens)."""
    _, model = tiny_causal
    p = _prompt(50, 3, 40)
    pre = prefill_cache(model, p, Sieve("snapkv", keep=1.0, window=8, chunk=16), "query_aware")
    cache, logits = pre.cache, pre.logits
    more = torch.randint(0, 128, (1, 3), generator=torch.Generator().manual_seed(2))
    got = torch.cat([logits[:, -1:], model(more, cache=cache).logits], dim=1)
    ref = model(torch.cat([torch.tensor([p.ids]), more], dim=1)).logits[:, 49:]
    assert (got - ref).abs().max().item() <= 1e-5


DECODE_METHODS = [n for n, c in METHODS.items() if "decode" in c.sites]


@pytest.mark.parametrize("method", DECODE_METHODS)
def test_decode_site_bounded_and_protected(tiny_llama_model, char_tok, method):
    """Decode site: the cache never exceeds its budget after a step; the question stays."""
    from flowsieve.generate import generate

    model = tiny_llama_model
    ctx = "abcdefghij" * 4
    r = generate(
        model,
        char_tok,
        ctx,
        "who?",
        sieve=Sieve(method, budget=30, site="decode", window=4),
        chat=False,
        max_new_tokens=24,
        instruction=None,
    )
    assert r.extra["capacity"] == 30 and r.extra["evicted"] > 0
    assert r.extra["max_stored"] <= 31  # capacity + the step's own new entry before eviction
    # keep-all at the decode site: no eviction, the same tokens as the full run
    full = generate(model, char_tok, ctx, "who?", chat=False, max_new_tokens=8, instruction=None)
    same = generate(
        model,
        char_tok,
        ctx,
        "who?",
        sieve=Sieve(method, keep=1.0, site="decode", window=4),
        chat=False,
        max_new_tokens=8,
        instruction=None,
    )
    assert same.token_ids[: len(full.token_ids)] == full.token_ids


def test_streamingllm_decode_matches_masked_reference(tiny_llama_model):
    """StreamingLLM at the decode site: each step's logits equal a full forward in which every query
    sees only the entries kept before it (sinks + recent) and itself."""
    from flowsieve.sites.decode import DecodeEvictor

    model = tiny_llama_model
    T, n_new, cap = 20, 10, 12
    p = _prompt(T, 0, T - 2)
    sieve = Sieve("streamingllm", budget=cap, site="decode", window=2)
    pre = prefill_cache(model, p, sieve, "query_aware")
    cache, protect = pre.cache, pre.protect
    ev = DecodeEvictor(model, cache, sieve, protect, recent=2)
    toks = torch.randint(0, 128, (n_new,), generator=torch.Generator().manual_seed(9)).tolist()
    seen: list[list[int]] = []
    got = []
    for t in toks:
        seen.append(cache.layer(0).positions.reshape(-1).tolist())  # kept before this query
        with ev() as after:
            got.append(model(torch.tensor([[t]]), cache=cache).logits[:, -1])
        after()
    ids = torch.tensor([list(p.ids) + toks])
    N = ids.shape[1]
    allowed = torch.zeros(N, N, dtype=torch.bool)
    allowed[:T, :T] = torch.ones(T, T).tril().bool()
    for q, kept in enumerate(seen):
        allowed[T + q, kept] = True
        allowed[T + q, T + q] = True
    ref = _per_layer_reference(model, ids, dict.fromkeys(cache.sieve_layers, allowed[None, None]))
    got_t = torch.cat(got)
    assert (got_t - ref[0, T:]).abs().max().item() <= 1e-5
    # what was kept is StreamingLLM's rule: the 4 sinks, the protected tail, then the most recent
    pinned = set(range(4)) | {i for i in range(T) if protect[i]}
    for q, kept in enumerate(seen):
        rest = [i for i in range(T + q) if i not in pinned]
        assert len(kept) == cap and set(kept) == pinned | set(rest[len(pinned) - cap :])


@pytest.mark.parametrize("method", ["snapkv", "flowcut", "h2o"])
def test_on_context_manager_with_generate(tiny_causal, method):
    """`with Sieve(...).on(model): model.generate(...)`: keep = 1 gives plain generate's tokens;
    keep = 0.5 shrinks the cache that generate carries."""
    _, model = tiny_causal
    ids = torch.tensor([_prompt(40, 0, 30).ids])
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    with Sieve(method, keep=1.0, window=4).on(model):
        same = model.generate(ids, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert torch.equal(same, ref)
    from transformers import GenerationConfig

    seen = {}
    with Sieve(method, keep=0.5, window=4).on(model, protect_last=6):
        out = model.generate(
            ids,
            generation_config=GenerationConfig(max_new_tokens=3, do_sample=False),
            return_dict_in_generate=True,
        )
        seen["cache"] = out.cache if hasattr(out, "cache") else out.past_key_values
    cache = seen["cache"]
    from flowsieve.kvcache import SieveCache

    # generate carried a cache whose full-attention layers all evicted: half the 40 prompt entries
    # kept on each, plus the 2 decoded before the last step
    assert cache.sieve_layers == SieveCache(model).sieve_layers != []
    for i in cache.sieve_layers:
        layer = cache.layer(i)
        assert layer.cumulative_length == 40 + 2 and layer.stored_length == 20 + 2
    assert model.config._attn_implementation == "sdpa"  # restored
