"""The ``layer`` site: context tokens leave the residual stream inside the model during prefill.

Tiny random Llama (4 full-attention layers) and Gemma-3 (6 layers, sliding-window and full
attention alternating, window 8 < prompt length) configs built in code. The reference for every
pruned run is a full forward pass with explicit per-layer masks in which, from each prune layer on,
the dropped tokens are hidden as keys from every other query (their own rows are then irrelevant).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from flowsieve.errors import FlowsieveError
from flowsieve.generate import generate
from flowsieve.inputs import Prompt
from flowsieve.methods import METHODS
from flowsieve.methods.layer import check_plan, merge_stages
from flowsieve.observe import decoder_layers
from flowsieve.sieve import Sieve
from flowsieve.sites.base import Prefilled
from flowsieve.sites.layer import LayerSite
from flowsieve.stream import LayerRuntime, LayerSiteCache, positional_mask

LAYER_METHODS = sorted(n for n, c in METHODS.items() if "layer" in c.sites)
T, C0, C1, Q0 = 48, 3, 36, 38  # prompt length, context span [C0, C1), question from Q0


def llama4():
    return tiny_llama(0, layers=4)


def gemma6():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 3,
        attn_implementation="sdpa",
    )
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {"llama": llama4, "gemma3": gemma6}
# Gemma: every prune layer needs a full-attention layer (1, 3, 5) between it and the previous one
OPTIONS = {
    "llama": {"fastv": {}, "flowcut": {}, "transprune": {}, "pyramid": {}},
    "gemma3": {
        "fastv": {},
        "flowcut": {},
        "transprune": {"prune_layers": [2, 4]},
        "pyramid": {"prune_layers": [2, 4]},
    },
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def family(request):
    return request.param, MODELS[request.param]()


def _ids(n: int = T, seed: int = 1) -> list[int]:
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _prompt(ids: list[int] | None = None) -> Prompt:
    ids = ids or _ids()
    return Prompt(ids=tuple(ids), context=(C0, C1), question=(Q0, len(ids)), split=C1)


def _sieve(fam: str, method: str, keep: float, **kw) -> Sieve:
    return Sieve(method, keep=keep, site="layer", window=4, options=OPTIONS[fam][method], **kw)


def _types(model) -> list[str]:
    cfg = model.config
    return list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


def _kept_per_stage(model, cache: LayerSiteCache, plan: list[tuple[int, float]]) -> list[set[int]]:
    """Positions in the stream from each prune layer on, read from a full-attention layer of that stage."""
    types = _types(model)
    bounds = [K for K, _ in plan] + [len(types)]
    out = []
    for s in range(len(plan)):
        full = [i for i in range(bounds[s], bounds[s + 1]) if types[i] == "full_attention"]
        assert full, "each stage of these configs has a full-attention layer"
        out.append(set(cache.layer(full[0]).positions.reshape(-1).tolist()))
    return out


def _plan(model, sieve: Sieve) -> list[tuple[int, float]]:
    return check_plan(sieve.scorer.layer_plan(model.config.num_hidden_layers, sieve.keep), 100)


@torch.inference_mode()
def masked_logits(model, ids: list[int], dropped: list[tuple[int, set[int]]]) -> torch.Tensor:
    """Logits (len(ids), V) of a full forward where, at every layer >= K, the positions dropped at K
    are hidden as keys from every query but their own (sliding layers keep their window)."""
    types = _types(model)
    W = model.config.sliding_window if hasattr(model.config, "sliding_window") else None
    n = len(ids)
    pos = torch.arange(n)
    eye = torch.eye(n, dtype=torch.bool)

    def mask(i: int) -> torch.Tensor:
        m = pos[None, :] <= pos[:, None]
        if types[i] == "sliding_attention":
            m &= (pos[:, None] - pos[None, :]) < W
        hidden = torch.zeros(n, dtype=torch.bool)
        for K, d in dropped:
            if i >= K and d:
                hidden[sorted(d)] = True
        return (m & (~hidden[None, :] | eye))[None, None]

    def hook(i):
        return lambda mod, args, kwargs: (args, {**kwargs, "attention_mask": mask(i)})

    handles = [
        layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _greedy(model, pre: Prefilled, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    cache = pre.cache
    toks, outs = [], [pre.logits[0, -1]]
    with pre.decoding():
        for _ in range(steps):
            toks.append(int(outs[-1].argmax()))
            outs.append(
                model(input_ids=torch.tensor([[toks[-1]]]), cache=cache, use_cache=True).logits[0, -1]
            )
    return toks, outs


# --------------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_keep_one_reproduces_the_model(family, method, char_tok):
    """keep = 1: the same last-position logits (<= 1e-5) and greedy tokens as the plain model."""
    fam, model = family
    p = _prompt()
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([p.ids])).logits[0, -1]
    for mode in ("query_aware", "query_agnostic"):
        pre = LayerSite().prefill(model, p, _sieve(fam, method, 1.0), mode)
        torch.testing.assert_close(pre.logits[0, -1], ref, atol=1e-5, rtol=0)
        assert all(st["context_kept"] == C1 - C0 for st in pre.extra["stages"])
        types = _types(model)
        assert all(n == T for n, t in zip(pre.cache.stored_lengths(), types) if t == "full_attention")
    ctx = "the quick brown fox jumps over the lazy dog " * 2
    plain = generate(model, char_tok, ctx, "what jumps?", chat=False, max_new_tokens=6, instruction=None)
    same = generate(
        model,
        char_tok,
        ctx,
        "what jumps?",
        chat=False,
        max_new_tokens=6,
        instruction=None,
        sieve=_sieve(fam, method, 1.0),
    )
    assert same.token_ids == plain.token_ids
    assert same.kept_tokens == plain.prompt_tokens


# --------------------------------------------------------------------------------- counts, positions


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_kept_counts_positions_and_protected_tokens(family, method, keep):
    fam, model = family
    p = _prompt()
    sieve = _sieve(fam, method, keep)
    plan = _plan(model, sieve)
    pre = LayerSite().prefill(model, p, sieve, "query_aware")
    cache, extra = pre.cache, pre.extra
    n = C1 - C0
    targets = [round(n * share) for _, share in plan]
    assert targets[-1] == round(n * keep)  # the last stage keeps `keep` of the context
    assert [st["layer"] for st in extra["stages"]] == [K for K, _ in plan]
    assert [st["context_kept"] for st in extra["stages"]] == targets
    assert [st["tokens"] for st in extra["stages"]] == [t + T - n for t in targets]
    assert pre.kept == targets[-1] + T - n
    kept = _kept_per_stage(model, cache, plan)
    non_context = set(range(C0)) | set(range(C1, T))
    types = _types(model)
    W = getattr(model.config, "sliding_window", None)
    for s, ks in enumerate(kept):
        assert non_context <= ks  # template and question untouched
        assert len(ks - non_context) == targets[s]
        if s:
            assert ks <= kept[s - 1]  # nested: a dropped token never comes back
    bounds = [0] + [K for K, _ in plan] + [len(types)]
    for i, layer in enumerate(cache.layers):
        assert layer.cumulative_length == T  # absolute: the next token gets position T
        stage = max(s for s in range(len(bounds) - 1) if bounds[s] <= i)
        want = set(range(T)) if stage == 0 else kept[stage - 1]
        if types[i] == "sliding_attention":
            want = {q for q in want if q > T - W}  # what later queries can still see
        got = layer.positions.reshape(-1).tolist()
        assert got == sorted(want), f"layer {i}"
        assert layer.keys.shape[2] == len(want)


def test_kv_bytes_and_generate_result(family, char_tok):
    fam, model = family
    ctx = "the quick brown fox jumps over the lazy dog. " * 2
    r = generate(
        model,
        char_tok,
        ctx,
        "what jumps?",
        chat=False,
        max_new_tokens=4,
        instruction=None,
        sieve=_sieve(fam, "fastv", 0.25),
    )
    n = len(ctx.strip())
    assert r.extra["context_tokens"] == n
    assert r.extra["stages"] == [{"layer": 2, "context_kept": round(n * 0.25), "tokens": r.kept_tokens}]
    assert r.kept_tokens == r.prompt_tokens - n + round(n * 0.25)
    assert r.kv_bytes < r.kv_bytes_full
    assert r.prefill_s > 0 and r.new_tokens == 4
    assert "layer_runtime" not in r.extra


# ----------------------------------------------------------------------------- masked reference


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_prefill_and_decode_match_the_masked_reference(family, method):
    """Dropping a token at layer K == hiding it as a key at every layer >= K: the last prompt
    position's logits and 4 greedy decode steps agree with the masked full forward (<= 1e-5)."""
    fam, model = family
    p = _prompt()
    sieve = _sieve(fam, method, 0.25)
    plan = _plan(model, sieve)
    pre = LayerSite().prefill(model, p, sieve, "query_aware")
    cache = pre.cache
    kept = _kept_per_stage(model, cache, plan)
    dropped = [(K, set(range(T)) - ks) for (K, _), ks in zip(plan, kept)]
    assert dropped[-1][1]  # something was dropped
    toks, outs = _greedy(model, pre, 4)
    ref = masked_logits(model, list(p.ids) + toks[:-1], dropped)
    for j, out in enumerate(outs[:-1]):
        torch.testing.assert_close(out, ref[T - 1 + j], atol=1e-5, rtol=0)
    # and the reference really differs from the unpruned model (the test can fail)
    plain = masked_logits(model, list(p.ids), [])
    assert (plain[T - 1] - ref[T - 1]).abs().max() > 1e-3
    # the pruned cache keeps working past the sliding window of the Gemma config
    assert cache.get_seq_length() == T + 4


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_query_agnostic_tail_matches_the_masked_reference(family, method):
    """The context-only prefix is pruned, then the question is appended as one chunk on top of a
    cache whose layers hold different tokens (per-layer positional masks)."""
    fam, model = family
    p = _prompt()
    sieve = _sieve(fam, method, 0.5)
    plan = _plan(model, sieve)
    pre = LayerSite().prefill(model, p, sieve, "query_agnostic")
    cache, logits, extra = pre.cache, pre.logits, pre.extra
    head = C1  # the split
    kept = _kept_per_stage(model, cache, plan)
    assert all(set(range(C1 - 4, C1)) <= ks for ks in kept)  # the relay window stays
    assert all(set(range(C1, T)) <= ks for ks in kept)  # the question was appended everywhere
    dropped = [(K, set(range(head)) - ks) for (K, _), ks in zip(plan, kept)]
    assert all(
        st["context_kept"] == round((C1 - C0) * share) for st, (_, share) in zip(extra["stages"], plan)
    )
    ref = masked_logits(model, list(p.ids), dropped)
    torch.testing.assert_close(logits[0, -1], ref[T - 1], atol=1e-5, rtol=0)
    assert pre.kept == extra["stages"][-1]["tokens"] + (T - head)


