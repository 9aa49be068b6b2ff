"""The ``layer`` site: drop context tokens from the residual stream between decoder layers.

During the prefill forward pass, right before each *prune layer* ``K_s`` of a method's plan
(:mod:`flowsieve.sieves.layer`), the method scores the tokens still in the stream from what the
layers since the previous prune layer were observed doing, and the lowest-scored context tokens
leave the hidden states. Layers from ``K_s`` on compute on (and cache) the remaining tokens only,
which is what makes the prefill faster. Tokens outside the context (chat template, question) and
the relay tokens are never dropped.

Positions. The kept tokens keep their **original positions**, as FastV's released code does (it
gathers the position ids of the kept tokens instead of renumbering them): every layer applies RoPE
with the tokens' original positions, the cache stores each entry's absolute position, and later
tokens (the question in query-agnostic mode, generated tokens) get absolute positions, because
``cache.get_seq_length()`` counts every token of the prompt. The methods' papers that renumber
positions (FlowCut, TransPrune, PyramidDrop) deviate from this; their docstrings say so.

The cache after a pruned prefill (:class:`LayerSiteCache`) holds, in layers below ``K_1``, every
token; in layers from ``K_s`` on, only the tokens kept at stage ``s``. Each layer therefore has its
own keys, and the masks transformers builds (once per forward, from one layer, assuming contiguous
positions) do not fit. So while a :class:`LayerRuntime` is active every decoder layer gets its own
boolean mask built from the absolute positions of its stored entries and of the incoming tokens
(causal: ``pos_key <= pos_query``; sliding-window layers also ``pos_query - pos_key < window``).
Where that mask is what SDPA does without one (an empty cache and contiguous positions, or one
query that sees every key), no mask is passed, as transformers does. Using a
:class:`LayerSiteCache` outside its runtime raises (its layers need the incoming positions).

Equivalence. Dropping token ``j`` at layer ``K`` is the same, for every token that stays, as
masking ``j`` as a key in every layer ``>= K``: the remaining queries never read ``j``'s keys or
values there, and nothing else of ``j`` reaches them. tests/test_layer_site.py checks the logits
of the last prompt token and of decoded tokens against such a masked full forward.

This is the only module besides :mod:`flowsieve.observe` and :mod:`flowsieve.kvcache` that knows
transformers internals (pinned to 5.24): the decoder layers' forward keywords (``hidden_states``
as first argument, ``attention_mask``, ``position_embeddings`` = ``(cos, sin)`` each (B, q, d),
``position_ids`` (B, q), ``cache``), and the cache-layer protocol.

Batch size 1. Shapes: q tokens of a forward pass, n tokens in the stream at a layer, S stored
entries of a cache layer.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from flowsieve.errors import FlowsieveError
from flowsieve.kvcache import SieveCache, SieveLayer, decoder_config
from flowsieve.observe import Observer, decoder_layers, observe
from flowsieve.sieves.layer import LayerContext, LayerPruner, Stage, check_plan

__all__ = [
    "LayerRuntime",
    "LayerSiteCache",
    "PositionedLayer",
    "attach",
    "plan_stages",
    "positional_mask",
    "prefill_layer_site",
]


# ------------------------------------------------------------------------------------------ cache


class PositionedLayer(SieveLayer):
    """A cache layer whose incoming tokens carry their absolute positions (not necessarily contiguous).

    Before each ``update`` the runtime sets :attr:`incoming` to the positions of the q tokens the
    layer is about to store; ``update`` records them in ``positions`` and sets
    ``cumulative_length`` to (last position + 1), the number of tokens of the sequence so far, also
    when this layer never saw some of them (they were dropped below it). A sliding-window layer then
    forgets the entries no later query can see (``pos <= cumulative - window``); the entries it
    returns for the current step are all of them.

    Attributes:
        sliding_window: the window of a sliding-window layer, None for full attention.
        incoming: (q,) int64 positions for the next update, or None (then ``update`` raises).
    """

    def __init__(self, layer_idx: int, sliding_window: int | None = None) -> None:
        super().__init__(layer_idx=layer_idx)
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.incoming: torch.Tensor | None = None

    def __repr__(self) -> str:
        kind = f"sliding {self.sliding_window}" if self.sliding_window else "full"
        return f"PositionedLayer({kind}, stored={self.stored_length}, seen={self.cumulative_length})"

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append q entries (B, Hk, q, d) at the positions in :attr:`incoming`; return all ``S + q``."""
        inc = self.incoming
        if inc is None:
            raise FlowsieveError(
                "a layer-site cache needs its positional masks: run the forward inside "
                "LayerRuntime.active() (flowsieve.generate.generate and Sieve.on do)"
            )
        q = key_states.shape[-2]
        if inc.numel() != q:
            raise FlowsieveError(f"layer {self.layer_idx}: {q} new entries but {inc.numel()} positions")
        self.incoming = None
        before = self.cumulative_length
        keys, values = super().update(key_states, value_states)
        assert self.positions is not None
        if q:
            self.positions[..., -q:] = inc.to(self.positions.device)
            self.cumulative_length = max(before, int(inc.max()) + 1)
        if self.sliding_window is not None:
            pos = self.positions.reshape(-1)
            old = pos <= self.cumulative_length - self.sliding_window
            if bool(old.any()):
                self.keep(torch.nonzero(~old).reshape(-1))
        return keys, values


