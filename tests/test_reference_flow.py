"""FlowCut (prefill and layer sites) and Keyformer against brute-force references of their formulas.

The references read a tiny random model's own attention: the eager attention probabilities
(``output_attentions=True``) and the queries, keys and values caught by forward hooks on the
attention projections (RoPE applied here from the model's own cos/sin), in float64, looped over
relays, heads and keys. They use nothing from flowsieve's observation, sieve or scorer code. Each
test compares the positions a method keeps with ``protected ∪ top-(k − #protected) candidates`` of
the reference, and checks that the reference's cut is no near-tie (float32 rounding cannot decide it).

The q/k/v weights are scaled up: at the random initialisation (std 0.02) every attention row and
every value-value row is nearly uniform, and the relay terms would hardly rank anything.

Prompt: T = 48 tokens, context [2, 40) (the candidates), question [40, 48) (the relay queries in
query-aware mode; it and the first two tokens are protected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import sharpen, tiny_gemma3, tiny_llama

from flowsieve.inputs import Prompt
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache

T, C0, C1 = 48, 2, 40
CONTEXT = tuple(range(C0, C1))
RELAYS = tuple(range(C1, T))
PROTECTED = frozenset(set(range(T)) - set(CONTEXT))
NEG = float("-inf")


# --------------------------------------------------------------------------------------- models


def llama4():
    return tiny_llama(0, layers=4)


BUILD = {
    "llama": lambda: sharpen(tiny_llama(), qk=8.0),
    "gemma3": lambda: sharpen(tiny_gemma3(), qk=3.0),
    "llama4": lambda: sharpen(llama4(), qk=8.0),
}


_MODELS: dict = {}


def model_of(name: str):
    if name not in _MODELS:
        _MODELS[name] = BUILD[name]()
    return _MODELS[name]


def _case_id(case) -> str:
    seed, keep, options = case
    return f"seed{seed}-keep{keep}-" + (",".join(f"{k}={v}" for k, v in options.items()) or "default")


def _ids(seed: int) -> list[int]:
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(seed: int, c0: int = C0) -> Prompt:
    return Prompt(ids=tuple(_ids(seed)), context=(c0, C1), question=(C1, T), split=C1)


# ------------------------------------------------------------------------------- the model's own maths


@dataclass
class Ref:
    """One layer's attention of a prompt, as nested Python lists of floats.

    logits[h][i][j]: scaled q_i . k_j of query head h (-inf where query i cannot see key j);
    probs[h][i][j]: the eager attention probabilities; values[hk][j]: value vector of key j.
    """

    logits: list
    probs: list
    values: list
    n_heads: int
    n_kv: int
    head_dim: int


_REFS: dict[tuple[int, int], list[Ref]] = {}


@torch.no_grad()
def capture(model, ids: list[int]) -> list[Ref]:
    """Per layer, the attention of a full eager forward of ``ids`` (cached per model and prompt)."""
    key = (id(model), hash(tuple(ids)))
    if key in _REFS:
        return _REFS[key]
    cfg = model.config
    H, Hk, d, n = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, len(ids)
    got: dict = {}
    hooks = []

    def keep_out(name: str, i: int):
        return lambda mod, args, out: got.__setitem__((name, i), out.detach())

    def keep_rope(i: int):
        return lambda mod, args, kwargs: got.__setitem__(("rope", i), kwargs["position_embeddings"])

    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        qs = attn.q_norm if hasattr(attn, "q_norm") else attn.q_proj
        ks = attn.k_norm if hasattr(attn, "k_norm") else attn.k_proj
        hooks += [
            qs.register_forward_hook(keep_out("q", i)),
            ks.register_forward_hook(keep_out("k", i)),
            attn.v_proj.register_forward_hook(keep_out("v", i)),
            attn.register_forward_pre_hook(keep_rope(i), with_kwargs=True),
        ]
    previous = cfg._attn_implementation
    model.set_attn_implementation("eager")
    try:
        out = model(input_ids=torch.tensor([ids]), output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
        for h in hooks:
            h.remove()

    def per_head(x: torch.Tensor, heads: int) -> torch.Tensor:  # -> (heads, n, d)
        if x.dim() == 3:  # projection output (1, n, heads * d)
            x = x.view(1, n, heads, d).transpose(1, 2)
        return x[0].double()

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = d // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    refs = []
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        cos, sin = (t[0].double() for t in got["rope", i])
        q = rope(per_head(got["q", i], H), cos, sin)
        k = rope(per_head(got["k", i], Hk), cos, sin)
        v = per_head(got["v", i], Hk)
        window = getattr(attn, "sliding_window", None)
        a, b = torch.arange(n)[:, None], torch.arange(n)[None, :]  # query, key
        visible = (b <= a) & ((a - b < window) if window is not None else True)
        logits = torch.stack([attn.scaling * (q[h] @ k[h // (H // Hk)].T) for h in range(H)])
        logits = logits.masked_fill(~visible, NEG)
        probs = out.attentions[i][0].double()
        # the captured q/k reproduce the model's own attention
        torch.testing.assert_close(torch.softmax(logits, -1), probs, atol=2e-5, rtol=1e-4)
        refs.append(Ref(logits.tolist(), probs.tolist(), v.tolist(), H, Hk, d))
    _REFS[key] = refs
    return refs


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    s = sum(e)
    return [t / s for t in e]


def mean_value_l1(ref: Ref) -> list[float]:
    """||mean over KV heads of v_j||_1 per key j."""
    n = len(ref.values[0])
    return [
        sum(abs(sum(ref.values[hk][j][c] for hk in range(ref.n_kv)) / ref.n_kv) for c in range(ref.head_dim))
        for j in range(n)
    ]


def value_softmax(ref: Ref, hk: int, r: int, keys: list[int]) -> list[float]:
    """softmax over ``keys`` of v_r . v_j / sqrt(d) in KV head ``hk``."""
    vr = ref.values[hk][r]
    dots = [sum(a * b for a, b in zip(vr, ref.values[hk][j])) / math.sqrt(ref.head_dim) for j in keys]
    return softmax(dots)


def top_kept(scores: list[float], protected: set[int] | frozenset[int], k: int) -> tuple[set[int], float]:
    """protected ∪ the k − #protected best other positions, and the relative score gap at the cut."""
    others = sorted((j for j in range(len(scores)) if j not in protected), key=lambda j: -scores[j])
    m = k - len(protected)
    kept = set(protected) | set(others[:m])
    top = max(abs(s) for s in scores) or 1.0
    gap = (scores[others[m - 1]] - scores[others[m]]) / top if 0 < m < len(others) else math.inf
    return kept, gap


