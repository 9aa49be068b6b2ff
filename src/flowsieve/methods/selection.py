"""Selection: from scores to the entries that stay (the policy every KV site uses)."""

from __future__ import annotations

import torch

from flowsieve.errors import FlowsieveError


def select_topk(scores: torch.Tensor, protect: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the protected entries plus the best others, k in all, ascending.

    Args:
        scores: (B, T) shared by heads or (B, Hk, T) per KV head; B must be 1.
        protect: bool (T,), or (1, Hk|1, T) per KV head.
        k: entries to keep (>= protected entries).

    Returns:
        (k,) when both are shared by all heads, else (1, Hk, k).
    """
    if scores.shape[0] != 1:
        raise FlowsieveError(
            "sieves run one sequence at a time (batch size 1); padded batches are not supported"
        )
    s = torch.nan_to_num(scores.float(), nan=float("-inf"))
    if s.dim() == 2:
        s = s[:, None]  # (1, 1, T)
    if protect.dim() == 1:
        protect = protect[None, None]
    s = torch.where(protect, torch.finfo(s.dtype).max, s)  # (1, Hk|1, T)
    idx = s.topk(k, dim=-1).indices.sort(dim=-1).values
    return idx[0, 0] if idx.shape[1] == 1 else idx
