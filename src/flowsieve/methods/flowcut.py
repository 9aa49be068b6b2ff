"""FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025, arXiv 2505.19536), applied to the KV cache of a context.

Per layer, the relay queries (the observation rows: the question span in query-aware mode, the
last ``window`` tokens otherwise) give ``(rel + sem) * ||mean_h v||_1`` per token (relay attention
and value-value attention, each head-averaged and then normalised over the candidates — the entries
that may be evicted, not the protected BOS sink, chat template or question — as the paper
normalises over the visual tokens only; see :func:`flowsieve.methods.flow_signals.flowcut_score`; the
value-value softmax is scaled by 1/√d as in the paper's LLM stage, not unscaled as in its CLIP
path), averaged
over the relay queries; scores are accumulated across layers with FlowCut's EMA (weight 0.5) so
that a layer keeps what has carried information so far. Option ``normalise="all"`` normalises over
every entry instead (the sink and the question then take part in both sums; an ablation, worse in
the README's measurements).

Deviations from the paper (written for visual tokens in a ViT and one LLM layer): the relay is the
window of text queries instead of CLS / the last instruction token; pruning is one-shot per layer
of the KV cache instead of progressive inside the ViT; the entropy-adaptive count is not used
(every layer keeps the same number of entries, which multi-token chunks after compression need).
Option ``kernel`` (default 1: off, the paper's rule) average-pools the per-layer scores over
``kernel`` neighbouring tokens before the EMA, as SnapKV does: in text, the tokens a relay query
matches (the words of a question) sit next to the ones that carry the answer (the digits after them),
which the relay attends to less; pooling keeps such neighbours together. Not in FlowCut.

At the ``layer`` site this is FlowCut's LLM stage: before layer ``layer`` (default 2) the context
tokens are ranked by the flow score of the prompt's last token (the relay) at layer ``layer - 1``,
``(rel + sem) * ||mean_h v||_1`` with ``rel`` and ``sem`` softmaxes over the candidate span per head
(the full-row probabilities renormalised over the candidates, which is the same thing), averaged
over heads; the best ``round(n * keep)`` context tokens stay in the residual stream. Deviations: the
official code scores and prunes inside layer 1's attention (layer 1 is FlowCut's ``prune_layer``)
and renumbers the positions of the kept tokens; here layer ``layer - 1`` runs on all tokens, they
leave before layer ``layer``, and the kept tokens keep their original positions. No EMA and no
entropy-adaptive count (one stage with an exact count, as in the LLM stage).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, ScoreContext, pool1d
from flowsieve.methods.flow_signals import flowcut_score
from flowsieve.methods.layer import LayerContext, LayerPruner, Stage, relay_rows, score_layer
from flowsieve.observe import LayerObs
from flowsieve.tensors import normalise


@METHODS.register("flowcut")
@dataclass
class FlowCutScorer(LayerPruner):
    """Relay flow with value-norm weighting, EMA over layers.

    Attributes:
        ema: weight of the new layer in the EMA (prefill site).
        layer: the prune layer at the layer site (>= 1); layer ``layer - 1`` scores.
        kernel: average pooling of the prefill-site scores over this many neighbours (1 = none).
        normalise: ``"candidates"`` (the paper's rule: both terms sum to 1 over the entries that
            may be evicted) or ``"all"`` (over every entry, protected ones included).
    """

    name = "flowcut"
    paper = "Tong et al. 2025, FlowCut, arXiv 2505.19536"
    sites = ("prefill", "layer")
    needs = ("rows",)
    ema: float = 0.5
    layer: int = 2
    kernel: int = 1
    normalise: str = "candidates"

    def __post_init__(self) -> None:
        if self.normalise not in ("candidates", "all"):
            raise FlowsieveError(f"flowcut: normalise must be 'candidates' or 'all', got {self.normalise!r}")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1:
            raise FlowsieveError(f"flowcut: kernel must be an integer >= 1, got {self.kernel!r}")
        if not 0 < self.ema <= 1:
            raise FlowsieveError(f"flowcut: ema must be in (0, 1], got {self.ema}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise FlowsieveError(f"flowcut: layer must be an integer >= 1, got {self.layer!r}")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        T = ctx.n_tokens
        assert obs.value_l1 is not None
        vl1 = obs.value_l1[..., :T]
        cand = ctx.shared_candidates() if self.normalise == "candidates" else None
        # every observation row is a relay of its own, normalised on its own; their scores are averaged
        per_relay = [
            flowcut_score(obs.rows[p][..., :T], obs.vv_rows[p][..., :T], vl1, cand) for p in ctx.window
        ]
        s = pool1d(torch.stack(per_relay).mean(0), self.kernel)  # (B, T)
        return normalise(s)

    def accumulate(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        out, acc = [], None
        for s in scores:
            acc = s if acc is None else (1 - self.ema) * acc + self.ema * s
            out.append(acc)
        return out

    def check_layer_options(self) -> None:
        """The layer site scores one layer with FlowCut's LLM-stage rule: no EMA, pooling or choice
        of normalisation (both terms are softmaxes over the candidate span)."""
        for name, default in (("ema", 0.5), ("kernel", 1), ("normalise", "candidates")):
            if getattr(self, name) != default:
                raise FlowsieveError(f"flowcut: option '{name}' applies at the prefill site only")

    def layer_plan(self, n_layers: int, keep: float) -> list[Stage]:
        return [(self.layer, keep)]

    def layer_score(
        self, seen: Mapping[int, LayerObs], ctx: LayerContext, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        obs = seen[score_layer(ctx.layer, ctx.layer_types)]
        p = ctx.relay[-1]
        if obs.value_l1 is None or p not in obs.vv_rows:
            raise FlowsieveError("flowcut: the relay's value rows were not recorded")
        cand = ctx.candidates
        # per head, the softmax over the span: (B, H, n) and (B, Hk, n)
        rel = normalise(relay_rows(obs, (p,))[:, :, 0], cand)
        sem = normalise(obs.vv_rows[p].float(), cand)
        return flowcut_score(rel, sem, obs.value_l1.float(), cand), None
