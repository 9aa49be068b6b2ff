"""VFlowOpt (Yang, Xu, Cui, Wang, Lin, Pang, "VFlowOpt: A Token Pruning Framework for LMMs with Visual
Information Flow-Guided Optimization", ICCV 2025, arXiv 2508.05211), applied to the KV cache of a
context.

VFlowOpt computes an importance map at one ViT layer: the tokens that receive the most attention
(``received_j > t * mean(received)``) are "global" hub tokens, and a token's importance is how much
the hubs attend to it, ``imp = A[hubs, :].mean(0)`` (an entropy term is switched off in the released
configs). Low-importance tokens are pruned, and instead of being thrown away they are *recycled*:
the dropped tokens of each local cell are merged, weighted by importance, into one token. The
pruning ratios come from a Bayesian optimisation (offline).

What changed for a text context (candidates = the context tokens):

- **importance map.** Under a causal mask a hub can only read the tokens before it, and the
  observation seam records full attention rows only at positions fixed before the forward (hubs
  are found during it), so ``A[hubs, :]`` is not available. The map here is VFlowOpt's map with
  ``t = 0`` (every token is a hub reader: the column mean of the attention), taken as a mean over
  the queries that can see each key (``received / visible``; the plain column mean of a causal
  matrix favours early tokens), mixed with the map read by the observation window (the queries
  that read the whole context; the question in query-aware mode):
  ``imp = (1 - window_weight) * hub + window_weight * win``, each term head-averaged and normalised
  over the candidates. ``t > 0`` needs the hub rows from the seam (proposed change to
  :mod:`flowsieve.observe`: after a layer's scan, recompute the rows of the hub queries and record
  their per-key sum and count);
- **recycling** works on the KV cache instead of hidden states: after the selection, the dropped
  context entries of each 1-D window of ``merge_window`` consecutive tokens (VFlowOpt's a x a cells)
  are merged into the window's most important *kept* context entry, replacing its key and value
  by the importance-weighted mean of itself and them (:func:`merge_dropped`). VFlowOpt merges them
  into the most important dropped token and keeps that one in addition; merging into a kept entry
  keeps the budget exact. A window with no kept context entry loses its dropped entries. Keys are
  post-RoPE, so merged keys average rotations of nearby positions; the merged entry keeps the
  receiver's position. Protected entries are never merged into;
- :meth:`flowsieve.sieve.Sieve.compress` calls :meth:`VFlowOptScorer.recycle` after each layer's
  selection (``recycle_dropped=False`` turns it off: plain pruning);
- no progressive LLM-stage schedule and no Bayesian optimisation: the sieve's budget is used in
  every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext, window_rows
from flowsieve.observe import LayerObs
from flowsieve.tensors import normalise


def merge_dropped(
    keys: torch.Tensor,
    values: torch.Tensor,
    importance: torch.Tensor,
    keep: torch.Tensor,
    protect: torch.Tensor,
    window: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge dropped entries into kept ones, weighted by importance, within 1-D windows.

    Stored entries ``[w * window, (w + 1) * window)`` form window ``w``. In each window (and for each batch
    row and KV head) the kept, unprotected entry of largest importance receives every dropped,
    unprotected entry of the window: its key and value become
    ``(imp_r x_r + sum_i imp_i x_i) / (imp_r + sum_i imp_i)``.

    Args:
        keys / values: (B, Hk, T, d) of one layer, before the selection is applied.
        importance: (B, T) or (B, Hk, T), >= 0 (negative values count as 0).
        keep: kept indices from :func:`flowsieve.methods.selection.select_topk`: (k,) or (B|1, Hk|1, k).
        protect: bool (T,) or (B|1, Hk|1, T) (what ``Sieve.compress`` passes per layer): entries
            that are never merged (neither given nor received).
        window: stored entries per window (>= 1); before any eviction, entry = token.

    Returns:
        (keys, values, mass): full-length tensors (B, Hk, T, d) where only receiving entries
        changed, and (B, Hk, T) the importance each entry carries afterwards (a receiver: its own plus
        what it received; a merged-away entry: 0; any other: its own), so that
        ``sum_j mass_j x'_j == sum_j imp_j x_j`` for keys and values alike.
    """
    if window < 1:
        raise FlowsieveError(f"merge window must be >= 1, got {window}")
    B, Hk, T, d = keys.shape
    dev = keys.device
    imp = importance.to(dev, torch.float32).clamp(min=0)
    imp = (imp[:, None] if imp.dim() == 2 else imp).expand(B, Hk, T)
    kept = torch.zeros(B, Hk, T, dtype=torch.bool, device=dev)
    idx = keep.to(dev, torch.long)
    idx = idx.view(1, 1, -1) if idx.dim() == 1 else idx
    kept.scatter_(-1, idx.expand(B, Hk, idx.shape[-1]), True)
    prot = protect.to(dev, torch.bool)
    cand = ~(prot.view(1, 1, T) if prot.dim() == 1 else prot)  # (1|B, 1|Hk, T)
    recv = kept & cand
    drop = ~kept & cand

    n_win = -(-T // window)
    pad = n_win * window - T
    r_score = torch.where(recv, imp, torch.tensor(-1.0, device=dev))  # -1: not a receiver
    r_score = torch.nn.functional.pad(r_score, (0, pad), value=-1.0).view(B, Hk, n_win, window)
    best, local = r_score.max(-1)  # (B, Hk, n_win)
    receiver = torch.arange(n_win, device=dev) * window + local  # token index of each window's receiver
    has = best >= 0
    tok = torch.arange(T, device=dev)
    wid = tok // window
    target = receiver[..., wid]  # (B, Hk, T): the receiver of each token's window
    moves = drop & has[..., wid]
    is_recv = recv & has[..., wid] & (target == tok)  # the chosen receivers
    gets = torch.zeros(B, Hk, T + 1, device=dev).scatter_add_(
        -1, torch.where(moves, target, T), moves.float()
    )[..., :T]
    changed = is_recv & (gets > 0)

    # every mover and every changed receiver sends imp * x to its receiver; the rest go to slot T
    send = moves | changed
    dest = torch.where(send, torch.where(moves, target, tok), T)
    w = torch.where(send, imp, 0.0)
    den = torch.zeros(B, Hk, T + 1, device=dev).scatter_add_(-1, dest, w)[..., :T]

    def merged(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        num = torch.zeros(B, Hk, T + 1, d, device=dev).scatter_add_(
            2, dest[..., None].expand(B, Hk, T, d), w[..., None] * xf
        )[:, :, :T]
        ok = changed & (den > 0)
        new = torch.where(ok[..., None], num / den.clamp(min=1e-30)[..., None], xf)
        return new.to(x.dtype)

    mass = torch.where(moves, torch.zeros_like(imp), torch.where(changed & (den > 0), den, imp))
    return merged(keys), merged(values), mass


@METHODS.register("vflowopt")
@dataclass
class VFlowOptScorer(KVScorer):
    """Hub (mean received attention) + window importance; optional importance-weighted recycling.

    Attributes:
        window_weight: share of the window-read map in the importance (0 = hub map only).
        merge_window: tokens per 1-D recycling window.
        recycle_dropped: merge dropped entries into kept ones when the sieve calls :meth:`recycle`.
    """

    name = "vflowopt"
    paper = "Yang et al. 2025, VFlowOpt: Visual Information Flow-Guided Optimization, arXiv 2508.05211"
    needs = ("received", "rows")
    window_weight: float = 0.5
    merge_window: int = 16
    recycle_dropped: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.window_weight <= 1:
            raise FlowsieveError(f"vflowopt: window_weight must be in [0, 1], got {self.window_weight}")
        if self.merge_window < 1:
            raise FlowsieveError(f"vflowopt: merge_window must be >= 1, got {self.merge_window}")
        if not isinstance(self.recycle_dropped, bool):
            raise FlowsieveError("vflowopt: recycle_dropped must be true or false")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        assert obs.received is not None and obs.visible is not None
        T = ctx.n_tokens
        cand = torch.ones(T)
        cand[max(T - len(ctx.window), 0) :] = 0  # the window (the last slots) is kept: not a candidate
        hub = obs.received[..., :T].mean(1) / obs.visible[..., :T].clamp(min=1)  # (B, T)
        win = window_rows(obs, ctx.window, T).mean(1).mean(1)  # (B, T)
        hub, win = hub * cand, win * cand
        hub = normalise(hub)
        win = normalise(win)
        return (1 - self.window_weight) * hub + self.window_weight * win

    def recycle(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        scores: torch.Tensor,
        keep: torch.Tensor,
        protect: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Post-selection hook: full-length (keys, values) with dropped entries merged, or None.

        Args: one layer's cached keys/values (B, Hk, T, d) before the selection, that layer's scores
        after :meth:`accumulate`, the indices ``select_topk`` returned, and the protect mask (T,).
        """
        if not self.recycle_dropped:
            return None
        k, v, _ = merge_dropped(keys, values, scores, keep, protect, self.merge_window)
        return k, v