def assert_kept(got: set[int], scores: list[float], protected, k: int, what: str, min_gap: float = 1e-5):
    want, gap = top_kept(scores, protected, k)
    assert gap > min_gap, f"{what}: near-tie at the cut (relative gap {gap:.2e}); pick another prompt"
    assert got == want, f"{what}: kept {sorted(got - want)} instead of {sorted(want - got)}"


def _kept(cache, layer: int) -> list[set[int]]:
    """Kept positions of a compressed layer, per KV head (one set when shared by all heads)."""
    pos = cache.layer(layer).positions
    return [set(row.tolist()) for row in pos.reshape(-1, pos.shape[-1])]


# ------------------------------------------------------------------------------- FlowCut, prefill site


def flowcut_prefill_reference(
    refs: list[Ref],
    layers: list[int],
    *,
    ema: float = 0.5,
    normalise: str = "candidates",
    kernel: int = 1,
    context: tuple[int, ...] = CONTEXT,
) -> dict[int, list[float]]:
    """F_l per compressed layer: per relay r, rel_r = head-mean attention row and sem_r = KV-head-mean
    of softmax_{j<=r}(v_r . v_j / sqrt d), each scaled to sum 1 over the normalisation set (the
    candidates, or every entry); s_r = (rel_r + sem_r) * ||mean_hk v_j||_1 on that set; s = mean over
    relays (average-pooled over ``kernel`` neighbours), scaled to sum 1; F = EMA over the layers."""
    span = list(context) if normalise == "candidates" else list(range(T))
    out, F = {}, None
    for layer in layers:
        ref = refs[layer]
        l1 = mean_value_l1(ref)
        s = [0.0] * T
        for r in RELAYS:
            rel = [sum(ref.probs[h][r][j] for h in range(ref.n_heads)) / ref.n_heads for j in range(T)]
            sem = [0.0] * T
            seen = list(range(r + 1))
            for hk in range(ref.n_kv):
                for j, p in zip(seen, value_softmax(ref, hk, r, seen)):
                    sem[j] += p / ref.n_kv
            rel_sum = sum(rel[j] for j in span)
            sem_sum = sum(sem[j] for j in span)
            for j in span:
                s[j] += (rel[j] / rel_sum + sem[j] / sem_sum) * l1[j] / len(RELAYS)
        if kernel > 1:
            lo = kernel // 2
            s = [
                sum(s[i] for i in range(j - lo, j - lo + kernel) if 0 <= i < T)
                / sum(1 for i in range(j - lo, j - lo + kernel) if 0 <= i < T)
                for j in range(T)
            ]
        total = sum(s)
        s = [x / total for x in s]
        F = s if F is None else [(1 - ema) * a + ema * b for a, b in zip(F, s)]
        out[layer] = F
    return out


