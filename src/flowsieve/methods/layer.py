"""What a method implements to prune tokens from the residual stream: the ``layer`` site.

The layer site (:mod:`flowsieve.sites.layer`) runs the prefill forward pass and, right before chosen
decoder layers (the *prune layers* ``K_1 < K_2 < ...``), drops context tokens from the hidden
states: layers from ``K_s`` on compute on, and cache, only the tokens still present. A method says

- where and how much (:meth:`LayerPruner.layer_plan`): stages ``[(K_s, share_s)]``; before layer
  ``K_s`` the stream keeps ``round(n * share_s)`` of the ``n`` context tokens of the prompt (shares
  non-increasing, the last one is the sieve's ``keep``). Tokens outside the context (chat template,
  question) and the relay tokens are never dropped;
- what to observe (:meth:`LayerPruner.layer_observe`): an :class:`~flowsieve.observe.ObserveSpec`
  restricted to the layers it reads; the runtime fills in ``rows`` with the current stream indices
  of the *relay* tokens (the question and what follows it in query-aware mode, the last ``window``
  tokens otherwise; the last relay token is the prompt's last token);
- how to score (:meth:`LayerPruner.layer_score`): one score per token of the current stream
  (higher = keep), from the observations of the layers that ran on the current stream, i.e. since
  the previous prune layer. A per-token ``carry`` (e.g. TransPrune's accumulated transition
  variation) is handed back at the next stage, re-gathered to the tokens that stayed.

Layers are 0-indexed; "prune layer K" means the tokens leave the input of layer K, i.e. after layer
K-1 finished (FastV's K). Shapes: B batch (1), H query heads, Hk KV heads, n tokens in the stream.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import KVScorer
from flowsieve.observe import LayerObs, ObserveSpec

Stage = tuple[int, float]  # (prune layer K, share of the context tokens kept from layer K on)


@dataclass
class LayerContext:
    """What a layer-site scorer knows at a prune layer besides the observations.

    Attributes:
        layer: the prune layer K (its input loses tokens).
        stage: index of this prune layer in the plan (0 = first).
        prev_layer: the previous prune layer (0 for the first stage): the layers
            ``prev_layer .. layer-1`` ran on the current stream.
        n_layers: decoder layers of the model.
        layer_types: per layer ``"full_attention"`` or ``"sliding_attention"``.
        relay: stream indices of the relay tokens, ascending; ``relay[-1]`` is the last token.
        candidates: bool (n,), stream tokens that may be dropped (context tokens outside the relay).
        n_heads / n_kv_heads: H and Hk.
        plan: all stages of this run, ``((K_1, share_1), ...)``.
    """

    layer: int
    stage: int
    prev_layer: int
    n_layers: int
    layer_types: tuple[str, ...]
    relay: tuple[int, ...]
    candidates: torch.Tensor
    n_heads: int
    n_kv_heads: int
    plan: tuple[Stage, ...] = ()


def score_layer(K: int, layer_types: Sequence[str]) -> int:
    """The layer whose attention ranks the tokens before prune layer ``K``.

    ``K - 1`` when it is a full-attention layer. A sliding-window layer's rows see only the last
    ``window`` tokens (everything older would score 0), so on models that mix them (Gemma-3) it is
    the last full-attention layer below ``K``; none -> FlowsieveError.
    """
    for j in range(K - 1, -1, -1):
        if layer_types[j] == "full_attention":
            return j
    full = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    raise FlowsieveError(
        f"no full-attention layer below prune layer {K} to score tokens with (a sliding-window layer "
        f"only sees its window); full-attention layers: {full}; prune after one of them"
    )


def check_plan(plan: Sequence[Stage], n_layers: int) -> list[Stage]:
    """Validate a plan: prune layers strictly increasing in [1, n_layers), shares in (0, 1], non-increasing."""
    if not plan:
        raise FlowsieveError("the layer site needs at least one prune layer")
    out: list[Stage] = []
    for K, share in plan:
        if not isinstance(K, int) or isinstance(K, bool):
            raise FlowsieveError(f"prune layers must be integers, got {K!r}")
        if not 1 <= K < n_layers:
            raise FlowsieveError(
                f"prune layer {K} outside [1, {n_layers - 1}]: the model has {n_layers} layers and a "
                f"prune layer needs at least one layer before it (to score) and is itself run on fewer tokens"
            )
        if not 0 < share <= 1:
            raise FlowsieveError(f"prune layer {K}: share {share} outside (0, 1]")
        if out and (K <= out[-1][0] or share > out[-1][1] + 1e-12):
            raise FlowsieveError(
                f"prune layers must increase and their shares must not ({out[-1]} then {(K, share)})"
            )
        out.append((K, float(share)))
    return out


def check_prune_layers(method: str, layers: Sequence[int]) -> tuple[int, ...]:
    """A method's ``prune_layers`` option: integers >= 1, strictly increasing."""
    ks = tuple(layers)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise FlowsieveError(f"{method}: prune_layers must be integers >= 1, got {layers}")
    if any(b <= a for a, b in itertools.pairwise(ks)):
        raise FlowsieveError(f"{method}: prune_layers must increase, got {ks}")
    return ks