# ---------------------------------------------------------------------------------- method rules


@pytest.mark.parametrize("method", ["fastv", "pyramid"])
def test_first_stage_keeps_the_top_of_the_last_row(family, method):
    """FastV (and PyramidDrop's first stage): the kept context tokens are the top of the last
    token's head-mean attention at the scoring layer, computed here with eager attention."""
    fam, model = family
    p = _prompt()
    sieve = _sieve(fam, method, 0.25)
    plan = _plan(model, sieve)
    cache = LayerSite().prefill(model, p, sieve, "query_aware").cache
    K, share = plan[0]
    types = _types(model)
    sl = max(j for j in range(K) if types[j] == "full_attention")
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            att = model(input_ids=torch.tensor([p.ids]), output_attentions=True).attentions[sl]
    finally:
        model.set_attn_implementation("sdpa")
    row = att[0, :, -1, C0:C1].mean(0)
    top = set((row.topk(round((C1 - C0) * share)).indices + C0).tolist())
    kept = _kept_per_stage(model, cache, plan)[0]
    assert kept - set(range(C0)) - set(range(C1, T)) == top


def test_plans_follow_the_papers():
    from flowsieve.methods.pyramid import PyramidScorer
    from flowsieve.methods.transprune import TransPruneScorer

    # PyramidDrop on a 32-layer model: lambda = 0.5 at layers 8/16/24 for keep 0.125
    assert PyramidScorer().layer_plan(32, 0.125) == [(8, 0.5), (16, 0.25), (24, 0.125)]
    # TransPrune: layers 7/9/12, ratios 0.875/0.625/0.125
    got = TransPruneScorer().layer_plan(32, 0.125)
    assert [k for k, _ in got] == [7, 9, 12]
    assert [round(s, 6) for _, s in got] == [0.875, 0.625, 0.125]
    assert TransPruneScorer().layer_plan(2, 0.3)[-1] == (1, 0.3)  # collapsed onto the only layer
    assert merge_stages([(1, 0.9), (1, 0.5), (2, 0.4)]) == [(1, 0.5), (2, 0.4)]


