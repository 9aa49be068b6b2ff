"""``selfinfo``: LLMLingua-1's budget controller and iterative token-level compression (ITPC).

Jiang et al., "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models",
EMNLP 2023, arXiv 2310.05736 (procedure as in microsoft/LLMLingua ``prompt_compressor.py``):

1. Budget: ``T* = keep * (|context| + |question|) - |question|`` tokens for the context.
2. Budget controller (when the context has more than one paragraph): rank paragraphs by their mean
   NLL under the small LM (highest first), add them in that order to a budget of ``T* + 100``
   tokens, stop after the one that makes the budget negative; the others are dropped.
3. ITPC at the uniform ratio ``tau = T* / (tokens of the kept paragraphs)``: the kept text is cut
   into windows of 200 tokens; each window is scored by the NLL of its tokens given the compressed
   text before it (a KV cache of the kept prefix); the threshold ``gamma`` is the
   ``floor(tau * N)``-th largest NLL among the ``N`` tokens kept so far plus the window's; the
   window's tokens with NLL > gamma are kept; earlier windows are not revisited.

Deviations, all stated:

- the NLL of a token is aligned with that token (upstream scores token ``t`` with the loss of token
  ``t + 1``); a text's first token, which has no prediction without a BOS, is kept;
- paragraphs are the context's blank-line separated blocks; the ITPC ratio is ``T*`` over the kept
  paragraphs' tokens (upstream adds 2 tokens per context for the ``"\\n\\n"`` it joins them with);
- force-kept tokens are kept whatever their NLL, also inside paragraphs the controller dropped;
- the threshold rule reaches the rate only roughly (the kept prefix, all high-NLL tokens, raises
  ``gamma`` window after window); the budget is then met exactly by the common selection: tokens
  the rule kept come first, then the rule's rejects by NLL, then the dropped paragraphs;
- past the model's context the oldest kept tokens (after the first 10) are dropped and the cache is
  recomputed at contiguous positions, instead of slicing the rotated keys;
- upstream's window loop runs while a whole window fits, so the last partial window (fewer than
  200 tokens at the end of the text) is never compressed; here every window is compressed (the
  paper's rule) unless ``keep_tail=True``, which keeps that tail whole as upstream does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt.base import PromptDoc, PromptScorer, Scores, prefix_ids, register
from flowsieve.methods.prompt.lm import SurprisalStream, sequence_nll
from flowsieve.models import context_length


def gamma_threshold(scores: torch.Tensor, tau: float) -> float:
    """LLMLingua's threshold: the ``floor(tau * N)``-th largest of ``scores`` (N,), 1-based.

    Fewer than one token to keep gives ``+inf`` (nothing passes ``> gamma``).
    """
    k = math.floor(tau * scores.numel())
    if k < 1:
        return math.inf
    k = min(k, scores.numel())
    return float(scores.sort(descending=True).values[k - 1])


@dataclass
class SelfInfo(PromptScorer):
    """LLMLingua-1 with the bundled (or any) causal LM. See the module docstring.

    Attributes:
        window: ITPC window in tokens (``iterative_size``, 200).
        context_filter: run the budget controller over paragraphs (``use_context_level_filter``).
        slack: tokens the controller adds to the budget (``+100``).
        keep_first: tokens kept at the start when the compressed prefix outgrows the model's context
            (``cache_bos_num``, 10).
        keep_tail: keep the last partial window (the ``len % window`` last tokens the ITPC sees)
            whole, as upstream's loop leaves it uncompressed (off: the paper's rule).
    """

    paper = "Jiang et al. 2023, LLMLingua, arXiv 2310.05736"
    window: int = 200
    context_filter: bool = True
    slack: int = 100
    keep_first: int = 10
    keep_tail: bool = False

    def __post_init__(self) -> None:
        if self.window < 1:
            raise FlowsieveError(f"window must be >= 1, got {self.window}")
        if self.slack < 0 or self.keep_first < 0:
            raise FlowsieveError("slack and keep_first must be >= 0")

    # --- the two method-specific parts (LongLLMLingua overrides them) -----------------------------

    def rank_paragraphs(self, doc: PromptDoc, model: nn.Module, spans: list[tuple[int, int]]) -> list[int]:
        """Paragraph indices, most worth keeping first: mean NLL under the LM, highest first."""
        ids = doc.context_ids
        bos = prefix_ids(doc.tokenizer)
        ppl = []
        for a, b in spans:
            seq = bos + ids[a:b]
            start = len(bos) or 1
            ppl.append(float(sequence_nll(model, seq, start).mean()) if len(seq) > start else 0.0)
        return sorted(range(len(spans)), key=lambda i: -ppl[i])

    def streams(self, doc: PromptDoc, model: nn.Module) -> list[SurprisalStream]:
        return [SurprisalStream(model, prefix_ids(doc.tokenizer), context_length(model), self.keep_first)]

    def window_scores(self, streams: list[SurprisalStream], window: list[int]) -> torch.Tensor:
        """(w,) scores of a window's tokens: its NLL given the compressed prefix."""
        return streams[0].score(window)

    # --- shared procedure -----------------------------------------------------------------------

    def score(self, doc: PromptDoc, model: Any) -> Scores:
        n = doc.n_context
        target = max(doc.budget, 0)
        para = doc.paragraphs
        spans = [
            (int(idx[0]), int(idx[-1]) + 1)
            for idx in (torch.nonzero(para == p).flatten() for p in range(int(para.max()) + 1))
            if idx.numel()
        ]
        kept_para = list(range(len(spans)))
        if self.context_filter and len(spans) > 1:
            budget = target + self.slack
            kept_para = []
            for i in self.rank_paragraphs(doc, model, spans):
                kept_para.append(i)
                budget -= spans[i][1] - spans[i][0]
                if budget < 0:
                    break
            kept_para.sort()
        seq = [t for i in kept_para for t in range(*spans[i])]  # token indices the ITPC sees
        tau = min(1.0, target / max(len(seq), 1))

        scores = torch.full((n,), -math.inf)
        tier = torch.zeros(n, dtype=torch.long)  # 0: dropped paragraph
        ids = doc.context_ids
        streams = self.streams(doc, model)
        prefix_scores = torch.zeros(0)
        gammas = []
        for w0 in range(0, len(seq), self.window):
            idx = seq[w0 : w0 + self.window]
            s = self.window_scores(streams, [ids[t] for t in idx])
            s = torch.nan_to_num(s, nan=math.inf, posinf=math.inf)
            gamma = gamma_threshold(torch.cat([prefix_scores, s]), tau)
            gammas.append(gamma)
            forced = doc.forced[idx]
            keep = (s > gamma) | forced
            kept_ids = [ids[t] for t, k in zip(idx, keep.tolist()) if k]
            for st in streams:
                st.accept(kept_ids)
            prefix_scores = torch.cat([prefix_scores, s[keep]])
            scores[idx] = s
            tier[idx] = 1 + keep.long()  # 2: kept by the threshold rule, 1: rejected by it
        tail = len(seq) % self.window if self.keep_tail else 0
        if tail:
            tier[seq[-tail:]] = 3  # 3: upstream's uncompressed last window
        return Scores(
            priority=scores,
            tier=tier,
            extra={"paragraphs_kept": kept_para, "n_paragraphs": len(spans), "tau": tau, "gammas": gammas},
        )


register("selfinfo")(SelfInfo)
