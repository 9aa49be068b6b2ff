"""A KV cache that can physically drop entries: the layer every KV-eviction method writes into.

Together with :mod:`flowsieve.observe` this is the only module that touches transformers cache
internals (pinned to transformers 5.24; the cache seams change between minor releases).

:class:`SieveLayer` is a ``DynamicLayer`` that also records, for every stored key/value entry, the
absolute index of the token it came from (``positions``) and how many tokens the layer has seen in
total (``cumulative_length``). Three invariants make an evicted cache behave like a full cache with
the evicted keys hidden:

- ``get_seq_length()`` returns the *absolute* number of tokens seen, so new tokens get the right
  RoPE positions and ``generate()`` slices its inputs correctly without explicit ``position_ids``;
- ``update()`` returns ``[stored; new]`` (``stored + q`` keys) and ``get_mask_sizes(q)`` reports
  exactly that, with ``kv_offset = cumulative - stored``; transformers' causal predicate
  ``kv_idx + kv_offset <= q_idx + q_offset`` (``q_offset = cumulative``) then lets every new query
  see every stored entry and the new keys causally, so multi-token chunks are masked correctly;
- keys keep the RoPE rotation of their original position (no re-rotation).

Eviction is :meth:`SieveLayer.keep` (gather the entries to keep, shared by all heads or per KV head
with the same count per head). A decode-time bounded cache sets a ``policy``: a callable run at the
end of every ``update()`` after the full states for this step were taken, which may call ``keep``.

:class:`SieveCache` builds one layer per decoder layer from a model config: a :class:`SieveLayer`
for every ``full_attention`` layer; every other layer type keeps transformers' own layer class, in
particular Gemma-3's ``sliding_attention`` layers stay ``DynamicSlidingWindowLayer`` (they already
hold only a window, and the sliding mask is built from them). Methods evict on
:attr:`SieveCache.sieve_layers` only; :meth:`SieveCache.keep` on any other layer raises.

Limits (transformers builds the mask once per forward, from the first full-attention layer):

- before a multi-token forward (chunk or prefill continuation) every full-attention layer must
  store the same number of entries; :meth:`SieveCache.update` raises otherwise. Single-token steps
  with SDPA get no mask and work with different lengths per layer (eager attention does not);
- a 2-D padding ``attention_mask`` is indexed by ``kv_idx + kv_offset``, i.e. as if the stored
  entries were the contiguous last tokens; after eviction it is only correct when it has no
  zeros (batch size 1 or unpadded batches).

Shapes: B batch, Hk key/value heads, S stored entries, d head dim, q new tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from flowsieve.errors import FlowsieveError

Policy = Callable[["SieveLayer"], None]

__all__ = [
    "Policy",
    "SieveCache",
    "SieveLayer",
    "drop_last",
    "full_kv_bytes",
    "kv_bytes",
    "layer_types",
    "plain_cache",
    "stored_tokens",
]


class SieveLayer(DynamicLayer):
    """A full-attention cache layer whose entries can be dropped, remembering where each came from.

    Attributes:
        keys / values: (B, Hk, S, d) stored states (post-RoPE keys, as the model caches them).
        positions: (B|1, Hk|1, S) int64, absolute token index of every stored entry. It is (1, 1, S)
            while all heads hold the same tokens and becomes (B, Hk, S) after a per-head ``keep``.
        cumulative_length: absolute number of tokens this layer has seen (``get_seq_length()``).
        extras: name -> (B|1, Hk|1, S) per-entry tensors a method wants carried with the entries
            (e.g. H2O's accumulated attention). ``update`` appends zeros for the new entries, ``keep``
            gathers them like ``positions``, ``clone`` copies them.
        policy: optional ``policy(layer)`` run at the end of each ``update`` (after the full states of
            this step were taken, so evicting there does not affect the current step).
        layer_idx: index of the decoder layer (set by :class:`SieveCache`), for policies.
    """

    is_sliding = False
    # eviction cannot be rolled back, so assisted decoding must not rely on `crop`
    is_croppable = False

    def __init__(self, policy: Policy | None = None, layer_idx: int | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.extras: dict[str, torch.Tensor] = {}
        # stored entries right before the last update (lets SieveCache check mask alignment)
        self._stored_before_update = 0

    def __repr__(self) -> str:
        return f"SieveLayer(stored={self.stored_length}, seen={self.cumulative_length})"

    # ------------------------------------------------------------------ transformers layer protocol

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.positions = torch.empty((1, 1, 0), dtype=torch.long, device=self.device)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append q new entries (B, Hk, q, d); return all ``stored + q`` keys and values of this step.

        The policy (if any) runs afterwards and may shrink what is *stored*; the returned tensors
        are not affected.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None and self.positions is not None
        self._stored_before_update = self.keys.shape[-2]
        q = key_states.shape[-2]
        new_pos = torch.arange(
            self.cumulative_length, self.cumulative_length + q, dtype=torch.long, device=self.positions.device
        )
        self.positions = torch.cat([self.positions, new_pos.expand(*self.positions.shape[:2], q)], dim=-1)
        for name, ex in self.extras.items():
            self.extras[name] = torch.cat([ex, ex.new_zeros((*ex.shape[:2], q))], dim=-1)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.cumulative_length += q
        keys, values = self.keys, self.values
        if self.policy is not None:
            self.policy(self)
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) = (stored + q, cumulative - stored): what ``update`` will return."""
        stored = self.stored_length
        return stored + query_length, self.cumulative_length - stored

    def get_seq_length(self) -> int:
        """Absolute number of tokens seen (not the number stored; see :attr:`stored_length`)."""
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()  # drops keys/values, zeroes cumulative_length
        self.positions = None
        self.extras = {}
        self._stored_before_update = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` tokens; only possible while they are all still stored."""
        if tokens_to_remove > 0:
            raise FlowsieveError("SieveLayer.crop takes a negative number of tokens to remove")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        assert self.positions is not None
        want = torch.arange(self.cumulative_length - n, self.cumulative_length, device=self.positions.device)
        tail = self.positions[..., -n:] if self.stored_length >= n else None
        if tail is None or not bool((tail == want).all()):
            raise FlowsieveError("cannot crop tokens that were already evicted from the cache")
        super().crop(tokens_to_remove)
        self.positions = self.positions[..., :-n]
        self.extras = {k: v[..., :-n] for k, v in self.extras.items()}
        self.cumulative_length -= n

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices])

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch-dim operation to the per-entry tensors that have a real batch dim."""
        if self.positions is not None and self.positions.shape[0] > 1:
            self.positions = fn(self.positions)
        self.extras = {k: fn(v) if v.shape[0] > 1 else v for k, v in self.extras.items()}

    # ------------------------------------------------------------------------------- eviction API

    @property
    def stored_length(self) -> int:
        """Number of entries stored now (S)."""
        return 0 if self.keys is None or not self.is_initialized else int(self.keys.shape[-2])

    def nbytes(self) -> int:
        """Bytes held by the stored keys and values."""
        if not self.is_initialized or self.keys is None or self.values is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def keep(self, idx: torch.Tensor) -> None:
        """Keep only the stored entries ``idx`` (indices into the S stored entries, not token indices).

        Args:
            idx: int tensor, either (S',) shared by all batch rows and heads, or (B|1, Hk|1, S') per
                batch row / KV head (the same count S' everywhere). Indices are sorted ascending here
                (stored order stays token order); duplicates and out-of-range indices raise.

        ``positions`` and ``extras`` are gathered with the entries; ``cumulative_length`` is unchanged.
        """
        if not self.is_initialized or self.keys is None or self.values is None or self.positions is None:
            raise FlowsieveError("keep() on a cache layer that has not seen any token")
        if idx.dtype in (torch.bool, torch.uint8) or idx.is_floating_point() or idx.is_complex():
            raise FlowsieveError(f"keep() needs integer indices, got {idx.dtype}")
        B, Hk, S = self.keys.shape[:3]
        idx = idx.to(device=self.keys.device, dtype=torch.long)
        if idx.ndim == 3 and idx.shape[0] == 1 and idx.shape[1] == 1:
            idx = idx.reshape(-1)
        if idx.ndim not in (1, 3) or (
            idx.ndim == 3 and (idx.shape[0] not in (1, B) or idx.shape[1] not in (1, Hk))
        ):
            raise FlowsieveError(
                f"keep() needs indices of shape (S',) or (B|1, Hk|1, S') with B={B}, Hk={Hk}; "
                f"got {tuple(idx.shape)}"
            )
        idx = idx.sort(dim=-1).values
        if idx.numel() > 0:
            if int(idx.min()) < 0 or int(idx.max()) >= S:
                raise FlowsieveError(f"keep() indices must lie in [0, {S}) (the stored entries)")
            if bool((idx[..., 1:] == idx[..., :-1]).any()):
                raise FlowsieveError("keep() indices must not repeat")

        if idx.ndim == 1:
            self.keys = self.keys.index_select(2, idx)
            self.values = self.values.index_select(2, idx)
            self.positions = self.positions.index_select(-1, idx.to(self.positions.device))
            self.extras = {k: v.index_select(-1, idx.to(v.device)) for k, v in self.extras.items()}
            return
        n = idx.shape[-1]
        idx = idx.expand(B, Hk, n)
        self.keys = self.keys.gather(2, idx[..., None].expand(B, Hk, n, self.keys.shape[-1]))
        self.values = self.values.gather(2, idx[..., None].expand(B, Hk, n, self.values.shape[-1]))
        self.positions = self._gather_entries(self.positions, idx, B, Hk)
        self.extras = {k: self._gather_entries(v, idx, B, Hk) for k, v in self.extras.items()}

    @staticmethod
    def _gather_entries(t: torch.Tensor, idx: torch.Tensor, B: int, Hk: int) -> torch.Tensor:
        """(B|1, Hk|1, S) -> (B, Hk, S') with per-row/per-head indices idx (B, Hk, S')."""
        return t.expand(B, Hk, t.shape[-1]).gather(-1, idx.to(t.device))

    def clone(self) -> SieveLayer:
        """An independent copy (tensors copied; the policy object is shared)."""
        return _clone_layer(self)


def _clone_layer(layer: Any) -> Any:
    """Shallow-copy a cache layer, then copy every tensor it holds (also inside dicts/lists)."""
    new = copy.copy(layer)
    for name, val in vars(layer).items():
        if isinstance(val, torch.Tensor):
            setattr(new, name, val.clone())
        elif isinstance(val, dict):
            setattr(new, name, {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in val.items()})
        elif isinstance(val, list):
            setattr(new, name, [v.clone() if isinstance(v, torch.Tensor) else v for v in val])
    return new


def decoder_config(model_or_config: Any, who: str) -> PreTrainedConfig:
    """The decoder text config of a model or config (what a cache is laid out from)."""
    config = getattr(model_or_config, "config", model_or_config)
    if not isinstance(config, PreTrainedConfig):
        raise FlowsieveError(f"{who} needs a model or a config, got {type(model_or_config).__name__}")
    return config.get_text_config(decoder=True)


class SieveCache(Cache):
    """A cache with one layer per decoder layer: :class:`SieveLayer` for full attention, stock otherwise.

    Args:
        model_or_config: the model or its config (the decoder text config is used).
        policy: optional decode-time policy given to every :class:`SieveLayer` (see ``SieveLayer.policy``).

    Pass it as ``cache=`` to a forward or to ``generate``. ``get_seq_length()`` stays absolute.
    """

    def __init__(self, model_or_config: nn.Module | PreTrainedConfig, policy: Policy | None = None) -> None:
        config = decoder_config(model_or_config, "SieveCache")
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers: list[Any] = []
        for i, (kind, kw) in enumerate(zip(layer_types, layer_kwargs, strict=True)):
            if kind == "full_attention":
                layers.append(SieveLayer(policy=policy, layer_idx=i))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        super().__init__(layers=layers)
        # transformers sizes the full-attention mask from the first full-attention layer
        self._mask_layer = next((i for i, kind in enumerate(layer_types) if kind == "full_attention"), None)

    def __repr__(self) -> str:
        return f"SieveCache(seen={self.get_seq_length()}, stored={self.stored_lengths()})"

    @property
    def sieve_layers(self) -> list[int]:
        """Indices of the layers that can evict (the full-attention ones)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, SieveLayer)]

    def layer(self, layer_idx: int) -> SieveLayer:
        """The :class:`SieveLayer` at ``layer_idx``; raises for layers that cannot evict."""
        layer = self.layers[layer_idx]
        if not isinstance(layer, SieveLayer):
            raise FlowsieveError(
                f"layer {layer_idx} is a {type(layer).__name__}, not an evictable full-attention layer; "
                f"evictable layers: {self.sieve_layers}"
            )
        return layer

    def stored_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored (keys, values) of a sieve layer, (B, Hk, S, d) each (read-only use)."""
        layer = self.layer(layer_idx)
        if layer_idx not in self.sieve_layers or layer.keys is None or layer.values is None:
            raise FlowsieveError(f"layer {layer_idx} is not an initialised sieve layer")
        return layer.keys, layer.values

    def replace_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite the stored keys and values of a sieve layer with tensors of the same shape and
        dtype (a method that merges entries, e.g. VFlowOpt's recycling); positions are unchanged."""
        old_k, old_v = self.stored_kv(layer_idx)
        if keys.shape != old_k.shape or values.shape != old_v.shape:
            raise FlowsieveError(
                f"replace_kv: shapes {tuple(keys.shape)}, {tuple(values.shape)} differ from the stored "
                f"{tuple(old_k.shape)}, {tuple(old_v.shape)}"
            )
        layer = self.layer(layer_idx)
        layer.keys, layer.values = keys.to(old_k.dtype), values.to(old_v.dtype)

    def keep(self, layer_idx: int, idx: torch.Tensor) -> None:
        """``SieveLayer.keep`` on one layer; idx (S',) or (B|1, Hk|1, S') into its stored entries."""
        self.layer(layer_idx).keep(idx)

    def set_policy(self, policy: Policy | None, layers: list[int] | None = None) -> None:
        """Set (or clear with None) the decode policy on the given evictable layers (default: all)."""
        for i in self.sieve_layers if layers is None else layers:
            self.layer(i).policy = policy

    def stored_lengths(self) -> list[int]:
        """Entries stored per layer (sliding layers: their window content)."""
        out = []
        for layer in self.layers:
            keys = getattr(layer, "keys", None)
            out.append(
                int(keys.shape[-2]) if getattr(layer, "is_initialized", False) and keys is not None else 0
            )
        return out

    def kv_bytes(self) -> int:
        """Bytes held by keys and values of all layers (sliding layers included): :func:`kv_bytes`."""
        return kv_bytes(self)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache.update, refusing multi-token steps whose mask would not fit this layer's keys."""
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        if key_states.shape[-2] > 1 and isinstance(layer, SieveLayer) and self._mask_layer is not None:
            ref = self.layers[self._mask_layer]
            if ref is not layer and layer._stored_before_update != ref._stored_before_update:
                raise FlowsieveError(
                    f"full-attention layers stored different numbers of entries before this "
                    f"{key_states.shape[-2]}-token step (layer {ref.layer_idx}: {ref._stored_before_update}, "
                    f"layer {layer_idx}: {layer._stored_before_update}); transformers builds one mask for "
                    f"all of them, so evict the same count on every full-attention layer before a "
                    f"multi-token forward"
                )
        return out

    def snapshot_fixed(self) -> dict[int, Any]:
        """Copies of the layers that cannot evict (sliding windows), for :meth:`rewind`."""
        return {i: _clone_layer(layer) for i, layer in enumerate(self.layers) if i not in self.sieve_layers}

    def rewind(self, n: int, saved: dict[int, Any]) -> None:
        """Forget the last ``n`` tokens: crop them from the evictable layers (they must still be
        stored) and put back the copies of the other layers taken before them (:meth:`snapshot_fixed`)."""
        for i in self.sieve_layers:
            self.layer(i).crop(-n)
        for i, layer in saved.items():
            self.layers[i] = _clone_layer(layer)

    def clone(self) -> SieveCache:
        """An independent deep copy of all stored tensors (policies are shared, not copied)."""
        new = copy.copy(self)
        new.layers = [_clone_layer(layer) for layer in self.layers]
        return new

    copy = clone


def layer_types(model_or_config: Any) -> tuple[str, ...]:
    """``"full_attention"`` / ``"sliding_attention"`` / ... per decoder layer (the cache layout)."""
    return tuple(get_layer_types_and_kwargs(decoder_config(model_or_config, "layer_types"))[0])


def plain_cache(model: nn.Module) -> Cache:
    """transformers' own dynamic cache for ``model`` (the uncompressed reference)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def drop_last(cache: Cache, n: int) -> bool:
    """Forget the last ``n`` tokens of a plain cache; False when it cannot roll back (a cache with
    sliding-window layers), and the cache must then be rebuilt."""
    try:
        cache.crop(-n)
    except (ValueError, RuntimeError, NotImplementedError):
        return False
    return True


def kv_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a cache (any transformers cache; every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def stored_tokens(cache: Any) -> int:
    """Entries stored per layer (the largest over layers)."""
    n = 0
    for layer in getattr(cache, "layers", []):
        t = getattr(layer, "keys", None)
        if isinstance(t, torch.Tensor) and t.dim() == 4:
            n = max(n, t.shape[-2])
    return n


def full_kv_bytes(model: nn.Module, n_tokens: int) -> int:
    """Bytes an uncompressed cache of ``n_tokens`` would hold in the model's dtype (sliding-window
    layers capped at their window)."""
    from flowsieve.models import head_counts, head_dim

    cfg = decoder_config(model, "full_kv_bytes")
    _, n_kv = head_counts(cfg)
    width = head_dim(cfg)
    window = getattr(cfg, "sliding_window", None)
    dtype_bytes = next(model.parameters()).element_size()
    total = 0
    for t in layer_types(cfg):
        n = min(n_tokens, window) if t == "sliding_attention" and window else n_tokens
        total += 2 * n * n_kv * width * dtype_bytes
    return total