# ----------------------------------------------------------------------------------- bad input


def test_bad_input(family):
    _, model = family
    p = _prompt()
    L = model.config.num_hidden_layers
    with pytest.raises(FlowsieveError, match="does not support site"):
        Sieve("fastv", keep=0.5)  # the default site is prefill
    with pytest.raises(FlowsieveError, match="does not support site"):
        Sieve("h2o", keep=0.5, site="layer")
    for keep in (0, -0.1, 1.5):
        with pytest.raises(FlowsieveError, match="keep must be in"):
            Sieve("fastv", keep=keep, site="layer")
    with pytest.raises(FlowsieveError, match="layer must be an integer >= 1"):
        Sieve("fastv", keep=0.5, site="layer", options={"layer": 0})
    for opts in ({"layer": L}, {"layer": L + 3}):
        with pytest.raises(FlowsieveError, match="outside"):
            LayerSite().prefill(model, p, Sieve("fastv", keep=0.5, site="layer", options=opts), "query_aware")
    with pytest.raises(FlowsieveError, match="outside"):
        s = Sieve("transprune", keep=0.5, site="layer", options={"prune_layers": [1, L]})
        LayerSite().prefill(model, p, s, "query_aware")
    with pytest.raises(FlowsieveError, match="prune_layers must increase"):
        Sieve("pyramid", keep=0.5, site="layer", options={"prune_layers": [2, 2]})
    with pytest.raises(FlowsieveError, match="budget"):
        Sieve("fastv", budget=10, site="layer")
    with pytest.raises(FlowsieveError, match="not a token budget"):  # a prefill-site sieve's budget
        LayerSite().prefill(model, p, Sieve("flowcut", budget=10), "query_aware")
    with pytest.raises(FlowsieveError, match="chunk"):
        Sieve("fastv", keep=0.5, site="layer", chunk=64)
    for opts in ({"schedule": "linear"}, {"ratio": 0.3}, {"stage_weights": [1, 0.5]}, {"kernel": 7}):
        with pytest.raises(FlowsieveError, match="prefill site only"):
            Sieve("pyramid", keep=0.5, site="layer", options=opts)
    Sieve("pyramid", keep=0.5, options={"schedule": "linear", "kernel": 7})  # fine at the prefill site
    with pytest.raises(FlowsieveError, match="relay window"):  # window of 30 > what keep leaves
        LayerSite().prefill(model, p, Sieve("fastv", keep=0.1, site="layer", window=30), "query_agnostic")
    cache = LayerSiteCache(model)
    with pytest.raises(FlowsieveError, match="batch size 1"), LayerRuntime(model, cache).active():
        with torch.inference_mode():
            model(input_ids=torch.tensor([_ids(8), _ids(8, 2)]), cache=cache, use_cache=True)


