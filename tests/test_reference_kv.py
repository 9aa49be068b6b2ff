"""SnapKV, TOVA, StreamingLLM and H2O (prefill and decode sites) against brute-force references of
their papers' formulas.

The references read a float64 copy of a tiny random model whose attention is computed by an
explicit eager attention function (``softmax(q k^T * scaling + additive mask)``, float64) that
records every layer's probabilities; decode steps are replayed as one full forward of the prompt
and the tokens so far, with a 4-D mask hiding from each decode query the entries evicted before it
(RoPE positions unchanged). The scores are then written out with loops over those probabilities;
nothing of flowsieve's observation, sieve or scorer code is used. Each test compares the positions
a method keeps with ``protected ∪ top-(k − #protected) candidates`` of the reference (per KV head
when the score is per KV head), checks that the reference's cut is no near-tie, and where a method
produces a score, compares its values too.

The q/k/v weights are scaled up: at the random initialisation (std 0.02) every attention row is
nearly uniform and would hardly rank anything.

Prompt: T = 48 tokens, context [2, 40) (the candidates), question [40, 48) (the observation rows
in query-aware mode; it and the first two tokens are protected).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import sharpen, tiny_gemma3, tiny_llama

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.methods import METHODS
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache
from flowsieve.sites.decode import DecodeEvictor

T, C0, C1 = 48, 2, 40
CONTEXT = tuple(range(C0, C1))
QUESTION = tuple(range(C1, T))
PROTECTED = frozenset(set(range(T)) - set(CONTEXT))
NEG = float("-inf")
REF_ATTN = "reference_kv_eager"


# --------------------------------------------------------------------------------------- models


BUILD = {
    "llama": lambda: sharpen(tiny_llama(), qk=8.0),
    "gemma3": lambda: sharpen(tiny_gemma3(), qk=3.0),
}
FULL_LAYERS = {"llama": [0, 1], "gemma3": [2]}  # the compressed (full-attention) layers

_MODELS: dict = {}


def model_of(name: str):
    if name not in _MODELS:
        _MODELS[name] = BUILD[name]()
    return _MODELS[name]


# ------------------------------------------------------------------------- the reference attention

_ALLOWED: dict[int, torch.Tensor] = {}  # layer -> bool (1, H|1, N, N): which keys each query sees
_PROBS: dict[int, torch.Tensor] = {}  # layer -> (H, N, N) float64 attention probabilities


def _eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """softmax(q k^T * scaling + mask) v in float64; the mask is this module's own causal (or
    sliding-window) one unless ``_ALLOWED`` gives the layer another."""
    assert kwargs.get("softcap") is None
    n = query.shape[2]
    g = query.shape[1] // key.shape[1]
    q = query.double()
    k = key.double().repeat_interleave(g, dim=1)  # query head h reads KV head h // g
    v = value.double().repeat_interleave(g, dim=1)
    logits = (q @ k.transpose(-1, -2)) * scaling
    allowed = _ALLOWED.get(module.layer_idx)
    if allowed is None:
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = j <= i
        window = getattr(module, "sliding_window", None)
        if window is not None:
            allowed = allowed & (i - j < window)
    probs = torch.softmax(logits.masked_fill(~allowed, NEG), dim=-1)
    _PROBS[module.layer_idx] = probs[0]
    return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(REF_ATTN, _eager_attention)
    AttentionMaskInterface.register(REF_ATTN, sdpa_mask)


_REFS: dict = {}


def ref_of(model):
    """A float64 copy of ``model`` that runs :func:`_eager_attention`."""
    if id(model) not in _REFS:
        _register()
        ref = copy.deepcopy(model).double()
        ref.set_attn_implementation(REF_ATTN)
        _REFS[id(model)] = ref
    return _REFS[id(model)]


@torch.no_grad()
def attention(ref, ids: list[int], allowed: dict[int, torch.Tensor] | None = None):
    """(per layer (H, N, N) float64 probabilities as nested lists, logits (N, V)) of one forward."""
    _ALLOWED.clear()
    _ALLOWED.update(allowed or {})
    _PROBS.clear()
    try:
        logits = ref(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        _ALLOWED.clear()
    probs = {i: p.tolist() for i, p in _PROBS.items()}
    return probs, logits


def _ids(seed: int, n: int = T) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(seed: int) -> Prompt:
    return Prompt(ids=tuple(_ids(seed)), context=(C0, C1), question=(C1, T), split=C1)


def _case_id(case) -> str:
    return "-".join(f"{k}={v}" for k, v in case.items())


# ------------------------------------------------------------------------------- the papers' scores


def snapkv_reference(A: list, rows: list[int], n_kv: int, kernel: int = 5, pooling: str = "avg") -> list:
    """Per KV head: per query head a_h[j] = sum_{r in rows} A_h[r][j]; the prefix columns (j before
    the first row) pooled over ``kernel`` neighbours, the average dividing by ``kernel`` (zeros
    outside the prefix), the max over the neighbours inside it; the window columns raw; then the
    mean over the KV head's query heads."""
    H, n = len(A), len(A[0])
    prefix = rows[0]
    pad = kernel // 2
    per_head = []
    for h in range(H):
        a = [sum(A[h][r][j] for r in rows) for j in range(n)]
        s = []
        for j in range(n):
            if j >= prefix or kernel == 1:
                s.append(a[j])
                continue
            near = [a[i] for i in range(j - pad, j - pad + kernel) if 0 <= i < prefix]
            s.append(sum(near) / kernel if pooling == "avg" else max(near))
        per_head.append(s)
    g = H // n_kv
    return [
        [sum(per_head[h][j] for h in range(hk * g, (hk + 1) * g)) / g for j in range(n)] for hk in range(n_kv)
    ]


