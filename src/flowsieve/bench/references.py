"""Comparison of a cell with the full run of its item: ``token_agreement`` and ``kl_answer_start``.

``token_agreement`` is the share of the full run's first ``agree_tokens`` tokens a cell reproduces
before the first difference; ``kl_answer_start`` is KL(full ‖ cell), in nats, of the next-token
distribution at the first generated position (teacher-forced tasks: at the continuation's first
token). A forward hook (:class:`_Recorder`) keeps the log-probabilities of a cell's own passes, so
measuring costs no extra forward pass; the full run's distribution and tokens are kept in memory per
item (:data:`_REFERENCES`, a few items; computed when missing by
:func:`flowsieve.bench.cells._reference`). Peers' rows carry neither.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from flowsieve.bench.tasks import Item
from flowsieve.generate import GenResult


@dataclass
class _Pass:
    """One forward pass seen by :class:`_Recorder`."""

    fed: int
    """Tokens fed."""
    last: int
    """The last token fed."""
    logprobs: Any
    """Log-probabilities of the next token after the last fed one, (V,) float32."""


@dataclass
class _Segment:
    """Consecutive passes on one cache object (a generation, or one sieve's copy in a shared run)."""

    first_fed: int
    passes: deque[_Pass]


class _Recorder:
    """A forward hook on the model that keeps the next-token log-probabilities of its recent passes,
    grouped by the cache each pass used (at most ``keep`` passes per cache); removed on exit.

    A greedy generation of ``n`` tokens ends with ``n - 1`` single-token passes, each feeding the
    token the previous pass chose; the pass before them chose the first token: its distribution
    is the answer start. Models without forward hooks (test doubles) record nothing.
    """

    def __init__(self, model: Any, keep: int) -> None:
        self.model, self.keep = model, max(1, keep)
        self.segments: list[_Segment] = []
        self._cache: Any = None
        self._handle: Any = None

    def __enter__(self) -> _Recorder:
        hook = getattr(self.model, "register_forward_hook", None)
        if callable(hook):
            self._handle = hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._cache = None

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        import torch

        logits = getattr(output, "logits", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(logits, torch.Tensor) or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self.segments or cache is not self._cache:
            self.segments.append(_Segment(int(ids.shape[-1]), deque(maxlen=self.keep)))
            self._cache = cache
        lp = torch.log_softmax(logits[0, -1].detach().float(), dim=-1).cpu()
        self.segments[-1].passes.append(_Pass(int(ids.shape[-1]), int(ids[0, -1]), lp))

    def answer_start(self, token_ids: Sequence[int]) -> Any:
        """The log-probabilities that chose ``token_ids[0]`` in the last generation, or None."""
        return _answer_start(self.segments[-1], token_ids) if self.segments else None

    def shared_answer_starts(
        self, results: Sequence[GenResult], prompt_len: int, split: int, mode: str
    ) -> list[Any]:
        """Per result of one :func:`flowsieve.generate.generate_many` call, the log-probabilities of its
        first token (None where they cannot be told apart)."""
        if mode == "query_aware":
            # every sieve's first token comes from the shared pass over the whole prompt
            shared = [sg for sg in self.segments if sg.first_fed == prompt_len and sg.passes]
            if not shared:
                return [None] * len(results)
            lp = shared[0].passes[0].logprobs
            return [lp if r.token_ids and int(lp.argmax()) == r.token_ids[0] else None for r in results]
        # query-agnostic: each sieve's copy of the cache takes the question, then decodes
        own = [sg for sg in self.segments if sg.first_fed != split]
        if len(own) != len(results):
            return [None] * len(results)
        return [_answer_start(sg, r.token_ids) for sg, r in zip(own, results, strict=True)]


def _answer_start(segment: _Segment, token_ids: Sequence[int]) -> Any:
    n = len(token_ids)
    passes = list(segment.passes)
    if n == 0 or len(passes) < n:
        return None
    tail = passes[len(passes) - n :]
    if any(p.fed != 1 or p.last != t for p, t in zip(tail[1:], token_ids[:-1], strict=True)):
        return None
    lp = tail[0].logprobs
    return lp if int(lp.argmax()) == int(token_ids[0]) else None


def token_agreement(ids: Sequence[int] | None, ref: Sequence[int] | None, n: int) -> float | None:
    """The share of ``ref[:n]`` (the full run's first ``n`` tokens) that ``ids`` reproduces before
    the first difference; None without tokens."""
    ref = list(ref or [])[:n]
    if not ref or ids is None:
        return None
    k = 0
    for a, b in zip(ids, ref):
        if int(a) != int(b):
            break
        k += 1
    return k / len(ref)


def kl_divergence(ref_logprobs: Any, logprobs: Any) -> float | None:
    """KL(ref ‖ cell) in nats between two next-token distributions given as log-probabilities (V,);
    None when either is missing or the vocabularies differ."""
    if ref_logprobs is None or logprobs is None or ref_logprobs.shape != logprobs.shape:
        return None
    p, q = ref_logprobs.double(), logprobs.double()
    kl = float((p.exp() * (p - q)).nan_to_num(nan=0.0).sum())  # 0 · log 0 = 0
    return max(kl, 0.0)  # rounding can give -1e-12


@dataclass
class _Reference:
    """What a cell is compared with: the full run's answer-start log-probabilities and tokens."""

    logprobs: Any
    token_ids: list[int]


_REFERENCES: OrderedDict[tuple[Any, ...], _Reference] = OrderedDict()
_REFERENCE_ITEMS = 8  # sweeps run the cells of one item together; a few items are enough


def _reference_key(model: Any, item: Item, chat: bool, max_new_tokens: int) -> tuple[Any, ...]:
    return (id(model), item.task, item.item_id, item.context, item.question, chat, max_new_tokens)


def _remember(key: tuple[Any, ...], ref: _Reference) -> _Reference:
    _REFERENCES[key] = ref
    _REFERENCES.move_to_end(key)
    while len(_REFERENCES) > _REFERENCE_ITEMS:
        _REFERENCES.popitem(last=False)
    return ref


def _compare(
    row: dict[str, Any], logprobs: Any, ref: _Reference | None, agree_tokens: int, teacher_forced: bool
) -> dict[str, Any]:
    """``row`` with ``token_agreement`` and ``kl_answer_start`` against ``ref``."""
    ids = (row.get("extra") or {}).get("token_ids")
    row["token_agreement"] = (
        None if teacher_forced or ref is None else token_agreement(ids, ref.token_ids, agree_tokens)
    )
    row["kl_answer_start"] = None if ref is None else kl_divergence(ref.logprobs, logprobs)
    if not teacher_forced:
        row["extra"] = {**row["extra"], "agree_tokens": agree_tokens}
    return row


__all__ = ["kl_divergence", "token_agreement"]
