"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453): keep the first ``sinks`` tokens (attention sinks) and the most recent tokens.

Deviation: positions are kept as they were (original RoPE, like kvpress's StreamingLLMPress
without re-rotation) instead of re-numbering the cache contiguously.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs


@METHODS.register("streamingllm")
@dataclass
class StreamingLLMScorer(KVScorer):
    """Sinks first, then recency. Attributes: sinks = 4 (the paper's start size)."""

    name = "streamingllm"
    paper = "Xiao et al. 2023, Efficient Streaming Language Models with Attention Sinks, arXiv 2309.17453"
    sites = ("prefill", "decode")
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.sinks < 0:
            raise FlowsieveError(f"sinks must be >= 0, got {self.sinks}")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        s = torch.arange(ctx.n_tokens, dtype=torch.float32)
        s[: self.sinks] = float(ctx.n_tokens) + 1.0  # above every recent token
        return s[None]

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        pos = layer.positions.float()
        return torch.where(pos < self.sinks, pos.new_tensor(float(layer.cumulative_length) + 1.0), pos)
