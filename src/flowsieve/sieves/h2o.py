"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens with the largest attention received,
summed over all prefill queries (heavy hitters), plus a recent window.

At the decode site the accumulated score of each entry is carried with it (``SieveLayer.extras``)
and grows with every step's attention; the cache is kept at its budget by evicting the lowest.
The recent window here is the sieve's protected window (question / observation window); the
per-KV-head score sums the attention of the KV head's query heads (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    sites = ("prefill", "decode")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        assert obs.received is not None
        r = obs.received[..., : ctx.n_tokens]  # (B, H, T)
        B, H, T = r.shape
        return r.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, T).sum(2)

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        """Heavy hitters at decode time: the attention each entry received, accumulated over the
        decode steps and carried with the entries (the prefill's received attention chose which
        prompt entries entered the decode cache)."""
        S = layer.stored_length
        row = obs.rows[-1][..., :S]  # (B, H, S) this step's attention
        B, H, _ = row.shape
        step = row.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, S).sum(2)  # (B, Hk, S)
        acc = layer.extras.get("h2o")
        if acc is None or acc.shape[-1] != S:
            acc = step.new_zeros(step.shape)
        acc = acc + step
        layer.extras["h2o"] = acc
        return acc
