"""``lexrank``: sentence-level LexRank, a fast extractive baseline with no language model.

Erkan & Radev, "LexRank: Graph-based Lexical Centrality as Salience in Text Summarization", JAIR 22
(2004), https://www.jair.org/index.php/jair/article/view/10396: sentences are TF-IDF vectors; two
sentences are linked when their idf-modified cosine exceeds a threshold (0.1, the paper's best
variant; ``continuous=True`` weights links by the cosine instead); a sentence's salience is its
stationary probability under a random walk on the graph with jump probability ``damping``,
computed by power iteration.

Selection: sentences are taken whole in order of salience while they fit the token budget; the
first one that does not fit is cut after its last word that fits (the budget is counted in tokens
of the compressor's tokenizer, units are whole words). Force-kept tokens stay wherever they are.

Deviations: the idf is computed over the sentences of the text itself (the paper uses a corpus);
the question is not used to rank (the paper's method is query-free).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt.base import (
    PromptDoc,
    PromptScorer,
    Scores,
    group_tokens,
    register,
    sentence_spans,
)

_WORD = re.compile(r"\w+")


def tfidf_cosine(sentences: list[str]) -> np.ndarray:
    """(S, S) idf-modified cosine similarity of sentences; idf = log(S / df) over these sentences."""
    bags = [Counter(w.lower() for w in _WORD.findall(s)) for s in sentences]
    df: Counter[str] = Counter()
    for b in bags:
        df.update(b.keys())
    vocab = {w: i for i, w in enumerate(sorted(df))}
    S = len(sentences)
    idf = np.array([math.log(S / df[w]) for w in sorted(df)])
    tf = np.zeros((S, len(vocab)))
    for i, b in enumerate(bags):
        for w, c in b.items():
            tf[i, vocab[w]] = c
    x = tf * idf  # (S, V)
    norm = np.linalg.norm(x, axis=1)
    sim = x @ x.T / np.maximum(np.outer(norm, norm), 1e-12)
    return sim


def lexrank(
    sim: np.ndarray,
    threshold: float = 0.1,
    damping: float = 0.15,
    continuous: bool = False,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> np.ndarray:
    """LexRank salience (S,) from a similarity matrix (S, S); sums to 1.

    ``p = damping / S + (1 - damping) * M^T p`` with ``M`` the row-normalised adjacency (links where
    ``sim > threshold``, self-links included as in the paper; weighted by ``sim`` when continuous).
    """
    S = sim.shape[0]
    if S == 0:
        return np.zeros(0)
    adj = np.where(sim > threshold, sim if continuous else 1.0, 0.0)
    np.fill_diagonal(adj, 1.0)  # a sentence is similar to itself (an empty one too)
    M = adj / adj.sum(1, keepdims=True)
    p = np.full(S, 1.0 / S)
    for _ in range(max_iter):
        nxt = damping / S + (1 - damping) * (M.T @ p)
        if np.abs(nxt - p).sum() < tol:
            p = nxt
            break
        p = nxt
    return p / p.sum()


@dataclass
class LexRank(PromptScorer):
    """Sentence-level LexRank (Erkan & Radev 2004). See the module docstring.

    Attributes:
        threshold: cosine above which two sentences are linked (0.1).
        damping: random-jump probability of the walk (0.15).
        continuous: weight links by the cosine (continuous LexRank) instead of thresholding.
        tol: L1 change at which the power iteration stops.
        max_iter: power-iteration limit.
    """

    paper = "Erkan & Radev 2004, LexRank, JAIR 22"

    level = "word"
    needs_model = False
    threshold: float = 0.1
    damping: float = 0.15
    continuous: bool = False
    tol: float = 1e-8
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if not 0 <= self.threshold < 1:
            raise FlowsieveError(f"threshold must be in [0, 1), got {self.threshold}")
        if not 0 < self.damping < 1:
            raise FlowsieveError(f"damping must be in (0, 1), got {self.damping}")
        if self.tol <= 0 or self.max_iter < 1:
            raise FlowsieveError("tol must be > 0 and max_iter >= 1")

    def score(self, doc: PromptDoc, model: Any) -> Scores:
        regions = sentence_spans(doc.context)
        sentences = [doc.context[a:b] for a, b in regions]
        salience = lexrank(
            tfidf_cosine(sentences), self.threshold, self.damping, self.continuous, self.tol, self.max_iter
        )
        sent = group_tokens(doc.spans[: doc.n_context], regions)  # (n,) sentence of each token
        priority = torch.from_numpy(salience)[sent]
        return Scores(priority=priority, fill="stop", extra={"sentences": len(regions)})


register("lexrank")(LexRank)