def tova_reference(A: list, row: int) -> list[float]:
    """s[j] = mean over heads of the attention row ``row`` gives key j."""
    H = len(A)
    return [sum(A[h][row][j] for h in range(H)) / H for j in range(len(A[0][row]))]


def h2o_reference(A: list, n_kv: int, n_rows: int = T) -> list:
    """Per KV head, s[j] = sum over its query heads and every row r < n_rows of A_h[r][j]."""
    H, n = len(A), len(A[0])
    g = H // n_kv
    return [
        [sum(A[h][r][j] for h in range(hk * g, (hk + 1) * g) for r in range(n_rows)) for j in range(n)]
        for hk in range(n_kv)
    ]


def streamingllm_kept(protected, candidates, k: int, sinks: int = 4) -> set[int]:
    """The protected entries, the candidates among the first ``sinks`` positions, then the most
    recent candidates up to ``k``."""
    m = k - len(protected)
    first = sorted(j for j in candidates if j < sinks)[:m]
    rest = sorted(j for j in candidates if j >= sinks)
    return set(protected) | set(first) | set(rest[len(rest) - (m - len(first)) :] if m > len(first) else [])


def top_kept(scores, protected, k: int, stored=None) -> tuple[set[int], float]:
    """protected ∪ the k − #protected best other entries of ``stored`` (default: every index), and
    the relative score gap at the cut (inf when nothing is cut)."""
    stored = range(len(scores)) if stored is None else stored
    others = sorted((j for j in stored if j not in protected), key=lambda j: -scores[j])
    m = k - len(set(protected) & set(stored))
    kept = (set(protected) & set(stored)) | set(others[:m])
    if not 0 < m < len(others):
        return kept, math.inf
    a, b = scores[others[m - 1]], scores[others[m]]
    return kept, (a - b) / max(abs(a), abs(b), 1e-300)


def assert_kept(got: set[int], want: set[int], gap: float, what: str, min_gap: float = 1e-4):
    assert gap > min_gap, f"{what}: near-tie at the cut (relative gap {gap:.2e}); pick another prompt"
    assert got == want, f"{what}: kept {sorted(got - want)} instead of {sorted(want - got)}"


def _kept(cache, layer: int) -> list[set[int]]:
    """Kept positions of a compressed layer, per KV head (one set when shared by all heads)."""
    pos = cache.layer(layer).positions
    return [set(row.tolist()) for row in pos.reshape(-1, pos.shape[-1])]


def spy_scores(sieve: Sieve) -> dict[int, torch.Tensor]:
    """Record the scores the sieve's method returns, per layer, as (1|Hk, T) float64."""
    seen: dict[int, torch.Tensor] = {}
    score = sieve.scorer.score

    def recorded(obs, ctx):
        s = score(obs, ctx)
        seen[ctx.layer] = s.detach().double().reshape(-1, s.shape[-1]).clone()
        return s

    sieve.scorer.score = recorded
    return seen


