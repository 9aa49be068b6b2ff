"""Rank fusion of information flow and surprisal: FlowCut's relay flow and LLMLingua's self-information.

Two signals keep different things. FlowCut's relay flow (Tong et al. 2025, arXiv 2505.19536) keeps
what the observation queries draw information from — the entries a question is about, or, without a
question, what the end of the context relays. Self-information (Jiang et al. 2023, LLMLingua, arXiv
2310.05736) keeps what the model cannot predict — rare facts, names, numbers — whatever is asked.
Each fails where the other holds: flow misses a fact the relay does not look at yet; surprisal keeps
every odd token, relevant or not.

The rule is reciprocal rank fusion (Cormack, Clarke and Büttcher, "Reciprocal Rank Fusion
outperforms Condorcet and individual Rank Learning Methods", SIGIR 2009): an entry ranked ``r_f``
by flow and ``r_s`` by surprisal (1 = best, per layer, over all stored entries, ties in position
order) scores

    1 / (k + r_f) + 1 / (k + r_s),      k = 60 (the paper's constant).

Ranks, not values, are fused: the two signals live on unrelated scales. The flow term is FlowCut's
score after its EMA over layers (:class:`~flowsieve.methods.flowcut.FlowCutScorer`, default options);
the surprisal term is :class:`~flowsieve.methods.selfinfo.SelfInfoScorer`'s, the same in every layer.
With ``units="sentence"`` a sentence ranks by the mean fused score of its tokens.

A combination defined here, in no paper: ranks run over every stored entry (protected ones
included; they are kept whatever they score, and shift every candidate's rank alike). Not for
chunked prefill (surprisal needs the whole prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.methods.flowcut import FlowCutScorer
from flowsieve.methods.selfinfo import SelfInfoScorer
from flowsieve.observe import LayerObs, ObserveSpec

RRF_K = 60


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of every entry along the last dim (1 = highest score; ties by position).

    Args:
        scores: (..., T).

    Returns:
        (..., T) float ranks.
    """
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    out = torch.empty_like(order, dtype=torch.float32)
    pos = torch.arange(1, scores.shape[-1] + 1, dtype=torch.float32).expand(order.shape)
    return out.scatter_(-1, order, pos.contiguous())


def rrf(a: torch.Tensor, b: torch.Tensor, k: float = RRF_K) -> torch.Tensor:
    """Reciprocal rank fusion of two score tensors of one shape (..., T): ``1/(k+r_a) + 1/(k+r_b)``."""
    return 1.0 / (k + ranks(a)) + 1.0 / (k + ranks(b))


@METHODS.register("fusion")
@dataclass
class FusionScorer(KVScorer):
    """Reciprocal rank fusion of FlowCut's relay flow and self-information, shared by all heads.

    Attributes:
        k: the fusion constant (larger = flatter weights on the top ranks).
    """

    name = "fusion"
    paper = (
        "Cormack et al. 2009 (reciprocal rank fusion) of FlowCut (arXiv 2505.19536) and LLMLingua "
        "self-information (arXiv 2310.05736)"
    )
    needs = ("rows", "surprisal")
    unit_reduce = "mean"
    chunkable = False
    k: float = RRF_K
    _flow: FlowCutScorer = field(default_factory=FlowCutScorer, init=False, repr=False)
    _info: SelfInfoScorer = field(default_factory=SelfInfoScorer, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or self.k < 0:
            raise FlowsieveError(f"fusion: k must be a number >= 0, got {self.k!r}")

    def spec(self, window: tuple[int, ...]) -> ObserveSpec:
        spec = self._flow.spec(window)
        spec.surprisal = True
        return spec

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        """Both signals of one layer, stacked: (2, B, T); :meth:`accumulate` fuses them."""
        return torch.stack([self._flow.score(obs, ctx).float(), self._info.score(obs, ctx).float()])

    def accumulate(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """FlowCut's EMA over the flow terms, then the fusion per layer: (B, T) each."""
        flow = self._flow.accumulate([s[0] for s in scores])
        return [rrf(f, s[1], self.k) for f, s in zip(flow, scores, strict=True)]
