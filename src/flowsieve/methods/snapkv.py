"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469): the attention of an observation window of queries at the end of the prompt,
summed over the window, smoothed by 1-D pooling, averaged over each KV head's query heads (GQA, as
kvpress does), selects the prefix entries to keep; the window itself is always kept.

Defaults follow the official ``init_snapkv``: window 32 (the sieve's window), kernel 5, avg pooling.
As in the official ``SnapKVCluster.update_kv``, only the prefix columns (the entries before the
window) are summed and pooled, with zero padding at both ends (``avg_pool1d``'s default
``count_include_pad=True``); the window's own columns are never candidates and keep their raw sums.
The window is the sieve's observation rows: the question span in query-aware mode
(``Sieve(rows="window")`` gives the paper's last ``window`` prompt tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext, pool1d, window_rows
from flowsieve.observe import LayerObs
from flowsieve.tensors import gqa_mean


@METHODS.register("snapkv")
@dataclass
class SnapKVScorer(KVScorer):
    """Window attention, pooled, per KV head. Attributes: kernel (pool size), pooling ("avg"|"max")."""

    name = "snapkv"
    paper = "Li et al. 2024, SnapKV, arXiv 2404.14469"
    needs = ("rows",)
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        if self.kernel < 1 or self.pooling not in ("avg", "max"):
            raise FlowsieveError("snapkv: kernel must be >= 1 and pooling 'avg' or 'max'")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        a = window_rows(obs, ctx.window, ctx.n_tokens).sum(2)  # (B, H, T)
        n = max(ctx.n_tokens - len(ctx.window), 0)  # prefix: the slots before the window
        pooled = pool1d(a[..., :n], self.kernel, self.pooling, zero_pad=True)
        return gqa_mean(torch.cat([pooled, a[..., n:]], dim=-1), ctx.n_kv_heads)
