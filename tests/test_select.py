"""The select site (TokenSelect, ActQKV) on tiny random Llama and Gemma-3 configs.

The cache keeps every entry; each later attention call of a full-attention layer attends to the
picked entries only. The central check: logits equal a full forward in which, per layer and per
query, every entry the runtime did not pick is hidden by an explicit mask.
"""

from __future__ import annotations

import math

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.generate import decode_greedy, generate
from flowsieve.inputs import Prompt
from flowsieve.kvcache import layer_types
from flowsieve.methods import METHODS
from flowsieve.methods.actqkv import (
    ActQKVMethod,
    activation_weights,
    grouped_queries,
    hand_out,
    local_attention,
    normalized_entropy,
)
from flowsieve.methods.tokenselect import TokenSelectMethod, soft_vote
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache
from flowsieve.sites.select import SelectRuntime, SelectSite

SELECT = ("tokenselect", "actqkv")
# small blocks so that a 60-token prompt has several candidate blocks
OPTIONS = {"tokenselect": {}, "actqkv": {"block_size": 4, "repr_topk": 2, "repr_window": 8}}


def _prompt(T: int = 60, c1: int = 50, seed: int = 1) -> Prompt:
    g = torch.Generator().manual_seed(seed)
    ids = tuple(torch.randint(0, 128, (T,), generator=g).tolist())
    return Prompt(ids=ids, context=(0, c1), question=(c1, T), split=c1)


def _sieve(method: str, **kw) -> Sieve:
    return Sieve(method, site="select", options=dict(OPTIONS[method]), **kw)


def _tokens(n: int, seed: int = 7) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _run(model, prompt: Prompt, sieve: Sieve, mode: str, more: list[int]):
    """Prefill with the select site, then feed ``more`` one token at a time while selecting.

    Returns (logits at the last prompt position then after each token (len(more) + 1, V), runtime).
    """
    pre = SelectSite().run(model, prompt, sieve, mode, trace=True)
    cache, rt = pre.cache, pre.hook
    assert isinstance(rt, SelectRuntime)
    rows = [pre.logits[0, -1]]
    with pre.decoding():
        for t in more:
            rows.append(model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1])
    return torch.stack(rows), rt


def _reference(model, ids: list[int], allowed: dict[int, torch.Tensor]) -> torch.Tensor:
    """Full forward of ``ids`` where layer i uses the bool mask allowed[i] (N, N); logits (N, V)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def fn(module, q, k, v, mask, **kw):
        kw.pop("is_causal", None)
        return sdpa_attention_forward(
            module, q, k, v, allowed[module.layer_idx][None, None], is_causal=False, **kw
        )

    AttentionInterface.register("test_select_ref", fn)
    AttentionMaskInterface.register("test_select_ref", sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation("test_select_ref")
    try:
        with torch.inference_mode():
            return model(torch.tensor([ids])).logits[0]
    finally:
        model.set_attn_implementation(prev)


def _masks_from_trace(model, rt: SelectRuntime, n_total: int) -> dict[int, torch.Tensor]:
    """Per layer (N, N): causal, with each selecting call's rows restricted to the slots it picked."""
    i, j = torch.arange(n_total)[:, None], torch.arange(n_total)[None, :]
    causal = j <= i
    allowed: dict[int, torch.Tensor] = {}
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    for li, kind in enumerate(types):
        if kind == "sliding_attention":
            allowed[li] = causal & (i - j < model.config.sliding_window)
        else:
            allowed[li] = causal.clone()
    # calls come layer after layer; the cache length N at a call tells which rows it computed
    assert rt.trace is not None
    for (_, layer, picked), (_, _, N, _) in zip(rt.trace, rt.records, strict=True):
        if picked is None:
            continue
        rows = [r for r in range(N) if r >= _first_new_row(rt, layer, N)]
        for r in rows:
            row = torch.zeros(n_total, dtype=torch.bool)
            row[picked] = True
            allowed[layer][r] = row & causal[r]
    return allowed


def _first_new_row(rt: SelectRuntime, layer: int, N: int) -> int:
    """The first token computed by the call of ``layer`` that ended with N cached entries."""
    ends = sorted({n for (_, li, n, _) in rt.records if li == layer})
    k = ends.index(N)
    return 0 if k == 0 else ends[k - 1]


