"""Token surprisal from a causal LM over a compressed prefix: the prompt site's one use of a KV cache.

:class:`SurprisalStream` scores a text window by window, each window conditioned on what was kept of
the windows before it (LLMLingua-1's iterative compression). The cache holds the committed prefix;
a step feeds the tokens kept from the previous window plus the new window, scores the window, and
crops the cache back to the committed prefix, so every token is fed at most twice.

Shapes: V vocabulary; w tokens in a window; p tokens pending (kept, not yet committed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.kvcache import drop_last, plain_cache


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(k, V) logits predicting (k,) targets -> (k,) negative log-likelihood, fp32."""
    lg = logits.float()
    return torch.logsumexp(lg, -1) - lg.gather(-1, targets[:, None])[:, 0]


def sequence_nll(model: nn.Module, ids: Sequence[int], start: int = 1) -> torch.Tensor:
    """NLL of ``ids[start:]`` given the tokens before each, in one forward: (len(ids) - start,)."""
    if start < 1 or start >= len(ids):
        raise FlowsieveError(f"need at least one token before the scored ones (start={start}, n={len(ids)})")
    x = torch.tensor([list(ids)], device=model_device(model))
    with torch.inference_mode():
        logits = model(input_ids=x, use_cache=False, logits_to_keep=len(ids) - start + 1).logits[0]
    return _nll(logits[:-1], x[0, start:]).cpu()


class SurprisalStream:
    """Scores windows of a text with a causal LM, conditioned on a growing compressed prefix.

    Args:
        model: a causal LM.
        prefix: tokens every window is conditioned on (a BOS, or a question); never evicted.
        max_positions: the model's context; when prefix + compressed text + window would exceed it,
            the oldest committed tokens after the first ``keep_first`` are dropped and the cache is
            rebuilt (LLMLingua keeps the first ``cache_bos_num`` = 10 tokens).
        keep_first: committed tokens always kept at the start (besides ``prefix``).
    """

    def __init__(
        self,
        model: nn.Module,
        prefix: Sequence[int] = (),
        max_positions: int | None = None,
        keep_first: int = 10,
    ) -> None:
        self.model = model
        self.device = model_device(model)
        self.max_positions = max_positions
        self.keep_first = keep_first
        self.n_fixed = len(prefix)
        self.committed: list[int] = []  # ids whose keys/values are in the cache
        self.pending: list[int] = list(prefix)  # kept, fed with the next window
        self.tail: torch.Tensor | None = None  # (V,) logits predicting the token after ``committed``
        self._new_cache = lambda: plain_cache(model)
        self.cache: Any = self._new_cache()
        self.croppable = True

    def accept(self, kept: Sequence[int]) -> None:
        """The tokens of the last window that were kept: they condition the next windows."""
        self.pending.extend(int(i) for i in kept)

    def _evict(self, incoming: int) -> None:
        """Drop the oldest tokens (after the fixed prefix and ``keep_first``) so that ``incoming`` fit."""
        if self.max_positions is None:
            return
        context = self.committed + self.pending
        over = len(context) + incoming - self.max_positions
        if over <= 0:
            return
        head = self.n_fixed + self.keep_first
        if len(context) - head < over:
            raise FlowsieveError(
                f"a window of {incoming} tokens does not fit into the model's context of {self.max_positions}"
            )
        # recompute the keys of what remains, at contiguous positions
        self.pending = context[:head] + context[head + over :]
        self.committed, self.tail = [], None
        self.cache = self._new_cache()

    def score(self, window: Sequence[int]) -> torch.Tensor:
        """NLL of each token of ``window`` (w,) given the compressed prefix and the window before it.

        The first token of a text with no prefix has no prediction: its NLL is ``inf``.
        """
        window = [int(i) for i in window]
        if not window:
            return torch.zeros(0)
        if not self.croppable:
            # a cache that cannot roll back (sliding-window layers): recompute the prefix each step
            self.pending = self.committed + self.pending
            self.committed, self.tail = [], None
            self.cache = self._new_cache()
        self._evict(len(window))
        feed = self.pending + window
        p = len(self.pending)
        x = torch.tensor([feed], device=self.device)
        with torch.inference_mode():
            # logits of the last pending token (if any) and of every window token
            logits = self.model(
                input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=len(window) + (p > 0)
            ).logits[0]
        # (w, V) predicting the window's tokens; (w-1, V) when nothing is pending
        nll = _nll(logits[:-1], x[0, p:] if p > 0 else x[0, 1:]).cpu()
        if p == 0:
            first = (
                _nll(self.tail[None], x[0, :1])[0].cpu() if self.tail is not None else torch.tensor(math.inf)
            )
            nll = torch.cat([first.reshape(1), nll])
        if p > 0:
            self.tail = logits[0].detach()
        # roll the cache back to the committed prefix + pending
        self.croppable = self.croppable and drop_last(self.cache, len(window))
        self.committed.extend(self.pending)
        self.pending = []
        return nll
