"""The ``prefill`` site: compress the cache right after the prompt's forward pass.

The prompt is prefilled while the method's observations are recorded (:meth:`Sieve.observe_spec`),
every compressible layer is scored and the best entries are kept (:meth:`Sieve.compress`); the
cache physically shrinks. Options of the same site, not separate paths:

- ``Sieve.chunk``: prefill in chunks and compress after each one (the cache never holds more than
  budget + chunk entries); every chunk but the last is observed by its last ``window`` tokens;
- ``Sieve.refeed``: after compressing, the question is fed again over the compressed cache;
- methods with ``replays = True`` (KVzip) score from passes that replay the context on top of the
  prefilled cache (:func:`replay_observe`), which are removed again before compressing.

:func:`prefill_shared` prefills a prompt once for several sieves (each compresses its own copy).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt, encode_plain, turn_end
from flowsieve.kvcache import SieveCache
from flowsieve.methods.kvzip import FIRST_REQUEST, NEXT_REQUEST
from flowsieve.observe import Observer, ObserveSpec, observe
from flowsieve.sites.base import Prefilled, append_tokens, forward, protect_mask, split, units_for

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve

__all__ = ["PrefillSite", "merge_specs", "prefill_shared", "replay_observe"]


def _check_refeed(prompt: Prompt, mode: str, n_tokens: int) -> None:
    if mode != "query_aware" or prompt.question is None or prompt.split >= n_tokens:
        raise FlowsieveError("refeed needs a question, in query-aware mode")


class PrefillSite:
    """Compression of the prefilled cache (see the module docstring)."""

    name = "prefill"

    def check(self, sieve: Sieve) -> None:
        """Every KV method runs here (chunking and refeed are checked by the sieve itself)."""

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
        head, tail = split(prompt, mode)
        T = len(head)
        c0, c1 = prompt.context
        question = prompt.question if mode == "query_aware" else None
        rows = sieve.observation_rows(T, question)
        protect = protect_mask(prompt, T, rows)
        w = min(sieve.window, T)
        cache = SieveCache(model)
        k = sieve.target(T)
        size = sieve.chunk or T
        units = units_for(sieve, prompt)
        replay = getattr(sieve.scorer, "replays", False)
        if sieve.refeed:
            _check_refeed(prompt, mode, T)
            if replay:
                raise FlowsieveError(f"method '{sieve.method}' replays the context; it does not refeed")
            return _prefill_refeed(model, prompt, sieve, protect, rows, k, units)
        t0 = time.perf_counter()
        score_s = 0.0
        peak_entries = 0
        kept = T
        for a in range(0, T, size):
            b = min(a + size, T)
            win = sieve.observation_rows(b, question, a) if b == T else tuple(range(max(0, b - w), b))
            with observe(model, sieve.observe_spec(win, cache.sieve_layers)) as obs:
                logits = forward(model, cache, head[a:b])
            peak_entries = max(peak_entries, max(cache.stored_lengths()))
            if b == T or sieve.scorer.carries or max(cache.stored_lengths()) > k:
                # the window of every chunk is kept at that step; at the end only the final window
                prot = protect[:b].clone()
                prot[win[0] : b] = True
                ts = time.perf_counter()
                if replay:
                    obs = replay_observe(model, tokenizer, cache, head, (c0, min(c1, T)), sieve, chat)
                kept = sieve.compress(obs, cache, prot, win, k=min(k, b), units=units)
                score_s += time.perf_counter() - ts
        t1 = time.perf_counter()
        if tail:
            logits = append_tokens(model, cache, tail)
        extra = {
            "kept_entries": kept + len(tail),
            "compressed_tokens": T,
            "protected": int(protect.sum()),
            "prefill_forward_s": round(t1 - t0 - score_s, 4),
            "score_s": round(score_s, 4),
            "peak_entries": peak_entries,
            "chunk": sieve.chunk,
        }
        protect = torch.cat([protect, torch.ones(len(tail), dtype=torch.bool)])
        return Prefilled(cache, logits, kept + len(tail), extra, protect=protect)


def _requery(
    model: nn.Module, cache: SieveCache, question: list[int], others: dict[int, Any]
) -> torch.Tensor:
    """Drop the question's entries from a compressed cache (they are protected, so still the last
    ones stored), restore the non-evicting layers to their state before the question, and feed the
    question again; returns its last logits (1, 1, V)."""
    cache.rewind(len(question), others)
    return append_tokens(model, cache, question)


def _prefill_refeed(
    model: nn.Module,
    prompt: Prompt,
    sieve: Sieve,
    protect: torch.Tensor,
    win: tuple[int, ...],
    k: int,
    units: torch.Tensor | None,
) -> Prefilled:
    """Query-aware prefill with ``sieve.refeed``: context, then question, observed as one prefill
    (observation rows ``win``); compress; then the question again over the compressed cache."""
    ids = list(prompt.ids)
    T, s = len(ids), prompt.split
    cache = SieveCache(model)
    t0 = time.perf_counter()
    with observe(model, sieve.observe_spec(win, cache.sieve_layers)) as obs:
        forward(model, cache, ids[:s])
        others = cache.snapshot_fixed()
        forward(model, cache, ids[s:])
    obs.pad_rows(T)
    peak_entries = max(cache.stored_lengths())
    ts = time.perf_counter()
    kept = sieve.compress(obs, cache, protect, win, k=k, units=units)
    score_s = time.perf_counter() - ts
    logits = _requery(model, cache, ids[s:], others)
    extra = {
        "kept_entries": kept,
        "compressed_tokens": T,
        "protected": int(protect.sum()),
        "prefill_forward_s": round(time.perf_counter() - t0 - score_s, 4),
        "score_s": round(score_s, 4),
        "peak_entries": peak_entries,
        "chunk": None,
        "refeed_tokens": T - s,
    }
    return Prefilled(cache, logits, kept, extra, protect=protect)


@torch.inference_mode()
def replay_observe(
    model: nn.Module,
    tokenizer: Any,
    cache: SieveCache,
    head: Sequence[int],
    context: tuple[int, int],
    sieve: Sieve,
    chat: bool,
) -> Observer:
    """Observe passes that replay the context on top of a prefilled cache (methods with
    ``replays = True``, e.g. KVzip), then remove every replay entry again.

    Each pass feeds a request to repeat the context, the end of the user turn when the prompt is a
    chat whose turn is still open, and the next ``chunk_size`` context tokens, teacher-forced. The
    evictable layers are cropped back after each pass; the other layers (sliding windows) are
    restored from a copy. Returns the :class:`~flowsieve.observe.Observer` (slot coordinates).

    Args:
        head: the prefilled token ids (T,); context: its context span [c0, c1).
    """
    if tokenizer is None:
        raise FlowsieveError(f"method '{sieve.method}' replays the context and needs the tokenizer")
    scorer = sieve.scorer
    saved = cache.snapshot_fixed()
    end = turn_end(tokenizer) if chat else []
    if end and list(head[-len(end) :]) == end:
        end = []  # the assistant turn is already open (query-aware prompt)
    first, nxt = encode_plain(tokenizer, FIRST_REQUEST), encode_plain(tokenizer, NEXT_REQUEST)
    c0, c1 = context
    spec = scorer.replay_spec()
    spec.slots = True
    spec.layers = tuple(cache.sieve_layers)
    size = getattr(scorer, "chunk_size", c1 - c0) or (c1 - c0)
    overlap = getattr(scorer, "overlap", 0)
    with observe(model, spec) as obs:
        for a in range(c0, c1, size):
            b = min(a + size, c1)
            req = first if a == c0 else nxt + list(head[max(c0, a - overlap) : a])
            ids = req + end + list(head[a:b])
            forward(model, cache, ids)
            cache.rewind(len(ids), saved)
    return obs


def merge_specs(specs: Sequence[ObserveSpec]) -> ObserveSpec:
    """One :class:`~flowsieve.observe.ObserveSpec` that records everything each of ``specs`` asks for.

    Flags are or-ed, rows and layers united; the sampling settings (``row_stride``,
    ``entropy_stride``, ``workers``, ``chunk``) must agree, since they change the recorded values.
    """
    if not specs:
        raise FlowsieveError("no observation specs to merge")
    first = specs[0]
    out: dict[str, Any] = {}
    for f in fields(first):
        vals = [getattr(s, f.name) for s in specs]
        if f.name == "rows":
            out[f.name] = tuple(sorted(set().union(*map(set, vals))))
        elif f.name == "layers":
            out[f.name] = (
                None if any(v is None for v in vals) else tuple(sorted(set().union(*map(set, vals))))
            )
        elif isinstance(vals[0], bool):
            out[f.name] = any(vals)
        elif len(set(vals)) > 1:
            raise FlowsieveError(
                f"the sieves observe with different {f.name} settings ({vals}); run them separately"
            )
        else:
            out[f.name] = vals[0]
    return replace(first, **out)


def check_shareable(sieves: Sequence[Sieve]) -> None:
    """Raise unless every sieve can take part in one shared prefill (unchunked prefill site, no replay)."""
    for s in sieves:
        if s.site != "prefill" or s.chunk is not None:
            raise FlowsieveError("generate_many shares unchunked prefill-site passes only; use generate()")
        if getattr(s.scorer, "replays", False):
            raise FlowsieveError(f"method '{s.method}' scores from its own replay passes; use generate()")


def _groups(model: nn.Module, sieves: Sequence[Sieve], wins: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices of the sieves that can share one observed pass (same observation rows)."""
    layers = SieveCache(model).sieve_layers
    groups: dict[tuple[int, ...], list[int]] = {}
    rowless = []
    for j, s in enumerate(sieves):
        rows = tuple(s.observe_spec(wins[j], layers).rows)
        if rows:
            groups.setdefault(rows, []).append(j)
        else:
            rowless.append(j)  # reads no rows: may share any pass
    if rowless and groups:
        next(iter(groups.values())).extend(rowless)
    elif rowless:
        groups[()] = rowless
    return list(groups.values())


