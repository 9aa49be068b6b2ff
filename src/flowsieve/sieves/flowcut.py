"""FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025, arXiv 2505.19536), applied to the KV cache of a context.

Per layer, the relay queries (the observation window: the question in query-aware mode) give
``(rel + sem) * ||mean_h v||_1`` per token (relay attention and value-value attention, each
normalised over the candidates, see :func:`flowsieve.scorers.flow.flowcut_score`), averaged over the
relay queries; scores are accumulated across layers with FlowCut's EMA (weight 0.5) so that a layer
keeps what has carried information so far.

Deviations from the paper (written for visual tokens in a ViT and one LLM layer): the relay is the
window of text queries instead of CLS / the last instruction token; pruning is one-shot per layer
of the KV cache instead of progressive inside the ViT; the entropy-adaptive count is not used
(every layer keeps the same number of entries, which multi-token chunks after compression need).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.observe import LayerObs
from flowsieve.scorers.flow import flowcut_score
from flowsieve.sieves.base import METHODS, KVScorer, ScoreContext


@METHODS.register("flowcut")
@dataclass
class FlowCutScorer(KVScorer):
    """Relay flow with value-norm weighting, EMA over layers. Attributes: ema (weight of the new layer)."""

    name = "flowcut"
    paper = "Tong et al. 2025, FlowCut, arXiv 2505.19536"
    needs = ("rows",)
    ema: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.ema <= 1:
            raise FlowsieveError(f"flowcut: ema must be in (0, 1], got {self.ema}")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        T = ctx.n_tokens
        assert obs.value_l1 is not None
        vl1 = obs.value_l1[..., :T]
        per_relay = [flowcut_score(obs.rows[p][..., :T], obs.vv_rows[p][..., :T], vl1) for p in ctx.window]
        s = torch.stack(per_relay).mean(0)  # (B, T)
        return s / s.sum(-1, keepdim=True).clamp(min=1e-12)

    def accumulate(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        out, acc = [], None
        for s in scores:
            acc = s if acc is None else (1 - self.ema) * acc + self.ema * s
            out.append(acc)
        return out
