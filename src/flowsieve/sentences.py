"""Sentence splitting shared by the prompt site and the KV sieves' sentence units.

One rule-based splitter, used both for the prompt-compression site's sentence spans
(:func:`flowsieve.methods.prompt.base.sentence_spans`) and for the per-token sentence map of a prompt built
by :func:`flowsieve.generate.build_prompt` (``units="sentence"``), so that both cut the same text at
the same places.

Where a sentence ends:

* after a run of terminal marks (``.``, ``!``, ``?``, ``…``; so ``?!`` and ``...`` are one end),
  followed by any closing quotes or brackets (``"'”’)]``), when white space comes next; the closing
  quotes and brackets belong to the sentence that ends;
* not after a single ``.`` that closes an initial (one capital letter: "E. B. White") or one of
  :data:`ABBREVIATIONS` ("Mr.", "e.g."), compared without case and after opening quotes or brackets;
  an initial or abbreviation followed by a closing quote or bracket does end the sentence;
* before every line break: the run of white space holding one or more line breaks (with the spaces
  or tabs before it) starts the next sentence, whatever comes before it.

White space: the white space after a sentence end belongs to the next sentence, white space at the
start of the text to the first sentence and white space at the end of the text to the last one, so
no sentence is white space only (unless the whole text is).

Known limits of a rule-based splitter: the pronoun "I" or "Plan B" before a full stop read as an
initial (no cut), and an abbreviation outside :data:`ABBREVIATIONS` ("Inc.", "U.S.") ends a
sentence.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence

#: Words (lower case, without their final full stop) whose full stop does not end a sentence.
ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "vs", "cf", "e.g", "i.e"})

_TERMINAL = re.compile(r"""[.!?…]+["'”’)\]]*(?=\s)""")
_LINE_BREAK = re.compile(r"[^\S\n]*\n\s*")
_OPENERS = "\"'“‘(["


def _word_before(text: str, i: int) -> str:
    """The run of non-space characters that ends just before ``text[i]``, without its opening quotes
    or brackets."""
    j = i
    while j > 0 and not text[j - 1].isspace():
        j -= 1
    return text[j:i].lstrip(_OPENERS)


def _is_end(text: str, m: re.Match[str]) -> bool:
    """Whether the terminal run ``m`` ends a sentence (a lone ``.`` after an initial or abbreviation
    does not)."""
    if m.group() != ".":
        return True
    word = _word_before(text, m.start())
    initial = len(word) == 1 and word.isupper()
    return not initial and word.lower() not in ABBREVIATIONS


def sentence_cuts(text: str) -> list[int]:
    """Character offsets where a sentence starts, other than the first: sorted, unique, each in
    ``(0, n)`` with ``n`` the length of ``text`` without its trailing white space."""
    stop = len(text.rstrip())
    cuts = {m.end() for m in _TERMINAL.finditer(text) if _is_end(text, m)}
    cuts.update(m.start() for m in _LINE_BREAK.finditer(text))
    return sorted(c for c in cuts if 0 < c < stop)


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Split ``text`` into sentences (the rules of the module docstring).

    Returns:
        character spans ``[(start, end), ...]``: non-empty, in order, tiling ``text`` (the first
        starts at 0, each starts where the one before ends, the last ends at ``len(text)``);
        ``[]`` for an empty text.
    """
    if not text:
        return []
    bounds = [0, *sentence_cuts(text), len(text)]
    return list(itertools.pairwise(bounds))


def sentence_index(text: str, starts: Sequence[int]) -> tuple[int, ...]:
    """Per token, the index of the sentence (of :func:`sentence_spans`) it starts in.

    Args:
        text: the text the tokens were cut from.
        starts: (T,) the start offset of each token in ``text`` (any order; an offset at or past
            the end of ``text`` falls in the last sentence).

    Returns:
        (T,) sentence indices, counted from 0 in text order; a token that starts on the white
        space after a sentence end belongs to the next sentence. All 0 for an empty text.
    """
    cuts = sentence_cuts(text)
    return tuple(bisect.bisect_right(cuts, a) for a in starts)