FLOWCUT_CASES = [  # (prompt seed, keep, options)
    (1, 0.3, {}),
    (2, 0.5, {}),
    (3, 0.7, {}),
    (1, 0.5, {"normalise": "all"}),
    (2, 0.3, {"normalise": "all"}),
    (3, 0.5, {"kernel": 3}),
    (1, 0.7, {"kernel": 5}),
    (2, 0.5, {"ema": 0.8}),
    (3, 0.3, {"normalise": "all", "ema": 0.3}),
]


@pytest.mark.parametrize("case", FLOWCUT_CASES, ids=_case_id)
@pytest.mark.parametrize("name", ["llama", "gemma3", "llama4"])
def test_flowcut_prefill_keeps_the_reference_top(name, case):
    seed, keep, options = case
    model = model_of(name)
    ids = _ids(seed)
    refs = capture(model, ids)
    layers = [2] if name == "gemma3" else list(range(len(refs)))  # sliding-window layers are never compressed
    F = flowcut_prefill_reference(refs, layers, **options)
    sieve = Sieve("flowcut", keep=keep, options=options)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    assert list(cache.sieve_layers) == layers
    for layer in layers:
        (got,) = _kept(cache, layer)
        assert_kept(got, F[layer], PROTECTED, round(keep * T), f"layer {layer}")


@pytest.mark.parametrize(("kernel", "seed", "keep"), [(5, 1, 0.6), (5, 4, 0.3), (4, 4, 0.35)])
def test_flowcut_kernel_pools_within_the_sequence(kernel, seed, keep):
    """With the context from the first token, pooling reaches past the start of the sequence:
    the average there is over the entries inside it (no zero padding). Prompts and keeps put
    token 0 or 1 just above the cut."""
    model = model_of("llama4")
    refs = capture(model, _ids(seed))
    context = tuple(range(0, C1))
    protected = frozenset(range(C1, T))
    F = flowcut_prefill_reference(refs, list(range(len(refs))), kernel=kernel, context=context)
    sieve = Sieve("flowcut", keep=keep, options={"kernel": kernel})
    cache = prefill_cache(model, _prompt(seed, c0=0), sieve, "query_aware").cache
    for layer in cache.sieve_layers:
        (got,) = _kept(cache, layer)
        assert_kept(got, F[layer], protected, round(keep * T), f"layer {layer}")


def test_flowcut_normalise_options_differ():
    """Normalising over the candidates or over every entry keeps different tokens (here, and in the
    reference)."""
    llama4_model = model_of("llama4")
    refs = capture(llama4_model, _ids(1))
    k = round(0.5 * T)
    kept = {}
    for norm in ("candidates", "all"):
        cache = prefill_cache(
            llama4_model, _prompt(1), Sieve("flowcut", keep=0.5, options={"normalise": norm}), "query_aware"
        ).cache
        F = flowcut_prefill_reference(refs, list(cache.sieve_layers), normalise=norm)
        kept[norm] = [_kept(cache, i)[0] for i in cache.sieve_layers]
        assert [top_kept(F[i], PROTECTED, k)[0] for i in cache.sieve_layers] == kept[norm]
    assert kept["candidates"] != kept["all"]


# --------------------------------------------------------------------------------- FlowCut, layer site


def flowcut_layer_reference(ref: Ref, relay: int) -> list[float]:
    """The LLM stage's score of the context tokens: per query head the softmax over the context span
    of q_relay . k_j (scaled), per KV head the softmax over the span of v_relay . v_j / sqrt d, each
    averaged over heads; (rel + sem) * ||mean_hk v_j||_1. Zero outside the span."""
    span = list(CONTEXT)
    rel, sem = [0.0] * T, [0.0] * T
    for h in range(ref.n_heads):
        for j, p in zip(span, softmax([ref.logits[h][relay][j] for j in span])):
            rel[j] += p / ref.n_heads
    for hk in range(ref.n_kv):
        for j, p in zip(span, value_softmax(ref, hk, relay, span)):
            sem[j] += p / ref.n_kv
    l1 = mean_value_l1(ref)
    return [(rel[j] + sem[j]) * l1[j] if j in span else 0.0 for j in range(T)]


