"""``compress_prompt``: drop tokens, words or sentences from a prompt before any model reads it."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt.base import (
    CompressedPrompt,
    build_doc,
    count_tokens,
    make_scorer,
    select_units,
    unit_scores,
    validate_keep,
)

log = logging.getLogger(__name__)

TOLERANCE = 0.01  # refit when the achieved ratio is further than this from keep


@functools.lru_cache(maxsize=1)
def default_compressor() -> tuple[Any, Any]:
    """The bundled default causal LM and its tokenizer, loaded once per process."""
    from flowsieve.models import DEFAULT_MODEL, load

    return load(DEFAULT_MODEL)


def _strings(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    out = tuple(value)
    if not all(isinstance(v, str) and v for v in out):
        raise FlowsieveError(f"{what} must be non-empty strings, got {out!r}")
    return out


def compress_prompt(
    text: str,
    *,
    scorer: str = "selfinfo",
    keep: float = 0.33,
    question: str | None = None,
    model: Any = None,
    tokenizer: Any = None,
    force_tokens: Sequence[str] = ("\n", "?"),
    force_words: Sequence[str] = (),
    **scorer_kwargs: Any,
) -> CompressedPrompt:
    """Compress ``text`` to about ``keep`` of its tokens; the question, if any, is kept whole after it.

    Args:
        text: the context to compress.
        scorer: a registered prompt scorer (``flowsieve.methods.prompt.SCORERS``): ``selfinfo``,
            ``longllmlingua``, ``lexrank``, ``flow``, ``distilled``.
        keep: share of the whole prompt's tokens (context + blank line + question) to keep, in (0, 1].
            The question is never cut, so the context keeps ``keep * total - |question|`` tokens.
        question: appended after a blank line, never compressed; ``longllmlingua`` and ``flow`` use it.
        model, tokenizer: the compressor (default: the bundled ``smollm2``). Tokens are counted with
            ``tokenizer``; LM-based scorers run ``model``. ``lexrank`` and ``distilled`` need only
            the tokenizer.
        force_tokens: every token whose text contains one of these strings is kept (newlines and
            question marks by default).
        force_words: whole-word occurrences (case-sensitive) of these words or phrases are kept.
        scorer_kwargs: the scorer's settings (its dataclass fields).

    Returns:
        a :class:`CompressedPrompt`. The kept tokens stay in their original order; the achieved
        ratio (re-tokenised) is within about 0.01 of ``keep`` unless force-kept tokens alone exceed
        the budget (then a warning is logged).

    Raises:
        FlowsieveError: empty text, ``keep`` outside (0, 1], an unknown scorer or setting, a scorer
        that needs a question or a model it did not get.
    """
    if not isinstance(text, str) or not text.strip():
        raise FlowsieveError("the text is empty")
    keep = validate_keep(keep)
    if question is not None and (not isinstance(question, str) or not question.strip()):
        raise FlowsieveError("the question is empty")
    force_tokens = _strings(force_tokens, "force_tokens")
    force_words = _strings(force_words, "force_words")
    sc = make_scorer(scorer, scorer_kwargs)
    if sc.needs_question and question is None:
        raise FlowsieveError(f"the {scorer} scorer needs a question")
    if model is not None and tokenizer is None:
        raise FlowsieveError("pass the model's tokenizer with the model")
    if tokenizer is None:
        model, tokenizer = default_compressor()
    if sc.needs_model and model is None:
        raise FlowsieveError(f"the {scorer} scorer needs a causal LM: pass model= with its tokenizer")

    t0 = time.perf_counter()
    doc = build_doc(tokenizer, text, question, keep, force_tokens, force_words)
    if keep == 1.0 or doc.n_context == 0:
        return CompressedPrompt(
            text=doc.text,
            kept_tokens=doc.total,
            total_tokens=doc.total,
            ratio=1.0,
            seconds=time.perf_counter() - t0,
            kept_mask=torch.ones(doc.total, dtype=torch.bool),
            scorer=scorer,
        )
    scores = sc.score(doc, model)
    if scores.priority.shape != (doc.n_context,):
        raise RuntimeError(
            f"{scorer} returned {tuple(scores.priority.shape)} scores for {doc.n_context} tokens"
        )
    units = doc.words if sc.level == "word" else torch.arange(doc.n_context)
    priority, tier = unit_scores(scores, units)

    # meet the budget in tokens of the re-tokenised output: cutting inside words can merge or split
    # tokens, so refit the context budget by the difference a few times and keep the closest
    target = round(keep * doc.total)
    budget = doc.budget
    best: tuple[int, str, torch.Tensor] | None = None
    for _ in range(6):
        chosen = select_units(units, priority, tier, doc.forced, max(budget, 0), scores.fill)
        out, mask = doc.assemble(chosen)
        k = count_tokens(tokenizer, out)
        if best is None or abs(k - target) < abs(best[0] - target):
            best = (k, out, mask)
        if abs(k - target) <= max(1, TOLERANCE * doc.total) or k == target:
            break
        step = target - k
        if budget + step < 0 and budget <= 0:
            break
        budget += step
    assert best is not None
    k, out, mask = best
    ratio = k / doc.total
    if abs(ratio - keep) > 0.03:
        log.warning(
            "kept %d of %d tokens (ratio %.3f) for keep=%.3f: the question and force-kept tokens "
            "alone take %d tokens",
            k,
            doc.total,
            ratio,
            keep,
            int(doc.forced.sum()) + doc.total - doc.n_context,
        )
    return CompressedPrompt(
        text=out,
        kept_tokens=k,
        total_tokens=doc.total,
        ratio=ratio,
        seconds=time.perf_counter() - t0,
        kept_mask=mask,
        scorer=scorer,
    )
