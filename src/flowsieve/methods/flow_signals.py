"""Information-flow scores of FlowCut and TransPrune, as pure tensor functions.

FlowCut (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025, arXiv 2505.19536): a relay token's attention row and its
value-value ("semantic") row, each normalised over the candidates, summed and weighted by the L1
norm of each candidate's head-mean value vector; accumulated over layers by an EMA with weight 0.5.

TransPrune (arXiv 2507.20630): token transition variation (TTV) of a block is
``(||after|| / ||before||) * softmax_over_tokens(1 - cos(before, after))``, summed over the attention
and MLP blocks of a layer and accumulated over layers.

Shapes: B batch, H query heads, Hk KV heads, T tokens.
"""

from __future__ import annotations

import torch

from flowsieve.tensors import normalise


def flowcut_score(
    relay_row: torch.Tensor,
    vv_row: torch.Tensor,
    value_l1: torch.Tensor,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlowCut's per-token flow score for one layer.

    Args:
        relay_row: attention probabilities of the relay query, (B, H, T).
        vv_row: softmax of the relay's value against every value, per KV head, (B, Hk, T).
        value_l1: L1 norm of each token's head-mean value vector, (B, T).
        candidates: bool (B, T) or (T,), tokens that compete (None = all). The paper renormalises
            both terms over the candidate span (the visual tokens); here the caller chooses the span.

    Returns:
        (B, T) scores, zero outside the candidates: ``(rel + sem) * ||mean_h v||_1``.
    """
    mask = None if candidates is None else candidates.to(relay_row.dtype).expand_as(value_l1)
    rel = normalise(relay_row.mean(1), mask)
    sem = normalise(vv_row.mean(1), mask)
    score = (rel + sem) * value_l1
    return score if mask is None else score * mask


def ema_accumulate(per_layer: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """FlowCut's accumulation across layers: ``F_0 = s_0``, ``F_l = (1-w) F_{l-1} + w s_l``.

    Each layer's scores are first normalised to sum to 1 so that layers with larger value norms
    do not dominate. per_layer (L, ..., T) -> (L, ..., T).
    """
    s = normalise(per_layer)
    out = torch.empty_like(s)
    acc = s[0]
    out[0] = acc
    for i in range(1, s.shape[0]):
        acc = (1 - weight) * acc + weight * s[i]
        out[i] = acc
    return out


def ttv(ratio: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """TransPrune's token transition variation of one block: (B, T), (B, T) -> (B, T), sums to the mean ratio * 1."""
    return ratio * torch.softmax(dist, dim=-1)
