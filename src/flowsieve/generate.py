"""Measured greedy generation: build the prompt, ask the sieve's site for the prefilled cache,
decode, measure. The CLI, the bench and :meth:`flowsieve.sieve.Sieve` users share it.

:func:`generate` runs prefill and greedy decoding by hand (no sampling) so that prefill time,
decode speed, KV-cache bytes and peak RSS are measured separately; with no sieve it produces
exactly the tokens of ``model.generate(do_sample=False)``. :func:`generate_many` shares one observed
prefill among several prefill-site sieves; :func:`score_continuation` feeds a continuation through
a prefilled cache teacher-forced (the bench's bits per byte).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from flowsieve.inputs import DEFAULT_INSTRUCTION, checked_prompt
from flowsieve.kvcache import full_kv_bytes, kv_bytes
from flowsieve.models import eos_ids
from flowsieve.sites import Prefilled, prefill_cache
from flowsieve.sites.prefill import prefill_shared

__all__ = ["GenResult", "PeakRSS", "decode_greedy", "generate", "generate_many", "score_continuation"]


@dataclass
class GenResult:
    """What one generation produced and cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    kept_tokens: int
    kv_bytes: int
    kv_bytes_full: int
    prefill_s: float
    decode_tok_s: float
    peak_rss_mb: float
    new_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PeakRSS:
    """Samples this process's RSS in a background thread; ``stop()`` returns the peak in MiB."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak / 2**20


@torch.inference_mode()
def decode_greedy(
    model: nn.Module,
    cache: Any,
    first_logits: torch.Tensor,
    max_new_tokens: int,
    eos: set[int],
    step: Any = None,
) -> tuple[list[int], float]:
    """Greedy decoding from the logits of the last prompt position; returns (tokens, seconds).

    ``step``, if given, is a context manager factory wrapped around every forward pass and then
    called after it (the decode site observes the step and evicts): ``with step() as s: ...; s()``.
    """
    out: list[int] = []
    nxt = int(first_logits[0, -1].argmax())
    t0 = time.perf_counter()
    while True:
        out.append(nxt)
        if nxt in eos or len(out) >= max_new_tokens:
            break
        logits = _step(model, cache, [nxt], step)
        nxt = int(logits[0, -1].argmax())
    return out, time.perf_counter() - t0


def _step(model: nn.Module, cache: Any, ids: list[int], step: Any) -> torch.Tensor:
    """One forward pass on ``cache``, under the decode site's per-step hook if there is one."""
    if step is None:
        return model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits
    with step() as after:
        logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits
    after()
    return logits


def _decode(
    model: nn.Module, tokenizer: Any, pre: Prefilled, max_new_tokens: int
) -> tuple[list[int], float, int]:
    """Decode greedily from a prefilled cache under its site's hook; (tokens, seconds, KV bytes:
    the largest of after prefill and after decoding)."""
    kv = kv_bytes(pre.cache)
    with pre.decoding():
        new, dec_s = decode_greedy(
            model, pre.cache, pre.logits, max_new_tokens, eos_ids(model, tokenizer), pre.step
        )
    if pre.step is not None:
        kv = max(kv, kv_bytes(pre.cache))
    pre.extra.update(pre.summary())
    return new, dec_s, kv


