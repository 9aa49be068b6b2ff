"""``flow``: keep the words the answer position draws on, by the information flow of a trace.

The score is the one :func:`flowsieve.trace.trace` shows as ``flow_accumulated``: FlowCut's flow into
the relay token (Tong et al., "FlowCut: Rethinking Redundancy via Information Flow for Efficient
Vision-Language Models", NeurIPS 2025, arXiv 2505.19536) — the relay's attention row plus its
value-value row, each normalised, times the L1 norm of the token's head-mean value — accumulated over
layers with FlowCut's EMA (weight 0.5), read at the last layer. The relay is the prompt's last
token: with a question, the end of the question (where the answer starts); without, the end of the
text. Only the relay's rows are observed (stock SDPA does the attention), so the cost is about one
forward pass.

A word's score is the mean of its tokens' (``agg``); whole words are kept, best first, until the
budget is met; the question is always kept.

Deviations: FlowCut prunes visual tokens inside a vision encoder and an LLM; here the flow ranks
prompt words before any model sees them (the prompt site), and candidates are not renormalised to
the context span, so the scores equal the trace's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flowsieve.errors import FlowsieveError
from flowsieve.methods.flow_signals import ema_accumulate, flowcut_score
from flowsieve.methods.prompt.base import PromptDoc, PromptScorer, Scores, prefix_ids, register
from flowsieve.methods.prompt.lm import model_device
from flowsieve.models import context_length
from flowsieve.observe import ObserveSpec, decoder_layers, is_causal, observe


def relay_flow(model: nn.Module, ids: list[int], weight: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow of every token into the last one, per layer: ((L, T) per-layer flow, (L, T) accumulated).

    Args:
        model: a causal LM.
        ids: (T,) token ids; the last token is the relay.
        weight: FlowCut's EMA weight.
    """
    T = len(ids)
    limit = context_length(model)
    if limit is not None and T > limit:
        raise FlowsieveError(f"the prompt is {T} tokens, longer than the model's context of {limit} tokens")
    relay = T - 1
    n_layers = len(decoder_layers(model))
    x = torch.tensor([ids], device=model_device(model))
    with torch.inference_mode(), observe(model, ObserveSpec(rows=(relay,))) as obs:
        model(input_ids=x, use_cache=False, logits_to_keep=1)
    per_layer = torch.stack(
        [
            flowcut_score(
                obs.layers[i].rows[relay][0][None],  # (1, H, T)
                obs.layers[i].vv_rows[relay][0][None],  # (1, Hk, T)
                obs.layers[i].value_l1[0][None],  # (1, T)
            )[0]
            for i in range(n_layers)
        ]
    )  # (L, T)
    return per_layer, ema_accumulate(per_layer, weight)


@dataclass
class Flow(PromptScorer):
    """Rank words by the flow into the answer position (see the module docstring).

    Attributes:
        layer: layer whose accumulated flow ranks the tokens (-1: the last).
        accumulate: use the EMA-accumulated flow (True) or the flow of that layer alone.
        weight: FlowCut's EMA weight.
    """

    paper = "Tong et al. 2025, FlowCut (flow score), arXiv 2505.19536"

    level = "word"
    layer: int = -1
    accumulate: bool = True
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.weight <= 1:
            raise FlowsieveError(f"weight must be in (0, 1], got {self.weight}")

    def score(self, doc: PromptDoc, model: Any) -> Scores:
        if not is_causal(model):
            raise FlowsieveError("the flow scorer needs a causal LM (the relay is the prompt's last token)")
        n_layers = len(decoder_layers(model))
        if not -n_layers <= self.layer < n_layers:
            raise FlowsieveError(f"layer {self.layer} is out of range for a model with {n_layers} layers")
        bos = prefix_ids(doc.tokenizer)
        per_layer, acc = relay_flow(model, bos + doc.ids, self.weight)
        s = (acc if self.accumulate else per_layer)[self.layer]
        return Scores(priority=s[len(bos) : len(bos) + doc.n_context].clone())


register("flow")(Flow)