# ------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize("name,arxiv", [("tokenselect", "2411.02886"), ("actqkv", "2502.13542")])
def test_registered_at_the_select_site_with_paper(name, arxiv):
    cls = METHODS.get(name)
    assert cls.sites == ("select",) and arxiv in cls.paper


# -------------------------------------------------------------------------------- end-to-end, exact


@pytest.mark.parametrize("method", SELECT)
@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_keep_all_equals_the_full_model(tiny_causal, method, mode):
    """keep = 1: the logits of every step equal one plain forward, and greedy tokens equal plain
    ``model.generate``."""
    _, model = tiny_causal
    p, more = _prompt(), _tokens(5)
    got, rt = _run(model, p, _sieve(method, keep=1.0), mode, more)
    with torch.inference_mode():
        ref = model(torch.tensor([list(p.ids) + more])).logits[0, len(p) - 1 :]
    assert (got - ref).abs().max().item() <= 1e-5
    assert all(picked is None for _, _, picked in rt.trace)
    pre = prefill_cache(model, p, _sieve(method, keep=1.0), mode)
    assert isinstance(pre.hook, SelectRuntime)
    with pre.decoding():
        toks, _ = decode_greedy(model, pre.cache, pre.logits, 6, eos=set())
    plain = model.generate(torch.tensor([p.ids]), max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert toks == plain[0, len(p) :].tolist()


@pytest.mark.parametrize("method", SELECT)
def test_budget_above_the_cache_is_full_attention(tiny_causal, method):
    _, model = tiny_causal
    p, more = _prompt(), _tokens(4)
    got, _ = _run(model, p, _sieve(method, budget=1000), "query_agnostic", more)
    with torch.inference_mode():
        ref = model(torch.tensor([list(p.ids) + more])).logits[0, len(p) - 1 :]
    assert (got - ref).abs().max().item() <= 1e-5
    # the methods themselves: a budget >= N picks every slot
    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 30, 16)
    for m in (TokenSelectMethod(), ActQKVMethod(block_size=4, repr_topk=2)):
        st = m.new_state()
        m.observe(st, 0, torch.randn(1, 4, 29, 16), k[:, :, :29], 0.25)
        m.observe(st, 0, q, k, 0.25)
        for budget in (30, 31, 500):
            assert m.select(st, (0,), 0, q, k, budget).tolist() == list(range(30))


@pytest.mark.parametrize("method", SELECT)
@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_selection_matches_masked_reference(tiny_causal, method, mode):
    """Every selecting call (the appended question in query-agnostic mode, each decode step)
    computes exactly what a full forward computes with the unpicked entries masked out."""
    _, model = tiny_causal
    p, more = _prompt(), _tokens(6)
    got, rt = _run(model, p, _sieve(method, keep=0.4), mode, more)
    picked = [x for _, _, x in rt.trace if x is not None]
    assert picked, "nothing was selected: the test would not test anything"
    assert all(len(x) < N for (_, _, x), (_, _, N, _) in zip(rt.trace, rt.records) if x is not None)
    ids = list(p.ids) + more
    ref = _reference(model, ids, _masks_from_trace(model, rt, len(ids)))[len(p) - 1 :]
    assert (got - ref).abs().max().item() <= 1e-5
    # and the selection changed the result (otherwise the reference proves nothing)
    with torch.inference_mode():
        full = model(torch.tensor([ids])).logits[0, len(p) - 1 :]
    assert (got - full).abs().max().item() > 1e-4
    if mode == "query_agnostic":
        assert any(ph == "chunk" and x is not None for ph, _, x in rt.trace)


@pytest.mark.parametrize("method", SELECT)
def test_chunked_prefill_selects_and_matches_reference(tiny_llama_model, method):
    """With Sieve.chunk every prefill chunk after the first attends to a selection."""
    model = tiny_llama_model
    p, more = _prompt(), _tokens(3)
    got, rt = _run(model, p, _sieve(method, keep=0.5, chunk=40, window=8), "query_aware", more)
    assert any(ph == "chunk" and x is not None for ph, _, x in rt.trace)
    ids = list(p.ids) + more
    ref = _reference(model, ids, _masks_from_trace(model, rt, len(ids)))[len(p) - 1 :]
    assert (got - ref).abs().max().item() <= 1e-5


