"""The task interface: :class:`Item`, :class:`Task`, the ``TASKS`` registry and shared helpers.

A task is a small frozen dataclass whose fields are its parameters (validated in ``__post_init__``).
``items(tokenizer, n, seed)`` makes ``n`` items; item ``i`` depends only on (task, parameters, seed,
``i``) and the tokenizer, so ``items(tok, 5)`` is a prefix of ``items(tok, 10)``. ``score(item,
prediction)`` returns a number in [0, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.registry import Registry


@dataclass(frozen=True)
class Item:
    """One evaluation example: a long context, a question asked after it, and the gold answers."""

    task: str
    item_id: str
    """Stable id, a function of (task, parameters, seed, index)."""
    context: str
    """The long text (haystack with needles, or passages)."""
    question: str
    """Asked after the context."""
    answers: tuple[str, ...]
    """Gold answers. Single-answer tasks: any one counts. Multi-value tasks: every value is wanted."""
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    """Task-specific facts: ``length_tokens``, needle char offsets and depths, source ids, ..."""


class Task(ABC):
    """Base class of evaluation tasks. Subclasses are frozen dataclasses registered in ``TASKS``."""

    name: ClassVar[str]
    teacher_forced: ClassVar[bool] = False
    """True for a task scored from the log-likelihood of ``answers[0]`` after the context (``lm``):
    the runner feeds it through the cache instead of generating, and ``score`` is not used."""

    def params(self) -> dict[str, Any]:
        """The task's parameters, as passed to :func:`get_task`."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def items(self, tokenizer: Any, n: int, seed: int = 0) -> list[Item]:
        """``n`` items, deterministic given ``seed``; lengths are measured in ``tokenizer``'s tokens.

        ``tokenizer`` is anything with ``encode(text) -> list`` or ``__call__(text) -> {"input_ids": list}``
        (a Hugging Face tokenizer, tiktoken, a test double); special tokens are not counted.
        """
        check_int("n", n, 0)
        check_int("seed", seed, None)
        counter = TokenCounter(tokenizer)
        key = json.dumps({"task": self.name, "params": self.params(), "seed": seed}, sort_keys=True)
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        return [
            self._item(counter, random.Random(f"{key}|{i}"), f"{self.name}-{digest}-{i}", i, seed)
            for i in range(n)
        ]

    @abstractmethod
    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        """Item ``index``; ``rng`` is seeded from (task, parameters, seed, index)."""

    @abstractmethod
    def score(self, item: Item, prediction: str) -> float:
        """How well ``prediction`` answers ``item``, in [0, 1]."""


TASKS: Registry[type[Task]] = Registry("task")

T = TypeVar("T", bound=type[Task])


def register(cls: T) -> T:
    """Class decorator: register a task under its ``name``."""
    return TASKS.register(cls.name)(cls)


def get_task(name: str, **params: Any) -> Task:
    """The task ``name`` built with ``params``; unknown names and parameters raise :class:`FlowsieveError`."""
    cls = TASKS.get(name)
    fields = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for p in params:
        if p not in fields:
            raise FlowsieveError(
                f"task '{name}' has no parameter '{p}'{did_you_mean(p, fields)}; "
                f"parameters: {', '.join(fields) or '(none)'}"
            )
    return cls(**params)


# --- parameter checks ------------------------------------------------------------------------------


def check_int(name: str, value: object, minimum: int | None = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FlowsieveError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise FlowsieveError(f"{name} must be at least {minimum}, got {value}")


def check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise FlowsieveError(f"{name} must be a number in [0, 1], got {value!r}")


def check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise FlowsieveError(
            f"{name} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(str(value), choices)}"
        )


# --- tokens ----------------------------------------------------------------------------------------


def _encoder(tokenizer: Any) -> Callable[[str], Sequence[Any]]:
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):

        def by_encode(text: str) -> Sequence[Any]:
            try:
                return encode(text, add_special_tokens=False)
            except TypeError:  # tiktoken and simple tokenizers take no such keyword
                return encode(text)

        return by_encode
    if callable(tokenizer):

        def by_call(text: str) -> Sequence[Any]:
            try:
                out = tokenizer(text, add_special_tokens=False)
            except TypeError:
                out = tokenizer(text)
            return out["input_ids"]

        return by_call
    raise FlowsieveError(
        f"cannot count tokens with {type(tokenizer).__name__}: a tokenizer needs encode(text) "
        "or __call__(text) returning {'input_ids': [...]}"
    )


class TokenCounter:
    """Counts tokens of a text; ``piece`` caches counts of short pieces (sentences) by their text."""

    def __init__(self, tokenizer: Any) -> None:
        self._encode = _encoder(tokenizer)
        self._pieces: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return len(self._encode(text))

    def piece(self, text: str) -> int:
        n = self._pieces.get(text)
        if n is None:
            n = self._pieces[text] = len(self._encode(text))
        return n


# --- answers ---------------------------------------------------------------------------------------


def first_line(prediction: str) -> str:
    """The first non-blank line of a prediction (models often keep talking after the answer)."""
    for line in prediction.splitlines():
        if line.strip():
            return line
    return ""


def normalize(text: str) -> str:
    """Lower case, punctuation removed ("4,817" -> "4817"), whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch.isspace() else ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def mentions(text: str, value: str) -> bool:
    """Whether the normalised ``value`` occurs in the normalised ``text`` as whole words."""
    value = normalize(value)
    return bool(value) and f" {value} " in f" {normalize(text)} "


def value_score(text: str, gold: Iterable[str], distractors: Iterable[str] = ()) -> float:
    """Found gold values / (number of gold values + distractor values also mentioned), in [0, 1].

    Naming every value in the context therefore does not earn full marks where distractors exist.
    """
    gold = list(gold)
    found = sum(mentions(text, g) for g in gold)
    wrong = sum(mentions(text, d) for d in distractors)
    return found / (len(gold) + wrong) if gold else 0.0


def pick(rng: random.Random, pool: Sequence[str], k: int, what: str) -> list[str]:
    """``k`` distinct entries of ``pool``; a :class:`FlowsieveError` when the pool is too small."""
    if k > len(pool):
        raise FlowsieveError(f"at most {len(pool)} {what} are available, {k} were asked for")
    return rng.sample(list(pool), k)
