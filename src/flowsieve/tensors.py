"""Small tensor helpers shared by methods, sites and the trace (floor 0: torch only)."""

from __future__ import annotations

import torch

EPS = 1e-12


def normalise(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scale ``x`` to sum to 1 over the last dim; with ``mask`` (broadcastable, bool or 0/1), zero
    the entries outside it first. An all-zero row stays zero."""
    if mask is not None:
        x = x * mask.to(x.dtype)
    return x / x.sum(-1, keepdim=True).clamp(min=EPS)


def gqa_mean(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Average query-head scores over each KV head's group: (B, H, T) -> (B, Hk, T)."""
    B, H, T = x.shape
    return x.view(B, n_kv_heads, H // n_kv_heads, T).mean(2)