def test_sliding_only_below_the_prune_layer_is_refused():
    """conftest's Gemma-3 has sliding layers 0-1 and a full layer 2: nothing can score before layer 2."""
    from conftest import tiny_gemma3

    model = tiny_gemma3()
    with pytest.raises(FlowsieveError, match="no full-attention layer below prune layer 2"):
        LayerSite().prefill(model, _prompt(), Sieve("fastv", keep=0.5, site="layer"), "query_aware")
    # and a stage scored before the previous prune layer is refused too
    with pytest.raises(FlowsieveError, match="ran before the previous prune layer"):
        s = Sieve("pyramid", keep=0.5, site="layer", options={"prune_layers": [2, 3]})
        LayerSite().prefill(gemma6(), _prompt(), s, "query_aware")


def test_cache_refuses_to_run_without_its_masks(family):
    fam, model = family
    p = _prompt()
    cache = LayerSite().prefill(model, p, _sieve(fam, "fastv", 0.5), "query_aware").cache
    with pytest.raises(FlowsieveError, match="positional masks"), torch.inference_mode():
        model(input_ids=torch.tensor([[5]]), cache=cache, use_cache=True)


def test_positional_mask_shapes():
    from flowsieve.stream import PositionedLayer

    layer = PositionedLayer(0)
    assert positional_mask(layer, torch.arange(5)) is None  # empty + contiguous: SDPA's causal
    m = positional_mask(layer, torch.tensor([0, 2, 7]))
    assert m is None  # still causal by index: keys == queries in the same order
    sl = PositionedLayer(0, sliding_window=3)
    m = positional_mask(sl, torch.tensor([0, 2, 7]))
    assert m is not None and m[0, 0].tolist() == [
        [True, False, False],
        [True, True, False],
        [False, False, True],
    ]
    k = torch.zeros(1, 1, 3, 2)
    sl.incoming = torch.tensor([0, 2, 7])
    sl.update(k, k)
    assert sl.positions.reshape(-1).tolist() == [7] and sl.cumulative_length == 8
    assert positional_mask(sl, torch.tensor([9])) is None  # 9 - 7 < 3: one query that sees all
    m = positional_mask(sl, torch.tensor([10]))
    assert m is not None and m[0, 0].tolist() == [[False, True]]  # 10 - 7 >= 3: out of the window


