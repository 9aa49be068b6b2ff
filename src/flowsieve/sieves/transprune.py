"""TransPrune (Li, Duan, Zhang, Ma, Xie, Carneiro, Yaqub, Wang, "TransPrune: Token Transition Pruning
for Efficient Large Vision-Language Model", 2025, arXiv 2507.20630), applied to the KV cache of a
context.

A token's *transition variation* (TTV) in one block (attention or MLP) is
``(||after|| / ||before||) * softmax_over_tokens(1 - cos(before, after))`` (``before`` the block's
normalised input, ``after`` its output before the residual add, see
:func:`flowsieve.scorers.flow.ttv`); a layer's TTV is the sum over its two blocks, and TTV is summed
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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.observe import LayerObs
from flowsieve.scorers.flow import ttv
from flowsieve.sieves.base import METHODS, KVScorer, ScoreContext, window_rows


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


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale to sum to 1 over the last dim (zeros stay zeros)."""
    return x / x.sum(-1, keepdim=True).clamp(min=1e-12)


@METHODS.register("transprune")
@dataclass
class TransPruneScorer(KVScorer):
    """Accumulated token transition variation + window-guided attention, each normalised.

    Attributes:
        ttv_from: first layer whose TTV is accumulated (the paper starts at its first pruning layer).
        iga_weight: weight of the attention term (1 in the paper).
    """

    name = "transprune"
    paper = "Li et al. 2025, TransPrune: Token Transition Pruning, arXiv 2507.20630"
    needs = ("transitions", "rows")
    ttv_from: int = 0
    iga_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.ttv_from < 0:
            raise FlowsieveError(f"transprune: ttv_from must be >= 0, got {self.ttv_from}")
        if not self.iga_weight >= 0:
            raise FlowsieveError(f"transprune: iga_weight must be >= 0, got {self.iga_weight}")

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
