"""Each method's own rule (keyformer, todre, transprune, vflowopt, pyramid) on tiny random configs.

The generic invariants (keep = 1 identity, masked-reference equivalence) run for every method in
tests/test_sieve.py; these tests check what makes each method what it is.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import SieveCache
from flowsieve.methods import METHODS, ScoreContext
from flowsieve.methods.h2o import H2OScorer
from flowsieve.methods.keyformer import KeyformerScorer, gumbel_column_sum, gumbel_noise
from flowsieve.methods.pyramid import PyramidScorer, allocate, layer_weights
from flowsieve.methods.selection import select_topk
from flowsieve.methods.todre import ToDREScorer, attention_features, greedy_order
from flowsieve.methods.transprune import TransPruneScorer, layer_ttv
from flowsieve.methods.vflowopt import VFlowOptScorer, merge_dropped
from flowsieve.observe import LayerObs, observe
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache

NEW = ("keyformer", "todre", "transprune", "vflowopt", "pyramid")


def _ids(T: int, seed: int = 1) -> list[int]:
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def _heads(model) -> tuple[int, int, int]:
    cfg = model.config
    return cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers


@torch.inference_mode()
def _observed(model, scorer, T: int = 40, w: int = 6, seed: int = 1):
    """One observed prefill: (observer, contexts per layer, cache)."""
    window = tuple(range(T - w, T))
    cache = SieveCache(model)
    with observe(model, scorer.spec(window)) as obs:
        model(input_ids=torch.tensor([_ids(T, seed)]), cache=cache, use_cache=True)
    H, Hk, L = _heads(model)
    ctxs = [ScoreContext(T, window, H, Hk, i, L, 0) for i in range(L)]
    return obs, ctxs, cache


def _scores(model, scorer, **kw) -> list[torch.Tensor]:
    obs, ctxs, _ = _observed(model, scorer, **kw)
    return scorer.accumulate([scorer.score(obs.layer(c.layer), c).float() for c in ctxs])


@pytest.mark.parametrize("name", NEW)
def test_registered_with_paper_and_prefill_site(name):
    cls = METHODS.get(name)
    assert "prefill" in cls.sites and "arXiv" in cls.paper


@pytest.mark.parametrize(
    "name,options,msg",
    [
        ("keyformer", {"tau": 0}, "tau must be > 0"),
        ("keyformer", {"noise": "yes"}, "true or false"),
        ("todre", {"relevance": -1}, "relevance must be >= 0"),
        ("todre", {"order_share": 0}, "order_share"),
        ("transprune", {"ttv_from": -1}, "ttv_from"),
        ("transprune", {"iga_weight": -0.5}, "iga_weight"),
        ("vflowopt", {"window_weight": 1.5}, "window_weight"),
        ("vflowopt", {"merge_window": 0}, "merge_window"),
        ("pyramid", {"schedule": "cone"}, "schedule must be one of"),
        ("pyramid", {"beta": 0.5}, "beta must be >= 1"),
        ("pyramid", {"ratio": 0}, "ratio must be in"),
        ("pyramid", {"stage_weights": [1, -1]}, "stage_weights"),
        ("pyramid", {"kernel": 0}, "kernel must be"),
    ],
)
def test_bad_options(name, options, msg):
    with pytest.raises(FlowsieveError, match=msg):
        Sieve(name, keep=0.5, options=options)


# ------------------------------------------------------------------------------------------ keyformer


def test_gumbel_column_sum_equals_gumbel_softmax_of_logits():
    """From probabilities alone: sum_i softmax((x_i + zeta_i) / tau), masked keys excluded."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 9, generator=g) * 3
    mask = torch.ones(7, 9, dtype=torch.bool).tril(2)  # causal-like, every row sees >= 3 keys
    x = x.masked_fill(~mask, float("-inf"))
    p = torch.softmax(x, -1)
    zeta = gumbel_noise(tuple(p.shape), torch.Generator().manual_seed(3))
    for tau in (1.0, 0.7, 2.5):
        ref = torch.softmax((x + zeta) / tau, -1).sum(-2)
        torch.testing.assert_close(gumbel_column_sum(p, tau, zeta), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gumbel_column_sum(p, 1.0, None), p.sum(-2), atol=1e-6, rtol=1e-6)


def test_gumbel_noise_is_seeded_gumbel():
    a = gumbel_noise((20000,), torch.Generator().manual_seed(1))
    b = gumbel_noise((20000,), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 0.5772) < 0.03  # Euler-Mascheroni constant
    assert abs(a.var().item() - math.pi**2 / 6) < 0.1


