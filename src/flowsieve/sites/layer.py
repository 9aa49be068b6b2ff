"""The ``layer`` site: drop context tokens from the residual stream between decoder layers.

During the prefill forward pass, right before each *prune layer* ``K_s`` of a method's plan
(:mod:`flowsieve.methods.layer`), the method scores the tokens still in the stream from what the
layers since the previous prune layer were observed doing, and the lowest-scored context tokens
leave the hidden states. Layers from ``K_s`` on compute on (and cache) the remaining tokens only,
which is what makes the prefill faster. Tokens outside the context (chat template, question) and
the relay tokens are never dropped.

Positions. The kept tokens keep their **original positions**, as FastV's released code does (it
gathers the position ids of the kept tokens instead of renumbering them): every layer applies RoPE
with the tokens' original positions, the cache stores each entry's absolute position, and later
tokens (the question in query-agnostic mode, generated tokens) get absolute positions, because
``cache.get_seq_length()`` counts every token of the prompt. The methods' papers that renumber
positions (FlowCut, TransPrune, PyramidDrop) deviate from this; their docstrings say so.

The cache after a pruned prefill (:class:`~flowsieve.stream.LayerSiteCache`) holds, in layers
below ``K_1``, every token; in layers from ``K_s`` on, only the tokens kept at stage ``s``; later
forward passes run inside its :class:`~flowsieve.stream.LayerRuntime` (per-layer positional masks),
which is the hook this site hands back.

Equivalence. Dropping token ``j`` at layer ``K`` is the same, for every token that stays, as
masking ``j`` as a key in every layer ``>= K``: the remaining queries never read ``j``'s keys or
values there, and nothing else of ``j`` reaches them. tests/test_layer_site.py checks the logits
of the last prompt token and of decoded tokens against such a masked full forward.

Batch size 1. Shapes: q tokens of a forward pass, n tokens in the stream at a layer, S stored
entries of a cache layer.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import layer_types
from flowsieve.methods.layer import LayerContext, LayerPruner, Stage, check_plan
from flowsieve.models import head_counts
from flowsieve.observe import Observer, ObserveSpec, observe
from flowsieve.sites.base import Prefilled, forward, split
from flowsieve.stream import LayerRuntime, LayerSiteCache

if TYPE_CHECKING:
    from flowsieve.sieve import Sieve

__all__ = ["LayerSite", "attach", "plan_stages"]


@dataclass
class _Prune:
    """The pruning of one prefill forward. Token sets are bool over the forward's q tokens."""

    scorer: LayerPruner
    plan: list[Stage]
    targets: list[int]  # context tokens kept from each prune layer on
    protect: torch.Tensor  # never dropped: non-context and relay tokens
    context: torch.Tensor
    relay: torch.Tensor  # (r,) forward indices, ascending
    relay_all: bool  # record every relay row (else the last one)
    types: tuple[str, ...]
    n_heads: int
    n_kv_heads: int
    obs: Observer | None = None
    carry: torch.Tensor | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    score_s: float = 0.0

    def rows(self, stream: torch.Tensor | None) -> tuple[int, ...]:
        """Stream indices of the relay tokens whose attention rows are recorded."""
        relay = self.relay if self.relay_all else self.relay[-1:]
        if stream is None:
            return tuple(int(p) for p in relay)
        return tuple(int(p) for p in torch.searchsorted(stream, relay))

    def select(self, stage: int, stream: torch.Tensor) -> torch.Tensor:
        """Indices into the stream (n,) of the tokens that stay before prune layer ``plan[stage]``."""
        assert self.obs is not None
        K = self.plan[stage][0]
        prev = self.plan[stage - 1][0] if stage else 0
        n = int(stream.numel())
        cand = ~self.protect[stream]
        relay = tuple(int(p) for p in torch.searchsorted(stream, self.relay))
        seen = {j: self.obs.layers[j] for j in range(prev, K) if j in self.obs.layers}
        ctx = LayerContext(
            layer=K,
            stage=stage,
            prev_layer=prev,
            n_layers=len(self.types),
            layer_types=self.types,
            relay=relay,
            candidates=cand,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            plan=tuple(self.plan),
        )
        t0 = time.perf_counter()
        scores, carry = self.scorer.layer_score(seen, ctx, self.carry)
        if scores.shape[-1] != n or scores.dim() != 2 or scores.shape[0] != 1:
            raise FlowsieveError(f"layer site: scores of shape {tuple(scores.shape)}, expected (1, {n})")
        n_ctx = int(self.context[stream].sum())
        drop = n_ctx - self.targets[stage]
        if drop > 0:
            s = torch.nan_to_num(scores[0].float(), nan=float("-inf"))
            s = torch.where(cand, s, torch.finfo(s.dtype).max)
            keep = s.topk(n - drop).indices.sort().values
        else:
            keep = torch.arange(n, device=stream.device)
        self.score_s += time.perf_counter() - t0
        self.carry = None if carry is None else carry[..., keep]
        self.stages.append(
            {"layer": K, "context_kept": int(self.context[stream[keep]].sum()), "tokens": int(keep.numel())}
        )
        return keep


