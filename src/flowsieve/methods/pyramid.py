"""Pyramid layer schedules: more cache entries in lower layers, fewer in higher ones.

PyramidKV (Cai, Zhang, Gao, Liu, Liu, Lu, Xiong, Dong, Chang, Hu, Xiao, "PyramidKV: Dynamic KV Cache
Compression based on Pyramidal Information Funneling", 2024, arXiv 2406.02069) observes that
attention is spread widely in lower layers and funnels onto a few tokens in higher ones, and gives
the layers a linearly decreasing budget: with ``C`` the compressible budget per layer, the lowest
layer gets ``2C - C/beta`` entries, the highest ``C/beta`` (``beta = 20`` in the official code and
kvpress), linear in between, so that the mean stays ``C``. Entries are chosen per layer by SnapKV's
rule (window attention, pooled, per KV head; see :mod:`flowsieve.methods.snapkv`).

``schedule="staged"`` is the staged form of PyramidDrop (Xing, Huang, Dong, Lu, Zhang, Zang, Cao,
He, Wang, Wu, Lin, "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", CVPR 2025, arXiv 2410.17247) and of the released AdaToken-3D code (Zhang,
Chen, Zhang, "AdaToken-3D: Dynamic Spatial Gating for Efficient 3D Large Multimodal-Models
Reasoning", 2025, arXiv 2505.12782, which ships a PyramidDrop pruner): the layers are split into
``stages`` equal groups and stage ``s`` gets a weight ``ratio**s`` (PyramidDrop's lambda = 0.5), or
the weights given in ``stage_weights`` (e.g. AdaToken-3D's ``[0.8, 0.6, 0.4]`` per stage).

What changed for a text context (the papers prune visual tokens, or the KV cache of a whole prompt):

- the candidates are the context tokens; the question / observation window and the chat template
  are protected, so the schedule shapes only the compressible part ``k - n_protected`` of each
  layer, and every layer's budget lies in ``[n_protected, n_tokens]``;
- the budgets are rescaled so that their mean is exactly the sieve's ``k`` (PyramidKV's integer
  ``steps`` leave the mean slightly below ``C``): the cache holds ``keep`` of the prompt in total;
  where the shape would exceed a bound, the clipped layers sit at the bound and the others are
  rescaled (PyramidKV instead re-anchors its line at ``n_tokens``);
- PyramidDrop and AdaToken-3D drop tokens from the *sequence*, so the kept sets are nested across
  layers and later layers compute on fewer tokens; here each layer selects its own entries from
  the full prompt after the prefill (nothing nested, no compute saved in the prefill), and the
  selection query is the observation window's attention in that layer (SnapKV's rule) instead of
  the last instruction token's attention with the next layer's projections;
- the schedule runs over the layers that can evict (Gemma-3's sliding layers keep their window and
  are not counted), by depth order.

Layers then hold different numbers of entries: a multi-token forward on top of the compressed
cache is not possible (transformers builds one mask for all layers), so a continuation is fed one
token at a time (:func:`flowsieve.sites.prefill_cache` does this), and a chunked prefill,
which compresses again after every chunk, cannot use a pyramid (``per_layer_budgets`` says so).

At the ``layer`` site this is PyramidDrop's staged token drop itself (and AdaToken-3D's released
pruner): the layers are split into ``stages`` equal groups; before the first layer of group ``s``
(layer ``round(s * L / stages)``, or the given ``prune_layers``) the context is cut to
``keep ** (s / (stages - 1))`` of its tokens, so every stage keeps the same fraction ``lambda`` of the
previous one (PyramidDrop's lambda, here ``keep ** (1 / (stages - 1))`` so that the last stage keeps
``keep``; ``keep = 0.125`` with 4 stages gives the paper's lambda = 0.5 at layers 8/16/24 of 32).
The rank is the attention of the prompt's last token, averaged over heads (PyramidDrop's last
instruction token). Deviations: the row comes from the layer before the prune layer (or the last
full-attention layer below it) instead of being recomputed with the prune layer's own projections,
and the kept tokens keep their original positions (PyramidDrop renumbers them). The prefill-site
options ``schedule="linear"``, ``beta``, ``ratio``, ``stage_weights``, ``kernel`` and ``pooling``
have no meaning here and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from flowsieve.errors import FlowsieveError
from flowsieve.methods.base import METHODS
from flowsieve.methods.layer import (
    LayerContext,
    LayerPruner,
    Stage,
    check_prune_layers,
    last_row_score,
    merge_stages,
)
from flowsieve.methods.snapkv import SnapKVScorer
from flowsieve.observe import LayerObs

SCHEDULES = ("linear", "staged")


def layer_weights(
    n: int,
    schedule: str = "linear",
    beta: float = 20.0,
    stages: int = 4,
    ratio: float = 0.5,
    stage_weights: tuple[float, ...] | None = None,
) -> list[float]:
    """Relative budgets of ``n`` layers, lowest layer first, all > 0, mean 1.

    ``linear`` is PyramidKV's line from ``2 - 1/beta`` down to ``1/beta``; ``staged`` splits the
    layers into ``stages`` (or ``len(stage_weights)``) equal groups weighted ``ratio**s``.
    """
    if n < 1:
        raise FlowsieveError("pyramid: no layers to schedule")
    if n == 1:
        return [1.0]
    if schedule == "linear":
        top, bottom = 2.0 - 1.0 / beta, 1.0 / beta
        return [top - (top - bottom) * i / (n - 1) for i in range(n)]
    ws = list(stage_weights) if stage_weights else [ratio**s for s in range(stages)]
    raw = [ws[min(i * len(ws) // n, len(ws) - 1)] for i in range(n)]
    mean = sum(raw) / n
    return [w / mean for w in raw]


def allocate(total: int, weights: list[float], lo: int, hi: int) -> list[int]:
    """Integers in ``[lo, hi]`` summing to ``total``, as proportional to ``weights`` as the bounds allow.

    The real-valued allocation is ``clip(s * w, lo, hi)`` with ``s`` chosen (by bisection) so that it
    sums to ``total``; it is rounded by largest remainders (ties to the lower layer), which keeps a
    non-increasing weight list non-increasing.
    """
    n = len(weights)
    if not lo * n <= total <= hi * n:
        raise FlowsieveError(f"pyramid: cannot split {total} entries over {n} layers within [{lo}, {hi}]")
    if any(w <= 0 or not math.isfinite(w) for w in weights):
        raise FlowsieveError("pyramid: layer weights must be finite and > 0")

    def filled(s: float) -> list[float]:
        return [min(max(s * w, lo), hi) for w in weights]

    a, b = 0.0, 1.0
    while sum(filled(b)) < total:
        b *= 2.0
    for _ in range(200):
        m = 0.5 * (a + b)
        if sum(filled(m)) < total:
            a = m
        else:
            b = m
    x = filled(b)
    base = [min(max(math.floor(v + 1e-9), lo), hi) for v in x]
    rest = total - sum(base)
    order = sorted(range(n), key=lambda i: (-(x[i] - base[i]), i))
    while rest != 0:
        step = 1 if rest > 0 else -1
        moved = False
        for i in order if step > 0 else reversed(order):
            if rest == 0:
                break
            if lo <= base[i] + step <= hi:
                base[i] += step
                rest -= step
                moved = True
        if not moved:  # pragma: no cover - guarded by the bounds check above
            raise FlowsieveError("pyramid: rounding failed")
    return base


@METHODS.register("pyramid")
@dataclass
class PyramidScorer(SnapKVScorer, LayerPruner):
    """SnapKV scores with a pyramid of per-layer budgets whose mean is the sieve's budget; at the
    layer site, PyramidDrop's staged token drop.

    Attributes:
        schedule: ``"linear"`` (PyramidKV) or ``"staged"`` (PyramidDrop / AdaToken-3D); None =
            linear at the prefill site, staged at the layer site.
        beta: PyramidKV's shape: the top layer keeps ``1/beta`` of the mean compressible budget.
        stages / ratio: PyramidDrop's stage count and per-stage decay (``staged`` only).
        stage_weights: explicit per-stage weights (``staged`` only; overrides stages and ratio).
        kernel / pooling: SnapKV's pooling of the window attention.
        prune_layers: layer site: the prune layers (None = ``round(s * L / stages)``, s = 1..stages-1).
    """

    name = "pyramid"
    # layers keep different numbers of entries (no multi-token chunk on top, no chunked prefill)
    per_layer_budgets: ClassVar[bool] = True
    paper = (
        "Cai et al. 2024, PyramidKV, arXiv 2406.02069 (staged: Xing et al. 2025, PyramidDrop, "
        "arXiv 2410.17247; AdaToken-3D, arXiv 2505.12782)"
    )
    sites = ("prefill", "layer")
    schedule: str | None = None
    beta: float = 20.0
    stages: int = 4
    ratio: float = 0.5
    stage_weights: tuple[float, ...] | None = None
    prune_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise FlowsieveError(f"pyramid: schedule must be one of {SCHEDULES}, got '{self.schedule}'")
        if not self.beta >= 1:
            raise FlowsieveError(f"pyramid: beta must be >= 1, got {self.beta}")
        if self.stages < 1:
            raise FlowsieveError(f"pyramid: stages must be >= 1, got {self.stages}")
        if not 0 < self.ratio <= 1:
            raise FlowsieveError(f"pyramid: ratio must be in (0, 1], got {self.ratio}")
        if self.stage_weights is not None:
            ws = tuple(float(w) for w in self.stage_weights)
            if not ws or any(not (w > 0 and math.isfinite(w)) for w in ws):
                raise FlowsieveError("pyramid: stage_weights must be a non-empty list of numbers > 0")
            self.stage_weights = ws
        if self.prune_layers is not None:
            self.prune_layers = check_prune_layers("pyramid", self.prune_layers)

    def weights(self, n: int) -> list[float]:
        """This scorer's relative budgets of ``n`` layers (lowest first, mean 1)."""
        schedule = self.schedule or "linear"
        return layer_weights(n, schedule, self.beta, self.stages, self.ratio, self.stage_weights)

    def budgets(self, k: int, n_protected: int, n_tokens: int, layers: list[int]) -> dict[int, int]:
        if not layers:
            return {}
        if not n_protected <= k <= n_tokens:
            raise FlowsieveError(f"pyramid: budget {k} outside [{n_protected}, {n_tokens}]")
        order = sorted(layers)
        free = allocate((k - n_protected) * len(order), self.weights(len(order)), 0, n_tokens - n_protected)
        return {layer: n_protected + c for layer, c in zip(order, free)}

    # ---------------------------------------------------------------------------------- layer site

    def check_layer_options(self) -> None:
        defaults = {"beta": 20.0, "ratio": 0.5, "stage_weights": None, "kernel": 5, "pooling": "avg"}
        bad = [k for k, v in defaults.items() if getattr(self, k) != v]
        if self.schedule == "linear":
            bad.insert(0, "schedule")
        if bad:
            raise FlowsieveError(
                f"pyramid at the layer site is PyramidDrop's staged drop (per-stage ratio keep ** "
                f"(1 / (stages - 1))); {', '.join(bad)} apply to the prefill site only"
            )
        if self.prune_layers is None and self.stages < 2:
            raise FlowsieveError("pyramid: the layer site needs stages >= 2 (or prune_layers)")

    def layer_plan(self, n_layers: int, keep: float) -> list[Stage]:
        if self.prune_layers is not None:
            layers = list(self.prune_layers)
        else:
            layers = [
                min(max(round(s * n_layers / self.stages), 1), n_layers - 1) for s in range(1, self.stages)
            ]
        m = len(layers)
        return merge_stages([(k, keep ** ((s + 1) / m)) for s, k in enumerate(layers)])

    def layer_score(
        self, seen: Mapping[int, LayerObs], ctx: LayerContext, carry: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return last_row_score(seen, ctx), None
