"""ActQKV (Xiao et al., "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context
LLMs Inference", arXiv 2502.13542) at the ``select`` site: block retrieval with an
activation-aware probe query and a per-layer cut-off by information density.

The whole KV cache stays; at every attention call of a full-attention layer (a decode step, a later
prefill chunk, the question appended in query-agnostic mode) the queries attend to the first
``n_init`` entries, a local window, and the best blocks of ``block_size`` past entries:

- blocks tile the entries between the initial ones and the local window (the last ``n_local``
  entries, at least the call's own tokens; a partial block next to it belongs to the window);
- a block's key is the mean, per KV head, of its ``repr_topk`` keys that received the most *local*
  attention (each query's softmax over its last ``repr_window`` keys, summed over the query heads
  of the KV head and over every query so far), concatenated over KV heads: (Hk * d);
- probe query: the call's queries (averaged over each KV head's query heads, concatenated:
  (q, Hk * d)) weighted by their activation bias
  ``dev_t = mean_dims((Q_t - mu)^2 / (var + mean(var) / 100))``, ``w = dev / sum(dev)``, with mu and
  var running statistics of the query activations; block score ``cos(block key, probe)``;
- dynamic cut-off: the normalised entropy ``Hn = H(softmax(scores)) / log(n_blocks)`` of each
  layer, averaged over its last 100 calls (``E[Hn]``), shares out a block budget layer by layer:
  ``k_l = round(remaining * E[Hn_l] / sum_{m >= l} E[Hn_m])``, clipped to
  ``[min_share * avg, max_share * avg]`` (and to the blocks available) while leaving every later
  layer its minimum; ``avg`` is the blocks the budget affords per layer, so the attended entries
  average at most the budget over the layers.

Budget: the sieve's ``keep`` is the share of the cache attended per call on average over the
full-attention layers, ``budget = round(keep x N)`` with N the entries cached at that call (about
keep x the prompt for a short answer); ``budget=`` is a fixed count. ``n_init`` and the local
window count inside it; with ``n_init`` / ``n_local`` unset they take the released configuration's
proportions (64 initial, 512 local, 46 blocks of 32 = 2048 entries).

Simplifications and deviations (the released code is InfLLM-based research code; see the
project's research notes):
- running statistics (mu, var) per sequence and per layer, updated with the call's own queries
  first (no warm-up phase with uniform weights); the released code keeps global statistics shared
  across layers and sequences and starts with ~1000 uniform calls;
- the question term (``+ 4 * cos(block, question probe)`` during prefill) is left out: our prompts
  put the question after the context, so it is not known while the context is prefilled (and never
  in query-agnostic mode); when the question itself is appended, its queries form the probe;
- for a single decode query the probe is that query (its weight is 1);
- queries and keys keep their RoPE rotation at their own positions (the released code rotates
  queries to one fixed position); representative keys are recomputed from the accumulated local
  attention at every call instead of being frozen when a block leaves the local window;
- the released cut-off (at least 32 and at most 46 blocks per layer out of a total of
  46 x layers / 2) cannot always be met; here the bounds are shares of the average (0.5 and 2 by
  default), and the total is never exceeded. Until every layer has an entropy history the budget is
  shared out uniformly;
- the prompt is prefilled in one pass with full attention (or in ``Sieve.chunk`` chunks, each
  later chunk selecting), not in InfLLM's 256-token chunks with an offloaded block memory.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KeySelectMethod, span_index, split_budget

# the released configuration: 64 initial entries, 512 local, 46 blocks of 32
_PAPER_INIT, _PAPER_LOCAL, _PAPER_BLOCKS = 64, 512, 46 * 32
_HISTORY = 100  # calls over which a layer's entropy is averaged


def grouped_queries(query: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Queries per KV head: (1, H, q, d) -> (q, Hk * d), averaging each KV head's query heads."""
    _, H, q, d = query.shape
    return query[0].float().view(n_kv, H // n_kv, q, d).mean(1).permute(1, 0, 2).reshape(q, n_kv * d)


def activation_weights(qc: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Activation-bias weights of q query vectors.

    Args:
        qc: (q, D) query vectors; mean, var: (D,) running statistics.

    Returns:
        (q,) non-negative weights summing to 1, ``dev_t / sum(dev)`` with
        ``dev_t = mean_dims((qc_t - mean)^2 / (var + mean(var) / 100))``; uniform when no query
        deviates (flat statistics).
    """
    denom = (var + var.mean() / 100).clamp(min=1e-12)
    dev = ((qc - mean) ** 2 / denom).mean(-1)
    total = dev.sum()
    if not bool(torch.isfinite(total)) or float(total) <= 0.0:
        return torch.full_like(dev, 1.0 / dev.shape[0])
    return dev / total


def normalized_entropy(scores: torch.Tensor) -> float:
    """``H(softmax(scores)) / log(n)`` in [0, 1] (1.0 for a single block)."""
    n = scores.shape[-1]
    if n < 2:
        return 1.0
    p = torch.softmax(scores.float(), -1)
    h = -(p * torch.log(p.clamp(min=1e-30))).sum()
    return float(h) / math.log(n)


def hand_out(remaining: int, expected: list[float | None], lo: int, hi: int) -> int:
    """Blocks for the current layer, ``expected[0]`` being its mean entropy and ``expected[1:]``
    those of the later layers (None: no history yet, then the share is uniform).

    The result lies in [lo, hi] and leaves ``lo`` blocks for each later layer, provided
    ``remaining >= lo * len(expected)`` (which the caller keeps true).
    """
    later = len(expected) - 1
    if any(e is None for e in expected) or sum(expected) <= 0:  # type: ignore[arg-type]
        k = round(remaining / len(expected))
    else:
        k = round(remaining * expected[0] / sum(expected))  # type: ignore[arg-type, operator]
    return max(lo, min(k, hi, remaining - later * lo))


@dataclass
class _LayerState:
    count: int = 0
    mean: torch.Tensor | None = None  # (Hk * d,)
    m2: torch.Tensor | None = None  # (Hk * d,) sum of squared deviations
    mass: torch.Tensor | None = None  # (Hk, N) local attention received
    entropy: deque[float] = field(default_factory=lambda: deque(maxlen=_HISTORY))


@dataclass
class ActQKVState:
    """Per sequence: per-layer statistics, and the block budget left in the current forward pass."""

    layers: dict[int, _LayerState] = field(default_factory=dict)
    remaining: int = 0
    blocks: dict[int, int] = field(default_factory=dict)  # layer -> blocks picked at its last call
    total: int = 0  # block budget of the last forward pass

    def layer(self, i: int) -> _LayerState:
        return self.layers.setdefault(i, _LayerState())


@METHODS.register("actqkv")
@dataclass
class ActQKVMethod(KeySelectMethod):
    """Block retrieval with an activation-weighted probe and an entropy-driven per-layer cut-off.

    Attributes: block_size (32), repr_topk (4 keys represent a block), repr_window (local window of
    the representative scores, 128), n_init / n_local (None = the released proportions of the
    budget), min_share / max_share (per-layer block bounds as shares of the average, 0.5 / 2).
    """

    name = "actqkv"
    paper = (
        "Xiao et al. 2025, Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context "
        "LLMs Inference, arXiv 2502.13542"
    )
    block_size: int = 32
    repr_topk: int = 4
    repr_window: int = 128
    n_init: int | None = None
    n_local: int | None = None
    min_share: float = 0.5
    max_share: float = 2.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or not 1 <= self.repr_topk <= self.block_size:
            raise FlowsieveError("actqkv: block_size must be >= 1 and repr_topk in [1, block_size]")
        if self.repr_window < 1:
            raise FlowsieveError(f"actqkv: repr_window must be >= 1, got {self.repr_window}")
        if self.n_init is not None and self.n_init < 0:
            raise FlowsieveError(f"actqkv: n_init must be >= 0, got {self.n_init}")
        if self.n_local is not None and self.n_local < 1:
            raise FlowsieveError(f"actqkv: n_local must be >= 1 (the current token), got {self.n_local}")
        if not 0 <= self.min_share <= 1 or self.max_share < 1:
            raise FlowsieveError("actqkv: min_share must be in [0, 1] and max_share >= 1")

    def split(self, budget: int) -> tuple[int, int]:
        """(n_init, n_local) for a budget of ``budget`` attended entries."""
        paper = (_PAPER_INIT, _PAPER_LOCAL, _PAPER_INIT + _PAPER_LOCAL + _PAPER_BLOCKS)
        return split_budget("actqkv", budget, self.n_init, self.n_local, paper)

    def new_state(self) -> ActQKVState:
        return ActQKVState()

    # ------------------------------------------------------------------------------ bookkeeping

    def observe(
        self, state: ActQKVState, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float
    ) -> None:
        """Fold the call's queries into the running statistics and the local attention received."""
        st = state.layer(layer)
        q, N = query.shape[2], key.shape[2]
        stored = 0 if st.mass is None else st.mass.shape[-1]
        if stored != N - q:
            raise FlowsieveError(
                f"actqkv: layer {layer} has seen {stored} entries but the cache holds {N - q} before this "
                f"call; the select site needs one sequence from its first token on"
            )
        qc = grouped_queries(query, key.shape[1])  # (q, D)
        # Chan et al.'s parallel update of mean and squared deviations
        n_b, mean_b = q, qc.mean(0)
        m2_b = ((qc - mean_b) ** 2).sum(0)
        if st.mean is None or st.m2 is None:
            st.count, st.mean, st.m2 = n_b, mean_b, m2_b
        else:
            n = st.count + n_b
            delta = mean_b - st.mean
            st.mean = st.mean + delta * n_b / n
            st.m2 = st.m2 + m2_b + delta**2 * st.count * n_b / n
            st.count = n
        mass = local_attention(query, key, scaling, self.repr_window)
        if st.mass is not None:
            mass[:, :stored] += st.mass
        st.mass = mass

    # -------------------------------------------------------------------------------- selection

    def block_keys(self, key: torch.Tensor, mass: torch.Tensor, start: int, n_blocks: int) -> torch.Tensor:
        """(n_blocks, Hk * d): per block from ``start``, the mean of its ``repr_topk`` keys with the most
        local attention, per KV head."""
        _, Hk, _, d = key.shape
        bs = self.block_size
        end = start + n_blocks * bs
        m = mass[:, start:end].reshape(Hk, n_blocks, bs)
        top = m.topk(self.repr_topk, dim=-1).indices  # (Hk, nb, r)
        k = key[0, :, start:end].float().reshape(Hk, n_blocks, bs, d)
        chosen = k.gather(2, top[..., None].expand(Hk, n_blocks, self.repr_topk, d))
        return chosen.mean(2).permute(1, 0, 2).reshape(n_blocks, Hk * d)

    def probe(self, state: ActQKVState, layer: int, query: torch.Tensor, n_kv: int) -> torch.Tensor:
        """(Hk * d,) activation-weighted probe query of the call."""
        st = state.layer(layer)
        assert st.mean is not None and st.m2 is not None
        qc = grouped_queries(query, n_kv)
        w = activation_weights(qc, st.mean, st.m2 / max(1, st.count))
        return w @ qc

    def select(
        self,
        state: ActQKVState,
        layers: tuple[int, ...],
        rank: int,
        query: torch.Tensor,
        key: torch.Tensor,
        budget: int,
    ) -> torch.Tensor:
        N, q, Hk = key.shape[2], query.shape[2], key.shape[1]
        dev = key.device
        if budget >= N:
            return torch.arange(N, device=dev)
        n_init, n_local = self.split(budget)
        bs = self.block_size
        n_blocks = max(0, (N - max(n_local, q) - n_init) // bs)
        local_from = n_init + n_blocks * bs
        if n_blocks == 0:
            return torch.arange(N, device=dev)
        avg = max(0, budget - n_init - (N - local_from)) // bs  # blocks per layer the budget affords
        if rank == 0:
            state.total = state.remaining = avg * len(layers)
        layer = layers[rank]
        st = state.layer(layer)
        assert st.mass is not None
        scores = torch.nn.functional.cosine_similarity(
            self.block_keys(key, st.mass, n_init, n_blocks), self.probe(state, layer, query, Hk)[None], dim=-1
        )
        st.entropy.append(normalized_entropy(scores))
        expected = [_mean(state.layer(m).entropy) for m in layers[rank:]]
        lo = min(n_blocks, math.floor(self.min_share * avg))
        hi = min(n_blocks, math.ceil(self.max_share * avg))
        k = hand_out(state.remaining, expected, lo, hi)
        state.remaining -= k
        state.blocks[layer] = k
        picked = scores.topk(k).indices if k > 0 else torch.empty(0, dtype=torch.long, device=dev)
        starts = n_init + picked * bs
        slots = (starts[:, None] + torch.arange(bs, device=dev)[None]).reshape(-1)
        return span_index(n_init, slots, local_from, N)

    def summary(self, state: ActQKVState) -> dict[str, Any]:
        return {"blocks_per_layer": dict(sorted(state.blocks.items())), "block_budget": state.total}


def _mean(xs: deque[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def local_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int) -> torch.Tensor:
    """Attention each key receives from the call's queries, each query's softmax restricted to its
    last ``window`` keys (itself included), summed over queries and over each KV head's query heads.

    Args:
        query: (1, H, q, d), the queries of tokens N - q .. N - 1; key: (1, Hk, N, d).

    Returns:
        (Hk, N) float32. Computed in query chunks: memory O(H x chunk x (window + chunk)).
    """
    _, H, q, d = query.shape
    Hk, N = key.shape[1], key.shape[2]
    g = H // Hk
    out = torch.zeros(Hk, N, dtype=torch.float32, device=key.device)
    chunk = 128
    for a in range(0, q, chunk):
        b = min(q, a + chunk)
        p0, p1 = N - q + a, N - q + b
        lo = max(0, p0 - window + 1)
        qs = query[0, :, a:b].float().reshape(Hk, g * (b - a), d)
        s = (qs @ key[0, :, lo:p1].float().transpose(-1, -2)).view(Hk, g, b - a, p1 - lo) * scaling
        pos_q = torch.arange(p0, p1, device=key.device)[:, None]
        pos_k = torch.arange(lo, p1, device=key.device)[None, :]
        band = (pos_k <= pos_q) & (pos_k > pos_q - window)
        s.masked_fill_(~band, float("-inf"))
        out[:, lo:p1] += torch.softmax(s, -1).sum((1, 2))
    return out