# ---------------------------------------------------------------------------------------- runtime


def plan_stages(
    scorer: LayerPruner, keep: float, types: Sequence[str], n_context: int, n_protected_context: int
) -> tuple[list[Stage], list[int]]:
    """A method's validated plan for a model with these layer types, and the context tokens kept per stage.

    Raises FlowsieveError for a prune layer outside ``[1, n_layers)``, a scoring layer that did not
    run on the stream of its stage, or a final count below the context tokens that must stay.
    """
    if n_context < 1:
        raise FlowsieveError("the layer site needs a context span to prune (it is empty)")
    plan = check_plan(scorer.layer_plan(len(types), keep), len(types))
    if plan[-1][1] != keep:
        raise FlowsieveError(f"the plan of '{scorer.name}' ends at share {plan[-1][1]}, not keep = {keep}")
    for s, (sl, (K, _)) in enumerate(zip(scorer.score_layers(plan, types), plan, strict=True)):
        prev = plan[s - 1][0] if s else 0
        if not prev <= sl < K:
            raise FlowsieveError(
                f"prune layer {K} would be scored at layer {sl}, which ran before the previous prune "
                f"layer {prev} (no full-attention layer in between); choose other prune layers"
            )
    targets = [round(n_context * share) for _, share in plan]
    if targets[-1] < n_protected_context:
        raise FlowsieveError(
            f"keep {keep} leaves {targets[-1]} context tokens, fewer than the {n_protected_context} "
            f"that must stay (the relay window); use a larger keep or a smaller window"
        )
    return plan, targets


def _prune_for(
    model: nn.Module, sieve: Sieve, types: tuple[str, ...], context: torch.Tensor, relay: torch.Tensor
) -> tuple[_Prune, ObserveSpec]:
    """The pruning state and observation spec of one prefill of ``context.numel()`` tokens."""
    scorer = sieve.scorer
    if not isinstance(scorer, LayerPruner) or "layer" not in scorer.sites:
        raise FlowsieveError(f"method '{sieve.method}' does not support the layer site")
    if sieve.keep is None:
        raise FlowsieveError("the layer site takes keep (a share of the context), not a token budget")
    if sieve.chunk is not None:
        raise FlowsieveError("the layer site prunes one whole prefill pass; chunked prefill is not supported")
    scorer.check_layer_options()
    protect = ~context.clone()
    protect[relay] = True
    plan, targets = plan_stages(scorer, sieve.keep, types, int(context.sum()), int((context & protect).sum()))
    spec = scorer.layer_observe(plan, types)
    spec.slots = True
    n_heads, n_kv = head_counts(model)
    prune = _Prune(
        scorer=scorer,
        plan=plan,
        targets=targets,
        protect=protect,
        context=context,
        relay=relay,
        relay_all=getattr(scorer, "relay_all", False),
        types=types,
        n_heads=n_heads,
        n_kv_heads=n_kv,
    )
    spec.rows = prune.rows(None)
    return prune, spec