def test_generate_records_full_cache_and_attended_entries(tiny_causal, char_tok):
    """generate(): nothing evicted (kv bytes and kept tokens of the full run); attended entries per
    decode step = round(keep x N) for TokenSelect, at most that on average for ActQKV."""
    _, model = tiny_causal
    ctx = "the lamp burned all night while the storm beat on the rocks. " * 2
    full = generate(model, char_tok, ctx, "who?", chat=False, max_new_tokens=6, instruction=None)
    for method in SELECT:
        for mode in ("query_aware", "query_agnostic"):
            r = generate(
                model,
                char_tok,
                ctx,
                "who?",
                sieve=_sieve(method, keep=0.3),
                mode=mode,
                chat=False,
                max_new_tokens=6,
                instruction=None,
            )
            assert r.kv_bytes == full.kv_bytes and r.kept_tokens == r.prompt_tokens == full.prompt_tokens
            steps = r.new_tokens - 1
            n = [r.prompt_tokens + s + 1 for s in range(steps)]  # cache entries at each decode step
            want = sum(round(0.3 * x) for x in n) / steps
            if method == "tokenselect":
                assert r.extra["attended_entries"] == pytest.approx(want, abs=0.01)
            else:
                assert 0 < r.extra["attended_entries"] <= want + 0.01
            assert r.extra["cache_entries"] == pytest.approx(sum(n) / steps, abs=0.01)
            assert "select_runtime" not in r.extra


# ------------------------------------------------------------------------------------- TokenSelect


