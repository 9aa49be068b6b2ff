"""H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023, arXiv 2306.14048): keep the tokens with the largest attention received,
summed over all prefill queries (heavy hitters), plus a recent window.

The accumulated score of each entry is carried with it (``SieveLayer.extras["h2o"]``): the
attention it received from every prefill query (summed over the chunks of a chunked prefill) and
then from every decode step, whether or not that step evicts, as the real-drop code's
``s_new[:, :Lk-q] += s_old`` does; the cache is kept at its budget by evicting the lowest.
The recent window here is the sieve's protected window (question / observation window); the
per-KV-head score sums the attention of the KV head's query heads (GQA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs


@METHODS.register("h2o")
@dataclass
class H2OScorer(KVScorer):
    """Accumulated attention received, per KV head."""

    name = "h2o"
    paper = "Zhang et al. 2023, H2O: Heavy-Hitter Oracle, arXiv 2306.14048"
    needs = ("received",)
    sites = ("prefill", "decode")
    carries = True

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        assert obs.received is not None
        r = obs.received[..., : ctx.n_tokens]  # (B, H, T)
        B, H, T = r.shape
        return r.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, T).sum(2)

    def carry(self, layer: Any, scores: torch.Tensor) -> torch.Tensor:
        """Add the attention the entries received in earlier chunks (new entries carry 0) and store
        the sum with them: (B, Hk, T) -> (B, Hk, T)."""
        prev = layer.extras.get("h2o")
        acc = scores if prev is None else prev.to(scores.dtype) + scores
        layer.extras["h2o"] = acc
        return acc

    def decode_step(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> None:
        """Add this step's attention (summed over each KV head's query heads) to every stored entry."""
        S = layer.stored_length
        row = obs.rows[-1][..., :S].float()  # (B, H, S) this step's attention
        B, H, _ = row.shape
        step = row.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, S).sum(2)  # (B, Hk, S)
        prev = layer.extras.get("h2o")
        if prev is None or prev.shape[-1] != S:
            raise FlowsieveError("h2o: the decode cache carries no prefill scores (was the prefill sieved?)")
        layer.extras["h2o"] = prev + step

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        """Heavy hitters at decode time: the attention each entry received over the prefill and every
        decode step so far (:meth:`decode_step` has added this step's)."""
        return layer.extras["h2o"]
