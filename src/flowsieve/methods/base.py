"""The narrow base every KV method implements, and small shared tensor helpers.

Shapes: B batch, H query heads, Hk KV heads, g = H / Hk, T prompt tokens, w observation window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.observe import LayerObs, ObserveSpec
from flowsieve.registry import Registry


@dataclass
class ScoreContext:
    """What a scorer knows about the prompt besides the observations.

    Attributes:
        n_tokens: T, tokens in the cache when scoring.
        window: absolute positions of the observation queries (the question span in query-aware
            mode, the last ``w`` tokens of the context otherwise); they are the last
            ``len(window)`` slots of the cache.
        n_heads / n_kv_heads: H and Hk.
        layer: index of the layer being scored; n_layers: how many there are.
        seed: for methods that draw random numbers.
        candidates: bool (T,) or (1, Hk|1, T) over cache slots: the entries that compete for the
            budget (not protected); None = every entry. Methods that normalise over "the tokens
            that may be pruned" (FlowCut) normalise over these.
    """

    n_tokens: int
    window: tuple[int, ...]
    n_heads: int
    n_kv_heads: int
    layer: int
    n_layers: int
    seed: int = 0
    candidates: torch.Tensor | None = None

    def shared_candidates(self) -> torch.Tensor | None:
        """The candidates as one (T,) mask for scores shared by all heads (an entry competes when
        it competes for any KV head), or None."""
        c = self.candidates
        if c is None:
            return None
        return c.reshape(-1, c.shape[-1]).any(0) if c.dim() > 1 else c


@dataclass
class KVScorer:
    """Scores KV-cache entries; higher = keep. Subclasses are dataclasses registered in METHODS.

    Class attributes:
        name: registry name. paper: citation shown by ``flowsieve ls``.
        sites: the sites the method supports.
        needs: which observations it uses (fields of :class:`ObserveSpec`: "rows", "received",
            "norms", "transitions", "surprisal").
        unit_reduce: how a sentence's entry scores make its rank under ``units="sentence"``:
            ``"max"`` (its best entry) or ``"mean"`` (e.g. a sentence's mean surprisal).
        chunkable: False when the method cannot score a chunked prefill chunk by chunk.
        replays: whether the observations come from passes that replay the context after the
            prefill (KVzip) instead of the prefill itself; :meth:`replay_spec` says what they record.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    sites: ClassVar[tuple[str, ...]] = ("prefill",)
    needs: ClassVar[tuple[str, ...]] = ()
    # scored from extra passes that replay the context after a request to repeat it (KVzip), not
    # from the prefill itself; see :func:`flowsieve.sites.prefill.replay_observe`
    replays: ClassVar[bool] = False
    # how ``units="sentence"`` ranks a sentence from its entries' scores: "max" or "mean"
    unit_reduce: ClassVar[str] = "max"
    # whether the method can score each chunk of a chunked prefill on its own
    chunkable: ClassVar[bool] = True
    # whether scores accumulate over time and travel with the entries (H2O): :meth:`carry` runs at
    # every compression, even one that keeps everything, and :meth:`decode_step` at every decode step
    carries: ClassVar[bool] = False

    def spec(self, window: tuple[int, ...]) -> ObserveSpec:
        """The observation this scorer needs during prefill."""
        return ObserveSpec(
            rows=window if "rows" in self.needs else (),
            received="received" in self.needs,
            norms="norms" in self.needs,
            transitions="transitions" in self.needs,
            surprisal="surprisal" in self.needs,
        )

    def replay_spec(self) -> ObserveSpec:
        """What the replay passes record (methods with ``replays = True`` only)."""
        raise NotImplementedError

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        """Scores for one layer: (B, Hk, T) per KV head, or (B, T) shared by all heads."""
        raise NotImplementedError

    def accumulate(self, scores: list[torch.Tensor]) -> list[torch.Tensor]:
        """Cross-layer step over the scores of the compressed layers, in layer order (identity
        unless a method says otherwise)."""
        return scores

    def recycle(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        keep: torch.Tensor,
        protect: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Post-selection hook: one layer's stored (keys, values) (B, Hk, T, d) with what the method
        folds into the kept entries, or None (the default: dropped entries are simply evicted).
        ``scores`` are the layer's accumulated scores, ``keep`` what ``select_topk`` chose and
        ``protect`` the layer's protect mask."""
        return None

    def carry(self, layer: Any, scores: torch.Tensor) -> torch.Tensor:
        """Prefill-site hook of methods with ``carries``: ``scores`` are one layer's new scores
        (B, Hk|1, T) over its stored entries; returns the scores to select with (e.g. plus what the
        entries already carry from earlier chunks) after storing them with the entries in
        ``layer.extras`` (a :class:`~flowsieve.kvcache.SieveLayer`). Identity by default."""
        return scores

    def decode_step(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> None:
        """Decode-site hook of methods with ``carries``, run after every decode step on every
        compressed layer, whether or not the step evicts (e.g. H2O adds the step's attention)."""

    def decode_spec(self) -> ObserveSpec:
        """What the decode site observes at every step (the step's own attention row by default)."""
        return ObserveSpec(current=True, slots=True)

    def decode_score(self, obs: LayerObs, layer: Any, ctx: ScoreContext) -> torch.Tensor:
        """Scores of the entries stored in ``layer`` (a SieveLayer) after a decode step: (B, S) or
        (B, Hk, S). Methods that support the ``decode`` site implement it."""
        raise NotImplementedError

    def budgets(self, k: int, n_protected: int, n_tokens: int, layers: list[int]) -> dict[int, int]:
        """Entries to keep per compressed layer; the same ``k`` everywhere unless a method schedules
        layers differently (pyramids). Each must lie in [n_protected, n_tokens]."""
        return dict.fromkeys(layers, k)


METHODS: Registry[type[KVScorer]] = Registry("method")


def window_rows(obs: LayerObs, window: tuple[int, ...], T: int) -> torch.Tensor:
    """Attention rows of the window queries, (B, H, w, T)."""
    missing = [p for p in window if p not in obs.rows]
    if missing:
        raise RuntimeError(f"observation rows missing for positions {missing[:5]}")
    return torch.stack([obs.rows[p][..., :T] for p in window], dim=2)


def unit_pool(scores: torch.Tensor, units: torch.Tensor, reduce: str = "max") -> torch.Tensor:
    """Rank whole units (sentences) by their best entry (``reduce="max"``) or the mean of their
    finite entries (``"mean"``): every entry of a unit that ranks higher comes first; inside a unit,
    entries keep their own order.

    Args:
        scores: (1, T) or (1, Hk|1, T) entry scores (higher = keep; -inf allowed).
        units: (1, Hk|1, T) long, the unit of every entry (same slots as ``scores``).

    Returns:
        (1, Hk', T) float scores whose top-k is: the units in order of their maximum, whole, then
        the best entries of the next unit. Unit rank r maps to ``-r + 0.5 * t`` with t in [0, 1) the
        entry's own score scaled within the row, so ranks never mix.
    """
    s = scores.float()
    if s.dim() == 2:
        s = s[:, None]
    shape = torch.broadcast_shapes(s.shape, units.shape)
    s = s.expand(shape).reshape(-1, shape[-1])
    u = units.expand(shape).reshape(-1, shape[-1])
    out = torch.empty_like(s)
    for r in range(s.shape[0]):
        row, ur = s[r], u[r]
        ids, inv = torch.unique(ur, return_inverse=True)
        finite = torch.isfinite(row)
        clean = torch.where(finite, row, torch.full_like(row, float("-inf")))
        if reduce == "mean":
            zero = torch.where(finite, row, torch.zeros_like(row))
            tot = torch.zeros(len(ids)).scatter_add(0, inv, zero)
            cnt = torch.zeros(len(ids)).scatter_add(0, inv, finite.float())
            best = torch.where(cnt > 0, tot / cnt.clamp(min=1), torch.full_like(tot, float("-inf")))
        elif reduce == "max":
            best = torch.full((len(ids),), float("-inf")).scatter_reduce(
                0, inv, clean, "amax", include_self=True
            )
        else:
            raise FlowsieveError(f"unit reduce must be 'max' or 'mean', got '{reduce}'")
        rank = torch.empty(len(ids), dtype=torch.float32)
        rank[torch.argsort(best, descending=True, stable=True)] = torch.arange(len(ids), dtype=torch.float32)
        lo = row[finite].min() if finite.any() else torch.tensor(0.0)
        hi = row[finite].max() if finite.any() else torch.tensor(0.0)
        t = torch.where(finite, (row - lo) / (hi - lo).clamp(min=1e-12), torch.zeros_like(row)).clamp(
            0, 0.999
        )
        out[r] = -rank[inv] + 0.5 * t
    return out.reshape(shape)


def pool1d(x: torch.Tensor, kernel: int, kind: str = "avg", zero_pad: bool = False) -> torch.Tensor:
    """Same-length 1-D pooling along the last dim (SnapKV's clustering of neighbouring tokens).

    ``kernel // 2`` padding on each side; an average near the ends divides by the entries inside
    the row, or by ``kernel`` with ``zero_pad`` (torch's default, which SnapKV's code uses)."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    pad = kernel // 2
    if kind == "max":
        out = torch.nn.functional.max_pool1d(flat, kernel, stride=1, padding=pad)
    else:
        out = torch.nn.functional.avg_pool1d(flat, kernel, stride=1, padding=pad, count_include_pad=zero_pad)
    return out[..., : shape[-1]].reshape(shape)


class KeySelectMethod(KVScorer):
    """A method of the ``select`` site: the cache keeps every entry, and each attention call of a
    full-attention layer attends only to the entries :meth:`select` picks (the runtime is
    :mod:`flowsieve.sites.select`).

    Shapes: query (1, H, q, d) are the call's q queries; key (1, Hk, N, d) are all N cached keys
    after the cache update (the q new ones last, slot = token index). Batch size 1.
    """

    sites: ClassVar[tuple[str, ...]] = ("select",)

    def new_state(self) -> Any:
        """Per-sequence state (reset when a new sequence is prefilled)."""
        return None

    def observe(self, state: Any, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """See every call of a full-attention layer (also those that attend to all keys)."""

    def select(
        self,
        state: Any,
        layers: tuple[int, ...],
        rank: int,
        query: torch.Tensor,
        key: torch.Tensor,
        budget: int,
    ) -> torch.Tensor:
        """Key slots the call attends to, sorted int64 (n,), shared by all heads.

        Args:
            layers: the full-attention layers, in the order they run; ``layers[rank]`` is this one.
            budget: entries to attend to at this call (< N; the runtime attends to all otherwise).
        """
        raise NotImplementedError

    def summary(self, state: Any) -> dict[str, Any]:
        """Method-specific counters for the generation result."""
        return {}


def split_budget(
    name: str, budget: int, n_init: int | None, n_local: int | None, paper: tuple[int, int, int]
) -> tuple[int, int]:
    """(n_init, n_local) for a budget of ``budget`` attended entries: the given counts, or the paper's
    shares ``paper = (init, local, total)`` of the budget (at least one recent entry, and the sinks
    capped so that they fit next to it). Raises when the two do not fit in the budget."""
    init_p, local_p, total = paper
    local = n_local if n_local is not None else max(1, round(budget * local_p / total))
    init = (
        n_init if n_init is not None else max(0, min(max(1, round(budget * init_p / total)), budget - local))
    )
    if init + local > budget:
        raise FlowsieveError(
            f"{name}: n_init + n_local = {init + local} entries exceed the budget of {budget}"
        )
    return init, local


def span_index(n_init: int, picked: torch.Tensor, local_from: int, n: int) -> torch.Tensor:
    """Sorted slots ``[0, n_init) + picked + [local_from, n)``; ``picked`` lies in [n_init, local_from)."""
    dev = picked.device
    return torch.cat(
        [
            torch.arange(n_init, device=dev),
            picked.to(torch.long).sort().values,
            torch.arange(local_from, n, device=dev),
        ]
    )
