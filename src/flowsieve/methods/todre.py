"""ToDRE (Li, Yang, Zhang, Shao, Lu, "ToDRE: Visual Token Pruning via Diversity and Task Awareness for
Efficient Large Vision-Language Models", 2025, arXiv 2505.18757; v2 retitled "ToDRE: Effective Visual
Token Pruning via Token Diversity and Task Relevance"), applied to the KV cache of a context.

ToDRE keeps a *diverse* subset of the visual tokens with a greedy k-center (farthest-first) pass
after the vision encoder (v2: greedy max-sum diversification), then removes *task-irrelevant*
tokens inside the LLM by the attention of the text tokens. Farthest-first repeatedly adds the
candidate farthest from everything chosen so far (a 2-approximation of the k-center radius), so
its picks form one order and the first ``k`` picks are the greedy result for every ``k``.

Here one greedy pass per layer does both: starting from the candidate most attended by the
question, it repeatedly picks ``argmax_x [ d(x, S) + relevance * rel(x) ]`` where ``d(x, S)`` is the
cosine distance (halved, in [0, 1]) from ``x`` to the nearest picked token and ``rel`` the window's
attention normalised to a maximum of 1: the distance term favours tokens unlike those already
kept, the relevance term tokens the question reads. With ``relevance = 0`` this is plain
farthest-first. (ToDRE applies diversity and relevance as two stages at two places of the model;
here they are fused into one order because each cache layer is selected once.) The score of a
token is its rank in the pick order (earlier = higher), so :func:`flowsieve.methods.selection.select_topk` with
budget ``k`` keeps exactly the first ``k - n_protected`` picks that are not protected anyway,
whatever ``k`` is (the scorer does not know ``k``).

What changed for a text context:

- the candidates are the tokens before the observation window; the question (the observation
  window, always kept) is the text that decides relevance, as ToDRE's instruction tokens do;
- the features are not encoder outputs but the layer's **keys seen through the window's queries**,
  recovered exactly from the recorded attention rows: ``log A[h, p, j] = s q_hp . k_j - c_hp`` for
  window query ``p`` and head ``h``, so after centring over the candidates (which removes each row's
  normaliser ``c_hp``) a token's feature is ``s Q (k_j - mean k)`` stacked over heads and window
  queries (``H * w`` numbers). Distances thus measure how differently the question's queries see two
  keys. (The observation seam records no key vectors or hidden states; probabilities that underflow
  to 0 are clamped at 1e-30.) One order is shared by all KV heads;
- the first centre is the most relevant candidate (ToDRE does not fix one);
- protected tokens outside the window (chat template, question beyond the window) are ordinary
  candidates in the greedy pass, so a pick of one of them does not cost budget;
- cost: the full order is ``O(n^2 (H w))`` per layer for ``n`` candidates (one ``n x n`` distance
  matrix per layer, 9 MB at 1.5k tokens); ``order_share < 1`` runs the greedy loop for that share
  of the candidates only and ranks the rest by the objective at that point (exact while
  ``k - n_protected`` stays below the share).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext, window_rows
from flowsieve.observe import LayerObs


def attention_features(rows: torch.Tensor, n_candidates: int) -> torch.Tensor:
    """Key features of the candidates from window attention rows.

    Args:
        rows: attention probabilities of the window queries, (B, H, w, T).
        n_candidates: the candidates are tokens ``[0, n_candidates)``.

    Returns:
        (B, n, H * w): ``log A`` centred over the candidates, i.e. ``s Q (k_j - mean k)``.
    """
    B, H, w, _ = rows.shape
    logp = torch.log(rows[..., :n_candidates].float().clamp(min=1e-30))
    f = logp.permute(0, 3, 1, 2).reshape(B, n_candidates, H * w)
    return f - f.mean(1, keepdim=True)


def greedy_order(
    features: np.ndarray, relevance: np.ndarray, weight: float, picks: int | None = None
) -> np.ndarray:
    """Farthest-first order with a relevance bonus.

    Args:
        features: (n, D); distances are ``(1 - cos) / 2``.
        relevance: (n,) >= 0; scaled to a maximum of 1. The first pick is its argmax.
        weight: relevance weight (0 = plain farthest-first from the most relevant token).
        picks: run the greedy loop for this many picks (None = all); the rest follow in order of
            the objective at that point.

    Returns:
        (n,) token indices in pick order.
    """
    n = features.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    norm = np.linalg.norm(features, axis=1, keepdims=True)
    unit = (features / np.maximum(norm, 1e-12)).astype(np.float32)
    dist = unit @ unit.T  # all pairwise (1 - cos) / 2 at once: one GEMM, then row look-ups
    dist *= -0.5
    dist += 0.5
    rel = relevance.astype(np.float64)
    rel = rel / rel.max() if rel.max() > 0 else np.zeros_like(rel)
    bonus = (weight * rel).astype(np.float32)
    dmin = np.ones(n, dtype=np.float32)  # distance to the empty set: the maximum
    obj = np.empty(n, dtype=np.float32)
    picks = n if picks is None else max(1, min(picks, n))
    order = np.empty(n, dtype=np.int64)
    c = int(np.argmax(rel))
    for i in range(picks):
        order[i] = c
        bonus[c] = -np.inf
        np.minimum(dmin, dist[c], out=dmin)
        np.add(dmin, bonus, out=obj)
        c = int(obj.argmax())
    if picks < n:
        # picked tokens are at -inf and sort last
        order[picks:] = np.argsort(-obj, kind="stable")[: n - picks]
    return order


@METHODS.register("todre")
@dataclass
class ToDREScorer(KVScorer):
    """Greedy k-center diversity over window-projected keys + window relevance, scored by pick rank.

    Attributes:
        relevance: weight of the (max-normalised) window attention in the greedy objective.
        order_share: share of the candidates ordered by the greedy loop (1 = all, exact for any k).
    """

    name = "todre"
    paper = "Li et al. 2025, ToDRE: Visual Token Pruning via Diversity and Task Awareness, arXiv 2505.18757"
    needs = ("rows",)
    relevance: float = 1.0
    order_share: float = 1.0

    def __post_init__(self) -> None:
        if not self.relevance >= 0:
            raise FlowsieveError(f"todre: relevance must be >= 0, got {self.relevance}")
        if not 0 < self.order_share <= 1:
            raise FlowsieveError(f"todre: order_share must be in (0, 1], got {self.order_share}")

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        T = ctx.n_tokens
        # candidates: the entries before the window (the window's queries are the last cache slots)
        n = max(T - len(ctx.window), 0)
        rows = window_rows(obs, ctx.window, T)  # (B, H, w, T)
        feats = attention_features(rows, n)
        rel = rows[..., :n].mean(1).sum(1)  # head mean, summed over window queries: (B, n)
        B = rows.shape[0]
        out = torch.full((B, T), float(n + 1))  # window (and anything after it): above every pick
        picks = None if self.order_share >= 1 else max(1, round(self.order_share * n))
        for b in range(B):
            order = greedy_order(feats[b].numpy(), rel[b].numpy(), self.relevance, picks)
            out[b, torch.from_numpy(order)] = torch.arange(n, 0, -1, dtype=torch.float32)
        return out
