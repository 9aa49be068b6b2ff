"""TransPrune (Li, Duan, Zhang, Ma, Xie, Carneiro, Yaqub, Wang, "TransPrune: Token Transition Pruning
for Efficient Large Vision-Language Model", 2025, arXiv 2507.20630), applied to the KV cache of a
context.

A token's *transition variation* (TTV) in one block (attention or MLP) is
``(||after|| / ||before||) * softmax_over_tokens(1 - cos(before, after))`` (``before`` the block's
normalised input, ``after`` its output before the residual add, see
:func:`flowsieve.methods.flow_signals.ttv`); a layer's TTV is the sum over its two blocks, and TTV is summed
over the layers run so far. The instruction-guided attention (IGA) is the head-mean attention of
the instruction tokens to the candidates, averaged over those tokens. The score is
``TTVacc / sum(TTVacc) + IGA / sum(IGA)`` over the candidates (it sums to 2).

What changed for a text context (the paper prunes the visual tokens of LLaVA inside the LLM at
layers 7/9/12, accumulating TTV from layer 7 on):

- the candidates are the tokens before the observation window; the instruction tokens are the
  observation window (the question in query-aware mode, the last tokens of the context otherwise),
  whose entries are always kept, so they are left out of both normalisations (score 0 here);
- every compressed layer's cache is scored after the prefill: the TTV of layer ``l`` is accumulated
  over the compressed layers ``ttv_from .. l`` (the paper: the layers already run before its
  pruning layer; Gemma-3's sliding-window layers are not compressed, so their TTV is not counted),
  and IGA is the window attention of layer ``l`` itself (the paper uses the next layer's
  projections on the pruned hidden states); layers before ``ttv_from`` use IGA alone;
- tokens are not pruned progressively from the sequence (no renumbered positions): each layer keeps
  its own entries and later tokens keep absolute positions;
- the TTV softmax runs over the tokens of the observed forward (the whole prompt, or one chunk of a
  chunked prefill), the candidate normalisation afterwards; in a chunked prefill the entries kept
  from earlier chunks were not observed and get the chunk's mean TTV.

``score`` returns both terms of one layer stacked, ``(2, B, T)`` (TTV, IGA); ``accumulate`` sums TTV
over layers and turns them into the final ``(B, T)`` scores.

At the ``layer`` site the tokens leave the residual stream progressively, as in the paper: the
default prune layers are the paper's 7, 9 and 12 (of 32 layers; the tokens leave the input of those
0-indexed layers) moved to the same relative depth of the model, and its keep ratios 0.875, 0.625
and 0.125 become ``1 - (1 - keep) * f`` with ``f = 1/7, 3/7, 1`` (the share of the finally dropped
tokens each stage has dropped; ``keep = 0.125`` gives the paper's ratios). TTV is accumulated from
the layer before the first prune layer (or ``ttv_from``, if later) up to each prune layer, and
re-gathered to the tokens that stay. The instruction tokens are the relay (the question and what
follows it, or the last ``window`` tokens in query-agnostic mode). Deviations: IGA is the relay's
attention at the last full-attention layer below the prune layer (the paper recomputes it with the
next layer's projections on the pruned hidden states), and the kept tokens keep their original
positions (the paper renumbers them).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, ScoreContext, window_rows
from flowsieve.methods.flow_signals import ttv
from flowsieve.methods.layer import (
    LayerContext,
    LayerPruner,
    Stage,
    check_prune_layers,
    depth_scaled,
    merge_stages,
    relay_rows,
    score_layer,
)
from flowsieve.observe import LayerObs, ObserveSpec
from flowsieve.tensors import normalise

PAPER_LAYERS = (7, 9, 12)  # of 32 (LLaVA-1.5-7B), tokens leave the input of these layers
PAPER_DROP = (1 / 7, 3 / 7, 1.0)  # ratios 0.875, 0.625, 0.125: shares of the finally dropped tokens


def layer_ttv(obs: LayerObs, n_tokens: int) -> torch.Tensor:
    """TTV of one layer over the ``n_tokens`` cache entries, (B, T).

    The sum over the layer's blocks of ``ratio * softmax(dist)``, the softmax over the tokens of the
    observed forward calls (concatenated). Those tokens are the last entries of the cache; entries
    stored before them (kept from an earlier chunk of a chunked prefill) were not observed and get
    the mean TTV of the observed ones (neutral in the ranking).
    """
    if not obs.ttv:
        raise FlowsieveError("transprune: no transition signals were recorded for this layer")
    out = None
    for blocks in obs.ttv.values():
        ratio = torch.cat([r for r, _ in blocks], dim=-1)[..., -n_tokens:]
        dist = torch.cat([d for _, d in blocks], dim=-1)[..., -n_tokens:]
        t = ttv(ratio.float(), dist.float())
        out = t if out is None else out + t
    assert out is not None
    n_new = out.shape[-1]
    if n_new < n_tokens:
        old = out.mean(-1, keepdim=True).expand(*out.shape[:-1], n_tokens - n_new)
        out = torch.cat([old, out], dim=-1)
    return out


@METHODS.register("transprune")
@dataclass
class TransPruneScorer(LayerPruner):
    """Accumulated token transition variation + window-guided attention, each normalised.

    Attributes:
        ttv_from: first layer whose TTV is accumulated (the paper starts at its first pruning layer).
        iga_weight: weight of the attention term (1 in the paper).
        prune_layers: layer site: the prune layers (None = the paper's 7, 9, 12 of 32, depth-scaled).
        drop_fractions: layer site: per prune layer, the share of the finally dropped context tokens
            dropped by then (non-decreasing, the last 1; None = the paper's 1/7, 3/7, 1 for three
            layers, ``s / m`` for ``m`` layers otherwise).
    """

    name = "transprune"
    paper = "Li et al. 2025, TransPrune: Token Transition Pruning, arXiv 2507.20630"
    sites = ("prefill", "layer")
    relay_all = True
    needs = ("transitions", "rows")
    ttv_from: int = 0
    iga_weight: float = 1.0
    prune_layers: tuple[int, ...] | None = None
    drop_fractions: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.ttv_from < 0:
            raise FlowsieveError(f"transprune: ttv_from must be >= 0, got {self.ttv_from}")
        if not self.iga_weight >= 0:
            raise FlowsieveError(f"transprune: iga_weight must be >= 0, got {self.iga_weight}")
        if self.prune_layers is not None:
            self.prune_layers = check_prune_layers("transprune", self.prune_layers)
        if self.drop_fractions is not None:
            fs = tuple(float(f) for f in self.drop_fractions)
            n = len(self.prune_layers) if self.prune_layers is not None else len(PAPER_LAYERS)
            if (
                len(fs) != n
                or any(not 0 < f <= 1 for f in fs)
                or any(b < a for a, b in itertools.pairwise(fs))
                or fs[-1] != 1
            ):
                raise FlowsieveError(
                    f"transprune: drop_fractions must be {n} non-decreasing numbers in (0, 1] ending "
                    f"with 1 (one per prune layer), got {self.drop_fractions}"
                )
            self.drop_fractions = fs

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        T = ctx.n_tokens
        t = layer_ttv(obs, T)  # (B, T)
        if ctx.layer < self.ttv_from:
            t = torch.zeros_like(t)
        iga = window_rows(obs, ctx.window, T).mean(1).mean(1)  # heads, then window queries -> (B, T)
        cand = torch.ones(T, dtype=t.dtype)
        cand[max(T - len(ctx.window), 0) :] = 0  # the window (the last slots) is kept: not a candidate
        return torch.stack([t * cand, iga * cand])

    def accumulate(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        if any(s.dim() != 3 or s.shape[0] != 2 for s in scores):
            raise FlowsieveError("transprune: accumulate() expects the stacked (TTV, IGA) scores of score()")
        out, acc = [], None
        for s in scores:
            acc = s[0] if acc is None else acc + s[0]
            out.append(normalise(acc) + self.iga_weight * normalise(s[1]))
        return out

    # ---------------------------------------------------------------------------------- layer site

    def layer_plan(self, n_layers: int, keep: float) -> list[Stage]:
        layers = list(self.prune_layers or depth_scaled(PAPER_LAYERS, 32, n_layers))
        fracs = self.drop_fractions
        if fracs is None:
            m = len(layers)
            fracs = PAPER_DROP if m == len(PAPER_DROP) else tuple((s + 1) / m for s in range(m))
        # the last fraction is 1: that stage keeps exactly `keep`
        return merge_stages([(k, keep if f == 1 else 1 - (1 - keep) * f) for k, f in zip(layers, fracs)])

    def _ttv_start(self, plan: Sequence[Stage]) -> int:
        return max(self.ttv_from, plan[0][0] - 1)

    def layer_observe(self, plan: Sequence[Stage], layer_types: Sequence[str]) -> ObserveSpec:
        ttv_layers = range(self._ttv_start(plan), plan[-1][0])
        layers = set(self.score_layers(plan, layer_types)) | set(ttv_layers)
        return ObserveSpec(layers=tuple(sorted(layers)), transitions=True, slots=True)

    def layer_score(
        self, seen: Mapping[int, LayerObs], ctx: LayerContext, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = int(ctx.candidates.shape[0])
        start = self._ttv_start(ctx.plan)
        acc = carry
        for j in sorted(seen):
            if max(start, ctx.prev_layer) <= j < ctx.layer:
                t = layer_ttv(seen[j], n)
                acc = t if acc is None else acc + t
        iga = relay_rows(seen[score_layer(ctx.layer, ctx.layer_types)], ctx.relay).mean(1).mean(1)  # (B, n)
        ttv_term = torch.zeros_like(iga) if acc is None else normalise(acc, ctx.candidates)
        return ttv_term + self.iga_weight * normalise(iga, ctx.candidates), acc
