"""Keyformer (Adnan, Arunkumar, Jain, Nair, Soloveychik, Kamath, "Keyformer: KV Cache Reduction through
Key Tokens Selection for Efficient Generative Inference", MLSys 2024, arXiv 2403.09054).

Keyformer keeps "key tokens": the tokens with the largest *accumulated Gumbel-softmax* score,
``f_j = sum_i softmax((x_i + zeta_i) / tau)_j``, summed over the prompt's query rows ``i`` (``x_i`` the
attention logits of row ``i``, ``zeta`` i.i.d. Gumbel(0, 1) noise, ``tau`` the temperature: 1 for the
prompt in the official code, growing by 0.01 per decoding step), plus a recent window (30% of the
budget in the official config). The noise regularises the score of tokens that were already
discarded; the model output itself uses the ordinary softmax. Per KV head the scores of its query
heads are summed (as H2O here).

What changed for a text context and this code base:

- the recent window is the sieve's protected observation window (question / last ``window``
  tokens) instead of 30% of the budget: set ``Sieve(window=...)`` to reproduce the paper's split;
- the prompt is scored once, after the prefill (Keyformer's prompt stage); the growing ``tau`` of
  the decoding stage does not apply;
- **the Gumbel-softmax is applied to the recorded query rows only.** The observation seam gives
  every row's plain softmax only as a column sum (``received``) and full probability rows only at
  positions fixed before the forward (the observation window). A row's Gumbel-softmax is exact
  from its probabilities, ``softmax((log p_i + zeta_i) / tau) = softmax((x_i + zeta_i) / tau)`` (the
  row's log-normaliser cancels; keys with ``p = 0`` stay excluded), so the score here is
  ``sum_{i not recorded} p_i + sum_{i recorded} gumbel_softmax(p_i)``: exact Keyformer for the
  recorded rows and the plain (H2O) column mass for the others. By default the recorded rows are
  the window; ``all_rows=True`` records every prompt row and gives the exact Keyformer score at a
  cost of ``H x T x T`` floats per layer (short prompts and tests only). With ``noise=False`` and
  ``tau=1`` the score is exactly H2O's accumulated attention either way. The exact score for long
  prompts at no extra memory needs one change in :mod:`flowsieve.observe`: an ``ObserveSpec``
  option (temperature and seed) under which ``_accumulate`` also adds
  :func:`gumbel_column_sum` of each chunk of probabilities, with seeded noise, next to ``received``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS, KVScorer, ScoreContext
from flowsieve.observe import LayerObs, ObserveSpec

# probabilities below this are treated as exactly zero attention (masked or underflowed keys)
_TINY = 1e-38


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """I.i.d. Gumbel(0, 1) samples: ``-log(E)`` with ``E ~ Exp(1)``."""
    e = torch.empty(shape, dtype=torch.float32).exponential_(generator=generator)
    return -torch.log(e.clamp(min=1e-30))


def gumbel_column_sum(
    probs: torch.Tensor, tau: float = 1.0, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Keyformer's score of a block of attention rows, from their probabilities.

    Args:
        probs: softmax probabilities (..., rows, keys); zeros are masked keys.
        tau: temperature.
        noise: Gumbel noise of the same shape, or None for the noise-free score.

    Returns:
        (..., keys): ``sum_rows softmax((log p + noise) / tau)`` over each row's non-zero keys. With
        ``noise=None`` and ``tau=1`` this is ``probs.sum(-2)`` (up to rounding).
    """
    logits = torch.log(probs.float().clamp(min=_TINY))
    if noise is not None:
        logits = logits + noise
    logits = (logits / tau).masked_fill(probs <= 0, float("-inf"))
    g = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(g, nan=0.0).sum(-2)  # a row with no visible key contributes nothing


@METHODS.register("keyformer")
@dataclass
class KeyformerScorer(KVScorer):
    """Accumulated Gumbel-softmax attention per KV head.

    Attributes:
        tau: temperature (the paper's ``tau_init`` = 1 for the prompt).
        noise: add seeded Gumbel noise (off: plain softmax, i.e. H2O when ``tau`` = 1).
        all_rows: record every prompt row (exact Keyformer; ``H x T x T`` memory per layer).
    """

    name = "keyformer"
    paper = "Adnan et al. 2024, Keyformer: KV Cache Reduction through Key Tokens Selection, arXiv 2403.09054"
    needs = ("received", "rows")
    tau: float = 1.0
    noise: bool = True
    all_rows: bool = False

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise FlowsieveError(f"keyformer: tau must be > 0, got {self.tau}")
        if not isinstance(self.noise, bool) or not isinstance(self.all_rows, bool):
            raise FlowsieveError("keyformer: noise and all_rows must be true or false")

    def spec(self, window: tuple[int, ...]) -> ObserveSpec:
        spec = super().spec(window)
        if self.all_rows and window:
            spec.rows = tuple(range(max(window) + 1))
        return spec

    def score(self, obs: LayerObs, ctx: ScoreContext) -> torch.Tensor:
        assert obs.received is not None
        T = ctx.n_tokens
        total = obs.received[..., :T].clone()  # (B, H, T): plain softmax mass of every row
        rows = sorted(p for p in obs.rows if p >= 0)  # query positions of this pass (-1: a decode alias)
        if rows and (self.noise or self.tau != 1.0):
            probs = torch.stack([obs.rows[p][..., :T] for p in rows], dim=2)  # (B, H, r, T)
            gen = torch.Generator().manual_seed(ctx.seed * 1000 + ctx.layer)
            zeta = gumbel_noise(tuple(probs.shape), gen) if self.noise else None
            # swap the recorded rows' plain mass for their Gumbel-softmax mass
            total = total - probs.sum(2) + gumbel_column_sum(probs, self.tau, zeta)
        B, H, _ = total.shape
        return total.clamp(min=0).view(B, ctx.n_kv_heads, H // ctx.n_kv_heads, T).sum(2)
