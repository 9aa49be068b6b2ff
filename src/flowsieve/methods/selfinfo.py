"""Self-information at the KV site: LLMLingua-1's perplexity rule applied to cache entries.

Jiang et al., "LLMLingua: Compressing Prompts for Accelerated Inference of Large Language Models",
EMNLP 2023, arXiv 2310.05736: information a model cannot predict is what a prompt must keep. Its
budget controller ranks segments by their perplexity under a small LM and keeps the most
perplexing ones; its token stage keeps the tokens of highest surprisal. Here the model being
compressed scores its own prompt: every entry scores the surprisal ``-log p(token | prefix)`` of
its token, read from the prefill's own final hidden states and output head (the
:class:`~flowsieve.observe.ObserveSpec` ``surprisal`` signal). The score never sees the question,
so it suits query-agnostic compression: a cache compressed once serves every later question.

With ``units="sentence"`` a sentence ranks by the mean surprisal of its tokens (its log-perplexity,
the budget controller's rule) and the best sentences are kept whole. With token units the most
surprising tokens are kept one by one (the token stage, without LLMLingua's iterative
conditioning on the kept prefix: the cache keeps the full prefix's keys).

Deviations: the scoring model is the model itself, not a separate small LM; segments are
sentences, not demonstrations; surprisal is computed once over the uncompressed prompt. Every layer
and head keeps the same entries. The output-head product over all prompt positions costs about as
much as the head of every generated token, once per prompt (a 262k-token vocabulary makes it a
noticeable share of a small model's prefill). Not for chunked prefill.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs


@METHODS.register("selfinfo")
@dataclass
class SelfInfoScorer(KVScorer):
    """Surprisal of each entry's token, shared by all heads; sentences rank by mean surprisal."""

    name = "selfinfo"
    paper = "Jiang et al. 2023, LLMLingua (perplexity budget controller), arXiv 2310.05736"
    needs = ("surprisal",)
    unit_reduce = "mean"
    chunkable = False

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        if obs.token_nll is None:
            raise FlowsieveError("selfinfo needs the surprisal observation of the prefill")
        nll = obs.token_nll[..., : ctx.n_tokens]  # (B, T)
        if nll.shape[-1] != ctx.n_tokens:
            raise FlowsieveError("selfinfo: the surprisal covers fewer tokens than the cache holds")
        return nll.clone()
