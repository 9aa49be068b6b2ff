"""Build a context of a requested token length from filler sentences, with pieces inserted at depths.

Filler text comes as a stream of :class:`Unit` s (sentences). Each sentence is tokenised once, on
its own (``TokenCounter.piece``), and the sum of those counts picks how many sentences to take; the
assembled context is then tokenised whole and whole sentences are added or dropped at the end until
its length is as close to the target as sentences allow. Only when one sentence is too coarse for the
tolerance (very short targets, or a run-on sentence at the end) is the last filler sentence cut at a
word boundary. Pieces (needles, a gold paragraph) go between sentences, never inside one.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from flowsieve.bench.tasks.base import TokenCounter
from flowsieve.errors import FlowsieveError

TOLERANCE = 0.05  # a context's length is within ±5% of the requested length


@dataclass(frozen=True)
class Unit:
    """A sentence (or a whole paragraph) and the separator put before it when text precedes it."""

    text: str
    sep: str = " "  # "\n\n" where the unit starts a paragraph


@dataclass(frozen=True)
class Insert:
    """A piece placed at the sentence boundary nearest to ``depth`` (0 = start, 1 = end)."""

    depth: float
    unit: Unit


@dataclass(frozen=True)
class Context:
    text: str
    tokens: int
    """Length of ``text`` in the tokenizer's tokens (no special tokens)."""
    spans: tuple[tuple[int, int], ...]
    """Character offsets ``(start, end)`` of each insert, in the order the inserts were given."""
    depths: tuple[float, ...]
    """Where each insert landed: filler tokens before it / all filler tokens (sum of sentence counts)."""
    fillers: int
    """How many filler units the context holds."""


def build_context(
    counter: TokenCounter,
    stream: Iterator[Unit],
    target: int,
    inserts: Sequence[Insert] = (),
    paragraphs_only: bool = False,
) -> Context:
    """Fillers from ``stream`` plus ``inserts``, about ``target`` tokens long (within ``TOLERANCE``).

    ``paragraphs_only`` places inserts only where a paragraph starts (a unit whose ``sep`` is not a
    space), at the start or at the end. Raises :class:`FlowsieveError` when the target cannot be met.
    """
    b = _Builder(counter, stream, inserts, paragraphs_only)
    best = b.fit_sentences(target)
    if abs(best.tokens - target) > TOLERANCE * target:
        best = b.cut_words(best, target)
    if abs(best.tokens - target) > TOLERANCE * target:
        why = (
            f"the source text ran out after {sum(b.est)} tokens"
            if b.dry
            else f"the inserted text alone is {b.fixed} tokens"
        )
        raise FlowsieveError(
            f"cannot build a context of {target} tokens (±{TOLERANCE:.0%}): the closest has "
            f"{best.tokens}; {why}"
        )
    return best


class _Builder:
    def __init__(
        self, counter: TokenCounter, stream: Iterator[Unit], inserts: Sequence[Insert], paragraphs_only: bool
    ) -> None:
        self.counter = counter
        self.stream = stream
        self.inserts = inserts
        self.paragraphs_only = paragraphs_only
        self.fixed = sum(counter.piece(i.unit.text) for i in inserts)
        self.fillers: list[Unit] = []
        self.est: list[int] = []  # tokens of each filler, counted alone
        self.dry = False  # the stream has run out

    def grow(self, k: int) -> bool:
        """Take units from the stream until there are ``k``; False when it runs dry."""
        while len(self.fillers) < k:
            unit = next(self.stream, None)
            if unit is None:
                self.dry = True
                return False
            self.fillers.append(unit)
            self.est.append(self.counter.piece(unit.text))
        return True

    def measure(self, fillers: list[Unit], est: list[int]) -> Context:
        text, spans, depths = _assemble(fillers, est, self.inserts, self.paragraphs_only)
        return Context(text, self.counter(text), spans, depths, len(fillers))

    def fit_sentences(self, target: int) -> Context:
        fillers, est = self.fillers, self.est
        # a first guess from per-sentence counts
        n, total = 0, self.fixed
        while total < target and self.grow(n + 1):
            total += est[n]
            n += 1
        if n and total - target > target - (total - est[n - 1]):
            n -= 1
        # then whole sentences at the end, against the real count, until nothing gets closer
        best: Context | None = None
        tried: set[int] = set()
        while n not in tried:
            tried.add(n)
            ctx = self.measure(fillers[:n], est[:n])
            if best is None or abs(ctx.tokens - target) < abs(best.tokens - target):
                best = ctx
            err = target - ctx.tokens
            if abs(err) <= max(1.0, 0.01 * target):
                break
            acc = 0  # tokens added (err > 0) or removed (err < 0) so far
            if err > 0:  # add sentences while each brings the length closer
                while self.grow(n + 1) and est[n] < 2 * (err - acc):
                    acc += est[n]
                    n += 1
            else:
                while n > 0 and est[n - 1] < 2 * (-err - acc):
                    acc += est[n - 1]
                    n -= 1
        assert best is not None
        return best

    def cut_words(self, best: Context, target: int) -> Context:
        """End the fillers with a word prefix of one sentence instead, if that gets closer."""
        n = best.fillers
        if best.tokens > target:  # shorten the last sentence
            if n == 0:
                return best
            n -= 1
        elif not self.grow(n + 1):  # lengthen with part of the next one
            return best
        source = self.fillers[n]
        words = source.text.split(" ")

        def probe(k: int) -> Context:
            part = Unit(" ".join(words[:k]), source.sep)
            return self.measure([*self.fillers[:n], part], [*self.est[:n], self.counter.piece(part.text)])

        lo, hi = 1, len(words) - 1  # binary search: the longest prefix that does not overshoot
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if probe(mid).tokens <= target:
                lo = mid
            else:
                hi = mid - 1
        for k in sorted({lo, lo + 1}):
            if 1 <= k < len(words):
                ctx = probe(k)
                if abs(ctx.tokens - target) < abs(best.tokens - target):
                    best = ctx
        return best


def _assemble(
    fillers: Sequence[Unit], est: Sequence[int], inserts: Sequence[Insert], paragraphs_only: bool
) -> tuple[str, tuple[tuple[int, int], ...], tuple[float, ...]]:
    n = len(fillers)
    cum = list(itertools.accumulate(est, initial=0))  # filler tokens before boundary b
    allowed = [b for b in range(n + 1) if not paragraphs_only or b in (0, n) or fillers[b].sep != " "]
    marks = [cum[b] for b in allowed]
    bounds = []
    for ins in inserts:
        goal = ins.depth * cum[n]
        i = bisect.bisect_left(marks, goal)
        near = [j for j in (i - 1, i) if 0 <= j < len(allowed)]
        bounds.append(allowed[min(near, key=lambda j: abs(marks[j] - goal))])

    pieces: list[str] = []
    spans: list[tuple[int, int]] = [(0, 0)] * len(inserts)
    pos = 0

    def put(unit: Unit) -> int:
        nonlocal pos
        if pieces:
            pieces.append(unit.sep)
            pos += len(unit.sep)
        pieces.append(unit.text)
        pos += len(unit.text)
        return pos - len(unit.text)

    order = sorted(range(len(inserts)), key=lambda k: (bounds[k], k))  # ties keep the given order
    j = 0
    for b in range(n + 1):
        while j < len(order) and bounds[order[j]] == b:
            k = order[j]
            start = put(inserts[k].unit)
            spans[k] = (start, pos)
            j += 1
        if b < n:
            put(fillers[b])
    depths = tuple(cum[b] / cum[n] if cum[n] else 0.0 for b in bounds)
    return "".join(pieces), tuple(spans), depths