@pytest.mark.parametrize("all_rows", [False, True])
def test_keyformer_without_noise_is_accumulated_attention(tiny_causal, all_rows):
    """noise off, tau = 1: exactly H2O's accumulated attention, and the same kept entries."""
    _, model = tiny_causal
    kf = KeyformerScorer(noise=False, tau=1.0, all_rows=all_rows)
    obs, ctxs, _ = _observed(model, kf)
    h2o = H2OScorer()
    for c in ctxs:
        torch.testing.assert_close(kf.score(obs.layer(c.layer), c), h2o.score(obs.layer(c.layer), c))
    p = Prompt(ids=tuple(_ids(40)), context=(2, 34), question=(34, 40), split=34)
    a = prefill_cache(
        model, p, Sieve("keyformer", keep=0.5, window=6, options={"noise": False}), "query_aware"
    ).cache
    b = prefill_cache(model, p, Sieve("h2o", keep=0.5, window=6), "query_aware").cache
    for i in a.sieve_layers:
        assert torch.equal(a.layer(i).positions, b.layer(i).positions)


def test_keyformer_all_rows_is_exact_and_seeded(tiny_causal):
    """Every row's Gumbel-softmax sums to 1, so a KV head's scores sum to g * T; seeded noise
    reproduces; a huge tau makes each row uniform over the keys it sees (harmonic column sums)."""
    _, model = tiny_causal
    T = 40
    H, Hk, _ = _heads(model)
    g = H // Hk
    kf = KeyformerScorer(tau=1.3, all_rows=True)
    obs, ctxs, _ = _observed(model, kf, T=T)
    c = ctxs[-1]  # a full-attention layer in both families
    s1 = kf.score(obs.layer(c.layer), c)
    torch.testing.assert_close(s1.sum(-1), torch.full_like(s1.sum(-1), g * T), rtol=1e-4, atol=1e-3)
    assert torch.equal(s1, kf.score(obs.layer(c.layer), c))
    other = ScoreContext(c.n_tokens, c.window, c.n_heads, c.n_kv_heads, c.layer, c.n_layers, seed=7)
    assert not torch.equal(s1, kf.score(obs.layer(c.layer), other))
    assert not torch.allclose(s1, H2OScorer().score(obs.layer(c.layer), c))
    flat = KeyformerScorer(tau=1e7, all_rows=True).score(obs.layer(c.layer), c)
    harmonic = torch.tensor([sum(1.0 / (i + 1) for i in range(j, T)) for j in range(T)])
    torch.testing.assert_close(flat[0], (g * harmonic).expand_as(flat[0]), rtol=1e-4, atol=1e-4)


def test_keyformer_window_rows_only_change_with_noise(tiny_causal):
    """Default (window rows recorded): the noise moves only the recorded rows' mass."""
    _, model = tiny_causal
    kf = KeyformerScorer()
    obs, ctxs, _ = _observed(model, kf)
    c = ctxs[-1]
    s, h = kf.score(obs.layer(c.layer), c), H2OScorer().score(obs.layer(c.layer), c)
    assert not torch.allclose(s, h)
    torch.testing.assert_close(s.sum(-1), h.sum(-1), rtol=1e-4, atol=1e-4)  # rows still sum to 1
    # keys before the window receive plain mass from the non-window rows: the difference is at most
    # the window rows' mass, w rows per query head
    assert (s - h).abs().max() <= len(c.window) * (c.n_heads // c.n_kv_heads) + 1e-4


# ---------------------------------------------------------------------------------------------- todre


def _reference_greedy(feats: torch.Tensor, rel: torch.Tensor, weight: float) -> list[int]:
    """A plain-loop farthest-first with relevance bonus, float64: first pick argmax rel."""
    f = feats.double()
    u = f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)
    r = rel.double() / rel.max().double()
    n = f.shape[0]
    order = [int(r.argmax())]
    while len(order) < n:
        best, best_val = -1, -math.inf
        for x in range(n):
            if x in order:
                continue
            d = min((1 - float(u[x] @ u[s])) / 2 for s in order)
            val = d + weight * float(r[x])
            if val > best_val + 1e-12:
                best, best_val = x, val
        order.append(best)
    return order


