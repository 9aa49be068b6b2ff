"""Positioned cache layers and the stream runtime: what the ``layer`` site needs from transformers.

At the layer site (:mod:`flowsieve.sites.layer`) context tokens leave the residual stream between
decoder layers, so each cache layer holds its own tokens with their original positions
(:class:`PositionedLayer`, :class:`LayerSiteCache`). The masks transformers builds (once per
forward, from one layer, assuming contiguous positions) do not fit such a cache, so while a
:class:`LayerRuntime` is active every decoder layer gets its own boolean mask built from the
absolute positions of its stored entries and of the incoming tokens (causal: ``pos_key <=
pos_query``; sliding-window layers also ``pos_query - pos_key < window``). Where that mask is what
SDPA does without one (an empty cache and contiguous positions, or one query that sees every key),
no mask is passed, as transformers does. Using a :class:`LayerSiteCache` outside its runtime
raises (its layers need the incoming positions).

While the runtime has a :class:`Pruning` (the layer site's plan), the stream loses tokens at its
prune layers: the pruning picks the tokens that stay, the runtime gathers the hidden states, the
(cos, sin) position embeddings and the position ids of those tokens.

Together with :mod:`flowsieve.observe`, :mod:`flowsieve.kvcache` and :mod:`flowsieve.models`, the
only module that knows transformers internals (pinned to 5.24): the decoder layers' forward
keywords (``hidden_states`` as first argument, ``attention_mask``, ``position_embeddings`` =
``(cos, sin)`` each (B, q, d), ``position_ids`` (B, q), ``cache``), and the cache-layer protocol.

Batch size 1. Shapes: q tokens of a forward pass, n tokens in the stream at a layer, S stored
entries of a cache layer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from flowsieve.errors import FlowsieveError
from flowsieve.kvcache import SieveCache, SieveLayer, decoder_config
from flowsieve.observe import Observer, decoder_layers

__all__ = ["LayerRuntime", "LayerSiteCache", "PositionedLayer", "Pruning", "positional_mask"]


class Pruning(Protocol):
    """What :class:`LayerRuntime` asks of a prefill's pruning (the layer site's plan)."""

    plan: list[tuple[int, float]]
    obs: Observer | None

    def rows(self, stream: torch.Tensor | None) -> tuple[int, ...]:
        """Stream indices of the relay tokens whose attention rows are recorded."""
        ...

    def select(self, stage: int, stream: torch.Tensor) -> torch.Tensor:
        """Indices into the stream (n,) of the tokens that stay before prune layer ``plan[stage][0]``."""
        ...


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
        self.prune: Pruning | None = None
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

    def summary(self) -> dict[str, Any]:
        """Nothing to add after decoding (the stages are measured during the prefill)."""
        return {}

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
