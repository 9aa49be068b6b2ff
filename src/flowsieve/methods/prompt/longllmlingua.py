"""``longllmlingua``: LongLLMLingua's coarse-to-fine, question-aware prompt compression.

Jiang et al., "LongLLMLingua: Accelerating and Enhancing LLMs in Long Context Scenarios via Prompt
Compression", ACL 2024, arXiv 2310.06839 (as ``rank_method="longllmlingua"``,
``condition_compare=True``, ``context_budget="+100"`` and ``dynamic_context_compression_ratio``
in microsoft/LLMLingua ``prompt_compressor.py``).

The context budget is LLMLingua-1's: ``T* = keep * (|context| + |question|) - |question|`` tokens.

1. Segments (the paper's documents). Each blank-line paragraph (:func:`~flowsieve.methods.prompt.base.
   paragraph_spans`) is one segment, unless it holds more than ``2 * segment_tokens`` tokens: then
   it is cut into consecutive groups of whole sentences (:func:`~flowsieve.methods.prompt.base.
   sentence_spans`); a group closes at the first sentence end once it holds at least
   ``segment_tokens`` tokens, and a last group under ``segment_tokens / 2`` tokens joins the one
   before it. A sentence is never split (a sentence longer than a group is a group of its own) and
   the segments tile the context.
2. Coarse stage. Segments are ranked by the mean NLL of ``question + " We can get the answer to
   this question in the given documents."`` given the segment (lowest first: the segment that
   makes the question most predictable). Whole segments are taken in that order against a budget
   of ``T* + slack`` tokens (``slack`` = 100, ``context_budget="+100"``): each taken segment's
   tokens are subtracted and the one that makes the budget negative is the last taken. The other
   segments are dropped whole.
3. Dynamic ratios. With ``N`` segments kept, the one of rank ``i`` (0 = best) keeps the share
   ``r_i = clip(tau + d * (N - 1 - 2 i) / (N - 1), 0, 1)`` of its tokens (``d`` =
   ``dynamic_ratio``; ``r_i = clip(tau, 0, 1)`` when ``N = 1``): the best-ranked kept segment gets
   ``tau + d``, the worst ``tau - d``, linearly between. ``tau`` is chosen so that the shares add
   up to ``T*`` tokens: ``sum_i r_i * |segment_i| = min(T*, kept tokens)``.
4. Fine stage: ITPC as in :mod:`~flowsieve.methods.prompt.selfinfo` on the contrastive score
   ``s_t = NLL(x_t | prefix) - NLL(x_t | question, prefix)`` (how much the question helps predict
   the token), with two KV-cached streams, one with the question (and a blank line) before the
   context and one without. The kept segments' tokens, in text order, are cut into windows of
   ``window`` tokens; within a window, the tokens of segment ``i`` are kept when ``s_t > gamma_i``,
   ``gamma_i`` being the ``floor(r_i * N)``-th largest score among the ``N`` tokens kept so far
   plus the window's (``gamma_i = -inf`` when ``r_i = 1``: the whole segment is kept).
5. Budget. The tokens the rule kept come first, then its rejects, then the dropped segments; within
   the first two, by the margin ``s_t - gamma_i`` (so the fill that meets the budget exactly
   favours the segments with the larger shares). Force-kept tokens are kept whatever their score.

Deviations, all stated:

- text order is kept: the kept segments are not reordered by rank (upstream
  ``reorder_context="sort"`` puts the best-ranked first) and nothing is inserted between them
  (upstream joins the kept documents with ``"\\n\\n"``); the ranks only set the coarse selection
  and the dynamic ratios;
- segments come from the context's own paragraphs and sentences (upstream takes a list of
  documents from the caller);
- ``tau`` is solved so that the clipped shares meet ``T*`` (upstream uses ``tau = T* / (kept
  tokens + 2 per document + 1)`` and loses what the clipping at 0 and 1 cuts off);
- the threshold ``gamma_i`` of a share too small to keep one token is the largest finite score
  (nothing passes, as upstream, but the margins stay finite);
- a segment too long for the model's context is ranked by its last tokens that fit before the
  question;
- those of :mod:`~flowsieve.methods.prompt.selfinfo` (scores aligned with their tokens, the exact budget
  fill, force-kept tokens kept also inside dropped segments, eviction past the model's context);
- the paper's subsequence recovery of the answer is not used. A question is required.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt.base import (
    SEPARATOR,
    PromptDoc,
    Scores,
    group_tokens,
    prefix_ids,
    register,
    sentence_spans,
)
from flowsieve.methods.prompt.lm import SurprisalStream, sequence_nll
from flowsieve.methods.prompt.selfinfo import SelfInfo, gamma_threshold
from flowsieve.models import context_length

QUESTION_SUFFIX = " We can get the answer to this question in the given documents."


def dynamic_ratios(sizes: list[int], spread: float, target: float) -> tuple[list[float], float]:
    """Per-segment keep shares for segments in rank order (best first), and the base share ``tau``.

    The segment of rank ``i`` of ``N`` gets ``clip(tau + spread * (N - 1 - 2 i) / (N - 1), 0, 1)``
    (``clip(tau, 0, 1)`` when ``N = 1``), ``tau`` being the smallest value (to 1e-9, by bisection)
    with ``sum_i share_i * sizes[i] >= min(target, sum(sizes))``.
    """
    n = len(sizes)
    deltas = [spread * (n - 1 - 2 * i) / (n - 1) if n > 1 else 0.0 for i in range(n)]
    goal = min(max(target, 0.0), float(sum(sizes)))

    def shares(tau: float) -> list[float]:
        return [min(1.0, max(0.0, tau + d)) for d in deltas]

    def total(tau: float) -> float:
        return sum(r * s for r, s in zip(shares(tau), sizes))

    lo, hi = -1.0 - spread, 1.0 + spread  # total(lo) == 0, total(hi) == sum(sizes)
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        if total(mid) >= goal:
            hi = mid
        else:
            lo = mid
    return shares(hi), hi


def segment_gamma(scores: torch.Tensor, ratio: float) -> float:
    """The threshold of a segment keeping ``ratio`` of its tokens, over the (N,) ``scores`` so far.

    ``-inf`` when ``ratio >= 1``; LLMLingua's ``floor(ratio * N)``-th largest score otherwise, or
    the largest finite score when that keeps fewer than one token.
    """
    if ratio >= 1.0:
        return -math.inf
    g = gamma_threshold(scores, ratio)
    if math.isinf(g):
        finite = scores[torch.isfinite(scores)]
        g = float(finite.max()) if finite.numel() else 0.0
    return g


@dataclass
class LongLLMLingua(SelfInfo):
    """LongLLMLingua: question-ranked segments, dynamic ratios, contrastive ITPC. See the module docstring.

    Attributes: as :class:`~flowsieve.methods.prompt.selfinfo.SelfInfo` (``slack`` is the coarse budget's
    extra tokens, ``context_filter`` switches the coarse stage), and:
        segment_tokens: the size, in tokens, of the sentence groups a long paragraph is cut into
            (100); paragraphs over twice this are cut.
        dynamic_ratio: the spread ``d`` of the per-segment keep shares (0.3, as LLMLingua's
            LongLLMLingua recipe; 0 gives one share for all kept segments), in [0, 1].
    """

    paper = "Jiang et al. 2024, LongLLMLingua, arXiv 2310.06839"

    needs_question = True
    segment_tokens: int = 100
    dynamic_ratio: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.segment_tokens, bool) or not isinstance(self.segment_tokens, int):
            raise FlowsieveError(f"segment_tokens must be an integer, got {self.segment_tokens!r}")
        if self.segment_tokens < 1:
            raise FlowsieveError(f"segment_tokens must be >= 1, got {self.segment_tokens}")
        d = self.dynamic_ratio
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise FlowsieveError(f"dynamic_ratio must be a number in [0, 1], got {d!r}")

    def _question_ids(self, doc: PromptDoc, suffix: str = "") -> list[int]:
        assert doc.question is not None
        return list(doc.tokenizer(doc.question + suffix, add_special_tokens=False)["input_ids"])

    # --- segments and ranking -------------------------------------------------------------------

    def segments(self, doc: PromptDoc) -> list[tuple[int, int]]:
        """Token spans ``[a, b)`` of the segments (rule 1 of the module docstring); they tile the context."""
        n = doc.n_context
        if n == 0:
            return []
        para = doc.paragraphs.tolist()
        sent = group_tokens(doc.spans[:n], sentence_spans(doc.context)).tolist()
        out: list[tuple[int, int]] = []
        a = 0
        for b in range(1, n + 1):
            if b < n and para[b] == para[a]:
                continue
            if b - a > 2 * self.segment_tokens:
                cuts = [a]
                for t in range(a + 1, b):
                    if sent[t] != sent[t - 1] and t - cuts[-1] >= self.segment_tokens:
                        cuts.append(t)
                if len(cuts) > 1 and b - cuts[-1] < self.segment_tokens / 2:
                    cuts.pop()
                out.extend(itertools.pairwise([*cuts, b]))
            else:
                out.append((a, b))
            a = b
        return out

    def rank_paragraphs(self, doc: PromptDoc, model: nn.Module, spans: list[tuple[int, int]]) -> list[int]:
        """Segment indices by the mean NLL of the question given the segment, lowest first."""
        q = self._question_ids(doc, QUESTION_SUFFIX)
        sep = list(doc.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
        bos = prefix_ids(doc.tokenizer)
        limit = context_length(model)
        room = None if limit is None else max(limit - len(bos) - len(sep) - len(q), 1)
        ids = doc.context_ids
        nll = []
        for a, b in spans:
            if room is not None:
                a = max(a, b - room)
            ctx = bos + ids[a:b] + sep
            nll.append(float(sequence_nll(model, ctx + q, len(ctx)).mean()))
        return sorted(range(len(spans)), key=lambda i: nll[i])

    # --- the two streams of the contrastive score -----------------------------------------------

    def streams(self, doc: PromptDoc, model: nn.Module) -> list[SurprisalStream]:
        bos = prefix_ids(doc.tokenizer)
        sep = list(doc.tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"])
        limit = context_length(model)
        conditioned = SurprisalStream(model, bos + self._question_ids(doc) + sep, limit, self.keep_first)
        plain = SurprisalStream(model, bos, limit, self.keep_first)
        return [plain, conditioned]

    def window_scores(self, streams: list[SurprisalStream], window: list[int]) -> torch.Tensor:
        """(w,) contrastive scores: NLL without the question minus NLL with it."""
        plain, conditioned = streams
        return plain.score(window) - conditioned.score(window)

    # --- the procedure --------------------------------------------------------------------------

    def coarse(self, doc: PromptDoc, model: nn.Module, spans: list[tuple[int, int]]) -> list[int]:
        """Indices of the kept segments in rank order, best first (rule 2 of the module docstring)."""
        if not self.context_filter or len(spans) < 2:
            return list(range(len(spans)))
        budget = max(doc.budget, 0) + self.slack
        kept = []
        for i in self.rank_paragraphs(doc, model, spans):
            kept.append(i)
            budget -= spans[i][1] - spans[i][0]
            if budget < 0:
                break
        return kept

    def score(self, doc: PromptDoc, model: nn.Module) -> Scores:
        n = doc.n_context
        target = max(doc.budget, 0)
        spans = self.segments(doc)
        kept = self.coarse(doc, model, spans)
        ranked = self.context_filter and len(spans) > 1
        shares, tau = dynamic_ratios(
            [spans[i][1] - spans[i][0] for i in kept], self.dynamic_ratio if ranked else 0.0, target
        )
        ratio = torch.zeros(n, dtype=torch.float64)  # (n,) share of each token's segment
        for i, r in zip(kept, shares):
            ratio[spans[i][0] : spans[i][1]] = r
        seq = [t for i in sorted(kept) for t in range(*spans[i])]  # token indices the ITPC sees

        scores = torch.full((n,), -math.inf)
        tier = torch.zeros(n, dtype=torch.long)  # 0: dropped segment
        ids = doc.context_ids
        streams = self.streams(doc, model)
        prefix_scores = torch.zeros(0)
        for w0 in range(0, len(seq), self.window):
            idx = seq[w0 : w0 + self.window]
            s = torch.nan_to_num(
                self.window_scores(streams, [ids[t] for t in idx]), nan=math.inf, posinf=math.inf
            )
            pool = torch.cat([prefix_scores, s])
            r = ratio[idx]
            gamma = torch.empty(len(idx))
            for value in r.unique().tolist():
                gamma[r == value] = segment_gamma(pool, value)
            keep = (s > gamma) | doc.forced[idx]
            kept_ids = [ids[t] for t, k in zip(idx, keep.tolist()) if k]
            for st in streams:
                st.accept(kept_ids)
            prefix_scores = torch.cat([prefix_scores, s[keep]])
            # margin over the segment's threshold; s is finite or +inf, gamma finite or -inf
            scores[idx] = s - gamma
            tier[idx] = 1 + keep.long()  # 2: kept by the threshold rule, 1: rejected by it
        return Scores(
            priority=scores,
            tier=tier,
            extra={
                "n_segments": len(spans),
                "segments": spans,
                "segments_kept": kept,
                "shares": shares,
                "tau": tau,
            },
        )


register("longllmlingua")(LongLLMLingua)