def assert_scores(got: torch.Tensor, want: list, what: str, rtol: float = 1e-4):
    want_t = torch.tensor(want, dtype=torch.float64).reshape(-1, got.shape[-1])
    assert got.shape == want_t.shape, (
        f"{what}: score shape {tuple(got.shape)}, expected {tuple(want_t.shape)}"
    )
    err = (got - want_t).abs().max().item()
    assert err <= rtol * want_t.abs().max().item(), f"{what}: scores differ by {err:.3e}"


def _n_kv(model) -> int:
    return model.config.num_key_value_heads


# ---------------------------------------------------------------------------------- prefill site


SNAPKV_CASES = [
    {"seed": 1, "keep": 0.3},
    {"seed": 2, "keep": 0.5},
    {"seed": 3, "keep": 0.7},
    {"seed": 1, "keep": 0.5, "kernel": 3},
    {"seed": 2, "keep": 0.3, "kernel": 7},
    {"seed": 1, "keep": 0.7, "pooling": "max"},  # max pooling ties neighbours: few cuts are clean
]


@pytest.mark.parametrize("case", SNAPKV_CASES, ids=_case_id)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_snapkv_keeps_the_reference_top(name, case):
    case = dict(case)
    seed, keep = case.pop("seed"), case.pop("keep")
    model = model_of(name)
    probs, _ = attention(ref_of(model), _ids(seed))
    sieve = Sieve("snapkv", keep=keep, options=case)
    scores = spy_scores(sieve)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    assert list(cache.sieve_layers) == FULL_LAYERS[name]
    for layer in FULL_LAYERS[name]:
        ref = snapkv_reference(probs[layer], list(QUESTION), _n_kv(model), **case)
        assert_scores(scores[layer], ref, f"layer {layer}")
        got = _kept(cache, layer)
        assert len(got) == _n_kv(model)  # one selection per KV head
        for hk, kept in enumerate(got):
            want, gap = top_kept(ref[hk], PROTECTED, round(keep * T))
            assert_kept(kept, want, gap, f"layer {layer} KV head {hk}")


@pytest.mark.parametrize(("seed", "keep"), [(1, 0.5), (2, 0.6), (3, 0.7)])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_snapkv_window_rows_keeps_the_reference_top(name, seed, keep):
    """rows="window": the last 16 prompt tokens observe (and are kept); the prefix is j < T − 16."""
    model = model_of(name)
    probs, _ = attention(ref_of(model), _ids(seed))
    rows = list(range(T - 16, T))
    protected = PROTECTED | set(rows)
    sieve = Sieve("snapkv", keep=keep, rows="window", window=16)
    scores = spy_scores(sieve)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    for layer in FULL_LAYERS[name]:
        ref = snapkv_reference(probs[layer], rows, _n_kv(model))
        assert_scores(scores[layer], ref, f"layer {layer}")
        for hk, kept in enumerate(_kept(cache, layer)):
            want, gap = top_kept(ref[hk], protected, round(keep * T))
            assert_kept(kept, want, gap, f"layer {layer} KV head {hk}")


@pytest.mark.parametrize(("seed", "keep"), [(1, 0.3), (2, 0.5), (3, 0.7), (4, 0.4)])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_tova_keeps_the_reference_top(name, seed, keep):
    model = model_of(name)
    probs, _ = attention(ref_of(model), _ids(seed))
    sieve = Sieve("tova", keep=keep)
    scores = spy_scores(sieve)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    for layer in FULL_LAYERS[name]:
        ref = tova_reference(probs[layer], T - 1)
        assert_scores(scores[layer], ref, f"layer {layer}")
        (kept,) = _kept(cache, layer)  # one selection shared by all heads
        want, gap = top_kept(ref, PROTECTED, round(keep * T))
        assert_kept(kept, want, gap, f"layer {layer}")