class LayerSite:
    """Context tokens leave the residual stream between decoder layers during prefill."""

    name = "layer"

    def check(self, sieve: Sieve) -> None:
        if sieve.budget is not None or sieve.chunk is not None:
            raise FlowsieveError(
                "the layer site takes keep (a share of the context) and prunes one whole prefill: "
                "no budget, no chunk"
            )
        if not isinstance(sieve.scorer, LayerPruner):
            raise FlowsieveError(f"method '{sieve.method}' lists the layer site but cannot prune layers")
        sieve.scorer.check_layer_options()

    @torch.inference_mode()
    def prefill(
        self,
        model: nn.Module,
        prompt: Prompt,
        sieve: Sieve,
        mode: str,
        tokenizer: Any = None,
        chat: bool = True,
    ) -> Prefilled:
        """Prefill ``prompt`` while dropping context tokens inside the model.

        ``"query_aware"``: the whole prompt is prefilled and pruned; the relay is the question span
        (question, instruction, template: :meth:`Sieve.observation_rows`), or the last ``window``
        tokens when there is no question or ``rows="window"``. ``"query_agnostic"``: the prompt up
        to the end of the context is prefilled and pruned (relay: its last ``window`` tokens, which
        stay), then the rest is appended on top of the pruned cache. ``extra["stages"]``: per prune
        layer, the context tokens kept and the tokens in the stream; the hook is the cache's
        :class:`~flowsieve.stream.LayerRuntime`.
        """
        head, tail = split(prompt, mode)
        T = len(head)
        c0, c1 = prompt.context
        context = torch.zeros(T, dtype=torch.bool)
        context[c0 : min(c1, T)] = True
        # the question span (query-aware) or the last ``window`` tokens, as at the prefill site
        relay = torch.tensor(sieve.observation_rows(T, prompt.question if mode == "query_aware" else None))
        types = layer_types(model)
        prune, spec = _prune_for(model, sieve, types, context, relay)
        cache = LayerSiteCache(model)
        runtime = LayerRuntime(model, cache)
        runtime.prune = prune
        t0 = time.perf_counter()
        with observe(model, spec) as obs, runtime.active():
            prune.obs = obs
            logits = forward(model, cache, head)
        runtime.prune = None
        t1 = time.perf_counter()
        if len(prune.stages) != len(prune.plan):
            raise FlowsieveError(f"layer site: {len(prune.stages)} of {len(prune.plan)} prune layers ran")
        kept = prune.stages[-1]["tokens"]  # tokens in the stream after the last prune layer
        if tail:
            with runtime.active():
                logits = forward(model, cache, tail)
        extra = {
            "kept_entries": kept + len(tail),
            "compressed_tokens": T,
            "context_tokens": int(context.sum()),
            "protected": int(prune.protect.sum()),
            "stages": prune.stages,
            "prefill_forward_s": round(t1 - t0 - prune.score_s, 4),
            "score_s": round(prune.score_s, 4),
        }
        return Prefilled(cache, logits, kept + len(tail), extra, hook=runtime)


@contextlib.contextmanager
def attach(model: nn.Module, sieve: Sieve, protect_last: int = 0) -> Iterator[None]:
    """Apply a layer-site sieve to every ``model(...)`` / ``model.generate(...)`` call inside the block.

    A prefill call (no cache, or an empty one) gets a :class:`LayerSiteCache` and is pruned: the
    last ``protect_last`` tokens (e.g. the question and the chat template after it) are not context
    and stay; the last ``window`` tokens are the relay and stay; ``keep`` is the share of the other
    tokens (the context) that stays. Later calls on that cache run with its positional masks. Batch size 1;
    hooks are always removed on exit.
    """
    types = layer_types(model)
    state: dict[str, Any] = {}

    def close_runtime() -> None:
        for key in ("obs_cm", "runtime_cm"):
            cm = state.pop(key, None)
            if cm is not None:
                cm.__exit__(None, None, None)

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise FlowsieveError("the layer site needs input_ids")
        if ids.shape[0] != 1:
            raise FlowsieveError("the layer site runs one sequence at a time (batch size 1)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            close_runtime()
            T = int(ids.shape[1])
            context = torch.ones(T, dtype=torch.bool)
            context[T - min(protect_last, T) :] = False
            question = (T - min(protect_last, T), T) if protect_last > 0 else None
            relay = torch.tensor(sieve.observation_rows(T, question))
            prune, spec = _prune_for(model, sieve, types, context, relay)
            new = LayerSiteCache(model)
            runtime = LayerRuntime(model, new)
            runtime.prune = prune
            kwargs.pop("past_key_values", None)
            kwargs["cache"] = new
            kwargs["use_cache"] = True
            obs_cm = observe(model, spec)
            prune.obs = obs_cm.__enter__()
            runtime_cm = runtime.active()
            runtime_cm.__enter__()
            state.update(obs_cm=obs_cm, runtime_cm=runtime_cm, runtime=runtime, prefill=True)
        return args, kwargs

    def post(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if state.pop("prefill", False):
            cm = state.pop("obs_cm")
            cm.__exit__(None, None, None)
            state["runtime"].prune = None

    h1 = model.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = model.register_forward_hook(post, with_kwargs=True)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()
        close_runtime()
