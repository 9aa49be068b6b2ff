"""TOVA (Oren et al., "Transformers are Multi-State RNNs", EMNLP 2024, arXiv 2401.06104): keep the
tokens the last query attends to most, averaged over heads (one score shared by all heads of a
layer). At the prefill site the last prompt token is the query; the decode site repeats it per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flowsieve.methods.base import METHODS, KVScorer, ScoreContext, window_rows
from flowsieve.observe import LayerObs


@METHODS.register("tova")
@dataclass
class TOVAScorer(KVScorer):
    """Last query's attention, head mean."""

    name = "tova"
    paper = "Oren et al. 2024, Transformers are Multi-State RNNs (TOVA), arXiv 2401.06104"
    needs = ("rows",)
    sites = ("prefill", "decode")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        last = (ctx.window[-1],)
        return window_rows(obs, last, ctx.n_tokens)[:, :, 0].mean(1)  # (B, T)

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        return obs.rows[-1][..., : layer.stored_length].mean(1)  # (B, S): this step's query, head mean