@pytest.mark.parametrize("keep", [0.25, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_streamingllm_keeps_sinks_and_recent(name, keep):
    model = model_of(name)
    cache = prefill_cache(model, _prompt(1), Sieve("streamingllm", keep=keep), "query_aware").cache
    want = streamingllm_kept(PROTECTED, CONTEXT, round(keep * T))
    assert {2, 3} <= want
    for layer in FULL_LAYERS[name]:
        assert _kept(cache, layer) == [want]


@pytest.mark.parametrize(("seed", "keep"), [(1, 0.3), (2, 0.5), (3, 0.7), (4, 0.4)])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_h2o_prefill_keeps_the_reference_top(name, seed, keep):
    model = model_of(name)
    probs, _ = attention(ref_of(model), _ids(seed))
    sieve = Sieve("h2o", keep=keep)
    scores = spy_scores(sieve)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    for layer in FULL_LAYERS[name]:
        ref = h2o_reference(probs[layer], _n_kv(model))
        assert_scores(scores[layer], ref, f"layer {layer}")
        got = _kept(cache, layer)
        assert len(got) == _n_kv(model)
        for hk, kept in enumerate(got):
            want, gap = top_kept(ref[hk], PROTECTED, round(keep * T))
            assert_kept(kept, want, gap, f"layer {layer} KV head {hk}")
            # the accumulated score travels with the kept entries
            pos = cache.layer(layer).positions.reshape(-1, len(kept))[hk].tolist()
            carried = cache.layer(layer).extras["h2o"][0, hk].double()
            assert_scores(carried[None], [[ref[hk][j] for j in pos]], f"layer {layer} carried")


# ----------------------------------------------------------------------------------- decode site


def _snapshot(cache) -> dict[int, tuple[list[list[int]], list[list[float]] | None]]:
    """Per compressed layer: kept positions per row (slot order), and the h2o scores if carried."""
    out = {}
    for i in cache.sieve_layers:
        layer = cache.layer(i)
        pos = layer.positions.reshape(-1, layer.positions.shape[-1]).tolist()
        ex = layer.extras.get("h2o")
        out[i] = (pos, None if ex is None else ex[0].double().tolist())
    return out


def spy_decode_scores(sieve: Sieve, step: list[int]) -> dict:
    """Record the decode scores the sieve's method returns: (step, layer) -> (positions per row,
    scores per row) of the entries stored when the step evicts."""
    seen: dict = {}
    decode_score = sieve.scorer.decode_score

    def recorded(obs, layer, ctx):
        s = decode_score(obs, layer, ctx)
        pos = layer.positions.reshape(-1, layer.positions.shape[-1]).tolist()
        seen[(step[0], ctx.layer)] = (pos, s.detach().double().reshape(-1, s.shape[-1]).tolist())
        return s

    sieve.scorer.decode_score = recorded
    return seen


def run_decode(model, sieve: Sieve, seed: int, toks: list[int]):
    """Prefill and decode ``toks`` as decode_greedy does; the cache's state before every step and at
    the end, the logits of the last prompt position and of every step, the evictor, and (as
    ``ev.scored``) the decode scores of every evicting step."""
    step = [0]
    scored = spy_decode_scores(sieve, step)
    pre = prefill_cache(model, _prompt(seed), sieve, "query_aware")
    cache, logits = pre.cache, pre.logits
    ev = DecodeEvictor(model, cache, sieve, pre.protect, sieve.window)
    states, step_logits, stored = [_snapshot(cache)], [logits[0, -1]], []
    for t in toks:
        step[0] += 1
        with ev() as after:
            out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
        after()
        step_logits.append(out[0, -1])
        states.append(_snapshot(cache))
        stored.append({i: cache.layer(i).stored_length for i in cache.sieve_layers})
    ev.scored = scored
    return states, torch.stack(step_logits), stored, ev


def decode_masks(model, n_prompt: int, kept_before: list[dict[int, list[set[int]]]], layers) -> dict:
    """Per compressed layer, bool (1, H, N, N): the prompt rows causal; decode row n_prompt + q sees
    the entries kept before its step (per KV head, or shared) and itself."""
    H = model.config.num_attention_heads
    g = H // _n_kv(model)
    N = n_prompt + len(kept_before)
    out = {}
    for i in layers:
        m = torch.zeros(1, H, N, N, dtype=torch.bool)
        m[..., :n_prompt, :n_prompt] = torch.ones(n_prompt, n_prompt).tril().bool()
        for q, kept in enumerate(kept_before):
            row = n_prompt + q
            for h in range(H):
                sets = kept[i]
                m[0, h, row, sorted(sets[h // g] if len(sets) > 1 else sets[0])] = True
                m[0, h, row, row] = True
        out[i] = m
    return out


def capacity_of(budget: int | None, keep: float | None, n: int) -> int:
    return budget if budget is not None else max(1, round(keep * n))


def simulate_decode(
    model, layers: list[int], method: str, seed: int, toks: list[int], budget, keep, window: int
):
    """The method's decode rule, step by step over the reference attention. Returns per step (the
    prefill first) {layer: kept per KV head (or one shared set)} and, for h2o, {layer: per KV head
    {position: accumulated score}}; the scores of every evicting step {(step, layer): per row
    {position: score}}; and the smallest relative gap at any eviction cut."""
    ref = ref_of(model)
    ids, n_kv = _ids(seed), _n_kv(model)
    H = model.config.num_attention_heads
    g = H // n_kv
    probs, _ = attention(ref, ids)
    k0 = min(budget, T) if budget is not None else round(keep * T)
    kept, acc, scored, min_gap = {}, {}, {}, math.inf
    for i in layers:
        A = probs[i]
        if method == "h2o":
            s = h2o_reference(A, n_kv)
            acc[i] = []
            kept[i] = []
            for hk in range(n_kv):
                ks, gap = top_kept(s[hk], PROTECTED, k0)
                min_gap = min(min_gap, gap)
                kept[i].append(ks)
                acc[i].append({j: s[hk][j] for j in ks})
        elif method == "tova":
            ks, gap = top_kept(tova_reference(A, T - 1), PROTECTED, k0)
            min_gap = min(min_gap, gap)
            kept[i] = [ks]
        else:
            kept[i] = [streamingllm_kept(PROTECTED, CONTEXT, k0)]
    history = [copy.deepcopy(kept)]
    accs = [copy.deepcopy(acc)]
    for q in range(len(toks)):
        p = T + q  # this step's token
        n = p + 1  # tokens seen
        cap = capacity_of(budget, keep, n)
        masks = decode_masks(model, T, history[: q + 1], layers)
        probs, _ = attention(ref, ids + toks[: q + 1], masks)
        for i in layers:
            row = [probs[i][h][p] for h in range(H)]
            new = []
            for r, ks in enumerate(kept[i]):
                stored = ks | {p}
                if method == "h2o":
                    a = acc[i][r]
                    a[p] = 0.0
                    for j in stored:
                        a[j] += sum(row[h][j] for h in range(r * g, (r + 1) * g))
                    scores = a
                elif method == "tova":
                    scores = {j: sum(row[h][j] for h in range(H)) / H for j in stored}
                else:
                    scores = {j: (math.inf if j < 4 else float(j)) for j in stored}
                if len(stored) <= cap:
                    new.append(stored)
                    continue
                scored.setdefault((q + 1, i), []).append(dict(scores))
                prot = {j for j in stored if j in PROTECTED or j >= n - window}
                ks2, gap = top_kept(scores, prot, cap, stored=stored)
                if method != "streamingllm":
                    min_gap = min(min_gap, gap)
                new.append(ks2)
                if method == "h2o":
                    acc[i][r] = {j: scores[j] for j in ks2}
            kept[i] = new
        history.append(copy.deepcopy(kept))
        accs.append(copy.deepcopy(acc))
    return history, accs, scored, min_gap


def _tokens(seed: int, n: int) -> list[int]:
    return _ids(100 + seed, n)


def _sets(rows) -> list[set[int]]:
    return [set(r) for r in rows]


def _same(got: list[set[int]], want: list[set[int]]) -> bool:
    n = max(len(got), len(want))
    return (got * n if len(got) == 1 else got) == (want * n if len(want) == 1 else want)


DECODE_CASES = [
    {"method": "h2o", "seed": 1, "budget": 24},
    {"method": "h2o", "seed": 2, "budget": 52},  # no prefill eviction; 4 steps without eviction
    {"method": "h2o", "seed": 3, "keep": 0.5},  # capacity grows: every other step evicts
    {"method": "tova", "seed": 1, "budget": 24},
    {"method": "tova", "seed": 2, "keep": 0.5},
    {"method": "tova", "seed": 3, "budget": 52},
    {"method": "streamingllm", "seed": 1, "budget": 20},
    {"method": "streamingllm", "seed": 2, "keep": 0.4},
    {"method": "streamingllm", "seed": 3, "budget": 52},  # positions 4, 5, ... reach the decode cache
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_decode_site_follows_the_reference(name, case):
    """Kept positions after the prefill and after each of 10 decode steps (and H2O's accumulated
    scores) equal an explicit simulation of the method's rule over the reference attention."""
    model = model_of(name)
    method, seed = case["method"], case["seed"]
    budget, keep, window, steps = case.get("budget"), case.get("keep"), 4, 10
    toks = _tokens(seed, steps)
    sieve = Sieve(method, budget=budget, keep=keep, site="decode", window=window)
    states, _, _, ev = run_decode(model, sieve, seed, toks)
    history, accs, scored, gap = simulate_decode(
        model, FULL_LAYERS[name], method, seed, toks, budget, keep, window
    )
    assert gap > 1e-4, f"near-tie at an eviction cut (relative gap {gap:.2e}); pick another prompt"
    assert ev.evicted > 0
    for step, (state, want, acc) in enumerate(zip(states, history, accs)):
        for i in FULL_LAYERS[name]:
            pos, extras = state[i]
            got = _sets(pos)
            assert _same(got, want[i]), f"step {step} layer {i}: kept {got}, expected {want[i]}"
            if method == "h2o":
                assert extras is not None and len(extras) == _n_kv(model)
                for hk in range(_n_kv(model)):
                    slots = pos[hk] if len(pos) > 1 else pos[0]
                    ref = acc[i][hk]
                    top = max(abs(x) for x in ref.values())
                    err = max(abs(extras[hk][s] - ref[p]) for s, p in enumerate(slots))
                    assert err <= 1e-4 * top, (
                        f"step {step} layer {i} KV head {hk}: scores differ by {err:.2e}"
                    )
    assert set(ev.scored) == set(scored)  # the same steps evict, on the same layers
    if method == "tova":  # one score shared by all heads: the step's attention, head mean
        for (step, i), (pos, got) in ev.scored.items():
            (want,) = scored[(step, i)]
            assert _sets(pos) == [set(want)]
            ref = [[want[p] for p in pos[0]]]
            assert_scores(torch.tensor(got, dtype=torch.float64), ref, f"step {step} layer {i}")


def test_h2o_decode_budget_below_protected_and_recent_raises():
    """Budget 10 = the protected prompt entries: the first decode step must also keep its own,
    recent token, and cannot."""
    model = model_of("llama")
    sieve = Sieve("h2o", budget=10, site="decode", window=4)
    with pytest.raises(
        FlowsieveError, match="the decode cache holds at most 10 entries, fewer than the 11 it must keep"
    ):
        run_decode(model, sieve, 1, _tokens(1, 2))


DECODE_METHODS = sorted(n for n, c in METHODS.items() if "decode" in c.sites)


@pytest.mark.parametrize("method", DECODE_METHODS)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_decode_cache_bounded_and_matches_masked_forward(name, method):
    """Decode site on both families: after every step each compressed layer holds at most its
    capacity and keeps the protected prompt entries and the recent window; every step's logits
    equal a full forward in which its query sees only the entries kept before it and itself."""
    model = model_of(name)
    budget, window, steps, seed = 22, 4, 10, 5
    toks = _tokens(seed, steps)
    sieve = Sieve(method, budget=budget, site="decode", window=window)
    states, logits, stored, ev = run_decode(model, sieve, seed, toks)
    assert ev.evicted > 0 and ev.max_stored <= budget + 1
    for q, state in enumerate(states[1:]):
        n = T + q + 1
        for i in FULL_LAYERS[name]:
            assert stored[q][i] <= budget
            for row in state[i][0]:
                assert len(row) == budget
                assert PROTECTED | set(range(n - window, n)) <= set(row)
    kept_before = [{i: _sets(s[i][0]) for i in FULL_LAYERS[name]} for s in states[:-1]]
    masks = decode_masks(model, T, kept_before, FULL_LAYERS[name])
    _, ref = attention(ref_of(model), _ids(seed) + toks, masks)
    err = (logits.double() - ref[T - 1 :]).abs().max().item()
    assert err <= 1e-4 * ref[T - 1 :].abs().max().item(), f"logits differ by {err:.2e}"


# chunked-prefill bounds of these are tested in test_sieve.py and test_sieve_methods.py
CHUNK_TESTED_ELSEWHERE = {"snapkv", "flowcut", "recent", "keyformer", "todre", "transprune", "vflowopt"}
CHUNKABLE = sorted(
    n
    for n, c in METHODS.items()
    if c.chunkable
    and "prefill" in c.sites
    and not getattr(c, "per_layer_budgets", False)
    and n not in CHUNK_TESTED_ELSEWHERE
)


@pytest.mark.parametrize("method", CHUNKABLE)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_chunked_prefill_bound(name, method):
    """Chunked prefill holds at most budget + chunk entries, ends at the budget and keeps the
    protected entries."""
    model = model_of(name)
    n, c0, c1, chunk = 96, 2, 88, 16
    p = Prompt(ids=tuple(_ids(7, n)), context=(c0, c1), question=(c1, n), split=c1)
    pre = prefill_cache(model, p, Sieve(method, keep=0.25, window=8, chunk=chunk), "query_aware")
    cache = pre.cache
    k = round(0.25 * n)
    assert pre.extra["peak_entries"] <= k + chunk
    for i in cache.sieve_layers:
        pos = cache.layer(i).positions
        assert pos.shape[-1] == k
        for row in pos.reshape(-1, k).tolist():
            assert set(range(c0)) | set(range(c1, n)) <= set(row)


def simulate_chunked_h2o(model, layers: list[int], ids: list[int], keep: float, chunk: int, window: int):
    """H2O over a chunked query-aware prefill of ``ids`` (context [C0, C1), question [C1, n)): the
    queries of each chunk see the entries kept so far and the chunk's own; after the chunk, every
    stored entry's score (what it carried, 0 for the chunk's own) gains the attention those queries
    give it, summed over its KV head's query heads, and a cache over ``k`` keeps the protected
    entries (outside the context, and the last ``window`` tokens, or the question at the end) and
    the best others. Returns per layer the kept positions and their scores per KV head, and the
    smallest relative gap at a cut."""
    ref = ref_of(model)
    n, n_kv = len(ids), _n_kv(model)
    H = model.config.num_attention_heads
    g = H // n_kv
    k = round(keep * n)
    outside = set(range(n)) - set(range(C0, C1))
    acc = {i: [{} for _ in range(n_kv)] for i in layers}  # position -> score, per KV head
    allowed = {i: torch.zeros(1, H, n, n, dtype=torch.bool) for i in layers}
    min_gap = math.inf
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        for i in layers:  # the chunk's queries: the entries kept so far, and causal within the chunk
            for h in range(H):
                for r in range(a, b):
                    allowed[i][0, h, r, sorted(acc[i][h // g])] = True
                    allowed[i][0, h, r, a : r + 1] = True
        probs, _ = attention(ref, ids[:b], {i: m[..., :b, :b] for i, m in allowed.items()})
        rows = range(b - window, b) if b < n else range(max(C1, a), n)
        protected = {j for j in range(b) if j in outside or j in rows}
        for i in layers:
            A = probs[i]
            for hk in range(n_kv):
                s = acc[i][hk]
                for j in range(a, b):
                    s[j] = 0.0
                for j in s:
                    s[j] += sum(A[h][r][j] for h in range(hk * g, (hk + 1) * g) for r in range(a, b))
                kb = min(k, b)
                if len(s) > kb:
                    kept, gap = top_kept(s, protected, kb, stored=list(s))
                    min_gap = min(min_gap, gap)
                    acc[i][hk] = {j: s[j] for j in kept}
    return acc, min_gap


@pytest.mark.parametrize(
    ("seed", "keep"),
    [
        (1, 0.3),
        (2, 0.3),
        (3, 0.5),
    ],
)
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_h2o_chunked_prefill_accumulates_over_chunks(name, seed, keep):
    """Chunked H2O (chunks of 16, window 8): the kept positions per KV head and the carried scores
    equal :func:`simulate_chunked_h2o`. With keep 0.3 (k = 14 < chunk) every chunk evicts; with
    keep 0.5 (k = 24) the first chunk fits and evicts nothing, yet its attention still counts."""
    model = model_of(name)
    chunk, window = 16, 8
    ids = _ids(seed)
    sieve = Sieve("h2o", keep=keep, window=window, chunk=chunk)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    want, gap = simulate_chunked_h2o(model, FULL_LAYERS[name], ids, keep, chunk, window)
    assert gap > 1e-4, f"near-tie at a cut (relative gap {gap:.2e}); pick another prompt"
    for i in FULL_LAYERS[name]:
        pos = cache.layer(i).positions.reshape(_n_kv(model), -1).tolist()
        carried = cache.layer(i).extras["h2o"][0].double()
        for hk in range(_n_kv(model)):
            assert set(pos[hk]) == set(want[i][hk]), f"layer {i} KV head {hk}: kept {sorted(pos[hk])}"
            ref = [[want[i][hk][p] for p in pos[hk]]]
            assert_scores(carried[hk][None], ref, f"layer {i} KV head {hk} carried")