def prefill_shared(
    model: nn.Module, prompt: Prompt, sieves: Sequence[Sieve], mode: str
) -> Iterator[tuple[int, Prefilled]]:
    """Prefill ``prompt`` once per group of ``sieves`` that observe the same rows, recording what
    all of them need (:func:`merge_specs`); then yield, sieve by sieve, (its index, its own
    compressed copy of the cache). ``extra["shared_forward_s"]`` is the shared pass,
    ``extra["own_s"]`` this sieve's scoring, compression and question tail.
    """
    sieves = [s.resolve(mode) for s in sieves]
    check_shareable(sieves)
    head, tail = split(prompt, mode)
    T = len(head)
    question = prompt.question if mode == "query_aware" else None
    wins = [s.observation_rows(T, question) for s in sieves]
    protects = [protect_mask(prompt, T, w) for w in wins]
    layers = SieveCache(model).sieve_layers
    for members in _groups(model, sieves, wins):
        spec = merge_specs([sieves[j].observe_spec(wins[j], layers) for j in members])
        base = SieveCache(model)
        t0 = time.perf_counter()
        refeed = any(sieves[j].refeed for j in members)
        if refeed:
            _check_refeed(prompt, mode, T)
        others: dict[int, Any] = {}
        with torch.inference_mode(), observe(model, spec) as obs:
            if refeed:  # context, then question: the non-evicting layers are saved in between
                forward(model, base, head[: prompt.split])
                others = base.snapshot_fixed()
                logits0 = forward(model, base, head[prompt.split :])
                obs.pad_rows(T)
            else:
                logits0 = forward(model, base, head)
        shared_s = time.perf_counter() - t0
        for j in members:
            sieve = sieves[j]
            t1 = time.perf_counter()
            cache = base.clone()
            with torch.inference_mode():
                kept = sieve.compress(
                    obs, cache, protects[j], wins[j], k=sieve.target(T), units=units_for(sieve, prompt)
                )
                logits = append_tokens(model, cache, tail) if tail else logits0
                if sieve.refeed:
                    logits = _requery(model, cache, head[prompt.split :], others)
            extra = {
                "kept_entries": kept + len(tail),
                "compressed_tokens": T,
                "protected": int(protects[j].sum()),
                "shared_prefill": True,
                "shared_forward_s": round(shared_s, 4),
                "own_s": round(time.perf_counter() - t1, 4),
            }
            yield j, Prefilled(cache, logits, kept + len(tail), extra)
            del cache
        del obs, base
