"""Where a model keeps its transformer blocks and their attention modules (Llama/Gemma/Qwen,
BERT and GPT-2 layouts), and whether its blocks expose what the transition signals need.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from flowsieve.errors import FlowsieveError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (Llama/Gemma/Qwen ``model.layers``, BERT ``encoder.layer``, GPT-2 ``h``)."""
    base = getattr(model, "base_model", model)
    for path in ("layers", "model.layers", "language_model.layers", "encoder.layer", "h", "transformer.h"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise FlowsieveError(f"cannot find the transformer layers of {type(model).__name__}")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """One self-attention module per layer, in layer order; each gets a ``layer_idx`` if missing."""
    mods = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None and hasattr(layer, "attention"):  # BERT: layer.attention.self
            attn = getattr(layer.attention, "self", None)
        if attn is None:
            attn = getattr(layer, "attn", None)
        if attn is None:
            raise FlowsieveError(f"cannot find the attention module of layer {i} in {type(model).__name__}")
        if getattr(attn, "layer_idx", None) is None:
            attn.layer_idx = i
        mods.append(attn)
    return mods


def _layer_blocks(layer: nn.Module) -> dict[str, nn.Module]:
    blocks = {}
    if hasattr(layer, "self_attn"):
        blocks["attn"] = layer.self_attn
    if hasattr(layer, "mlp"):
        blocks["mlp"] = layer.mlp
    return blocks


def supports_transitions(model: nn.Module) -> bool:
    """TTV needs separate attention and MLP blocks with (normed input) -> (output before the residual)."""
    return all(len(_layer_blocks(layer)) == 2 for layer in decoder_layers(model))


def is_causal(model: nn.Module) -> bool:
    return bool(getattr(attention_modules(model)[0], "is_causal", True))
