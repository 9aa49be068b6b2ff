"""Running one cell: a compressed generation, a prompt-site cell, a teacher-forced (``lm``) cell,
the full reference, and the prefill-site cells of one item that share one observed prefill.

Compressed cells go through :func:`run_compressed` (the :class:`flowsieve.sieve.Sieve` facade);
:func:`execute` runs one flowsieve cell (full or compressed) and compares it with the full run of
its item (:mod:`flowsieve.bench.references`); :func:`execute_shared` does the same for a group of
prefill-site cells from one :func:`flowsieve.generate.generate_many` call. Teacher-forced tasks
(``lm``) generate nothing: :func:`run_lm` prefills (and compresses) the context, feeds the held-out
continuation through the cache and records ``bits_per_byte``. Predictions are scored here, with the
task's ``score()`` (:func:`score_row`).

``flowsieve.generate`` is called through the module (``_gen.generate``), so that a replaced
``flowsieve.generate.generate`` is the one that runs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flowsieve.generate as _gen
from flowsieve.bench.config import AGREE_TOKENS, Job, _make_sieve, _sieve_class, parse_method
from flowsieve.bench.references import (
    _REFERENCES,
    _compare,
    _Recorder,
    _Reference,
    _reference_key,
    _remember,
)
from flowsieve.bench.store import FULL, MEASURES
from flowsieve.bench.tasks import Item
from flowsieve.errors import FlowsieveError
from flowsieve.generate import GenResult
from flowsieve.inputs import build_prompt
from flowsieve.kvcache import full_kv_bytes


def run_compressed(
    model: Any,
    tok: Any,
    item: Item,
    method: str,
    site: str,
    keep: float | None,
    budget: int | None,
    mode: str,
    max_new_tokens: int,
    *,
    chat: bool = True,
    compressor: str | None = None,
) -> GenResult:
    """One compressed generation through the :class:`flowsieve.sieve.Sieve` facade (or, at the
    ``prompt`` site, :func:`flowsieve.sites.prompt.compress_prompt` followed by a plain generation).

    ``keep`` is None for a budget cell and ``budget`` None for a keep cell. Raises
    :class:`FlowsieveError` when the method cannot run; never falls back to the full context.
    """
    if site == "prompt":
        return run_prompt_site(
            model, tok, item, method, keep, mode, max_new_tokens, chat=chat, compressor=compressor
        )
    try:
        _, sieve_cls = _sieve_class()
    except FlowsieveError as e:
        raise FlowsieveError(f"method '{method}' is not available: {e}") from None
    params = inspect.signature(_gen.generate).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any and not {"sieve", "mode"} <= set(params):
        raise FlowsieveError(f"method '{method}' is not available: generate() takes no sieve and mode")
    sieve = _make_sieve(sieve_cls, method, keep, budget, site)
    return _gen.generate(
        model,
        tok,
        item.context,
        item.question,
        chat=chat,
        max_new_tokens=max_new_tokens,
        sieve=sieve,
        mode=mode,
    )


@functools.lru_cache(maxsize=2)
def _compressor(name: str) -> tuple[Any, Any]:
    from flowsieve.models import load

    return load(name)


def run_prompt_site(
    model: Any,
    tok: Any,
    item: Item,
    scorer: str,
    keep: float | None,
    mode: str,
    max_new_tokens: int,
    *,
    chat: bool = True,
    compressor: str | None = None,
) -> GenResult:
    """Compress the item's context with a prompt scorer, then answer the shorter prompt with ``model``.

    Query-aware: the scorer sees the question (it is never cut); query-agnostic: the context is
    compressed alone. ``keep`` is the share of the compressor's tokens of context + question
    (:func:`flowsieve.sites.prompt.compress_prompt`). The row's ``prefill_s`` includes the compression
    time (time to first token); ``prompt_tokens`` and ``kv_bytes_full`` are the uncompressed
    prompt's, ``kept_tokens`` and ``kv_bytes`` the compressed one's.
    """
    from flowsieve.sites.prompt import compress_prompt

    if keep is None:
        raise FlowsieveError("the prompt site takes keep ratios, not token budgets")
    cmodel, ctok = (model, tok) if compressor is None else _compressor(compressor)
    question = item.question if mode == "query_aware" else None
    name, options = parse_method(scorer)
    cp = compress_prompt(
        item.context, scorer=name, keep=keep, question=question, model=cmodel, tokenizer=ctok, **options
    )
    context = cp.text
    if question is not None:
        q = question.strip()
        if not context.rstrip().endswith(q):
            raise FlowsieveError("the compressed prompt does not end with the question")
        context = context.rstrip()[: -len(q)].rstrip()
    if not context.strip():
        raise FlowsieveError(f"{scorer} kept nothing of the context at keep {keep}")
    result = _gen.generate(model, tok, context, item.question, chat=chat, max_new_tokens=max_new_tokens)
    full = build_prompt(tok, item.context, item.question, chat=chat)
    result.kv_bytes_full = full_kv_bytes(model, len(full))
    result.kept_tokens = result.prompt_tokens
    result.prompt_tokens = len(full)
    result.prefill_s += cp.seconds
    result.extra.update(
        {
            "compress_s": round(cp.seconds, 4),
            "compress_ratio": round(cp.ratio, 4),
            "compressor": compressor or "(the answering model)",
        }
    )
    return result


def _result_fields(result: GenResult | Mapping[str, Any]) -> dict[str, Any]:
    d = result.to_dict() if isinstance(result, GenResult) else dict(result)
    out = {k: d.get(k) for k in MEASURES if k not in ("prediction", "score")}
    out["prediction"] = d.get("text", d.get("prediction")) or ""
    extra = dict(d.get("extra") or {})
    if d.get("token_ids") is not None:
        extra["token_ids"] = [int(t) for t in d["token_ids"]]
    out["extra"] = extra
    versions = d.get("versions") or extra.get("versions")  # a peer reports its environment's
    if isinstance(versions, Mapping):
        out["versions"] = dict(versions)
    return out


def score_row(job: Job, result: GenResult | Mapping[str, Any]) -> dict[str, Any]:
    """The result row of ``job``: its identity, measures and the task's score of the prediction
    (teacher-forced tasks: the score of the result's ``bits_per_byte``)."""
    row = dataclasses.asdict(job.cell)
    row |= _result_fields(result)
    if job.task.teacher_forced:
        bpb = row.get("bits_per_byte")
        if bpb is None:
            raise FlowsieveError(
                f"task {job.task.name} is teacher-forced but the result has no bits_per_byte"
            )
        score = float(job.task.score_bits(bpb))  # type: ignore[attr-defined]
    else:
        score = float(job.task.score(job.item, row["prediction"]))
    if not 0.0 <= score <= 1.0:
        raise FlowsieveError(f"task {job.task.name} scored {score}, outside [0, 1]")
    row["score"] = score
    row["task_params"] = job.task.params()
    meta = job.item.meta
    row["extra"] = {
        **{k: meta[k] for k in ("length_tokens", "depth") if k in meta},
        **row["extra"],
    }
    return row


# --- cells compared with the full run --------------------------------------------------------------


def _reference(model: Any, tok: Any, job: Job, chat: bool) -> _Reference:
    """The full run of ``job``'s item: from memory, else computed now (and kept)."""
    c = job.cell
    key = _reference_key(model, job.item, chat, c.max_new_tokens)
    ref = _REFERENCES.get(key)
    if ref is not None:
        _REFERENCES.move_to_end(key)
        return ref
    if job.task.teacher_forced:
        _, lp = run_lm(model, tok, job.item)
        return _remember(key, _Reference(lp, []))
    with _Recorder(model, c.max_new_tokens) as rec:
        res = _gen.generate(
            model, tok, job.item.context, job.item.question, chat=chat, max_new_tokens=c.max_new_tokens
        )
    return _remember(key, _Reference(rec.answer_start(res.token_ids), list(res.token_ids)))


def execute(
    job: Job,
    model: Any,
    tok: Any,
    *,
    chat: bool = True,
    compressor: str | None = None,
    agree_tokens: int = AGREE_TOKENS,
) -> dict[str, Any]:
    """Run one flowsieve cell (full or compressed) and return its scored row, compared with the
    full run of the same item (``token_agreement``, ``kl_answer_start``)."""
    import torch

    c = job.cell
    forced = job.task.teacher_forced
    ref = None if c.is_full else _reference(model, tok, job, chat)
    torch.manual_seed(c.seed)  # methods that draw at random (the `random` baseline) repeat
    keep, budget = (c.keep if c.budget == 0 else None), (c.budget or None)
    if forced:
        site = None if c.is_full else c.site
        result, lp = run_lm(model, tok, job.item, c.method, site, keep, budget, c.mode, compressor=compressor)
    else:
        with _Recorder(model, c.max_new_tokens) as rec:
            if c.is_full:
                result = _gen.generate(
                    model,
                    tok,
                    job.item.context,
                    job.item.question,
                    chat=chat,
                    max_new_tokens=c.max_new_tokens,
                )
            else:
                result = run_compressed(
                    model,
                    tok,
                    job.item,
                    c.method,
                    c.site,
                    keep,
                    budget,
                    c.mode,
                    c.max_new_tokens,
                    chat=chat,
                    compressor=compressor,
                )
        lp = rec.answer_start(result.token_ids)
    row = score_row(job, result)
    if c.is_full:
        ids = [] if forced else list(result.token_ids)
        ref = _remember(_reference_key(model, job.item, chat, c.max_new_tokens), _Reference(lp, ids))
    return _compare(row, lp, ref, agree_tokens, forced)


def execute_shared(
    jobs: Sequence[Job], model: Any, tok: Any, *, chat: bool = True, agree_tokens: int = AGREE_TOKENS
) -> list[dict[str, Any]]:
    """Run prefill-site cells of one item and mode from one shared observed prefill
    (:func:`flowsieve.generate.generate_many`); returns their scored rows in order."""
    import torch

    _, sieve_cls = _sieve_class()
    first = jobs[0]
    ref = _reference(model, tok, first, chat)
    torch.manual_seed(first.cell.seed)
    sieves = [
        _make_sieve(
            sieve_cls,
            j.cell.method,
            j.cell.keep if j.cell.budget == 0 else None,
            j.cell.budget or None,
            j.cell.site,
        )
        for j in jobs
    ]
    with _Recorder(model, first.cell.max_new_tokens) as rec:
        results = _gen.generate_many(
            model,
            tok,
            first.item.context,
            first.item.question,
            sieves,
            mode=first.cell.mode,
            chat=chat,
            max_new_tokens=first.cell.max_new_tokens,
        )
    prompt = build_prompt(tok, first.item.context, first.item.question, chat=chat)
    starts = rec.shared_answer_starts(results, len(prompt), prompt.split, first.cell.mode)
    return [
        _compare(score_row(j, r), lp, ref, agree_tokens, False)
        for j, r, lp in zip(jobs, results, starts, strict=True)
    ]


# --- teacher-forced cells (lm) ---------------------------------------------------------------------


def _encode(tok: Any, text: str) -> list[int]:
    try:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    except TypeError:
        ids = tok(text)["input_ids"]
    return [int(i) for i in ids]


def run_lm(
    model: Any,
    tok: Any,
    item: Item,
    method: str = FULL,
    site: str | None = None,
    keep: float | None = None,
    budget: int | None = None,
    mode: str = "query_aware",
    *,
    compressor: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """A teacher-forced cell: the negative log-likelihood of ``item.answers[0]`` (the held-out
    continuation) after ``item.context``, the context compressed with ``method`` at ``site``
    (None: the full context). Returns (result fields with ``bits_per_byte``, the log-probabilities
    of the continuation's first token (V,)).

    The context is plain text (no chat template, no question; both modes are the same run). At
    the ``prompt`` site the context text is compressed first; at the other sites the sieve
    compresses the prefilled cache at its site (:func:`flowsieve.sites.prefill_cache`), and the
    continuation is fed through it as decoding would (:func:`flowsieve.generate.score_continuation`). ``extra``: ``nll_bits``, ``scored_tokens``, ``scored_bytes``
    (UTF-8 bytes of the continuation, leading space included) and ``flops_per_token``
    (:func:`flowsieve.bench.tasks.lm.decode_flops_per_token`, for Information Capacity).
    """
    import torch

    from flowsieve.bench.tasks.lm import decode_flops_per_token
    from flowsieve.generate import PeakRSS, score_continuation
    from flowsieve.kvcache import kv_bytes
    from flowsieve.models import context_length
    from flowsieve.sites import prefill_cache

    if not item.answers or not item.answers[0]:
        raise FlowsieveError(f"item {item.item_id} has no continuation to score")
    continuation = item.answers[0]
    context, extra0, compress_s = item.context, {}, 0.0
    sieve = None
    if site == "prompt":
        from flowsieve.sites.prompt import compress_prompt

        if keep is None:
            raise FlowsieveError("the prompt site takes keep ratios, not token budgets")
        cmodel, ctok = (model, tok) if compressor is None else _compressor(compressor)
        name, options = parse_method(method)
        cp = compress_prompt(context, scorer=name, keep=keep, model=cmodel, tokenizer=ctok, **options)
        if not cp.text.strip():
            raise FlowsieveError(f"{method} kept nothing of the context at keep {keep}")
        context, compress_s = cp.text, cp.seconds
        extra0 = {"compress_s": round(cp.seconds, 4), "compress_ratio": round(cp.ratio, 4)}
    elif site is not None:
        _, sieve_cls = _sieve_class()
        sieve = _make_sieve(sieve_cls, method, keep, budget, site)
    full = build_prompt(tok, item.context, None, chat=False)
    prompt = full if site != "prompt" else build_prompt(tok, context, None, chat=False)
    cont = _encode(tok, continuation)
    if not cont:
        raise FlowsieveError(f"the continuation of item {item.item_id} has no tokens")
    limit = context_length(model)
    if limit is not None and len(prompt) + len(cont) > limit:
        raise FlowsieveError(
            f"context ({len(prompt)}) and continuation ({len(cont)}) tokens exceed the model's context of {limit}"
        )
    rss = PeakRSS()
    t0 = time.perf_counter()
    pre = prefill_cache(model, prompt, sieve, mode, tok, chat=False)
    prefill_s = time.perf_counter() - t0 + compress_s
    kv = kv_bytes(pre.cache)
    nll, feed_s = score_continuation(model, pre, cont)
    if pre.step is not None:
        kv = max(kv, kv_bytes(pre.cache))
    extra = {**pre.extra, **pre.summary()}
    peak = rss.stop()
    bits = nll / math.log(2)
    n_bytes = len(continuation.encode("utf-8"))
    extra = {
        **extra0,
        **{k: v for k, v in extra.items() if not hasattr(v, "shape")},
        "nll_bits": bits,
        "scored_tokens": len(cont),
        "scored_bytes": n_bytes,
        "score_tok_s": round(len(cont) / feed_s, 2) if feed_s > 0 else None,
        "flops_per_token": decode_flops_per_token(model.config),
    }
    result = {
        "prediction": "",
        "prompt_tokens": len(full),
        "kept_tokens": pre.kept,
        "kv_bytes": kv,
        "kv_bytes_full": full_kv_bytes(model, len(full)),
        "peak_rss_mb": peak,
        "prefill_s": prefill_s,
        "decode_tok_s": None,
        "new_tokens": 0,
        "bits_per_byte": bits / n_bytes,
        "extra": extra,
    }
    return result, torch.log_softmax(pre.logits[0, -1].float(), dim=-1)


# --- helpers of the sweep -------------------------------------------------------------------------


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


__all__ = [
    "execute",
    "execute_shared",
    "run_compressed",
    "run_lm",
    "run_prompt_site",
    "score_row",
]