def generate(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    question: str | None = None,
    *,
    sieve: Any = None,
    mode: str = "query_aware",
    chat: bool = True,
    max_new_tokens: int = 32,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> GenResult:
    """Greedy generation with measurements, with or without a sieve.

    Args:
        sieve: a :class:`flowsieve.sieve.Sieve` at the ``prefill``, ``decode``, ``select`` or ``layer``
            site (:mod:`flowsieve.sites`), or None for the full context. At the ``select`` site
            nothing is evicted (``kv_bytes`` and ``kept_tokens`` are the full cache's) and
            ``extra["attended_entries"]`` is the mean number of entries a full-attention layer
            attended to per decode step. At the ``layer`` site context tokens leave the residual
            stream inside the model during prefill; ``kept_tokens`` is the stream after the last
            prune layer and ``extra["stages"]`` gives, per prune layer, the context tokens kept and
            the tokens left.
        mode: ``"query_aware"`` compresses with the question in the prompt (the observation window
            covers it); ``"query_agnostic"`` compresses the context first and appends the question
            afterwards, as a cache compressed once would serve questions asked later.
    """
    prompt = checked_prompt(model, tokenizer, context, question, chat, instruction, mode, max_new_tokens)
    rss = PeakRSS()
    t0 = time.perf_counter()
    pre = prefill_cache(model, prompt, sieve, mode, tokenizer, chat)
    prefill_s = time.perf_counter() - t0
    new, dec_s, kv = _decode(model, tokenizer, pre, max_new_tokens)
    return _result(
        tokenizer,
        new,
        dec_s,
        len(prompt),
        pre.kept,
        kv,
        full_kv_bytes(model, len(prompt)),
        prefill_s,
        rss.stop(),
        pre.extra,
    )


def _result(
    tokenizer: Any,
    new: list[int],
    dec_s: float,
    prompt_tokens: int,
    kept: int,
    kv: int,
    kv_full: int,
    prefill_s: float,
    peak_mb: float,
    extra: dict[str, Any],
) -> GenResult:
    steps = len(new) - 1  # forward passes after prefill
    return GenResult(
        text=tokenizer.decode(new, skip_special_tokens=True),
        token_ids=new,
        prompt_tokens=prompt_tokens,
        kept_tokens=kept,
        kv_bytes=kv,
        kv_bytes_full=kv_full,
        prefill_s=prefill_s,
        decode_tok_s=steps / dec_s if steps > 0 and dec_s > 0 else 0.0,
        peak_rss_mb=peak_mb,
        new_tokens=len(new),
        extra=extra,
    )


def generate_many(
    model: nn.Module,
    tokenizer: Any,
    context: str,
    question: str | None,
    sieves: Sequence[Any],
    *,
    mode: str = "query_aware",
    chat: bool = True,
    max_new_tokens: int = 32,
    instruction: str | None = DEFAULT_INSTRUCTION,
) -> list[GenResult]:
    """:func:`generate` for several prefill-site sieves on one prompt, sharing one observed prefill.

    The prompt is prefilled once while recording everything the sieves need
    (:func:`flowsieve.sites.prefill.prefill_shared`); then each sieve compresses its own copy of the
    cache, the question follows (query-agnostic mode) and greedy decoding runs. Each result is what
    ``generate`` with that sieve returns (kept entries, KV bytes, tokens), except for measurement
    noise and float ties: the shared pass computes attention the way the most demanding sieve needs
    it (exact chunked scan or stock SDPA), which agree to ~1e-6. Its ``prefill_s`` is the shared
    forward pass plus this sieve's own scoring, compression and question tail;
    ``extra["shared_prefill"]`` says so, and ``extra["shared_forward_s"]`` gives the shared part.
    Speed comparisons between methods need :func:`generate`, one method per pass.

    Sieves whose observation rows differ (e.g. Keyformer over all rows) get their own pass.
    Only the ``prefill`` site without chunking is shared; other sieves raise :class:`FlowsieveError`.
    """
    from flowsieve.sites.prefill import check_shareable

    sieves = [s.resolve(mode) for s in sieves]  # method="default" -> the mode's default
    check_shareable(sieves)
    if not sieves:
        return []
    prompt = checked_prompt(model, tokenizer, context, question, chat, instruction, mode, max_new_tokens)
    kv_full = full_kv_bytes(model, len(prompt))
    results: list[GenResult | None] = [None] * len(sieves)
    for j, pre in prefill_shared(model, prompt, sieves, mode):
        rss = PeakRSS()
        prefill_s = pre.extra["shared_forward_s"] + pre.extra["own_s"]
        new, dec_s, kv = _decode(model, tokenizer, pre, max_new_tokens)
        results[j] = _result(
            tokenizer, new, dec_s, len(prompt), pre.kept, kv, kv_full, prefill_s, rss.stop(), pre.extra
        )
    return [r for r in results if r is not None]


@torch.inference_mode()
def score_continuation(model: nn.Module, pre: Prefilled, ids: Sequence[int]) -> tuple[float, float]:
    """Negative log-likelihood (nats) of ``ids`` fed teacher-forced after a prefilled prompt, as
    decoding would feed them: one chunk when every layer holds as many entries and the site leaves
    no hook, else one token at a time under the site's hook (the decode site keeps evicting, the
    select and layer sites keep their runtimes). Returns (nll, seconds of the feed after the first token).
    """
    first = torch.log_softmax(pre.logits[0, -1].float(), dim=-1)
    nll = -float(first[ids[0]])
    cache = pre.cache
    layers = getattr(cache, "sieve_layers", None)
    uniform = layers is None or len({cache.layer(i).stored_length for i in layers}) <= 1
    t1 = time.perf_counter()
    with pre.decoding():
        if len(ids) > 1 and pre.hook is None and uniform:
            out = model(input_ids=torch.tensor([list(ids[:-1])]), cache=cache, use_cache=True).logits
            lp = torch.log_softmax(out[0].float(), dim=-1)
            nll -= float(lp.gather(1, torch.tensor(list(ids[1:])).unsqueeze(1)).double().sum())
        else:
            for t, nxt in itertools.pairwise(ids):
                out = _step(model, cache, [t], pre.step)
                nll -= float(torch.log_softmax(out[0, -1].float(), dim=-1)[nxt])
    return nll, time.perf_counter() - t1
