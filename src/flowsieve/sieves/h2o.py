"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens with the largest attention received,
summed over all prefill queries (heavy hitters), plus a recent window.

The recent window here is the sieve's protected window (question / observation window); the
per-KV-head score sums the attention of the KV head's query heads (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.observe import LayerObs
from flowsieve.sieves.base import METHODS, KVScorer, ScoreContext


@METHODS.register("h2o")
@dataclass
class H2OScorer(KVScorer):
    """Accumulated attention received, per KV head."""

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle, arXiv 2306.14048"
    needs = ("received",)

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        assert obs.received is not None
        r = obs.received[..., : ctx.n_tokens]  # (B, H, T)
        B, H, T = r.shape
        return r.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, T).sum(2)
