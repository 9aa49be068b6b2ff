"""The observation seam: the one package that touches transformers internals for observation.

An attention function registered with transformers' ``AttentionInterface`` (:mod:`.attention`)
produces the model's attention output and, while an :class:`Observer` is active, records per layer
what scorers ask for:

- attention rows of chosen query positions (last token, a window, the question span, CLS);
- attention received by every key, summed over all queries, computed query chunk by query chunk
  so that no ``T x T`` matrix is ever held (H2O's accumulated attention), or its maximum over
  queries (KVzip's reconstruction score);
- per-head statistics: mass on the first token, normalised row entropy, output norm (for sink and
  dormant-head detection);
- key and value norms, and the value-value "semantic" rows FlowCut needs;
- hidden-state transitions of the attention and MLP blocks (TransPrune's TTV), through forward hooks;
- the surprisal of every token, -log p(token | prefix), from the model's own output head applied to
  the final hidden states (self-information, as LLMLingua and Selective Context score text).

The same function is also the seam of the ``select`` site: inside :func:`select_keys` it asks a
key selector, per layer and per call, which cached entries the call's queries attend to, gathers
only those keys and values and runs SDPA on them (the unselected entries cost nothing in the
attention itself; they stay in the cache).

Modules, each importing only those listed before it:

- :mod:`.adapter`: where a model keeps its blocks and attention modules;
- :mod:`.spec`: what to record (:class:`ObserveSpec`) and what was recorded (:class:`LayerObs`,
  :class:`Observer`);
- :mod:`.probs`: attention probabilities chunk by chunk and their per-key and per-head sums;
- :mod:`.attention`: the registered attention function and :func:`select_keys`;
- :mod:`.hooks`: the forward hooks (transitions, surprisal, cache offsets) and :func:`observe`.
"""

from __future__ import annotations

from flowsieve.observe.adapter import attention_modules, decoder_layers, is_causal, supports_transitions
from flowsieve.observe.attention import ATTN_NAME, KeySelector, register, select_keys
from flowsieve.observe.hooks import observe
from flowsieve.observe.spec import LayerObs, Observer, ObserveSpec

__all__ = [
    "ATTN_NAME",
    "KeySelector",
    "LayerObs",
    "ObserveSpec",
    "Observer",
    "attention_modules",
    "decoder_layers",
    "is_causal",
    "observe",
    "register",
    "select_keys",
    "supports_transitions",
]
