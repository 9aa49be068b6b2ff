"""The protocol every KV-cache site implements, and the pieces the sites share.

A site applies a method to a model. It is one object with two calls:

- ``check(sieve)``: refuse, with a one-line :class:`FlowsieveError`, a sieve this site cannot run
  (called by :class:`flowsieve.sieve.Sieve` at construction);
- ``prefill(model, prompt, sieve, mode, tokenizer, chat)``: feed the prompt into a cache the way
  the site applies the method and return a :class:`Prefilled`: the cache, the logits of the last
  prompt position, the measurements, and optionally a :class:`DecodeHook` that later forward
  passes on that cache must run under (the decode site's eviction, the select site's key
  selection, the layer site's positional masks).

``mode`` is ``"query_aware"`` (the whole prompt, question included, is prefilled and compressed)
or ``"query_agnostic"`` (the prompt up to the end of the context is compressed, then the rest is
appended on top of the compressed cache). Adding a site is one file with such an object and one
line in :data:`flowsieve.sites.SITES`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from flowsieve.inputs import Prompt

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve


class DecodeHook(Protocol):
    """What a site leaves running while a prefilled cache is decoded."""

    def active(self) -> ContextManager[Any]:
        """Every forward pass inside the block runs under the hook."""
        ...

    def summary(self) -> dict[str, Any]:
        """Measurements after decoding (merged into the result's ``extra``)."""
        ...


@dataclass
class Prefilled:
    """A prompt prefilled into a cache by a site.

    Attributes:
        cache: the (compressed) cache.
        logits: logits of the last prompt position, (1, 1, V).
        kept: entries kept per compressed layer (the mean), the appended tail included.
        extra: measurements (seconds, protected tokens, stages, ...).
        hook: what later forward passes on ``cache`` run under, or None.
        step: a per-step hook of the decode loop (``with step() as after: forward; after()``), or None.
        protect: bool (N,) over absolute positions, the entries compression never drops (prompt
            tokens outside the context and the observation rows; the appended tail), or None.
    """

    cache: Any
    logits: torch.Tensor
    kept: int
    extra: dict[str, Any] = field(default_factory=dict)
    hook: DecodeHook | None = None
    step: Callable[[], ContextManager[Callable[[], None]]] | None = None
    protect: torch.Tensor | None = None

    def decoding(self) -> ContextManager[Any]:
        """The block every later forward pass on :attr:`cache` must run in."""
        return self.hook.active() if self.hook is not None else contextlib.nullcontext()

    def summary(self) -> dict[str, Any]:
        """The hook's measurements after decoding (empty without a hook)."""
        return self.hook.summary() if self.hook is not None else {}


class Site(Protocol):
    """One place where a method is applied (see the module docstring)."""

    name: str

    def check(self, sieve: Sieve) -> None: ...

    def prefill(
        self,
        model: nn.Module,
        prompt: Prompt,
        sieve: Sieve,
        mode: str,
        tokenizer: Any = None,
        chat: bool = True,
    ) -> Prefilled: ...


def split(prompt: Prompt, mode: str) -> tuple[list[int], list[int]]:
    """(head, tail): the ids compressed and the ids appended afterwards (query-agnostic mode)."""
    ids = list(prompt.ids)
    if mode == "query_agnostic":
        return ids[: prompt.split], ids[prompt.split :]
    return ids, []


def protect_mask(prompt: Prompt, n_tokens: int, rows: Sequence[int]) -> torch.Tensor:
    """bool (n_tokens,): the entries a compression of the first ``n_tokens`` prompt tokens always
    keeps: everything outside the context (chat template, question) and the observation ``rows``."""
    c0, c1 = prompt.context
    protect = torch.ones(n_tokens, dtype=torch.bool)
    protect[c0 : min(c1, n_tokens)] = False
    protect[list(rows)] = True
    return protect


def units_for(sieve: Sieve, prompt: Prompt) -> torch.Tensor | None:
    """The unit map ``sieve.compress`` needs for ``prompt``: its sentence map when the sieve keeps
    whole sentences, else None."""
    return prompt.sentence_units() if sieve.units != "token" else None


@torch.inference_mode()
def forward(model: nn.Module, cache: Any, ids: Sequence[int]) -> torch.Tensor:
    """One forward pass of ``ids`` on ``cache``; the last position's logits (1, 1, V)."""
    return model(input_ids=torch.tensor([list(ids)]), cache=cache, use_cache=True, logits_to_keep=1).logits


@torch.inference_mode()
def append_tokens(model: nn.Module, cache: Any, ids: Sequence[int]) -> torch.Tensor:
    """Feed ``ids`` (e.g. the question after a query-agnostic compression) on top of a compressed
    :class:`~flowsieve.kvcache.SieveCache`; returns the last position's logits (1, 1, V).

    When its layers hold different numbers of entries (a per-layer schedule) the mask of a
    multi-token chunk cannot be shared, so the tokens go one at a time (single tokens need none)."""
    if len({cache.layer(i).stored_length for i in cache.sieve_layers}) > 1:
        for t in ids:
            logits = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
        return logits[:, -1:]
    return forward(model, cache, ids)