@pytest.mark.parametrize(
    ("seed", "keep", "prune_layer"), [(1, 0.25, 2), (2, 0.5, 2), (3, 0.75, 2), (1, 0.5, 3), (2, 0.25, 3)]
)
def test_flowcut_layer_site_keeps_the_reference_top(seed, keep, prune_layer):
    model = model_of("llama4")
    refs = capture(model, _ids(seed))
    sieve = Sieve("flowcut", keep=keep, site="layer", options={"layer": prune_layer})
    pre = prefill_cache(model, _prompt(seed), sieve, "query_aware")
    cache, extra = pre.cache, pre.extra
    n = round(len(CONTEXT) * keep)
    assert extra["stages"] == [{"layer": prune_layer, "context_kept": n, "tokens": n + len(PROTECTED)}]
    # scored at layer K - 1 with the prompt's last token as the relay; nothing of the context is protected
    scores = flowcut_layer_reference(refs[prune_layer - 1], T - 1)
    want, gap = top_kept([scores[j] for j in CONTEXT], frozenset(), n)
    assert gap > 1e-5, f"near-tie at the cut ({gap:.2e})"
    want = {CONTEXT[j] for j in want}
    for layer in range(4):
        (got,) = _kept(cache, layer)
        if layer < prune_layer:
            assert got == set(range(T))
        else:
            assert got & set(CONTEXT) == want, f"layer {layer}: {sorted(got ^ want)}"
            assert PROTECTED <= got


# ------------------------------------------------------------------------------------------- Keyformer


def keyformer_reference(
    ref: Ref, gumbel_rows: list[int], tau: float, noise: torch.Tensor | None
) -> list[list[float]]:
    """Per KV head, f_j = sum over its query heads h and all prompt rows i of G_hi[j], where
    G_hi = softmax_j((x_hij + zeta_hij) / tau) over the keys row i sees for i in ``gumbel_rows``
    (zeta = noise[h, index of i in gumbel_rows, j], or 0) and the plain attention row otherwise."""
    g = ref.n_heads // ref.n_kv
    f = [[0.0] * T for _ in range(ref.n_kv)]
    index = {i: n for n, i in enumerate(sorted(gumbel_rows))}
    for h in range(ref.n_heads):
        for i in range(T):
            seen = [j for j in range(T) if ref.logits[h][i][j] != NEG]
            if i in index:
                z = [0.0] * len(seen) if noise is None else [float(noise[h, index[i], j]) for j in seen]
                row = softmax([(ref.logits[h][i][j] + zj) / tau for j, zj in zip(seen, z)])
            else:
                row = [ref.probs[h][i][j] for j in seen]
            for j, p in zip(seen, row):
                f[h // g][j] += p
    return f


def seeded_gumbel(seed: int, layer: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise keyformer draws for a layer: Gumbel(0, 1) = -log Exp(1), from a generator seeded
    with ``seed * 1000 + layer``, in (head, recorded row, key) order."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    return -torch.log(torch.empty(shape, dtype=torch.float32).exponential_(generator=gen))


KEYFORMER_CASES = [  # (prompt seed, keep, options)
    (1, 0.5, {"noise": False}),
    (2, 0.3, {"noise": False, "tau": 0.5}),
    (1, 0.3, {}),
    (2, 0.5, {}),
    (3, 0.7, {"tau": 2.0}),
    (3, 0.5, {"all_rows": True}),
    (1, 0.7, {"all_rows": True, "tau": 0.7}),
    (2, 0.5, {"all_rows": True, "noise": False, "tau": 1.5}),
]


@pytest.mark.parametrize("case", KEYFORMER_CASES, ids=_case_id)
@pytest.mark.parametrize("name", ["llama", "gemma3", "llama4"])
def test_keyformer_keeps_the_reference_top(name, case):
    seed, keep, options = case
    model = model_of(name)
    refs = capture(model, _ids(seed))
    noise, tau = options.get("noise", True), options.get("tau", 1.0)
    rows = list(range(T)) if options.get("all_rows") else list(RELAYS)
    sieve_seed = 5 + seed
    layers = [2] if name == "gemma3" else list(range(len(refs)))
    f = {}
    for layer in layers:
        ref = refs[layer]
        zeta = seeded_gumbel(sieve_seed, layer, (ref.n_heads, len(rows), T)) if noise else None
        f[layer] = keyformer_reference(ref, rows, tau, zeta)
        if not noise and tau == 1.0:
            # H2O: the attention each key received, summed over every row and the KV head's query heads
            g = ref.n_heads // ref.n_kv
            for hk in range(ref.n_kv):
                h2o = [
                    sum(ref.probs[h][i][j] for h in range(hk * g, (hk + 1) * g) for i in range(T))
                    for j in range(T)
                ]
                assert max(abs(x - y) for x, y in zip(f[layer][hk], h2o)) < 1e-5
    sieve = Sieve("keyformer", keep=keep, seed=sieve_seed, options=options)
    cache = prefill_cache(model, _prompt(seed), sieve, "query_aware").cache
    assert list(cache.sieve_layers) == layers
    for layer in layers:
        got = _kept(cache, layer)
        assert len(got) == refs[layer].n_kv  # one selection per KV head
        for hk, kept in enumerate(got):
            assert_kept(kept, f[layer][hk], PROTECTED, round(keep * T), f"layer {layer} KV head {hk}")