def test_soft_vote_is_the_sum_of_per_head_softmax():
    g = torch.Generator().manual_seed(0)
    H, Hk, n, d = 6, 2, 11, 8
    qf, keys = torch.randn(H, d, generator=g), torch.randn(Hk, n, d, generator=g)
    ref = sum(torch.softmax(keys[h // (H // Hk)] @ qf[h], -1) for h in range(H))
    torch.testing.assert_close(soft_vote(qf, keys), ref)
    assert soft_vote(qf, keys).sum().item() == pytest.approx(H, rel=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_tokenselect_picks_init_local_and_the_top_votes(kernel):
    g = torch.Generator().manual_seed(1)
    H, Hk, q, N, d = 4, 2, 1, 80, 8
    query, key = torch.randn(1, H, q, d, generator=g), torch.randn(1, Hk, N, d, generator=g)
    m = TokenSelectMethod(n_init=3, n_local=5, kernel=kernel)
    budget = 20
    idx = m.select(m.new_state(), (0,), 0, query, key, budget)
    assert idx.tolist() == sorted(set(idx.tolist())) and len(idx) == budget
    assert set(range(3)) | set(range(N - 5, N)) <= set(idx.tolist())
    s = soft_vote(query[0, :, 0], key[0, :, 3 : N - 5])
    if kernel > 1:
        s = torch.nn.functional.max_pool1d(s[None, None], kernel, stride=1, padding=kernel // 2)[0, 0]
    top = set((s.topk(budget - 8).indices + 3).tolist())
    assert set(idx.tolist()) - set(range(3)) - set(range(N - 5, N)) == top


def test_tokenselect_default_split_and_chunks():
    m = TokenSelectMethod()
    assert m.split(2688) == (128, 512)  # the paper's proportions
    assert m.split(1) == (0, 1) and sum(m.split(25)) <= 25
    # a chunk of q > n_local new tokens is attended whole (every query sees itself)
    query, key = torch.randn(1, 4, 12, 8), torch.randn(1, 2, 100, 8)
    idx = m.select(m.new_state(), (0,), 0, query, key, 30)
    assert set(range(88, 100)) <= set(idx.tolist())


def test_tokenselect_selection_cache():
    g = torch.Generator().manual_seed(2)
    m = TokenSelectMethod(n_init=2, n_local=2, theta=0.9)
    st = m.new_state()
    key = torch.randn(1, 2, 60, 8, generator=g)
    q1 = torch.randn(1, 4, 1, 8, generator=g)
    a = m.select(st, (0,), 0, q1, key, 12)
    b = m.select(st, (0,), 0, q1 * 1.01, key, 12)  # cosine 1: reuse
    assert st.hits == 1 and torch.equal(a, b)
    m.select(st, (0,), 0, -q1, key, 12)  # cosine -1: select again
    assert st.hits == 1 and st.selections == 2
    off = TokenSelectMethod(n_init=2, n_local=2)
    st2 = off.new_state()
    off.select(st2, (0,), 0, q1, key, 12)
    off.select(st2, (0,), 0, q1, key, 12)
    assert st2.hits == 0 and off.summary(st2) == {}


# ------------------------------------------------------------------------------------------ ActQKV


def test_activation_weights_sum_to_one_and_favour_outliers():
    g = torch.Generator().manual_seed(3)
    qc = torch.randn(7, 16, generator=g)
    qc[4] *= 10
    mean, var = qc.mean(0), qc.var(0, unbiased=False)
    w = activation_weights(qc, mean, var)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and (w >= 0).all()
    assert int(w.argmax()) == 4


def test_activation_weights_uniform_when_stats_are_flat():
    qc = torch.ones(5, 8)
    w = activation_weights(qc, torch.ones(8), torch.zeros(8))  # no query deviates
    torch.testing.assert_close(w, torch.full((5,), 0.2))
    # every query deviates equally from the mean
    qc = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])
    w = activation_weights(qc, torch.zeros(2), torch.ones(2))
    torch.testing.assert_close(w, torch.full((4,), 0.25))


def test_grouped_queries_average_each_kv_heads_group():
    q = torch.arange(4 * 3 * 2, dtype=torch.float32).view(1, 4, 3, 2)  # H=4, q=3, d=2
    out = grouped_queries(q, 2)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out[1, :2], (q[0, 0, 1] + q[0, 1, 1]) / 2)
    torch.testing.assert_close(out[1, 2:], (q[0, 2, 1] + q[0, 3, 1]) / 2)


def test_local_attention_is_banded_softmax_received():
    g = torch.Generator().manual_seed(4)
    H, Hk, N, q, d, W = 4, 2, 300, 260, 8, 7
    query, key = torch.randn(1, H, q, d, generator=g), torch.randn(1, Hk, N, d, generator=g)
    got = local_attention(query, key, 0.3, W)
    ref = torch.zeros(Hk, N)
    for t in range(q):
        p = N - q + t
        lo = max(0, p - W + 1)
        for h in range(H):
            kv = h // (H // Hk)
            ref[kv, lo : p + 1] += torch.softmax(key[0, kv, lo : p + 1] @ query[0, h, t] * 0.3, -1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert got.sum().item() == pytest.approx(H * q, rel=1e-5)


def test_block_keys_average_the_representative_keys():
    m = ActQKVMethod(block_size=4, repr_topk=2)
    key = torch.arange(1 * 1 * 10 * 1, dtype=torch.float32).view(1, 1, 10, 1)
    mass = torch.tensor([[0, 0, 5.0, 1, 9, 0, 2, 0, 3, 0]])  # blocks from slot 2: [2..5], [6..9]
    bk = m.block_keys(key, mass, 2, 2)
    torch.testing.assert_close(bk, torch.tensor([[(2 + 4) / 2], [(6 + 8) / 2]]))


@pytest.mark.parametrize("seed", range(5))
def test_hand_out_respects_the_total_and_the_bounds(seed):
    g = torch.Generator().manual_seed(seed)
    n_layers = int(torch.randint(1, 12, (1,), generator=g))
    avg = int(torch.randint(0, 20, (1,), generator=g))
    n = int(torch.randint(0, 50, (1,), generator=g))
    lo, hi = min(n, math.floor(0.5 * avg)), min(n, math.ceil(2 * avg))
    ent: list[float | None] = [float(x) for x in torch.rand(n_layers, generator=g)]
    if seed == 0:
        ent[-1] = None  # no history yet: uniform
    remaining = total = avg * n_layers
    ks = []
    for r in range(n_layers):
        k = hand_out(remaining, ent[r:], lo, hi)
        ks.append(k)
        remaining -= k
    assert sum(ks) <= total and all(lo <= k <= hi for k in ks)


def test_hand_out_follows_the_entropy():
    """A layer with more spread-out scores (higher mean entropy) gets more blocks; no history: uniform."""
    assert hand_out(20, [0.2, 0.8], 0, 20) == 4
    assert hand_out(20, [0.8, 0.2], 0, 20) == 16
    assert hand_out(20, [0.8, 0.2], 5, 12) == 12  # clipped to hi
    assert hand_out(20, [0.8, 0.2, 0.2], 5, 20) == 10  # leaves lo for each later layer
    assert hand_out(20, [None, 0.2], 0, 20) == hand_out(20, [0.3, None], 0, 20) == 10


def test_normalized_entropy_bounds():
    assert normalized_entropy(torch.zeros(8)) == pytest.approx(1.0)
    assert normalized_entropy(torch.tensor([100.0, 0, 0, 0])) < 1e-6
    assert normalized_entropy(torch.tensor([0.3])) == 1.0


def test_actqkv_cutoff_over_layers_in_a_model():
    """A 4-layer Llama: per decode step the blocks handed out over the layers never exceed the total,
    each layer's count lies within its bounds, and the mean attended entries stay within the budget."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    p = _prompt(T=120, c1=110)
    sieve = _sieve("actqkv", keep=0.4)
    m = sieve.scorer
    pre = SelectSite().run(model, p, sieve, "query_aware", trace=True)
    cache, rt = pre.cache, pre.hook
    assert isinstance(rt, SelectRuntime)
    steps = []
    with torch.inference_mode(), pre.decoding():
        for t in _tokens(12):
            model(input_ids=torch.tensor([[t]]), cache=cache)
            steps.append(dict(rt.state.blocks))
            N = cache.get_seq_length()
            budget = round(0.4 * N)
            n_init, n_local = m.split(budget)
            n_blocks = (N - n_local - n_init) // 4
            avg = (budget - n_init - (N - n_init - n_blocks * 4)) // 4
            lo, hi = min(n_blocks, math.floor(0.5 * avg)), min(n_blocks, math.ceil(2 * avg))
            ks = list(rt.state.blocks.values())
            assert len(ks) == 4 and sum(ks) <= rt.state.total == avg * 4
            assert all(lo <= k <= hi for k in ks)
            attended = [a for (ph, _, n, a) in rt.records[-4:]]
            assert sum(attended) / 4 <= budget
    assert len(steps) == 12


def test_actqkv_picks_whole_blocks_init_and_local():
    g = torch.Generator().manual_seed(5)
    m = ActQKVMethod(block_size=4, repr_topk=2, n_init=2, n_local=6)
    st = m.new_state()
    N, d = 50, 8
    key = torch.randn(1, 2, N, d, generator=g)
    m.observe(st, 0, torch.randn(1, 4, N - 1, d, generator=g), key[:, :, : N - 1], 0.3)
    q = torch.randn(1, 4, 1, d, generator=g)
    m.observe(st, 0, q, key, 0.3)
    idx = m.select(st, (0,), 0, q, key, 20).tolist()
    assert idx == sorted(set(idx))
    n_blocks = (N - 6 - 2) // 4  # 10 blocks over slots 2..41, local 42..49
    local = set(range(2 + n_blocks * 4, N))
    assert {0, 1} | local <= set(idx)
    mid = sorted(set(idx) - {0, 1} - local)
    assert len(mid) % 4 == 0 and len(mid) // 4 == st.blocks[0]
    for a in range(0, len(mid), 4):
        b = mid[a : a + 4]
        assert (b[0] - 2) % 4 == 0 and b == list(range(b[0], b[0] + 4))


def test_actqkv_refuses_a_cache_it_has_not_seen_from_the_start(tiny_llama_model):
    model = tiny_llama_model
    from flowsieve.kvcache import SieveCache

    cache = SieveCache(model)
    with torch.inference_mode():
        model(input_ids=torch.tensor([_tokens(30)]), cache=cache)
        rt = SelectRuntime(model, _sieve("actqkv", keep=0.5))
        with rt.active(), pytest.raises(FlowsieveError, match="from its first token"):
            model(input_ids=torch.tensor([[5]]), cache=cache)


# --------------------------------------------------------------------------------- Sieve.on, errors


@pytest.mark.parametrize("method", SELECT)
def test_sieve_on_inside_model_generate(tiny_causal, method):
    """Inside ``model.generate``: keep = 1 gives plain generate's tokens; keep = 0.4 gives the tokens
    of the generate() harness with the same sieve (same selection rule, same steps)."""
    _, model = tiny_causal
    p = _prompt()
    ids = torch.tensor([p.ids])
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    with _sieve(method, keep=1.0).on(model):
        same = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(same, plain)
    sieve = _sieve(method, keep=0.4)
    with sieve.on(model):
        inside = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, len(p) :]
    pre = prefill_cache(model, p, sieve, "query_aware")
    assert isinstance(pre.hook, SelectRuntime)
    with pre.decoding():
        harness, _ = decode_greedy(model, pre.cache, pre.logits, 6, eos=set())
    assert inside.tolist() == harness
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        ({"method": "tokenselect", "keep": 0.5}, "does not support site 'prefill'"),
        ({"method": "actqkv", "keep": 0.5, "site": "decode"}, "does not support site 'decode'"),
        ({"method": "snapkv", "keep": 0.5, "site": "select"}, "does not support site 'select'"),
        ({"method": "tokenselect", "keep": 0.0, "site": "select"}, "keep must be in"),
        ({"method": "tokenselect", "keep": 1.5, "site": "select"}, "keep must be in"),
        ({"method": "actqkv", "keep": -0.1, "site": "select"}, "keep must be in"),
        ({"method": "tokenselect", "keep": 0.5, "site": "select", "options": {"kernel": 0}}, "kernel"),
        ({"method": "tokenselect", "keep": 0.5, "site": "select", "options": {"n_local": 0}}, "n_local"),
        ({"method": "tokenselect", "keep": 0.5, "site": "select", "options": {"theta": 2}}, "theta"),
        ({"method": "actqkv", "keep": 0.5, "site": "select", "options": {"repr_topk": 40}}, "repr_topk"),
        ({"method": "actqkv", "keep": 0.5, "site": "select", "options": {"min_share": 2}}, "min_share"),
        ({"method": "actqkv", "keep": 0.5, "site": "select", "options": {"colour": 1}}, "bad option"),
    ],
)
def test_bad_select_arguments(kwargs, msg):
    with pytest.raises(FlowsieveError, match=msg):
        Sieve(**kwargs)


def test_runtime_errors(tiny_llama_model):
    model = tiny_llama_model
    p = _prompt()
    # initial + local entries larger than the budget of a step
    sieve = Sieve("tokenselect", budget=10, site="select", options={"n_init": 6, "n_local": 6})
    with pytest.raises(FlowsieveError, match="exceed the budget"):
        prefill_cache(model, p, sieve, "query_agnostic")
    with pytest.raises(FlowsieveError, match="batch size 1"):
        with torch.inference_mode(), _sieve("tokenselect", keep=0.5).on(model):
            model.generate(torch.tensor([p.ids, p.ids]), max_new_tokens=3, do_sample=False)
    with pytest.raises(FlowsieveError, match="select site"):
        SelectRuntime(model, Sieve("snapkv", keep=0.5))
    with pytest.raises(FlowsieveError, match=r"Sieve\.on supports"):
        with Sieve("snapkv", keep=0.5).on(model, site="prompt"):
            pass
    with pytest.raises(FlowsieveError, match="does not support site 'layer'"):
        with Sieve("snapkv", keep=0.5).on(model, site="layer"):
            pass


def test_full_attention_layers(tiny_causal):
    name, model = tiny_causal
    want = (0, 1) if name == "llama" else (2,)
    assert tuple(i for i, t in enumerate(layer_types(model)) if t == "full_attention") == want
    assert SelectRuntime(model, _sieve("tokenselect", keep=0.5)).layers == want


@pytest.mark.parametrize("with_cache", [False, True])
def test_select_keys_seam_hides_unpicked_keys(tiny_llama_model, with_cache):
    """The attention extension point alone: a selector that drops some key slots from a first pass
    (no mask from transformers: the causal mask is built before gathering) or from a chunk on a
    cache (transformers' mask, gathered) equals a forward with those keys masked out."""
    from flowsieve.kvcache import SieveCache
    from flowsieve.observe import select_keys

    model = tiny_llama_model
    ids = _tokens(24)
    drop = {3, 4, 10}
    n0 = 12 if with_cache else 0

    def selector(module, query, key, scaling):
        N = key.shape[2]
        return torch.tensor([j for j in range(N) if j not in drop])

    cache = SieveCache(model)
    with torch.inference_mode():
        if with_cache:
            model(input_ids=torch.tensor([ids[:n0]]), cache=cache)
        with select_keys(model, selector):
            got = model(input_ids=torch.tensor([ids[n0:]]), cache=cache).logits[0]
    N = len(ids)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    hide = torch.zeros(N, N, dtype=torch.bool)
    hide[n0:, sorted(drop)] = True
    allowed = (j <= i) & ~hide
    ref = _reference(model, ids, dict.fromkeys(range(2), allowed))[n0:]
    assert (got - ref).abs().max().item() <= 1e-5
    assert model.config._attn_implementation == "sdpa"
