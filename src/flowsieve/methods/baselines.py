"""Position-only baselines: random and recent."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs


@METHODS.register("random")
@dataclass
class RandomScorer(KVScorer):
    """Uniformly random scores (seeded): the floor every method must beat."""

    name = "random"
    paper = "baseline"
    sites = ("prefill", "decode")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.layer)
        return torch.rand(1, ctx.n_tokens, generator=g)

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        g = torch.Generator().manual_seed(ctx.seed * 1000003 + layer.cumulative_length * 31 + ctx.layer)
        return torch.rand(layer.positions.shape, generator=g)


@METHODS.register("recent")
@dataclass
class RecentScorer(KVScorer):
    """Keep the most recent tokens (a sliding window without sinks)."""

    name = "recent"
    paper = "baseline"
    sites = ("prefill", "decode")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        return torch.arange(ctx.n_tokens, dtype=torch.float32)[None]

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        return layer.positions.float()
