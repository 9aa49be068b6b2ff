"""Attention sinks and dormant heads from accumulated attention statistics.

Criteria (thresholds are arguments; the defaults below are this project's, stated in the trace):

- Sink tokens (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453; ACT, Yu et al. 2024,
  arXiv 2406.15765): key ``j`` is a sink of head ``h`` when its mean received attention
  ``m_j = sum_i A[i, j] / (#queries that see j)`` exceeds ``alpha`` (ACT's threshold 0.1). Keys seen by
  fewer than ``min_visible`` queries are excluded: near the end of a text a handful of queries
  makes ``m_j`` meaningless. A token is a sink of a layer when the head-mean ``m_j`` exceeds ``alpha``.
- Dormant heads (Guo et al., "Active-Dormant Attention Heads", arXiv 2410.13835; Sandoval-Segura
  et al., arXiv 2504.03889): a head is dormant when it parks at least ``park`` of its attention on the
  sink tokens (attention weight on the sinks, the AWFT idea generalised from the first token to the
  detected sinks), or when its output norm is below ``quiet`` times the median head of its layer
  (the output-norm criterion that catches inactive heads AWFT misses).
"""

from __future__ import annotations

import torch


def mean_received(received: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """m_j per head: received (H, T) / visible (T,) -> (H, T)."""
    return received / visible.clamp(min=1)


def sink_mask(
    received: torch.Tensor, visible: torch.Tensor, alpha: float = 0.1, min_visible: int = 16
) -> torch.Tensor:
    """Per-head sink flags (H, T) bool."""
    m = mean_received(received, visible)
    return (m > alpha) & (visible >= min_visible)


def layer_sinks(
    received: torch.Tensor, visible: torch.Tensor, alpha: float = 0.1, min_visible: int = 16
) -> torch.Tensor:
    """Tokens that are sinks of the layer (head-mean m_j > alpha): (H, T), (T,) -> (T,) bool."""
    m = mean_received(received, visible).mean(0)
    return (m > alpha) & (visible >= min_visible)


def sink_share(received: torch.Tensor, n_rows: int, sinks: torch.Tensor) -> torch.Tensor:
    """Fraction of each head's attention that lands on the sink tokens: (H, T), bool (T,) -> (H,)."""
    return (received * sinks).sum(-1) / max(n_rows, 1)


def dormant_heads(
    share: torch.Tensor, out_norm: torch.Tensor, park: float = 0.9, quiet: float = 0.1
) -> torch.Tensor:
    """Dormant flags (L, H) from sink share (L, H) and mean head output norm (L, H)."""
    med = out_norm.median(dim=-1, keepdim=True).values.clamp(min=1e-12)
    return (share >= park) | (out_norm / med < quiet)