# ----------------------------------------------------------------------------------- wiring


@pytest.mark.parametrize("method", ["fastv", "transprune"])
def test_sieve_on_with_model_generate(family, method):
    """`with Sieve(..., site="layer").on(model, protect_last=q): model.generate(...)`: keep = 1 gives
    plain generate's tokens; keep = 0.5 gives the tokens of the same pruning run by hand."""
    from transformers import GenerationConfig

    fam, model = family
    ids = _ids()
    q = T - C1  # the question tail: not context
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    x = torch.tensor([ids])
    plain = model.generate(x, generation_config=cfg)
    with Sieve(method, keep=1.0, site="layer", window=q, options=OPTIONS[fam][method]).on(
        model, protect_last=q
    ):
        same = model.generate(x, generation_config=cfg)
    assert torch.equal(same, plain)
    sieve = Sieve(method, keep=0.5, site="layer", window=q, options=OPTIONS[fam][method])
    with sieve.on(model, protect_last=q):
        out = model.generate(
            x,
            generation_config=GenerationConfig(
                max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True
            ),
        )
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.get_seq_length() == T + 3
    assert cache.stored_lengths()[-1] < T + 3  # the last layer sees the pruned prompt
    p = Prompt(ids=tuple(ids), context=(0, C1), question=(C1, T), split=C1)
    pre = LayerSite().prefill(model, p, sieve, "query_aware")
    c2 = pre.cache
    toks, outs = _greedy(model, pre, 3)  # generate: 3 steps after prefill
    assert out.sequences[0, T:].tolist() == [*toks, int(outs[-1].argmax())]
    assert cache.stored_lengths() == c2.stored_lengths()
    # hooks are gone: a plain forward afterwards is the plain model
    with torch.inference_mode():
        assert torch.equal(model.generate(x, generation_config=cfg), plain)


def test_cli_generate_at_the_layer_site(monkeypatch, capsys, char_tok):
    import json

    import flowsieve.models
    from flowsieve.cli import main

    model = llama4()
    monkeypatch.setattr(flowsieve.models, "load", lambda *a, **k: (model, char_tok))
    ctx = "the quick brown fox jumps over the lazy dog. " * 2
    argv = ["generate", "--prompt", ctx, "--question", "what jumps?", "--no-chat", "--json"]
    argv += ["--sieve", "fastv", "--site", "layer", "--keep", "0.5", "--max-new-tokens", "3"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["site"] == "layer" and out["sieve"] == "fastv"
    n = len(ctx.strip())
    assert out["extra"]["stages"] == [
        {"layer": 2, "context_kept": round(n * 0.5), "tokens": out["kept_tokens"]}
    ]
    assert out["kv_bytes"] < out["kv_bytes_full"]