class LayerSiteCache(SieveCache):
    """One :class:`PositionedLayer` per decoder layer (full-attention and sliding-window layers).

    Layers may hold different entries (below and above a prune layer). ``get_seq_length()`` is the
    absolute number of tokens seen. Only usable while a :class:`LayerRuntime` for it is active.
    """

    def __init__(self, model_or_config: nn.Module | PreTrainedConfig) -> None:
        config = decoder_config(model_or_config, "LayerSiteCache")
        types, kws = get_layer_types_and_kwargs(config)
        layers: list[Any] = []
        for i, (kind, kw) in enumerate(zip(types, kws, strict=True)):
            if kind == "full_attention":
                layers.append(PositionedLayer(i))
            elif kind == "sliding_attention":
                layers.append(PositionedLayer(i, int(kw["sliding_window"])))
            else:
                raise FlowsieveError(
                    f"the layer site supports full and sliding-window attention, not '{kind}'"
                )
        Cache.__init__(self, layers=layers)
        # per-layer positional masks replace the shared one: no equal-length check (SieveCache.update)
        self._mask_layer = None
        self.layer_types: tuple[str, ...] = tuple(types)

    def __repr__(self) -> str:
        return f"LayerSiteCache(seen={self.get_seq_length()}, stored={self.stored_lengths()})"


def layer_types(model: nn.Module) -> tuple[str, ...]:
    """``"full_attention"`` / ``"sliding_attention"`` / ... per decoder layer of ``model``."""
    cfg = model.config.get_text_config(decoder=True)
    return tuple(get_layer_types_and_kwargs(cfg)[0])


