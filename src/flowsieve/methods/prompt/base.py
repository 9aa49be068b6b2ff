"""The prompt site's shared pieces: the tokenised prompt, the scorer base class and registry, selection.

A prompt scorer turns a :class:`PromptDoc` (the prompt tokenised with the counting tokenizer, with
its context tokens grouped into words and paragraphs and its force-kept tokens marked) into
:class:`Scores`: a priority per context token and, optionally, a tier (the method's own keep rule).
:func:`select_units` then fills a token budget with whole units (tokens or words) in order of
(tier, priority), always keeping the forced units; text order is never changed.

Shapes: T tokens of the whole prompt (context, separator, question); n context tokens (the first n);
U selection units (tokens or words) of the context.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch

from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.registry import Registry
from flowsieve.sentences import sentence_spans as sentence_spans

SEPARATOR = "\n\n"  # between the context and the question, as in flowsieve.trace.build_input


@dataclass(frozen=True)
class CompressedPrompt:
    """The result of :func:`flowsieve.sites.prompt.compress_prompt`.

    Attributes:
        text: the compressed prompt: the kept context tokens in their original order, then (when a
            question was given) the separator and the question, untouched.
        kept_tokens: tokens of ``text`` under the counting tokenizer (the compressor's).
        total_tokens: tokens of the original prompt (context, separator, question).
        ratio: ``kept_tokens / total_tokens``.
        seconds: wall time of the compression (model loading excluded).
        kept_mask: (T,) bool over the original prompt's tokens; the question's tokens are all True.
        scorer: the scorer's registry name.
    """

    text: str
    kept_tokens: int
    total_tokens: int
    ratio: float
    seconds: float
    kept_mask: torch.Tensor
    scorer: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the mask)."""
        return {
            "text": self.text,
            "kept_tokens": self.kept_tokens,
            "total_tokens": self.total_tokens,
            "ratio": round(self.ratio, 4),
            "seconds": round(self.seconds, 4),
            "scorer": self.scorer,
        }


# ------------------------------------------------------------------------------------- tokenisation


def tokenize_spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and the character span each token owns.

    Spans tile the text: token ``i`` owns ``[end_{i-1}, end_i)`` (the first from 0, the last to the
    end), so whitespace a tokenizer leaves out of its offsets goes to the token after it and joining
    the spans of all tokens gives the text back exactly.
    """
    try:
        enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError) as e:
        raise FlowsieveError(
            f"the tokenizer {type(tokenizer).__name__} gives no character offsets; "
            "prompt compression needs a fast (offset-mapping) tokenizer"
        ) from e
    ids = [int(i) for i in enc["input_ids"]]
    ends: list[int] = []
    for _, b in offsets:
        ends.append(max(int(b), ends[-1] if ends else 0))
    if not ids:
        return [], []
    ends[-1] = len(text)
    starts = [0, *ends[:-1]]
    return ids, list(zip(starts, ends))


def count_tokens(tokenizer: Any, text: str) -> int:
    """Tokens of ``text`` under ``tokenizer``, without special tokens."""
    if not text:
        return 0
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def prefix_ids(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before a text (a BOS), or ``[]``."""
    try:
        with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
        plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError):
        return []
    k = len(with_special) - len(plain)
    if k > 0 and with_special[k:] == plain:
        return with_special[:k]
    if k > 0 and with_special[1 : 1 + len(plain)] == plain:
        return with_special[:1]
    return []


# ----------------------------------------------------------------------------------- text structure

