"""What to record and what was recorded.

:class:`ObserveSpec` says which signals a scorer needs; :class:`LayerObs` holds what one layer
recorded; :class:`Observer` holds every layer's records while :func:`~flowsieve.observe.observe`
is active. The ``_*_growing`` helpers accumulate per-key values along a sequence that grows from
one forward pass to the next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.observe.adapter import attention_modules


@dataclass
class ObserveSpec:
    """What to record. Everything is off by default; a scorer turns on what it needs.

    Attributes:
        rows: absolute query positions whose attention rows (and value-value rows) are recorded.
            Negative numbers count from the end of the *first* forward pass (``-1`` = its last token).
        received: sum of attention received per key over all queries (chunked).
        received_max: highest attention any query of the pass gave each key, per head (chunked;
            KVzip's reconstruction score).
        head_stats: per-head first-token mass and output norm (all rows) and normalised row
            entropy (every ``entropy_stride``-th row of each chunk).
        norms: L2 norms of keys and values per KV head.
        transitions: TTV inputs (norm ratio and cosine distance of attention/MLP blocks).
        surprisal: -log p(token | prefix) of every token, by absolute position (the first token of
            the first pass gets 0: nothing predicts it). Costs one output-head product per token.
        layers: restrict to these layer indices (None = all).
        row_stride: 1 scans every query row (exact). k > 1 scans every k-th chunk of query rows (and
            the last chunk) for
            ``received`` and the per-row head statistics (an estimate; the output then comes from
            stock SDPA and costs little more than a plain pass); visibility is still counted exactly.
        current: record the attention row of the last query of every call under key ``-1`` of
            ``rows`` (decode-time methods score with the step's own query).
        slots: index per-key values by the key's slot in the cache (what an evicting cache needs)
            instead of by absolute token index (what a trace shows).
        workers: threads that scan query chunks in parallel when every row is scanned, each with
            one torch thread (bounded by ``torch.get_num_threads()``); None = one per torch thread.
            On 2 cores two workers make a 4k-token observed forward ~15% faster end to end than one
            scan with two intra-op threads; each worker holds its own scratch buffer (~6 MiB).
        chunk: query rows per chunk when every row is needed; None sizes chunks so that the scores
            of one KV-head group (g x chunk x L floats) stay near 6 MiB, in cache (exact scan), or
            all heads' scores (H x chunk x L) near 8 MiB (sampled scan).
    """

    rows: Sequence[int] = ()
    received: bool = False
    received_max: bool = False
    head_stats: bool = False
    norms: bool = False
    transitions: bool = False
    surprisal: bool = False
    layers: Sequence[int] | None = None
    chunk: int | None = None
    entropy_stride: int = 8
    row_stride: int = 1
    workers: int | None = None
    slots: bool = False
    current: bool = False

    def __post_init__(self) -> None:
        bad_workers = self.workers is not None and self.workers < 1
        if (
            (self.chunk is not None and self.chunk < 1)
            or self.entropy_stride < 1
            or self.row_stride < 1
            or bad_workers
        ):
            raise FlowsieveError(
                f"chunk, entropy_stride, row_stride and workers must be >= 1, got {self.chunk}, "
                f"{self.entropy_stride}, {self.row_stride}, {self.workers}"
            )

    @property
    def needs_all_rows(self) -> bool:
        return self.received or self.received_max or self.head_stats


@dataclass
class LayerObs:
    """What one layer recorded. Tensors are float32 on CPU.

    Attributes:
        rows: position -> attention probabilities of that query, (B, H, L).
        vv_rows: position -> softmax over keys of (value of that query) . (values), per KV head, (B, Hk, L).
        received: attention received per key, summed over queries, (B, H, L).
        received_max: attention received per key, maximum over queries, (B, H, L).
        visible: number of scanned queries that could see each key, (B, L).
        visible_all: number of all queries that could see each key, (B, L) (= visible when exact).
        first_mass: per-head sum over scanned query rows, (B, H); divide by ``n_prob_rows``.
        out_norm: per-head sum of output norms over all query rows, (B, H); divide by ``n_rows``.
        row_entropy: per-head sum of normalised row entropy over sampled rows; divide by ``n_entropy_rows``.
        key_norm / value_norm: (B, Hk, L) for the keys present at the last call.
        value_l1: L1 norm of the head-mean value vector per key, (B, L) (FlowCut's weighting).
        ttv: per-block (``"attn"``, ``"mlp"``) lists of (norm ratio, cosine distance), each (B, T).
        token_nll: surprisal of every token so far, (B, T) by absolute position (shared by all layers).
    """

    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    vv_rows: dict[int, torch.Tensor] = field(default_factory=dict)
    received: torch.Tensor | None = None
    received_max: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    first_mass: torch.Tensor | None = None
    row_entropy: torch.Tensor | None = None
    out_norm: torch.Tensor | None = None
    n_rows: int = 0
    n_prob_rows: int = 0
    n_entropy_rows: int = 0
    visible_all: torch.Tensor | None = None
    key_norm: torch.Tensor | None = None
    value_norm: torch.Tensor | None = None
    value_l1: torch.Tensor | None = None
    ttv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    token_nll: torch.Tensor | None = None


def _add_growing(acc: torch.Tensor | None, new: torch.Tensor, offset: int = 0, size: int = 0) -> torch.Tensor:
    """acc[..., offset:offset+n] += new, growing ``acc`` along the last dim as the sequence grows.

    ``size`` pre-sizes a new accumulator (the sequence length known so far) so that chunk after chunk
    adds in place instead of reallocating.
    """
    end = offset + new.shape[-1]
    if acc is None:
        acc = new.new_zeros((*new.shape[:-1], max(end, size)))
    elif acc.shape[-1] < end:
        pad = new.new_zeros((*acc.shape[:-1], max(end, size) - acc.shape[-1]))
        acc = torch.cat([acc, pad], dim=-1)
    acc[..., offset:end] += new
    return acc


def _max_growing(acc: torch.Tensor | None, new: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """acc[..., offset:offset+n] = max(acc, new), growing ``acc`` (zeros) along the last dim."""
    end = offset + new.shape[-1]
    if acc is None:
        acc = new.new_zeros((*new.shape[:-1], end))
    elif acc.shape[-1] < end:
        acc = torch.cat([acc, new.new_zeros((*acc.shape[:-1], end - acc.shape[-1]))], dim=-1)
    torch.maximum(acc[..., offset:end], new, out=acc[..., offset:end])
    return acc


class Observer:
    """Collects :class:`LayerObs` for one model while active. Use :func:`observe`."""

    def __init__(self, model: nn.Module, spec: ObserveSpec) -> None:
        self.model = model
        self.spec = spec
        self.layers: dict[int, LayerObs] = {}
        self.attn_modules = attention_modules(model)
        self._module_ids = {id(m) for m in self.attn_modules}
        self._first_len: int | None = None  # tokens after the first forward (resolves negative rows)
        self._seen: dict[int, int] = {}  # layer -> tokens already in its cache when the call started
        self.on_layer: Callable[[int], None] | None = None
        self.token_nll: torch.Tensor | None = None  # (B, tokens seen) surprisal, when observed
        self._last_logprobs: torch.Tensor | None = None  # (B, V) of the last position so far

    def layer(self, idx: int) -> LayerObs:
        if idx not in self.layers:
            self.layers[idx] = LayerObs()
        return self.layers[idx]

    def wants(self, idx: int) -> bool:
        return self.spec.layers is None or idx in self.spec.layers

    def pad_rows(self, total: int) -> None:
        """Zero-extend recorded attention rows to ``total`` keys: a row recorded in an earlier
        forward of the same observation (e.g. a context, then its question) saw fewer keys, and
        cannot attend to the later ones."""
        for rec in self.layers.values():
            for rows in (rec.rows, rec.vv_rows):
                for p, r in rows.items():
                    if r.shape[-1] < total:
                        rows[p] = torch.nn.functional.pad(r, (0, total - r.shape[-1]))

    def row_positions(self, total: int) -> list[int]:
        if self._first_len is None:
            self._first_len = total
        return sorted({p if p >= 0 else self._first_len + p for p in self.spec.rows})
