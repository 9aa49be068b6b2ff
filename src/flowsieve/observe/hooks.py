"""Forward hooks, and :func:`observe`, the context manager that installs them.

The hooks record what the attention function does not see: hidden-state transitions of the
attention and MLP blocks (TransPrune's TTV), the surprisal of every token, -log p(token | prefix),
from the model's own output head applied to the final hidden states (self-information, as
LLMLingua and Selective Context score text), and, before each attention call, how many tokens its
cache layer already holds. :func:`observe` installs them, activates an
:class:`~flowsieve.observe.spec.Observer` and switches the model to the registered attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.models import text_config
from flowsieve.observe.adapter import _layer_blocks, decoder_layers
from flowsieve.observe.attention import _ACTIVE, ATTN_NAME, register
from flowsieve.observe.spec import Observer, ObserveSpec


def _transition_hooks(obs: Observer) -> list[Any]:
    handles = []
    for i, layer in enumerate(decoder_layers(obs.model)):
        if not obs.wants(i):
            continue
        blocks = _layer_blocks(layer)
        if len(blocks) != 2:
            raise FlowsieveError(
                f"transition signals need separate attention and MLP blocks; "
                f"{type(layer).__name__} does not expose them"
            )
        for name, mod in blocks.items():

            def hook(
                mod: nn.Module, args: tuple, kwargs: dict, output: Any, i: int = i, name: str = name
            ) -> None:
                before = kwargs.get("hidden_states", args[0] if args else None)
                after = output[0] if isinstance(output, tuple) else output
                if before is None or after is None:
                    return
                b, a = before.float(), after.float()
                nb = b.norm(dim=-1).clamp(min=1e-12)  # (B,T)
                na = a.norm(dim=-1)
                ratio = na / nb
                dist = 1.0 - (a * b).sum(-1) / (na.clamp(min=1e-12) * nb)  # 1 - cos(before, after)
                obs.layer(i).ttv.setdefault(name, []).append((ratio, dist))

            handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    return handles


def _surprisal_hooks(obs: Observer, rows: int = 256) -> list[Any]:
    """Score every token's surprisal from the decoder's final hidden states and the output head
    (``rows`` positions at a time, so the (rows, vocab) log-probabilities stay small). A token that
    opens a later forward (a chunk or a continuation) is scored from the previous forward's last
    position."""
    model = obs.model
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise FlowsieveError(
            f"surprisal needs a causal LM with an output head; {type(model).__name__} has none"
        )
    cap = getattr(text_config(model), "final_logit_softcapping", None)

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise FlowsieveError("surprisal needs input_ids (not inputs_embeds)")
        h = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, q, d)
        B, q = ids.shape
        nll = torch.zeros(B, q)
        if obs._last_logprobs is not None:
            nll[:, 0] = -obs._last_logprobs.gather(1, ids[:, :1].cpu())[:, 0]
        for a in range(0, q, rows):
            b = min(a + rows, q)
            logits = head(h[:, a:b]).float()
            if cap is not None:
                logits = torch.tanh(logits / cap) * cap
            lp = torch.log_softmax(logits, dim=-1).cpu()  # (B, c, V): positions a..b-1
            nxt = ids[:, a + 1 : b + 1].cpu()  # the tokens they predict
            n = nxt.shape[1]
            nll[:, a + 1 : a + 1 + n] = -lp[:, :n].gather(-1, nxt[..., None])[..., 0]
            if b == q:
                obs._last_logprobs = lp[:, -1]
        obs.token_nll = nll if obs.token_nll is None else torch.cat([obs.token_nll, nll], dim=1)
        for i in range(len(obs.attn_modules)):
            if obs.wants(i):
                obs.layer(i).token_nll = obs.token_nll

    return [base.register_forward_hook(hook, with_kwargs=True)]


def _offset_hooks(obs: Observer) -> list[Any]:
    """Record, before each attention call, how many tokens its cache layer already holds."""

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        i = mod.layer_idx
        seen = 0
        if cache is not None and hasattr(cache, "layers") and i < len(cache.layers):
            seen = int(cache.get_seq_length(i))
        obs._seen[i] = seen

    return [m.register_forward_pre_hook(pre, with_kwargs=True) for m in obs.attn_modules]


@contextlib.contextmanager
def observe(model: nn.Module, spec: ObserveSpec) -> Iterator[Observer]:
    """Record observations of every forward pass of ``model`` inside the block.

    The model's attention implementation is switched to the observation function and restored on
    exit; hooks are always removed, also when the block raises.
    """
    register()
    obs = Observer(model, spec)
    previous = model.config._attn_implementation
    handles = _offset_hooks(obs) + (_transition_hooks(obs) if spec.transitions else [])
    if spec.surprisal:
        handles += _surprisal_hooks(obs)
    token = _ACTIVE.set(obs)
    try:
        model.set_attn_implementation(ATTN_NAME)
        yield obs
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
