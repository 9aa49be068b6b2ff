"""The ``select`` site: keep the whole KV cache, attend to a chosen subset of it at every step.

A select-site method (:class:`flowsieve.methods.base.KeySelectMethod`: TokenSelect, ActQKV) decides,
per full-attention layer and per attention call, which cached entries the call's queries attend
to. :class:`SelectRuntime` is the key selector that :func:`flowsieve.observe.select_keys` consults
from the flowsieve attention function: it gives the method the call's queries and keys, the
budget of the call (:meth:`flowsieve.sieve.Sieve.capacity` of the entries cached then:
``round(keep x N)``, or the fixed ``budget``), and hands the picked slots back; the attention
function gathers those keys and values and runs SDPA on them alone, so attention work scales with
the attended entries. Memory does not drop: every entry stays in the cache (``kv_bytes`` is the
full cache's).

Which calls select:
- a first pass over an empty cache (the prompt, or the first prefill chunk) attends to everything
  (there is nothing cached to choose from); it also resets the method's per-sequence state;
- every later call selects when its budget is below the cached entries: decode steps, later
  prefill chunks (``Sieve.chunk``), and the question appended in query-agnostic mode;
- Gemma-3's sliding-window layers are never selected (they already hold only their window).

Batch size 1. Used by :func:`flowsieve.generate.generate` (through :class:`SelectSite`) and by
:meth:`flowsieve.sieve.Sieve.on` inside ``model.generate``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import SieveCache, layer_types
from flowsieve.methods.base import KeySelectMethod
from flowsieve.observe import select_keys
from flowsieve.sites.base import Prefilled, forward, split

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve

__all__ = ["SelectRuntime", "SelectSite"]


class SelectRuntime:
    """Per-sequence selection for one model and one select-site sieve; the key selector of
    :func:`flowsieve.observe.select_keys`.

    Attributes:
        layers: the full-attention layers that select, in order.
        records: one (phase, layer, cached entries N, attended entries) per call of a selecting
            layer; phase is "prefill" (a first pass over an empty cache), "chunk" (several new
            tokens on a cache: a later prefill chunk, the appended question) or "decode" (one token).
        trace: when ``trace=True``, (phase, layer, slots or None for all) per call, for tests.
        select_s: seconds spent in the method (scoring and picking).
    """

    def __init__(self, model: nn.Module, sieve: Sieve, trace: bool = False) -> None:
        if sieve.site != "select":
            raise FlowsieveError(f"the select runtime needs a sieve at the select site, not '{sieve.site}'")
        if not isinstance(sieve.scorer, KeySelectMethod):
            raise FlowsieveError(f"method '{sieve.method}' cannot select keys")
        self.model, self.sieve, self.method = model, sieve, sieve.scorer
        self.layers = tuple(i for i, t in enumerate(layer_types(model)) if t == "full_attention")
        if not self.layers:
            raise FlowsieveError("the model has no full-attention layer to select keys in")
        self._rank = {layer: r for r, layer in enumerate(self.layers)}
        self.state: Any = self.method.new_state()
        self.records: list[tuple[str, int, int, int]] = []
        self.trace: list[tuple[str, int, torch.Tensor | None]] | None = [] if trace else None
        self.select_s = 0.0

    def __call__(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> torch.Tensor | None:
        """Slots (n,) this call of ``module`` attends to, or None for all; query (1, H, q, d),
        key (1, Hk, N, d)."""
        layer = getattr(module, "layer_idx", None)
        rank = self._rank.get(layer) if layer is not None else None
        if rank is None:
            return None
        if query.shape[0] != 1:
            raise FlowsieveError("the select site runs one sequence at a time (batch size 1)")
        t0 = time.perf_counter()
        q, N = query.shape[2], key.shape[2]
        if q == N and rank == 0:
            self.state = self.method.new_state()  # a new sequence starts
        phase = "prefill" if q == N else "decode" if q == 1 else "chunk"
        self.method.observe(self.state, layer, query, key, scaling)
        picked: torch.Tensor | None = None
        budget = self.sieve.capacity(N)
        if q < N and budget < N:
            picked = self.method.select(self.state, self.layers, rank, query, key, budget)
            if picked.shape[0] >= N:
                picked = None
        self.select_s += time.perf_counter() - t0
        self.records.append((phase, layer, N, N if picked is None else int(picked.shape[0])))
        if self.trace is not None:
            self.trace.append((phase, layer, None if picked is None else picked.clone()))
        return picked

    @contextlib.contextmanager
    def active(self) -> Iterator[SelectRuntime]:
        """Every forward pass of the model inside the block selects keys through this runtime."""
        with select_keys(self.model, self):
            yield self

    def summary(self) -> dict[str, Any]:
        """Mean attended and cached entries per call of a selecting layer, by phase, and the method's
        own counters. ``attended_entries`` is the decode-step mean (None without decode steps),
        ``chunk_attended_entries`` that of multi-token calls on a cache."""

        def mean(phase: str, col: int) -> float | None:
            xs = [r[col] for r in self.records if r[0] == phase]
            return round(sum(xs) / len(xs), 2) if xs else None

        out: dict[str, Any] = {
            "attended_entries": mean("decode", 3),
            "cache_entries": mean("decode", 2),
            "select_layers": len(self.layers),
            "select_s": round(self.select_s, 4),
        }
        if any(r[0] == "chunk" for r in self.records):
            out["chunk_attended_entries"] = mean("chunk", 3)
        out.update(self.method.summary(self.state))
        return out


class SelectSite:
    """Nothing is evicted: every later forward pass attends to the entries the method picks."""

    name = "select"

    def check(self, sieve: Sieve) -> None:
        if not isinstance(sieve.scorer, KeySelectMethod):
            raise FlowsieveError(f"method '{sieve.method}' cannot select keys")

    @torch.inference_mode()
    def prefill(
        self,
        model: nn.Module,
        prompt: Prompt,
        sieve: Sieve,
        mode: str,
        tokenizer: Any = None,
        chat: bool = True,
    ) -> Prefilled:
        """The prompt (query-aware) or the context (query-agnostic) is prefilled in one pass with full
        attention, or in ``sieve.chunk``-token chunks of which every one after the first selects; in
        query-agnostic mode the question is then appended with selection. The returned hook is the
        :class:`SelectRuntime` to keep active while decoding."""
        return self.run(model, prompt, sieve, mode)

    def run(
        self, model: nn.Module, prompt: Prompt, sieve: Sieve, mode: str, trace: bool = False
    ) -> Prefilled:
        """:meth:`prefill`; ``trace`` records the picked slots of every call (:attr:`SelectRuntime.trace`)."""
        head, tail = split(prompt, mode)
        runtime = SelectRuntime(model, sieve, trace=trace)
        cache = SieveCache(model)
        size = sieve.chunk or len(head)
        t0 = time.perf_counter()
        with runtime.active():
            for a in range(0, len(head), size):
                logits = forward(model, cache, head[a : a + size])
            if tail:
                logits = forward(model, cache, tail)
        extra = {
            "kept_entries": len(prompt),
            "compressed_tokens": 0,
            "prefill_forward_s": round(time.perf_counter() - t0, 4),
            "chunk": sieve.chunk,
        }
        return Prefilled(cache, logits, len(prompt), extra, hook=runtime)