@pytest.mark.parametrize("weight", [0.0, 1.0, 3.0])
def test_greedy_order_matches_reference(weight):
    g = torch.Generator().manual_seed(int(weight * 10))
    feats = torch.randn(30, 5, generator=g)
    rel = torch.rand(30, generator=g)
    got = greedy_order(feats.numpy(), rel.numpy(), weight).tolist()
    assert got == _reference_greedy(feats, rel, weight)
    assert sorted(got) == list(range(30))
    # truncated loop: same prefix
    assert greedy_order(feats.numpy(), rel.numpy(), weight, picks=10).tolist()[:10] == got[:10]


def test_farthest_first_radius_does_not_grow():
    """weight 0: the distance of each new pick to the earlier ones never increases (k-center)."""
    feats = torch.randn(40, 6, generator=torch.Generator().manual_seed(2))
    order = greedy_order(feats.numpy(), np.ones(40), 0.0)
    u = feats / feats.norm(dim=1, keepdim=True)
    gaps = [min((1 - float(u[order[m]] @ u[s])) / 2 for s in order[:m]) for m in range(1, 40)]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(gaps))


def test_attention_features_are_projected_keys():
    """Centred log attention = s Q (k_j - mean k): the row normalisers cancel exactly."""
    g = torch.Generator().manual_seed(0)
    H, w, T, d = 2, 3, 10, 4
    q, k = torch.randn(H, w, d, generator=g), torch.randn(T, d, generator=g)
    s = d**-0.5
    logits = s * q @ k.T  # (H, w, T)
    rows = torch.softmax(logits, -1)[None]
    f = attention_features(rows, T)[0]  # (T, H*w)
    ref = logits.permute(2, 0, 1).reshape(T, H * w)
    torch.testing.assert_close(f, ref - ref.mean(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("relevance", [0.0, 1.0])
def test_todre_keeps_the_greedy_kcenter_set(tiny_causal, relevance):
    """Through Sieve.compress: kept = window + the first k - w picks of the greedy order."""
    _, model = tiny_causal
    T, w = 40, 6
    sc = ToDREScorer(relevance=relevance)
    obs, ctxs, _ = _observed(model, sc, T=T, w=w)
    p = Prompt(ids=tuple(_ids(T)), context=(0, T), question=None, split=T)  # protected: the window
    for keep in (0.3, 0.5, 0.8):
        cache = prefill_cache(
            model, p, Sieve("todre", keep=keep, window=w, options={"relevance": relevance}), "query_aware"
        ).cache
        k = round(keep * T)
        for i in cache.sieve_layers:
            rows = torch.stack([obs.layer(i).rows[q][..., :T] for q in ctxs[i].window], 2)[0]  # (H, w, T)
            n = T - w
            logp = rows[..., :n].double().clamp(min=1e-30).log().permute(2, 0, 1).reshape(n, -1)
            feats = logp - logp.mean(0)
            rel = rows[..., :n].mean(0).sum(0)
            order = _reference_greedy(feats, rel, relevance)
            want = sorted(order[: k - w] + list(range(n, T)))
            assert cache.layer(i).positions.reshape(-1).tolist() == want


# ----------------------------------------------------------------------------------------- transprune


def test_identity_blocks_give_uniform_ttv():
    T = 12
    obs = LayerObs(
        ttv={"attn": [(torch.ones(1, T), torch.zeros(1, T))], "mlp": [(torch.ones(1, T), torch.zeros(1, T))]}
    )
    torch.testing.assert_close(layer_ttv(obs, T), torch.full((1, T), 2.0 / T))
    # several forward calls are concatenated before the softmax over tokens
    half = [(torch.ones(1, 6), torch.zeros(1, 6))] * 2
    torch.testing.assert_close(layer_ttv(LayerObs(ttv={"mlp": half}), T), torch.full((1, T), 1.0 / T))


def test_identity_mlp_in_a_model_gives_uniform_ttv(tiny_causal):
    """With the MLPs replaced by the identity the hooks see after == before: ratio 1, distance 0."""
    _, model = tiny_causal
    for layer in model.model.layers:
        layer.mlp = torch.nn.Identity()
    obs, ctxs, _ = _observed(model, TransPruneScorer(), T=30)
    for c in ctxs:
        ((ratio, dist),) = obs.layer(c.layer).ttv["mlp"]
        torch.testing.assert_close(ratio, torch.ones_like(ratio))
        assert dist.abs().max() < 1e-5
        mlp_only = LayerObs(ttv={"mlp": obs.layer(c.layer).ttv["mlp"]})
        torch.testing.assert_close(layer_ttv(mlp_only, 30), torch.full((1, 30), 1 / 30), atol=1e-6, rtol=1e-5)


def test_transprune_scores_sum_to_two(tiny_causal):
    _, model = tiny_causal
    sc = TransPruneScorer()
    scores = _scores(model, sc, T=40, w=6)
    for s in scores:
        assert s.shape == (1, 40)
        torch.testing.assert_close(s.sum(-1), torch.tensor([2.0]))
        assert (s >= 0).all() and (s[..., 34:] == 0).all()  # the window is not a candidate


def test_transprune_accumulates_ttv_over_layers():
    """final_l = TTV_{from..l} / sum + IGA_l / sum over the candidates, on hand-made observations."""
    T, w, H = 8, 2, 2
    window = tuple(range(T - w, T))
    g = torch.Generator().manual_seed(0)
    obs, ttvs, igas = [], [], []
    for _ in range(3):
        ratio, dist = torch.rand(1, T, generator=g) + 0.5, torch.rand(1, T, generator=g)
        rows = {p: torch.softmax(torch.randn(1, H, T, generator=g), -1) for p in window}
        obs.append(LayerObs(rows=rows, ttv={"attn": [(ratio, dist)]}))
        ttvs.append(ratio * torch.softmax(dist, -1))
        igas.append(torch.stack([rows[p] for p in window], 2).mean(1).mean(1))
    for start in (0, 1):
        sc = TransPruneScorer(ttv_from=start)
        ctxs = [ScoreContext(T, window, H, H, i, 3) for i in range(3)]
        out = sc.accumulate([sc.score(o, c) for o, c in zip(obs, ctxs)])
        for layer in range(3):
            acc = sum(ttvs[m] for m in range(start, layer + 1))
            iga = igas[layer][..., : T - w]
            want = iga / iga.sum()
            if not isinstance(acc, int):
                want = want + acc[..., : T - w] / acc[..., : T - w].sum()
            torch.testing.assert_close(out[layer][..., : T - w], want)
    with pytest.raises(FlowsieveError, match="stacked"):
        TransPruneScorer().accumulate([torch.zeros(1, T)])


# ------------------------------------------------------------------------------------------- vflowopt


def _merge_case(seed: int = 0, per_head: bool = False, window: int = 4):
    g = torch.Generator().manual_seed(seed)
    B, Hk, T, d = 1, 2, 22, 3
    keys, values = torch.randn(B, Hk, T, d, generator=g), torch.randn(B, Hk, T, d, generator=g)
    imp = torch.rand(B, Hk, T, generator=g) if per_head else torch.rand(B, T, generator=g)
    protect = torch.zeros(T, dtype=torch.bool)
    protect[:2] = True
    protect[-3:] = True
    keep = select_topk(imp, protect, 11)
    return keys, values, imp, keep, protect, window


@pytest.mark.parametrize("per_head", [False, True])
def test_merge_preserves_importance_weighted_sum(per_head):
    keys, values, imp, keep, protect, window = _merge_case(per_head=per_head)
    B, Hk, T, _ = keys.shape
    k2, v2, mass = merge_dropped(keys, values, imp, keep, protect, window)
    w = (imp[:, None] if imp.dim() == 2 else imp).expand(B, Hk, T)
    for x, x2 in ((keys, k2), (values, v2)):
        torch.testing.assert_close((mass[..., None] * x2).sum(2), (w[..., None] * x).sum(2))
    torch.testing.assert_close(mass.sum(-1), w.sum(-1))
    kept = torch.zeros(B, Hk, T, dtype=torch.bool)
    idx = keep.view(1, 1, -1) if keep.dim() == 1 else keep
    kept.scatter_(-1, idx.expand(B, Hk, -1), True)
    # protected entries never change; dropped ones pass their mass on or keep it if their window has
    # no kept context entry; changed entries are kept and are convex combinations of their window
    changed = (k2 != keys).any(-1)
    assert not changed[..., protect].any()
    assert (kept | ~changed).all()
    assert changed.any()
    for b, h, j in changed.nonzero().tolist():
        lo, hi = (j // window) * window, min((j // window + 1) * window, T)
        win = keys[b, h, lo:hi]
        assert (k2[b, h, j] >= win.min(0).values - 1e-6).all() and (
            k2[b, h, j] <= win.max(0).values + 1e-6
        ).all()
    moved = ~kept & ~protect & (mass == 0)
    assert moved.any()


def test_merge_accepts_a_per_head_protect_mask():
    keys, values, imp, keep, protect, window = _merge_case()
    a = merge_dropped(keys, values, imp, keep, protect, window)
    b = merge_dropped(keys, values, imp, keep, protect.view(1, 1, -1).expand(1, 2, -1), window)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_merge_is_identity_without_dropped_entries_or_with_unit_windows():
    keys, values, imp, _, protect, _ = _merge_case()
    everything = torch.arange(keys.shape[2])
    k2, v2, _ = merge_dropped(keys, values, imp, everything, protect, 4)
    assert torch.equal(k2, keys) and torch.equal(v2, values)
    keys, values, imp, keep, protect, _ = _merge_case()
    k2, v2, _ = merge_dropped(keys, values, imp, keep, protect, 1)
    assert torch.equal(k2, keys) and torch.equal(v2, values)


def test_merge_into_the_most_important_kept_entry_of_the_window():
    T = 8
    keys = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1)
    imp = torch.tensor([[1.0, 2.0, 1.0, 4.0, 1.0, 1.0, 3.0, 1.0]])
    keep = torch.tensor([1, 3, 6])
    protect = torch.zeros(T, dtype=torch.bool)
    k2, _, mass = merge_dropped(keys, keys, imp, keep, protect, 4)
    # window 0: tokens 0..3, kept 1 (imp 2) and 3 (imp 4) -> 3 receives 0 and 2
    assert k2[0, 0, 3, 0].item() == pytest.approx((4 * 3 + 1 * 0 + 1 * 2) / 6)
    assert k2[0, 0, 1, 0].item() == 1.0
    # window 1: tokens 4..7, kept 6 receives 4, 5, 7
    assert k2[0, 0, 6, 0].item() == pytest.approx((3 * 6 + 4 + 5 + 7) / 6)
    assert mass[0, 0].tolist() == [0, 2, 0, 6, 0, 0, 6, 0]


def test_vflowopt_importance(tiny_causal):
    """The map sums to 1 over the candidates; window_weight 0 is the visibility-normalised column mean."""
    _, model = tiny_causal
    T, w = 40, 6
    for ww in (0.0, 0.5, 1.0):
        sc = VFlowOptScorer(window_weight=ww)
        obs, ctxs, _ = _observed(model, sc, T=T, w=w)
        for c in ctxs:
            s = sc.score(obs.layer(c.layer), c)
            torch.testing.assert_close(s.sum(-1), torch.tensor([1.0]))
            assert (s[..., T - w :] == 0).all()
            if ww == 0.0:
                o = obs.layer(c.layer)
                m = (o.received[..., :T].mean(1) / o.visible[..., :T])[..., : T - w]
                torch.testing.assert_close(s[..., : T - w], m / m.sum())


def test_vflowopt_recycle_hook_on_a_cache(tiny_causal):
    """What Sieve.compress would do with the hook: merged kept entries, exact count, decoding runs."""
    _, model = tiny_causal
    T, w = 40, 6
    sc = VFlowOptScorer()
    obs, ctxs, cache = _observed(model, sc, T=T, w=w)
    scores = sc.accumulate([sc.score(obs.layer(c.layer), c) for c in ctxs])
    protect = torch.zeros(T, dtype=torch.bool)
    protect[T - w :] = True
    plain = cache.clone()
    for i in cache.sieve_layers:
        layer = cache.layer(i)
        idx = select_topk(scores[i], protect, 20)
        merged = sc.recycle(layer.keys, layer.values, scores[i], idx, protect)
        assert merged is not None
        layer.keys, layer.values = merged
        cache.keep(i, idx)
        plain.keep(i, idx)
        assert cache.layer(i).stored_length == 20
        assert not torch.equal(cache.layer(i).values, plain.layer(i).values)
        assert torch.equal(cache.layer(i).values[..., -w:, :], plain.layer(i).values[..., -w:, :])
    nxt = torch.tensor([[5]])
    a = model(nxt, cache=cache).logits
    b = model(nxt, cache=plain).logits
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
    assert VFlowOptScorer(recycle_dropped=False).recycle(None, None, None, None, None) is None


@pytest.mark.parametrize("mode", ["query_aware", "query_agnostic"])
def test_sieve_compress_recycles_for_vflowopt(tiny_causal, mode):
    """Sieve.compress calls the recycling hook: the same entries are kept as without it, and the kept
    values differ from plain pruning's (the merge itself is checked in the merge_dropped tests)."""
    _, model = tiny_causal
    T, c0, c1 = 48, 3, 38
    p = Prompt(ids=tuple(_ids(T)), context=(c0, c1), question=(c1 + 2, T), split=c1)
    on = Sieve("vflowopt", keep=0.5, window=6)
    off = Sieve("vflowopt", keep=0.5, window=6, options={"recycle_dropped": False})
    a = prefill_cache(model, p, on, mode).cache
    b = prefill_cache(model, p, off, mode).cache
    changed = 0
    for i in a.sieve_layers:
        assert torch.equal(a.layer(i).positions, b.layer(i).positions)  # same selection
        ka, va = a.stored_kv(i)
        kb, vb = b.stored_kv(i)
        assert ka.shape == kb.shape
        changed += int(not torch.equal(va, vb))
    assert changed > 0


def test_replace_kv_checks_shapes(tiny_llama_model):
    cache = SieveCache(tiny_llama_model)
    with torch.inference_mode():
        tiny_llama_model(input_ids=torch.tensor([_ids(10)]), cache=cache, use_cache=True)
    k, v = cache.stored_kv(0)
    cache.replace_kv(0, k * 2, v)
    assert torch.equal(cache.stored_kv(0)[0], k * 2)
    with pytest.raises(FlowsieveError, match="replace_kv"):
        cache.replace_kv(0, k[..., :5, :], v)


# -------------------------------------------------------------------------------------------- pyramid


@pytest.mark.parametrize("schedule", ["linear", "staged"])
@pytest.mark.parametrize(
    "k,n_p,T,n_layers",
    [(100, 10, 400, 30), (24, 13, 48, 2), (13, 13, 48, 5), (48, 13, 48, 5), (390, 5, 400, 7), (7, 3, 9, 1)],
)
def test_pyramid_budgets_sum_and_bounds(schedule, k, n_p, T, n_layers):
    sc = PyramidScorer(schedule=schedule)
    layers = list(range(0, 2 * n_layers, 2))  # e.g. every other layer can evict
    plan = sc.budgets(k, n_p, T, layers)
    assert sorted(plan) == layers
    b = [plan[i] for i in layers]
    assert sum(b) == k * n_layers  # mean exactly k: memory drops to keep
    assert all(n_p <= x <= T for x in b)
    assert all(x >= y for x, y in itertools.pairwise(b))  # lower layers keep more
    if n_p < k < T and n_layers > 1 and k * 2 - n_p < T:
        assert b[0] > b[-1]


def test_pyramid_linear_follows_pyramidkv():
    """Unclipped: lowest 2C - C/beta, highest C/beta, linear in between (C = k - n_protected)."""
    k, n_p, T, L, beta = 110, 10, 1000, 5, 20
    plan = PyramidScorer(beta=beta).budgets(k, n_p, T, list(range(L)))
    C = k - n_p
    top, bottom = 2 * C - C / beta, C / beta
    for i in range(L):
        assert abs(plan[i] - n_p - (top - (top - bottom) * i / (L - 1))) <= 1
    # clipped at the prompt length: the lowest layers keep everything, the mean stays k
    plan = PyramidScorer(beta=beta).budgets(900, 10, 1000, list(range(L)))
    assert plan[0] == 1000 and sum(plan.values()) == 900 * L


def test_pyramid_staged_weights():
    w = layer_weights(8, "staged", stages=4, ratio=0.5)
    assert (
        w[0] == w[1]
        and w[2] == w[3]
        and w[0] / w[2] == pytest.approx(2.0)
        and w[4] / w[6] == pytest.approx(2)
    )
    assert sum(w) / 8 == pytest.approx(1.0)
    w = layer_weights(6, "staged", stage_weights=(0.8, 0.6, 0.4))
    assert w[0] / w[-1] == pytest.approx(2.0)
    assert allocate(10, [1.0, 1.0, 1.0], 0, 10) == [4, 3, 3]
    with pytest.raises(FlowsieveError, match="cannot split"):
        allocate(40, [1.0, 1.0], 0, 10)


def _pyramid_weights(n: int, schedule: str, beta: float = 20.0, stages: int = 4) -> list[float]:
    """PyramidKV's line (lowest layer 2 - 1/beta, highest 1/beta), or ``stages`` equal groups
    weighted 0.5**s (PyramidDrop); mean 1 (n divisible by stages)."""
    if schedule == "linear":
        return [(2 - 1 / beta) - (2 - 2 / beta) * i / (n - 1) for i in range(n)]
    raw = [0.5 ** (i // (n // stages)) for i in range(n)]
    return [w * n / sum(raw) for w in raw]


def _brute_budgets(k: int, n_p: int, T: int, weights: list[float]) -> list[int]:
    """Every split of the compressible entries (k - n_p per layer on average, at most T - n_p in a
    layer) tried: the nearest (least squares, ties to the lower layers) to the real pyramid, whose
    layers over the bound sit at it while the others are rescaled."""
    n, total, hi = len(weights), (k - n_p) * len(weights), T - n_p
    fixed: set[int] = set()
    while True:
        s = (total - hi * len(fixed)) / sum(w for i, w in enumerate(weights) if i not in fixed)
        over = {i for i, w in enumerate(weights) if i not in fixed and s * w > hi}
        if not over:
            break
        fixed |= over
    x = [hi if i in fixed else s * w for i, w in enumerate(weights)]
    best = min(
        (b for b in itertools.product(range(hi + 1), repeat=n) if sum(b) == total),
        key=lambda b: (round(sum((bi - xi) ** 2 for bi, xi in zip(b, x)), 9), [-bi for bi in b]),
    )
    return [n_p + b for b in best]


@pytest.mark.parametrize(
    "schedule,k,n_p,T,n_layers",
    [
        ("linear", 9, 3, 15, 4),  # unclipped
        ("linear", 7, 2, 12, 3),
        ("linear", 12, 2, 16, 3),  # the two lower layers clipped at the prompt length
        ("staged", 6, 2, 12, 4),  # two stages of two layers: ties go to the lower layer
        ("staged", 7, 1, 10, 4),
    ],
)
def test_pyramid_budgets_equal_brute_force(schedule, k, n_p, T, n_layers):
    stages = 2 if schedule == "staged" else 4
    plan = PyramidScorer(schedule=schedule, stages=stages).budgets(k, n_p, T, list(range(n_layers)))
    want = _brute_budgets(k, n_p, T, _pyramid_weights(n_layers, schedule, stages=stages))
    assert [plan[i] for i in range(n_layers)] == want
    assert sum(want) == k * n_layers and want[0] > want[-1]


@torch.inference_mode()
def test_pyramid_keeps_the_top_of_window_attention_per_layer():
    """On a 4-layer GQA Llama each layer keeps its brute-force budget: the protected entries plus
    the context entries with the highest SnapKV score, recomputed here from eager attention (the
    question rows summed, avg-pooled over 5 with zero padding, averaged over each KV head's query
    heads)."""
    from conftest import tiny_llama

    model = tiny_llama(0, layers=4)
    T, c0, c1, keep = 48, 3, 38, 0.5
    p = Prompt(ids=tuple(_ids(T)), context=(c0, c1), question=(c1, T), split=c1)
    pre = prefill_cache(model, p, Sieve("pyramid", keep=keep, window=6), "query_aware")
    cache = pre.cache
    k, n_p = round(keep * T), T - (c1 - c0)
    budgets = _brute_budgets(k, n_p, T, _pyramid_weights(4, "linear"))
    assert pre.kept == k and cache.sieve_layers == [0, 1, 2, 3]
    model.set_attn_implementation("eager")
    att = model(torch.tensor([p.ids]), output_attentions=True).attentions  # (1, H, T, T) per layer
    H, Hk = 4, 2
    protected = set(range(c0)) | set(range(c1, T))
    for li, budget in enumerate(budgets):
        rows = att[li][0, :, c1:, :c1].sum(1)  # (H, c1): the question rows on the prefix columns
        pooled = torch.nn.functional.pad(rows, (2, 2)).unfold(-1, 5, 1).mean(-1)
        per_kv = pooled.view(Hk, H // Hk, c1).mean(1)
        kept = cache.layer(li).positions  # (1, Hk, S)
        assert kept.shape == (1, Hk, budget)
        for h in range(Hk):
            top = per_kv[h, c0:c1].topk(budget - n_p).indices + c0
            assert sorted(kept[0, h].tolist()) == sorted(protected | set(top.tolist()))


@torch.inference_mode()
def test_pyramid_cache_per_layer_and_masked_reference():
    """On a 2-layer Llama the layers keep their scheduled counts (kv bytes = keep on average), and
    single-token steps after compression equal a full forward with the evicted keys hidden."""
    from conftest import tiny_llama
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    model = tiny_llama()
    T, c0, c1 = 48, 3, 38
    p = Prompt(ids=tuple(_ids(T)), context=(c0, c1), question=(c1, T), split=c1)
    sieve = Sieve("pyramid", keep=0.5, window=6)
    pre = prefill_cache(model, p, sieve, "query_aware")
    cache, logits = pre.cache, pre.logits
    k = 24
    n_p = T - (c1 - c0)
    plan = sieve.scorer.budgets(k, n_p, T, cache.sieve_layers)
    assert plan[0] > plan[1] and pre.kept == k
    for i in cache.sieve_layers:
        assert cache.layer(i).stored_length == plan[i]
    more = [7, 11, 3]
    got = [model(torch.tensor([[t]]), cache=cache).logits[0, -1] for t in more]
    ids = torch.tensor([list(p.ids) + more])
    N = ids.shape[1]
    H, Hk, _ = _heads(model)
    i, j = torch.arange(N)[:, None], torch.arange(N)[None]
    allowed = {}
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions  # (1, Hk, S): per KV head
        kept = pos[..., : plan[li]].expand(1, Hk, plan[li])
        hidden = torch.ones(1, Hk, N, dtype=torch.bool)
        hidden[..., T:] = False
        hidden.scatter_(-1, kept, False)
        hidden = hidden.repeat_interleave(H // Hk, dim=1)  # (1, H, N)
        allowed[li] = (j <= i) & ~((i >= T) & hidden[..., None, :])

    def fn(module, q, k_, v, mask, **kw):
        kw.pop("is_causal", None)
        return sdpa_attention_forward(module, q, k_, v, allowed[module.layer_idx], is_causal=False, **kw)

    AttentionInterface.register("test_pyramid_ref", fn)
    AttentionMaskInterface.register("test_pyramid_ref", sdpa_mask)
    prev = model.config._attn_implementation
    model.set_attn_implementation("test_pyramid_ref")
    try:
        ref = model(ids).logits[0]
    finally:
        model.set_attn_implementation(prev)
    torch.testing.assert_close(logits[0, -1], ref[T - 1], atol=1e-5, rtol=0)
    for step, row in enumerate(got):
        torch.testing.assert_close(row, ref[T + step], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ chunked prefill


@pytest.mark.parametrize("method", ["keyformer", "todre", "transprune", "vflowopt"])
def test_chunked_prefill(tiny_causal, method):
    """Compressing after every chunk (observations in cache-slot coordinates): bounded cache, exact
    count at the end, question and template kept."""
    _, model = tiny_causal
    T, c0, c1 = 96, 2, 88
    p = Prompt(ids=tuple(_ids(T)), context=(c0, c1), question=(c1, T), split=c1)
    pre = prefill_cache(model, p, Sieve(method, keep=0.25, window=8, chunk=16), "query_aware")
    cache = pre.cache
    k = round(0.25 * T)
    assert pre.extra["peak_entries"] <= k + 16 and pre.kept == k
    for li in cache.sieve_layers:
        pos = cache.layer(li).positions
        assert pos.shape[-1] == k
        for row in pos.reshape(-1, k).tolist():
            assert set(range(c1, T)) | set(range(c0)) <= set(row)


def test_chunked_ttv_covers_the_last_slots():
    """A chunk's TTV belongs to the last cache slots; earlier kept entries get the chunk's mean."""
    ratio, dist = torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3)
    t = layer_ttv(LayerObs(ttv={"mlp": [(ratio, dist)]}), 5)
    torch.testing.assert_close(t, torch.tensor([[2 / 3, 2 / 3, 1 / 3, 2 / 3, 1.0]]))


def test_pyramid_refuses_chunked_prefill(tiny_llama_model):
    """Per-layer budgets leave layers of different lengths: the next chunk cannot be masked."""
    p = Prompt(ids=tuple(_ids(64)), context=(2, 56), question=(56, 64), split=56)
    assert PyramidScorer.per_layer_budgets
    with pytest.raises(FlowsieveError, match="gives layers different budgets; chunked prefill needs equal"):
        prefill_cache(tiny_llama_model, p, Sieve("pyramid", keep=0.25, window=8, chunk=16), "query_aware")


def test_flowcut_kernel_pools_neighbours(tiny_causal):
    """flowcut@kernel=k: the per-layer score is SnapKV-style average pooling of the paper's score."""
    from flowsieve.methods.base import pool1d
    from flowsieve.methods.flowcut import FlowCutScorer

    _, model = tiny_causal
    obs, ctxs, _ = _observed(model, FlowCutScorer())
    for c in ctxs:
        plain = FlowCutScorer().score(obs.layer(c.layer), c)
        pooled = FlowCutScorer(kernel=3).score(obs.layer(c.layer), c)
        ref = pool1d(plain, 3)
        torch.testing.assert_close(pooled, ref / ref.sum(-1, keepdim=True), rtol=1e-5, atol=1e-7)
        assert not torch.allclose(pooled, plain)
    with pytest.raises(FlowsieveError, match="kernel"):
        Sieve("flowcut", keep=0.5, options={"kernel": 0})
