"""The ``decode`` site: prefill as the prefill site does, then keep the cache within a capacity
while decoding.

After every decode step each compressed layer holding more than :meth:`Sieve.capacity` entries
drops its lowest-scored unprotected ones (:class:`DecodeEvictor`). Protected: the prompt's
protected positions (chat template, question, observation window) and the ``window`` most recent
entries. Methods that carry scores across steps (H2O) add every step's attention whether or not
the step evicts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import SieveCache
from flowsieve.methods import ScoreContext
from flowsieve.methods.selection import select_topk
from flowsieve.models import head_counts
from flowsieve.observe import Observer, observe
from flowsieve.sites.base import Prefilled
from flowsieve.sites.prefill import PrefillSite

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve

__all__ = ["DecodeEvictor", "DecodeSite"]


class DecodeEvictor:
    """Keeps every compressed layer of a :class:`~flowsieve.kvcache.SieveCache` within the sieve's
    capacity during decoding: after each step, the lowest-scored unprotected entries are evicted.

    Args:
        protect: bool (N,) over absolute prompt positions: never evicted.
        recent: the most recent entries that are never evicted.
    """

    def __init__(
        self, model: nn.Module, cache: SieveCache, sieve: Sieve, protect: torch.Tensor, recent: int
    ) -> None:
        self.model, self.cache, self.sieve = model, cache, sieve
        self.protect, self.recent = protect, recent
        self.capacity = 0
        self.evicted = 0
        self.max_stored = 0

    def __call__(self) -> contextlib.AbstractContextManager[Callable[[], None]]:
        """The per-step hook: observe the step, then evict (``with ev() as after: ...; after()``)."""

        @contextlib.contextmanager
        def ctx() -> Iterator[Callable[[], None]]:
            with observe(self.model, self.sieve.scorer.decode_spec()) as obs:
                yield lambda: self._evict(obs)

        return ctx()

    def active(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def summary(self) -> dict[str, Any]:
        return {"evicted": self.evicted, "max_stored": self.max_stored, "capacity": self.capacity}

    def _evict(self, obs: Observer) -> None:
        n_heads, n_kv = head_counts(self.model)
        scorer = self.sieve.scorer
        for i in self.cache.sieve_layers:
            layer = self.cache.layer(i)
            S = layer.stored_length
            self.max_stored = max(self.max_stored, S)
            self.capacity = cap = self.sieve.capacity(layer.cumulative_length)
            ctx = ScoreContext(S, (), n_heads, n_kv, i, len(self.cache.layers), self.sieve.seed)
            if scorer.carries:
                scorer.decode_step(obs.layer(i), layer, ctx)
            if S <= cap:
                continue
            pos = layer.positions
            n = layer.cumulative_length
            prot = (pos >= n - self.recent) | self.protect[pos.clamp(max=self.protect.shape[0] - 1)] & (
                pos < self.protect.shape[0]
            )
            must = int(prot.sum(-1).max())
            if must > cap:
                raise FlowsieveError(
                    f"the decode cache holds at most {cap} entries, fewer than the {must} it must keep "
                    f"(the prompt's protected tokens and the last {self.recent}); raise the budget or keep"
                )
            ctx.candidates = ~prot
            scores = scorer.decode_score(obs.layer(i), layer, ctx).float()
            layer.keep(select_topk(scores, prot, cap))
            self.evicted += S - cap


class DecodeSite:
    """Prefill-site compression of the prompt, then eviction at every decode step."""

    name = "decode"

    def check(self, sieve: Sieve) -> None:
        """Every method with decode scores runs here (the method lists the site)."""

    def prefill(
        self,
        model: nn.Module,
        prompt: Prompt,
        sieve: Sieve,
        mode: str,
        tokenizer: Any = None,
        chat: bool = True,
    ) -> Prefilled:
        if getattr(sieve.scorer, "replays", False):
            raise FlowsieveError(f"method '{sieve.method}' runs at the prefill site only")
        out = PrefillSite().prefill(model, prompt, sieve, mode, tokenizer, chat)
        assert out.protect is not None
        evictor = DecodeEvictor(model, out.cache, sieve, out.protect, sieve.window)
        out.hook = out.step = evictor
        return out