def depth_scaled(layers: Sequence[int], of: int, n_layers: int) -> list[int]:
    """Prune layers given for an ``of``-layer model, moved to the same relative depth of ``n_layers``
    (at least 1, at most ``n_layers - 1``; duplicates kept, the caller merges them)."""
    return [min(max(round(k * n_layers / of), 1), n_layers - 1) for k in layers]


def merge_stages(plan: Sequence[Stage]) -> list[Stage]:
    """Stages that fell on the same layer become one, with the smallest share (the later stage)."""
    out: dict[int, float] = {}
    for K, share in plan:
        out[K] = min(share, out.get(K, 1.0))
    return sorted(out.items())


def relay_rows(obs: LayerObs, relay: Sequence[int]) -> torch.Tensor:
    """Attention rows of the relay tokens, (B, H, r, n)."""
    missing = [p for p in relay if p not in obs.rows]
    if missing:
        raise FlowsieveError(f"layer site: attention rows of stream tokens {missing[:5]} were not recorded")
    return torch.stack([obs.rows[p].float() for p in relay], dim=2)


class LayerPruner(KVScorer):
    """Base of the methods that support the ``layer`` site (see the module docstring).

    Class attributes:
        relay_all: record the attention rows of every relay token (else only the last token's).
    """

    relay_all: ClassVar[bool] = False

    def layer_plan(self, n_layers: int, keep: float) -> list[Stage]:
        """The stages ``[(K_s, share_s)]`` for a model of ``n_layers`` layers and a final share ``keep``."""
        raise NotImplementedError

    def score_layers(self, plan: Sequence[Stage], layer_types: Sequence[str]) -> list[int]:
        """The layer whose attention rows rank the tokens at each stage (default: :func:`score_layer`)."""
        return [score_layer(K, layer_types) for K, _ in plan]

    def layer_observe(self, plan: Sequence[Stage], layer_types: Sequence[str]) -> ObserveSpec:
        """What the pruned prefill records: the relay rows at the scoring layers (the runtime fills
        in ``rows``)."""
        return ObserveSpec(layers=tuple(sorted(set(self.score_layers(plan, layer_types)))), slots=True)

    def layer_score(
        self, seen: Mapping[int, LayerObs], ctx: LayerContext, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores (B, n) of the stream tokens at prune layer ``ctx.layer`` and the carry for the next
        stage ((B, n) or None). ``seen`` maps each observed layer in ``[ctx.prev_layer, ctx.layer)``
        to its observations (per-token values in stream order)."""
        raise NotImplementedError

    def check_layer_options(self) -> None:
        """Raise FlowsieveError for options that have no meaning at the layer site."""


def last_row_score(seen: Mapping[int, LayerObs], ctx: LayerContext) -> torch.Tensor:
    """FastV's rank: the last token's attention row at the scoring layer, mean over heads, (B, n)."""
    sl = score_layer(ctx.layer, ctx.layer_types)
    if sl not in seen:
        raise FlowsieveError(f"layer site: layer {sl} was not observed before prune layer {ctx.layer}")
    return relay_rows(seen[sl], ctx.relay[-1:])[:, :, 0].mean(1)