_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    """Paragraphs (blank-line separated) as character spans that tile ``text``; a paragraph owns the
    blank lines after it."""
    cuts = [0] + [m.end() for m in _PARAGRAPH.finditer(text) if 0 < m.end() < len(text)] + [len(text)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _token_of_char(spans: Sequence[tuple[int, int]], pos: int) -> int:
    ends = [b for _, b in spans]
    return min(bisect.bisect_right(ends, pos), len(spans) - 1)


def group_tokens(spans: Sequence[tuple[int, int]], regions: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(n,) long: the index of the character region (sentence, paragraph) each token starts in."""
    ends = [b for _, b in regions]
    out = [min(bisect.bisect_right(ends, a), len(regions) - 1) for a, _ in spans]
    return torch.tensor(out, dtype=torch.long)


def count_words(text: str) -> int:
    """Number of words (maximal runs of non-space characters) in ``text``."""
    return sum(1 for _ in re.finditer(r"\S+", text))


def token_runs(text: str, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(n,) long: the index of the word (maximal run of non-space characters of ``text``) each
    token's first non-space character is in, or -1 for a token of only whitespace."""
    run_of_char = np.full(len(text) + 1, -1, dtype=np.int64)
    for k, m in enumerate(re.finditer(r"\S+", text)):
        run_of_char[m.start() : m.end()] = k
    out = []
    for a, b in spans:
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        out.append(int(run_of_char[a + lead]) if lead < len(piece) else -1)
    return torch.tensor(out, dtype=torch.long)


def word_units(
    text: str, spans: Sequence[tuple[int, int]], separate: torch.Tensor | None = None
) -> torch.Tensor:
    """(n,) long: a unit index per token such that each unit is one whole word.

    A word is a maximal run of non-space characters; a token belongs to the word its first
    non-space character is in (:func:`token_runs`). A token of only whitespace belongs to the word
    after it (it is that word's leading space, so a dropped word takes it along and the words left
    never run together), unless ``separate`` (n,) marks it (forced line breaks) or no word follows:
    then it is a unit of its own. Unit indices increase with token order.
    """
    runs = token_runs(text, spans).tolist()
    sep = [False] * len(runs) if separate is None else separate.tolist()
    eff = list(runs)
    nxt = -1
    for i in range(len(runs) - 1, -1, -1):
        if runs[i] >= 0:
            nxt = runs[i]
        elif sep[i]:
            nxt = -1
        else:
            eff[i] = nxt
    units: list[int] = []
    last, u = -1, -1
    for r in eff:
        if r < 0 or r != last:
            u += 1
        units.append(u)
        last = r
    return torch.tensor(units, dtype=torch.long)


# ---------------------------------------------------------------------------------------- the prompt


@dataclass
class PromptDoc:
    """A prompt tokenised with the counting tokenizer, ready to be scored and cut.

    Attributes:
        text: the whole original prompt: ``context`` or ``context.rstrip() + SEPARATOR + question``.
        context: the part that may be compressed (a prefix of ``text``).
        question: the question, or None.
        ids: (T,) token ids of ``text`` (no special tokens).
        spans: (T,) character spans tiling ``text`` (see :func:`tokenize_spans`).
        n_context: tokens ``[0, n_context)`` are the context; the rest (separator, question) are kept.
        forced: (n,) bool, context tokens that must be kept.
        words: (n,) long, whole-word unit of each context token (:func:`word_units`).
        paragraphs: (n,) long, blank-line separated paragraph of each context token.
        budget: context tokens to keep so that the whole prompt keeps ``keep`` of its tokens.
        keep: the requested keep ratio over the whole prompt.
        tokenizer: the counting tokenizer.
    """

    text: str
    context: str
    question: str | None
    ids: list[int]
    spans: list[tuple[int, int]]
    n_context: int
    forced: torch.Tensor
    words: torch.Tensor
    paragraphs: torch.Tensor
    budget: int
    keep: float
    tokenizer: Any = field(repr=False, default=None)

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def context_ids(self) -> list[int]:
        return self.ids[: self.n_context]

    @property
    def question_ids(self) -> list[int]:
        """The tokens after the context (separator and question)."""
        return self.ids[self.n_context :]

    def token_text(self, i: int) -> str:
        a, b = self.spans[i]
        return self.text[a:b]

    def assemble(self, keep_context: torch.Tensor) -> tuple[str, torch.Tensor]:
        """(n,) bool over the context -> (compressed text, (T,) bool mask over the whole prompt)."""
        mask = torch.ones(self.total, dtype=torch.bool)
        mask[: self.n_context] = keep_context
        text = "".join(self.text[a:b] for (a, b), k in zip(self.spans, mask.tolist()) if k)
        return text, mask


def build_doc(
    tokenizer: Any,
    text: str,
    question: str | None,
    keep: float,
    force_tokens: Sequence[str] = ("\n", "?"),
    force_words: Sequence[str] = (),
) -> PromptDoc:
    """Tokenise the prompt, mark forced tokens and compute the context budget.

    The budget follows LLMLingua-1: ``T* = keep * (|context| + |question|) - |question|`` tokens for
    the context, the question (with its separator) being kept whole.
    """
    q = question.strip() if question is not None else None
    context = text.rstrip() if q else text
    full = context + SEPARATOR + q if q else context
    ids, spans = tokenize_spans(tokenizer, full)
    if not ids:
        raise FlowsieveError("the text produced no tokens")
    # spans tile the text: the context is the tokens ending inside it (a token that runs into the
    # separator is kept with the question)
    n = sum(1 for _, b in spans if b <= len(context))
    forced = torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        a, b = spans[i]
        piece = full[a:b]
        if any(f in piece for f in force_tokens):
            forced[i] = True
    for w in force_words:
        for m in re.finditer(rf"(?<!\w){re.escape(w)}(?!\w)", context):
            lo = _token_of_char(spans[:n], m.start())
            hi = _token_of_char(spans[:n], max(m.end() - 1, m.start()))
            forced[lo : hi + 1] = True
    words = word_units(full, spans[:n], separate=forced)
    paragraphs = group_tokens(spans[:n], paragraph_spans(context))
    budget = round(keep * len(ids)) - (len(ids) - n)
    return PromptDoc(
        text=full,
        context=context,
        question=q,
        ids=ids,
        spans=spans,
        n_context=n,
        forced=forced,
        words=words,
        paragraphs=paragraphs,
        budget=budget,
        keep=keep,
        tokenizer=tokenizer,
    )


# --------------------------------------------------------------------------------------- the scorers


@dataclass
class Scores:
    """What a prompt scorer returns, per context token.

    Attributes:
        priority: (n,) float; higher is kept first. ``inf`` and ``-inf`` are allowed.
        tier: (n,) long or None; tokens of a higher tier are kept before any token of a lower one
            (a method's own keep rule, e.g. LLMLingua's thresholds), priority ranks within a tier.
        fill: ``"skip"`` fills the budget greedily, skipping a unit that does not fit and trying the
            next; ``"stop"`` stops at the first unit that does not fit (a sentence cut short).
        extra: method-specific diagnostics (thresholds, segment choices).
    """

    priority: torch.Tensor
    tier: torch.Tensor | None = None
    fill: str = "skip"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fill not in ("skip", "stop"):
            raise FlowsieveError(f"fill must be 'skip' or 'stop', got {self.fill!r}")
        if self.tier is not None and self.tier.shape != self.priority.shape:
            raise FlowsieveError("tier and priority must have the same shape")


@dataclass
class PromptScorer:
    """Base class of prompt scorers: a dataclass of settings with a :meth:`score` method.

    Class attributes:
        level: ``"token"`` (units are single tokens) or ``"word"`` (whole words are kept or dropped;
            a word's priority is the mean of its tokens', its tier the highest of its tokens').
        needs_model: whether :meth:`score` uses the causal LM passed to ``compress_prompt``.
        needs_question: whether a question is required.
        paper: citation shown by ``flowsieve ls``.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    level: ClassVar[str] = "token"
    needs_model: ClassVar[bool] = True
    needs_question: ClassVar[bool] = False

    def score(self, doc: PromptDoc, model: Any) -> Scores:
        """Score the context tokens of ``doc``: returns per-token (n,) :class:`Scores`."""
        raise NotImplementedError


SCORERS: Registry[type[PromptScorer]] = Registry("prompt scorer")


def register(name: str) -> Any:
    """Class decorator: register a :class:`PromptScorer` under ``name``."""

    def deco(cls: type[PromptScorer]) -> type[PromptScorer]:
        cls.name = name
        return SCORERS.register(name)(cls)

    return deco


def make_scorer(name: str, kwargs: dict[str, Any]) -> PromptScorer:
    """Instantiate a registered scorer; unknown settings raise a :class:`FlowsieveError`."""
    cls = SCORERS.get(name)
    known = [f.name for f in fields(cls)]
    for k in kwargs:
        if k not in known:
            raise FlowsieveError(
                f"scorer '{name}' has no setting '{k}'{did_you_mean(k, known)}; "
                f"settings: {', '.join(known) or 'none'}"
            )
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------- selection


def unit_scores(scores: Scores, units: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-token scores -> per-unit (U,) priority (mean over the unit's tokens) and tier (max).

    A unit with a ``+inf`` token gets ``+inf``; one whose tokens are all ``-inf`` gets ``-inf``;
    otherwise the mean over its finite tokens. NaN counts as ``-inf``.
    """
    u = units.numpy()
    U = int(u.max()) + 1 if u.size else 0
    pr = np.nan_to_num(scores.priority.double().numpy(), nan=-np.inf, posinf=np.inf, neginf=-np.inf)
    finite = np.isfinite(pr)
    total = np.bincount(u, weights=np.where(finite, pr, 0.0), minlength=U)
    count = np.bincount(u, weights=finite.astype(np.float64), minlength=U)
    mean = total / np.maximum(count, 1)
    mean[count == 0] = -np.inf
    mean[np.bincount(u, weights=(pr == np.inf).astype(np.float64), minlength=U) > 0] = np.inf
    tier = np.zeros(U, dtype=np.int64)
    if scores.tier is not None:
        tier = np.full(U, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(tier, u, scores.tier.long().numpy())
    return mean, tier


def select_units(
    units: torch.Tensor,
    priority: np.ndarray,
    tier: np.ndarray,
    forced: torch.Tensor,
    budget: int,
    fill: str = "skip",
) -> torch.Tensor:
    """Fill ``budget`` tokens with whole units; returns the (n,) bool keep mask over tokens.

    Args:
        units: (n,) long unit of each token, non-decreasing.
        priority: (U,) float; tier: (U,) int. Units are taken by tier, then priority, then position.
        forced: (n,) bool; a unit with a forced token is always kept (and counts against the budget).
        budget: tokens to keep in all (forced included); the result may exceed it only by forced units.
        fill: ``"skip"`` or ``"stop"`` (see :class:`Scores`).
    """
    n = units.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    U = len(priority)
    size = torch.bincount(units, minlength=U).numpy()
    forced_u = torch.bincount(units, weights=forced.double(), minlength=U).numpy() > 0
    take = forced_u.copy()
    remaining = budget - int(size[forced_u].sum())
    order = np.lexsort((np.arange(U), -priority, -tier.astype(np.float64)))
    for u in order:
        if remaining <= 0:
            break
        if take[u]:
            continue
        if size[u] <= remaining:
            take[u] = True
            remaining -= int(size[u])
        elif fill == "stop":
            break
    return torch.from_numpy(take)[units]


def validate_keep(keep: Any) -> float:
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise FlowsieveError(f"keep must be a number in (0, 1], got {keep!r}")
    k = float(keep)
    if not 0.0 < k <= 1.0:  # also rejects NaN
        raise FlowsieveError(f"keep must be in (0, 1], got {keep}")
    return k
