"""KVzip (Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
NeurIPS 2025, arXiv 2505.23416): an entry matters as much as the model needs it to reproduce the
context. After the prefill, the context is replayed, teacher-forced, behind a request to repeat it
("Repeat the previous context exactly."); each cached entry of the context scores the highest
attention any replay query of its KV head's group paid it. Scores do not depend on any question,
so a cache compressed once serves every later question.

The replay runs in chunks of ``chunk_size`` context tokens (the paper's 2k); a later chunk's request
ends with the last 8 tokens of the previous chunk, as in the paper. The replay entries are removed
from the cache after every chunk. The first ``n_sink`` tokens are always kept (the paper's 4 sinks).

Deviations: the paper spreads one global budget over all layers and heads (non-uniform head
budgets); here every KV head of a layer keeps the same number of entries, so that the stored
tensors really shrink. Each replay query's softmax runs over the whole cache (context and replay so
far), not over a subset of keys. The replay costs about one more prefill of the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs, ObserveSpec

FIRST_REQUEST = "\n\nRepeat the previous context exactly."
NEXT_REQUEST = "\n\nRepeat the part of the previous context exactly, starting with"


@METHODS.register("kvzip")
@dataclass
class KVzipScorer(KVScorer):
    """Maximum attention from replay queries, per KV head. Attributes: chunk_size (context tokens
    per replay pass), n_sink (first tokens always kept), overlap (tokens of the previous chunk that
    lead a later chunk's request)."""

    name = "kvzip"
    paper = (
        "Kim et al. 2025, KVzip: query-agnostic KV compression with context reconstruction, arXiv 2505.23416"
    )
    replays = True
    chunkable = False
    chunk_size: int = 2048
    n_sink: int = 4
    overlap: int = 8

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.n_sink < 0 or self.overlap < 0:
            raise FlowsieveError("kvzip: chunk_size must be >= 1, n_sink and overlap >= 0")

    def replay_spec(self) -> ObserveSpec:
        return ObserveSpec(received_max=True)

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        if obs.received_max is None:
            raise FlowsieveError(
                "kvzip scores from replay passes of the context; run it through flowsieve.generate "
                "(flowsieve.generate.generate or flowsieve.sites.prefill_cache with the tokenizer)"
            )
        r = obs.received_max[..., : ctx.n_tokens]  # (B, H, T)
        B, H, T = r.shape
        s = r.view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, T).amax(2)  # (B, Hk, T)
        if self.n_sink:
            s[..., : self.n_sink] = float("inf")
        return s
