"""FastV (Chen, Zhao, Chen, Liu, Zhou, Lin, Chang, "An Image is Worth 1/2 Tokens After Layer 2:
Plug-and-Play Inference Acceleration for Large Vision-Language Models", ECCV 2024, arXiv 2403.06764),
applied to a text context at the ``layer`` site.

At layer ``K`` (default 2, the paper's setting) the context tokens are ranked by the attention the
prompt's last token gives them at layer ``K-1`` (softmax over the whole row, averaged over heads)
and only the best ``round(n * keep)`` of the ``n`` context tokens stay in the residual stream; every
other token (chat template, question) is untouched. The tokens keep their original positions, as in
the released code (``position_ids`` of the kept tokens), so later tokens get absolute positions.

What changed for a text context (the paper drops image tokens of LLaVA):

- the candidate span is the context instead of the image tokens; in query-agnostic mode the last
  ``window`` context tokens (the relay) are kept and counted in the ``round(n * keep)``;
- the paper parameterises by a drop ratio ``R``; here ``keep = 1 - R``;
- on models with sliding-window layers (Gemma-3) the ranking row comes from the last full-attention
  layer below ``K`` when ``K - 1`` is a sliding layer (its row sees only its window), see
  :func:`flowsieve.methods.layer.score_layer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, ScoreContext
from flowsieve.methods.layer import LayerContext, LayerPruner, Stage, last_row_score
from flowsieve.observe import LayerObs


@METHODS.register("fastv")
@dataclass
class FastVScorer(LayerPruner):
    """The last token's head-mean attention at layer K-1 ranks the context before layer K.

    Attributes:
        layer: K, the first layer that runs on the pruned stream (>= 1).
    """

    name = "fastv"
    paper = "Chen et al. 2024, FastV: An Image is Worth 1/2 Tokens After Layer 2, ECCV 2024, arXiv 2403.06764"
    sites = ("layer",)
    layer: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise FlowsieveError(f"fastv: layer must be an integer >= 1, got {self.layer!r}")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        raise FlowsieveError("fastv prunes inside the model: use site='layer'")

    def layer_plan(self, n_layers: int, keep: float) -> list[Stage]:
        return [(self.layer, keep)]

    def layer_score(
        self, seen: Mapping[int, LayerObs], ctx: LayerContext, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return last_row_score(seen, ctx), None
