"""TokenSelect (Wu et al., "TokenSelect: Efficient Long-Context Inference and Length Extrapolation
for LLMs via Dynamic Token-Level KV Cache Selection", arXiv 2411.02886) at the ``select`` site.

The whole KV cache stays; at every attention call of a full-attention layer (a decode step, a
later prefill chunk, the question appended in query-agnostic mode) the queries attend to:

- the first ``n_init`` entries (attention sinks) and the last ``n_local`` entries (recent window;
  at least the call's own q new tokens, so every query sees itself);
- the ``k`` best other entries, by per-head soft voting: with qf the mean of the call's queries,
  ``s = sum_h softmax_j(qf_h . k_{kv(h), j})`` over the candidates j (raw dot products, no
  1/sqrt(d); ``kv(h)`` is the KV head of query head h), optionally max-pooled over neighbouring
  tokens (``kernel``), top-k. The same entries serve every head.

Budget: the sieve's ``keep`` is the share of the cache attended at each call,
``budget = round(keep x N)`` entries with N the entries cached at that call (the prompt plus the
tokens generated so far, so about keep x the prompt tokens for a short answer); ``budget=`` is a
fixed number of entries. ``n_init`` and ``n_local`` count inside it: ``k = budget - n_init - n_local``.
When ``budget >= N`` the call attends to everything. With ``n_init`` / ``n_local`` unset they take the
paper's proportions of the budget (128 : 512 of 128 + 2048 + 512 entries, the released configs).

Selection cache (off by default, as released): with ``theta`` set, a layer reuses its last top-k
selection while the cosine between the current qf and the qf that made that selection is at least
``theta`` (entries that moved into the local window since are simply attended as local).

Deviations from the paper:
- positions: the cached keys carry the RoPE rotation of their original positions and the queries
  theirs, so scoring and attention use true relative positions. The paper keeps a pre-RoPE pool and
  rotates the selected keys to contiguous positions (its length-extrapolation part); within the
  model's trained context keeping original positions is the natural choice and needs no re-rotation;
- a chunk's scoring query is the mean of its queries at their own positions (the paper rotates them
  to one fixed position before averaging);
- the paper's Triton kernel and paged cache make the scoring cheap; here it is one grouped matmul
  over the candidates (H x N x d per call, the same order as the attention it saves).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KeySelectMethod, pool1d, span_index, split_budget

# the released configuration: n_init 128, top-k 2048, n_local 512 entries
_PAPER_INIT, _PAPER_TOPK, _PAPER_LOCAL = 128, 2048, 512


def soft_vote(qf: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Per-head soft voting: ``sum_h softmax_j(qf_h . k_{kv(h), j})``.

    Args:
        qf: (H, d) one query per head.
        keys: (Hk, n, d) candidate keys; query head h reads KV head h // (H / Hk).

    Returns:
        (n,) float32 scores; they sum to H.
    """
    H, d = qf.shape
    Hk = keys.shape[0]
    s = qf.float().view(Hk, H // Hk, d) @ keys.float().transpose(-1, -2)  # (Hk, g, n)
    return torch.softmax(s, dim=-1).sum((0, 1))


@dataclass
class TokenSelectState:
    """Per sequence: the selection cache (layer -> (qf (H*d,), selected slots)) and counters."""

    cached: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    hits: int = 0
    selections: int = 0


@METHODS.register("tokenselect")
@dataclass
class TokenSelectMethod(KeySelectMethod):
    """Sinks + recent + top-k by soft voting, per call. Attributes: n_init, n_local (None = the
    paper's proportions of the budget), kernel (max-pool size, 1 = off), theta (selection-cache
    cosine threshold, None = off)."""

    name = "tokenselect"
    paper = (
        "Wu et al. 2024, TokenSelect: Efficient Long-Context Inference and Length Extrapolation for LLMs "
        "via Dynamic Token-Level KV Cache Selection, arXiv 2411.02886"
    )
    n_init: int | None = None
    n_local: int | None = None
    kernel: int = 1
    theta: float | None = None

    def __post_init__(self) -> None:
        if self.n_init is not None and self.n_init < 0:
            raise FlowsieveError(f"tokenselect: n_init must be >= 0, got {self.n_init}")
        if self.n_local is not None and self.n_local < 1:
            raise FlowsieveError(f"tokenselect: n_local must be >= 1 (the current token), got {self.n_local}")
        if self.kernel < 1:
            raise FlowsieveError(f"tokenselect: kernel must be >= 1 (1 = no pooling), got {self.kernel}")
        if self.theta is not None and not -1.0 <= self.theta <= 1.0:
            raise FlowsieveError(f"tokenselect: theta must be a cosine in [-1, 1], got {self.theta}")

    def split(self, budget: int) -> tuple[int, int]:
        """(n_init, n_local) for a budget of ``budget`` attended entries."""
        paper = (_PAPER_INIT, _PAPER_LOCAL, _PAPER_INIT + _PAPER_TOPK + _PAPER_LOCAL)
        return split_budget("tokenselect", budget, self.n_init, self.n_local, paper)

    def new_state(self) -> TokenSelectState:
        return TokenSelectState()

    def select(
        self,
        state: TokenSelectState,
        layers: tuple[int, ...],
        rank: int,
        query: torch.Tensor,
        key: torch.Tensor,
        budget: int,
    ) -> torch.Tensor:
        N, q = key.shape[2], query.shape[2]
        if budget >= N:
            return torch.arange(N, device=key.device)
        n_init, n_local = self.split(budget)
        lo, hi = n_init, N - max(n_local, q)  # candidates [lo, hi)
        if hi <= lo:
            return torch.arange(N, device=key.device)
        k = min(max(0, budget - n_init - max(n_local, q)), hi - lo)
        qf = query[0].float().mean(1)  # (H, d)
        layer = layers[rank]
        prev = state.cached.get(layer) if self.theta is not None else None
        if prev is not None and _cosine(qf.reshape(-1), prev[0]) >= self.theta:
            sel = prev[1][(prev[1] >= lo) & (prev[1] < hi)]
            state.hits += 1
        else:
            s = pool1d(soft_vote(qf, key[0, :, lo:hi]), self.kernel, "max")
            sel = s.topk(k).indices + lo
            if self.theta is not None:
                state.cached[layer] = (qf.reshape(-1), sel)
            state.selections += 1
        return span_index(n_init, sel, hi, N)

    def summary(self, state: TokenSelectState) -> dict[str, Any]:
        if self.theta is None:
            return {}
        return {"selection_cache_hits": state.hits, "selections": state.selections}


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b) / (a.norm() * b.norm()).clamp(min=1e-12))