def positional_mask(layer: PositionedLayer, qpos: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of ``q`` incoming tokens at positions ``qpos`` (q,) over this layer's keys.

    Returns bool (1, 1, q, S + q) (keys: the S stored entries, then the q new ones): key j is
    visible to query i iff ``pos_j <= pos_i`` and, on a sliding-window layer, ``pos_i - pos_j <
    window``. None where SDPA without a mask does exactly that: an empty layer and increasing
    positions that fit in the window (plain causal over q == keys), or one query that sees every key.
    """
    q = int(qpos.numel())
    stored = (
        layer.positions.reshape(-1)
        if layer.is_initialized and layer.positions is not None
        else qpos.new_empty(0)
    )
    W = layer.sliding_window
    if stored.numel() == 0 and q > 0:
        increasing = q == 1 or bool((qpos[1:] > qpos[:-1]).all())
        if increasing and (W is None or int(qpos[-1] - qpos[0]) < W):
            return None
    kpos = torch.cat([stored.to(qpos.device), qpos])
    allowed = kpos[None, :] <= qpos[:, None]
    if W is not None:
        allowed &= (qpos[:, None] - kpos[None, :]) < W
    if q == 1 and bool(allowed.all()):
        return None
    return allowed[None, None]


# ---------------------------------------------------------------------------------------- pruning


@dataclass
class _Prune:
    """The pruning of one prefill forward. Token sets are bool over the forward's q tokens."""

    scorer: LayerPruner
    plan: list[Stage]
    targets: list[int]  # context tokens kept from each prune layer on
    protect: torch.Tensor  # never dropped: non-context and relay tokens
    context: torch.Tensor
    relay: torch.Tensor  # (r,) forward indices, ascending
    relay_all: bool  # record every relay row (else the last one)
    types: tuple[str, ...]
    n_heads: int
    n_kv_heads: int
    obs: Observer | None = None
    carry: torch.Tensor | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    score_s: float = 0.0

    def rows(self, stream: torch.Tensor | None) -> tuple[int, ...]:
        """Stream indices of the relay tokens whose attention rows are recorded."""
        relay = self.relay if self.relay_all else self.relay[-1:]
        if stream is None:
            return tuple(int(p) for p in relay)
        return tuple(int(p) for p in torch.searchsorted(stream, relay))

    def select(self, stage: int, stream: torch.Tensor) -> torch.Tensor:
        """Indices into the stream (n,) of the tokens that stay before prune layer ``plan[stage]``."""
        assert self.obs is not None
        K = self.plan[stage][0]
        prev = self.plan[stage - 1][0] if stage else 0
        n = int(stream.numel())
        cand = ~self.protect[stream]
        relay = tuple(int(p) for p in torch.searchsorted(stream, self.relay))
        seen = {j: self.obs.layers[j] for j in range(prev, K) if j in self.obs.layers}
        ctx = LayerContext(
            layer=K,
            stage=stage,
            prev_layer=prev,
            n_layers=len(self.types),
            layer_types=self.types,
            relay=relay,
            candidates=cand,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            plan=tuple(self.plan),
        )
        t0 = time.perf_counter()
        scores, carry = self.scorer.layer_score(seen, ctx, self.carry)
        if scores.shape[-1] != n or scores.dim() != 2 or scores.shape[0] != 1:
            raise FlowsieveError(f"layer site: scores of shape {tuple(scores.shape)}, expected (1, {n})")
        n_ctx = int(self.context[stream].sum())
        drop = n_ctx - self.targets[stage]
        if drop > 0:
            s = torch.nan_to_num(scores[0].float(), nan=float("-inf"))
            s = torch.where(cand, s, torch.finfo(s.dtype).max)
            keep = s.topk(n - drop).indices.sort().values
        else:
            keep = torch.arange(n, device=stream.device)
        self.score_s += time.perf_counter() - t0
        self.carry = None if carry is None else carry[..., keep]
        self.stages.append(
            {"layer": K, "context_kept": int(self.context[stream[keep]].sum()), "tokens": int(keep.numel())}
        )
        return keep


# ---------------------------------------------------------------------------------------- runtime


class LayerRuntime:
    """Per-layer positional masks (and, during a pruned prefill, the pruning) for one cache.

    Inside :meth:`active`, every forward pass of ``model`` that uses ``cache`` gets, at every
    decoder layer, the absolute positions of the tokens still in the stream (RoPE, the cache
    entries) and a mask built from them (:func:`positional_mask`). While :attr:`prune` is set, the
    stream loses tokens at its prune layers. Forward passes with another cache pass through.
    """

    def __init__(self, model: nn.Module, cache: LayerSiteCache) -> None:
        self.model = model
        self.cache = cache
        self.layers = decoder_layers(model)
        if len(self.layers) != len(cache.layers):
            raise FlowsieveError(f"the model has {len(self.layers)} layers, the cache {len(cache.layers)}")
        self.prune: _Prune | None = None
        self._positions: torch.Tensor | None = None  # (q,) absolute positions of the forward's tokens
        self._stream: torch.Tensor | None = None  # forward indices of the tokens in the stream (None = all)
        self._stage = 0
        # masks of layers with an empty cache depend only on the stream and the window: built once
        # per stage and window in a forward pass (as transformers builds one mask per layer type)
        self._masks: dict[tuple[int, int | None], torch.Tensor | None] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator[LayerRuntime]:
        """Install the per-layer hooks; they are always removed on exit."""
        handles = [
            layer.register_forward_pre_hook(functools.partial(self._pre, i), with_kwargs=True)
            for i, layer in enumerate(self.layers)
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def _pre(self, i: int, mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not self.cache:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        if i == 0:
            pid = kwargs.get("position_ids")
            if pid is None:
                raise FlowsieveError("the layer site needs the position ids the model passes to its layers")
            if h.shape[0] != 1 or pid.shape[0] != 1:
                raise FlowsieveError("the layer site runs one sequence at a time (batch size 1)")
            self._positions = pid[0].to(torch.long)
            self._stream = None
            self._stage = 0
            self._masks = {}
            if self.prune is not None and self.prune.obs is not None:
                self.prune.obs.spec.rows = self.prune.rows(None)
        assert self._positions is not None
        pr = self.prune
        if pr is not None and self._stage < len(pr.plan) and pr.plan[self._stage][0] == i:
            stream = self._stream if self._stream is not None else torch.arange(h.shape[1], device=h.device)
            keep = pr.select(self._stage, stream)
            self._stage += 1
            if keep.numel() < stream.numel():
                h = h.index_select(1, keep.to(h.device))
                self._stream = stream[keep]
                assert pr.obs is not None
                pr.obs.spec.rows = pr.rows(self._stream)
        pos = self._positions
        if self._stream is not None:
            idx = self._stream.to(self._positions.device)
            pos = self._positions[idx]
            if kwargs.get("position_embeddings") is None:
                raise FlowsieveError(
                    "the layer site needs the (cos, sin) position embeddings the model passes"
                )
            cos, sin = kwargs["position_embeddings"]
            kwargs["position_embeddings"] = (cos.index_select(1, idx), sin.index_select(1, idx))
            kwargs["position_ids"] = pos[None]
        layer = self.cache.layers[i]
        assert isinstance(layer, PositionedLayer)
        if layer.stored_length == 0:
            key = (self._stage, layer.sliding_window)
            if key not in self._masks:
                self._masks[key] = positional_mask(layer, pos)
            kwargs["attention_mask"] = self._masks[key]
        else:
            kwargs["attention_mask"] = positional_mask(layer, pos)
        layer.incoming = pos
        if args:
            args = (h, *args[1:])
        else:
            kwargs["hidden_states"] = h
        return args, kwargs


def _head_counts(model: nn.Module) -> tuple[int, int]:
    cfg = model.config.get_text_config(decoder=True)
    return cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def plan_stages(
    scorer: LayerPruner, keep: float, types: Sequence[str], n_context: int, n_protected_context: int
) -> tuple[list[Stage], list[int]]:
    """A method's validated plan for a model with these layer types, and the context tokens kept per stage.

    Raises FlowsieveError for a prune layer outside ``[1, n_layers)``, a scoring layer that did not
    run on the stream of its stage, or a final count below the context tokens that must stay.
    """
    if n_context < 1:
        raise FlowsieveError("the layer site needs a context span to prune (it is empty)")
    plan = check_plan(scorer.layer_plan(len(types), keep), len(types))
    if plan[-1][1] != keep:
        raise FlowsieveError(f"the plan of '{scorer.name}' ends at share {plan[-1][1]}, not keep = {keep}")
    for s, (sl, (K, _)) in enumerate(zip(scorer.score_layers(plan, types), plan, strict=True)):
        prev = plan[s - 1][0] if s else 0
        if not prev <= sl < K:
            raise FlowsieveError(
                f"prune layer {K} would be scored at layer {sl}, which ran before the previous prune "
                f"layer {prev} (no full-attention layer in between); choose other prune layers"
            )
    targets = [round(n_context * share) for _, share in plan]
    if targets[-1] < n_protected_context:
        raise FlowsieveError(
            f"keep {keep} leaves {targets[-1]} context tokens, fewer than the {n_protected_context} "
            f"that must stay (the relay window); use a larger keep or a smaller window"
        )
    return plan, targets


def _prune_for(
    model: nn.Module, sieve: Any, types: tuple[str, ...], context: torch.Tensor, relay: torch.Tensor
) -> tuple[_Prune, Any]:
    """The pruning state and observation spec of one prefill of ``context.numel()`` tokens."""
    scorer = sieve.scorer
    if not isinstance(scorer, LayerPruner) or "layer" not in scorer.sites:
        raise FlowsieveError(f"method '{sieve.method}' does not support the layer site")
    if sieve.keep is None:
        raise FlowsieveError("the layer site takes keep (a share of the context), not a token budget")
    if sieve.chunk is not None:
        raise FlowsieveError("the layer site prunes one whole prefill pass; chunked prefill is not supported")
    scorer.check_layer_options()
    protect = ~context.clone()
    protect[relay] = True
    plan, targets = plan_stages(scorer, sieve.keep, types, int(context.sum()), int((context & protect).sum()))
    spec = scorer.layer_observe(plan, types)
    spec.slots = True
    n_heads, n_kv = _head_counts(model)
    prune = _Prune(
        scorer=scorer,
        plan=plan,
        targets=targets,
        protect=protect,
        context=context,
        relay=relay,
        relay_all=getattr(scorer, "relay_all", False),
        types=types,
        n_heads=n_heads,
        n_kv_heads=n_kv,
    )
    spec.rows = prune.rows(None)
    return prune, spec


@torch.inference_mode()
def prefill_layer_site(
    model: nn.Module, prompt: Any, sieve: Any, mode: str
) -> tuple[LayerSiteCache, torch.Tensor, dict]:
    """Prefill ``prompt`` while dropping context tokens inside the model (the ``layer`` site).

    Args:
        prompt: a :class:`flowsieve.generate.Prompt` (ids, context span, split).
        sieve: a :class:`flowsieve.sieve.Sieve` at the ``layer`` site.
        mode: ``"query_aware"``: the whole prompt is prefilled and pruned; the relay is the
            question span (question, instruction, template: :meth:`Sieve.observation_rows`), or the
            last ``window`` tokens when there is no question or ``rows="window"``. ``"query_agnostic"``: the prompt up to the end
            of the context is prefilled and pruned (relay: its last ``window`` tokens, which stay),
            then the rest is appended on top of the pruned cache.

    Returns:
        (cache, logits of the last prompt position (1, 1, V), extra) with ``extra["layer_runtime"]``
        the :class:`LayerRuntime` that later forward passes on this cache must run inside, and
        ``extra["stages"]``: per prune layer, the context tokens kept and the tokens in the stream.
    """
    ids = list(prompt.ids)
    head, tail = (ids[: prompt.split], ids[prompt.split :]) if mode == "query_agnostic" else (ids, [])
    T = len(head)
    c0, c1 = prompt.context
    context = torch.zeros(T, dtype=torch.bool)
    context[c0 : min(c1, T)] = True
    # the question span (query-aware) or the last ``window`` tokens, as at the prefill site
    relay = torch.tensor(sieve.observation_rows(T, prompt.question if mode == "query_aware" else None))
    types = layer_types(model)
    prune, spec = _prune_for(model, sieve, types, context, relay)
    cache = LayerSiteCache(model)
    runtime = LayerRuntime(model, cache)
    runtime.prune = prune
    t0 = time.perf_counter()
    with observe(model, spec) as obs, runtime.active():
        prune.obs = obs
        logits = model(input_ids=torch.tensor([head]), cache=cache, use_cache=True, logits_to_keep=1).logits
    runtime.prune = None
    t1 = time.perf_counter()
    if len(prune.stages) != len(prune.plan):
        raise FlowsieveError(f"layer site: {len(prune.stages)} of {len(prune.plan)} prune layers ran")
    kept = prune.stages[-1]["tokens"]  # tokens in the stream after the last prune layer
    if tail:
        with runtime.active():
            logits = model(
                input_ids=torch.tensor([tail]), cache=cache, use_cache=True, logits_to_keep=1
            ).logits
    extra = {
        "kept_entries": kept + len(tail),
        "compressed_tokens": T,
        "context_tokens": int(context.sum()),
        "protected": int(prune.protect.sum()),
        "stages": prune.stages,
        "prefill_forward_s": round(t1 - t0 - prune.score_s, 4),
        "score_s": round(prune.score_s, 4),
        "layer_runtime": runtime,
    }
    return cache, logits, extra


@contextlib.contextmanager
def attach(model: nn.Module, sieve: Any, protect_last: int = 0) -> Iterator[None]:
    """Apply a layer-site sieve to every ``model(...)`` / ``model.generate(...)`` call inside the block.

    A prefill call (no cache, or an empty one) gets a :class:`LayerSiteCache` and is pruned: the
    last ``protect_last`` tokens (e.g. the question and the chat template after it) are not context
    and stay; the last ``window`` tokens are the relay and stay; ``keep`` is the share of the other
    tokens (the context) that stays. Later calls on that cache run with its positional masks. Batch size 1;
    hooks are always removed on exit.
    """
    types = layer_types(model)
    state: dict[str, Any] = {}

    def close_runtime() -> None:
        for key in ("obs_cm", "runtime_cm"):
            cm = state.pop(key, None)
            if cm is not None:
                cm.__exit__(None, None, None)

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise FlowsieveError("the layer site needs input_ids")
        if ids.shape[0] != 1:
            raise FlowsieveError("the layer site runs one sequence at a time (batch size 1)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            close_runtime()
            T = int(ids.shape[1])
            context = torch.ones(T, dtype=torch.bool)
            context[T - min(protect_last, T) :] = False
            question = (T - min(protect_last, T), T) if protect_last > 0 else None
            relay = torch.tensor(sieve.observation_rows(T, question))
            prune, spec = _prune_for(model, sieve, types, context, relay)
            new = LayerSiteCache(model)
            runtime = LayerRuntime(model, new)
            runtime.prune = prune
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = new
            kwargs["use_cache"] = True
            obs_cm = observe(model, spec)
            prune.obs = obs_cm.__enter__()
            runtime_cm = runtime.active()
            runtime_cm.__enter__()
            state.update(obs_cm=obs_cm, runtime_cm=runtime_cm, runtime=runtime, prefill=True)
        return args, kwargs

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if state.pop("prefill", False):
            cm = state.pop("obs_cm")
            cm.__exit__(None, None, None)
            state["runtime"].prune = None

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
        close_runtime()
