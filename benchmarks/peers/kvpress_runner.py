"""Run NVIDIA kvpress on task items (executed with the kvpress venv's python by flowsieve.bench.peers).

kvpress is called through its own ``kv-press-text-generation`` pipeline: it prefills the context with
the press active (the press prunes each layer's KV cache right after that layer's attention), then
feeds the question and decodes greedily.

Prompt with ``chat=True`` (SmolLM2): the pipeline renders the chat template around the context and
tokenizes ``chat_prefix + context`` and ``question + chat_suffix`` separately with no separator, so
the question is passed as ``"\\n\\n" + question + "\\nAnswer briefly."``: the text is then exactly
flowsieve's ``build_prompt(..., chat=True)``; whether the *tokens* match flowsieve's (separate
tokenization at the seam) is checked per item and written to ``extra``.

Prompt with ``chat=False`` (models without a chat template: gemma3-270m): flowsieve's plain prompt,
``context + "\\n\\n" + question + "\\nAnswer briefly."`` tokenized with the tokenizer's special tokens
(``<bos>`` first). The pipeline's own preprocessing would put ``<bos>`` as text before the context and
a ``"\\n"`` after the question, which flowsieve's prompt lacks, so this runner builds the ids itself,
requires them to equal the ids flowsieve's tokenizer gave (``prompt_ids`` of each item; a mismatch is
an error), and hands them to the pipeline's ``forward`` (kvpress's prefill-with-press and greedy
decoding, unchanged).

Modes:
- ``query_agnostic`` is the pipeline as shipped: the context is compressed before the question is
  seen; the question is appended to the compressed cache. With the chat template the compressed part
  includes the template's system prompt and user header and the question carries the assistant
  header; with a plain prompt the split is flowsieve's ``Prompt.split`` (``<bos>`` + context |
  question + instruction).
- ``query_aware``: context, question and instruction all go in as kvpress's context and the question
  is empty, so the press sees the question while it compresses (kvpress's ``evaluate.py`` does the
  same with its ``compress_questions`` / query-aware option). The question's tokens are then subject
  to eviction too. With the chat template only the assistant header is appended uncompressed; with a
  plain prompt there is no header, so the prompt's last token is held back and fed after compression
  (the pipeline needs at least one token after the prefill to produce the first logits).

Gemma-3 (sliding-window layers of 512 tokens, and full-attention layers every sixth layer). kvpress
0.5.5 skips sliding-window layers only for ``Gemma3ForConditionalGeneration`` (``BasePress.__call__``);
the text-only ``Gemma3ForCausalLM`` of gemma3-270m is hooked on every layer, so as shipped its
**sliding-window layers are compressed too**, by the same ratio, and its pipeline's cache
(``DynamicCache()`` without the model config) keeps every prompt token on every layer until the press
prunes it: a sliding layer ends up holding ``keep`` x the prompt (more than its 512-entry window at
long prompts and high keep), and new tokens see it through the sliding-window mask counted in cache
slots, not token positions. Measured on gemma3-270m: degenerate answers and a cache larger than the
uncompressed one. The press is therefore applied per layer, chosen by the ``layers`` option
(``config["options"]``, spelled ``<method>@layers=...``):

- ``layers=full`` (the default): our adaptation. Only the full-attention layers are pressed, what
  kvpress itself does for the multimodal Gemma-3. Scorer presses go through kvpress's own
  ``PerLayerCompressionPress`` with ratio 0 on the sliding-window layers; AdaKV (which that wrapper
  refuses, not being a scorer press) through :func:`pressed_layers_only`, a wrapper that leaves the
  sliding-window layers' hooks out. The cache is ``DynamicCache(config=model.config)``, so sliding
  layers hold transformers' window (511 entries, the 512th is the new token). One more bridge is
  needed, :func:`fit_full_attention_masks`: with pruned full layers and an unpruned first layer,
  transformers counts the question's positions from the first (sliding) layer, so the causal mask
  it builds for the full layers would let every question token see the later ones; each full layer's
  multi-token mask is rebuilt as all stored entries visible + causal among the new tokens.
  On models without sliding-window layers (SmolLM2) every layer is a full-attention layer: nothing
  changes.
- ``layers=all``: kvpress as shipped (every layer pressed, ``DynamicCache()``), kept for comparison.

``kv_bytes`` is measured from the cache's tensors; ``kv_bytes_full`` is flowsieve's (sliding-window
layers capped at the window); ``extra`` has the stored entries per layer, the pressed layers, and the
bytes of sliding and full layers. ``kept_tokens`` is the largest count on a pressed layer. One
incompatibility is bridged, not hidden: kvpress gives every attention layer the model's shared rotary
embedding, whose ``forward`` in transformers 5 needs the layer type on Gemma-3 (ExpectedAttention
calls it without one and fails); each attention layer is handed the rotary embedding bound to its own
layer type (local RoPE base on sliding layers, global on full ones: the RoPE Gemma-3 itself applies
there), which ``extra["rope"]`` records.

PyramidKV: kvpress's ``PyramidKVPress`` gives each layer its own budget (shrinking with the layer
index over all the model's layers) only when the prompt length, ratio, ``window_size`` (64) and
``beta`` (20) allow it (``get_layer_budget``); otherwise it falls back to SnapKV's uniform budget on
every layer (e.g. SmolLM2, 1k-token prompt, keep 0.25). The runner keeps kvpress's defaults and says
in ``extra["layer_budgets"]`` which of the two happened (measured from the stored entries). With
``layers=full`` on Gemma-3 only layers 5, 11 and 17 take their budgets, which average less than
``keep`` (the pyramid is spread over all 18 layers, as kvpress does for the multimodal Gemma-3).

Measured per item like flowsieve's ``generate``: prefill seconds (context prefill with the press +
the question forward), decode tokens/s (forward passes after the first new token), KV bytes of the
cache at the start of decoding (compressed context + question) and of the uncompressed prompt, peak
RSS. Head-wise presses (AdaKV) mask entries instead of dropping them: their cache keeps its full size,
as kvpress documents ("does not reduce peak memory"); ``extra`` then gives the per-head kept count.
"""

from __future__ import annotations

import time
import traceback
from typing import Any

from _common import (
    PeakRSS,
    PeerError,
    compare_ids,
    flowsieve_prompt,
    full_kv_bytes,
    kv_bytes,
    load_model,
    log,
    main,
    question_tail,
    set_threads,
    stored_tokens,
    versions,
)


def make_press(method: str, ratio: float) -> Any:
    """The kvpress press for our method name at ``compression_ratio=ratio``."""
    import kvpress as kp

    presses = {
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "observed_attention": lambda: kp.ObservedAttentionPress(compression_ratio=ratio),
        "expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "keydiff": lambda: kp.KeyDiffPress(compression_ratio=ratio),
        "pyramidkv": lambda: kp.PyramidKVPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kp.AdaKVPress(
            press=kp.ExpectedAttentionPress(compression_ratio=ratio)
        ),
    }
    if method not in presses:
        raise PeerError(f"kvpress runner has no press '{method}'; known: {', '.join(presses)}")
    return presses[method]()


LAYERWISE = {"pyramidkv"}
"""Presses that leave each layer with a different number of cache entries."""

MASK_FIT = (
    "layer-wise budgets leave layers with different cache lengths; transformers builds the question's "
    "SDPA mask from layer 0 only (huggingface/transformers#35168: variable lengths work with "
    "flash-attention-2 alone, which has no CPU build), so each layer's mask is fitted to its own keys: "
    "every stored entry visible, causal among the new tokens (what flash-attention-2 does for batch 1)"
)


def fit_sdpa_masks() -> None:
    """Wrap transformers' "sdpa" attention so a mask narrower or wider than the layer's keys is fitted.

    With per-layer budgets the mask of a multi-token forward (the question) is sized for layer 0. For
    a layer with ``K`` keys of which the last ``q`` are new, the fitted mask allows the ``K - q``
    stored entries and keeps the mask's causal part among the ``q`` new tokens (batch 1, no padding).
    """
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    func = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def fitted(
        module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            q, k = query.shape[-2], key.shape[-2]
            new = attention_mask[..., -q:]
            shape = (*new.shape[:-1], k - q)
            if new.dtype == torch.bool:
                stored = torch.ones(shape, dtype=torch.bool, device=new.device)
            else:
                stored = torch.zeros(shape, dtype=new.dtype, device=new.device)
            attention_mask = torch.cat([stored, new], dim=-1)
        return func(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = fitted


LAYERS = ("full", "all")
"""Values of the ``layers`` option: press the full-attention layers only (default), or every layer."""


def pressed_layers(layer_types: list[str], n_layers: int, layers: str) -> list[int]:
    """The indices of the layers the press compresses: ``layers="full"`` leaves the sliding-window
    layers out, ``"all"`` presses every layer (kvpress as shipped on a text-only Gemma-3)."""
    if layers not in LAYERS:
        raise PeerError(f"layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    if layers == "all" or not layer_types:
        return list(range(n_layers))
    return [i for i, t in enumerate(layer_types[:n_layers]) if t != "sliding_attention"]


def pressed_layers_only(press: Any, layers: list[int], n_layers: int) -> Any:
    """``press`` restricted to ``layers`` (the others keep every entry).

    A scorer press goes through kvpress's ``PerLayerCompressionPress`` with its ratio on ``layers`` and
    0 elsewhere. That wrapper takes scorer presses only, so any other press (AdaKV) is wrapped in
    ``PressedLayersOnly``, which runs the press's hook on ``layers`` and returns at once on the rest.
    """
    from dataclasses import dataclass

    import kvpress as kp

    if isinstance(press, kp.ScorerPress):
        ratio = float(press.compression_ratio)
        ratios = [ratio if i in layers else 0.0 for i in range(n_layers)]
        return kp.PerLayerCompressionPress(press=press, compression_ratios=ratios)

    @dataclass
    class PressedLayersOnly(kp.BasePress):
        press: Any
        layers: tuple[int, ...]

        def post_init_from_model(self, model: Any) -> None:
            self.press.post_init_from_model(model)

        @property
        def compression_ratio(self) -> float:
            return float(self.press.compression_ratio)

        def forward_hook(self, module: Any, input: Any, kwargs: dict, output: Any) -> Any:
            if module.layer_idx not in self.layers:
                return output
            return self.press.forward_hook(module, input, kwargs, output)

    return PressedLayersOnly(press=press, layers=tuple(layers))


def causal_after_stored(mask: Any, stored: int, q: int) -> Any:
    """An attention mask for ``q`` new tokens after ``stored`` cache entries (batch 1, no padding):
    every stored entry visible, causal among the new tokens; shape ``(*mask.shape[:-2], q, stored + q)``
    and the kind of ``mask`` (boolean: True = visible; additive float: 0 = visible)."""
    import torch

    shape = (*mask.shape[:-2], q, stored + q)
    visible = torch.ones(shape, dtype=torch.bool, device=mask.device)
    visible[..., stored:] = torch.tril(visible[..., stored:])
    if mask.dtype == torch.bool:
        return visible
    out = torch.zeros(shape, dtype=mask.dtype, device=mask.device)
    return out.masked_fill(~visible, torch.finfo(mask.dtype).min)


def fit_full_attention_masks(model: Any, layers: list[int]) -> list[Any]:
    """Before each attention forward of ``layers`` with several new tokens and a filled cache, replace
    its mask by :func:`causal_after_stored`; returns the hook handles.

    Needed when the first cache layer is not pressed (Gemma-3's first layer is a sliding-window one):
    transformers numbers the new tokens after the first layer's token count and builds the
    full-attention mask for a layer of that length, so on a pressed layer every question token would
    see the question tokens after it. Works for every attention implementation (the mask is an
    argument of the layer)."""

    def pre(module: Any, args: Any, kwargs: dict) -> Any:
        mask = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if mask is None or cache is None or hidden is None or hidden.shape[1] < 2:
            return None
        stored = int(cache.layers[module.layer_idx].get_seq_length())
        if stored == 0:  # the prefill: transformers' causal mask is right
            return None
        kwargs["attention_mask"] = causal_after_stored(mask, stored, hidden.shape[1])
        return args, kwargs

    attn = [model.model.layers[i].self_attn for i in layers]
    return [a.register_forward_pre_hook(pre, with_kwargs=True) for a in attn]


SLIDING_NOTE = (
    "layers=all, kvpress as shipped: kvpress 0.5.5 skips sliding-window layers only for "
    "Gemma3ForConditionalGeneration; this Gemma3ForCausalLM is hooked on every layer, so its "
    "sliding-window layers are compressed too, by the same ratio, from the whole prompt (the pipeline's "
    "DynamicCache() keeps every token on every layer until the press prunes it); new tokens see a "
    "sliding layer through the sliding-window mask counted in cache slots (the last {window} stored "
    "entries), not token positions"
)
FULL_LAYERS_NOTE = (
    "layers=full, flowsieve's adaptation of kvpress to this Gemma3ForCausalLM: only the full-attention "
    "layers {layers} are pressed, as kvpress does for Gemma3ForConditionalGeneration (kvpress 0.5.5 "
    "would press every layer of the text-only model); {how}; the cache is DynamicCache(config=...), so "
    "the sliding-window layers keep transformers' window of the last {keep_window} entries; the "
    "question's mask on the pressed layers is rebuilt (all stored entries visible, causal among the "
    "question tokens), since transformers numbers the question after the unpressed first layer"
)
ROPE_NOTE = (
    "kvpress hands every attention layer the model's shared rotary embedding, whose forward needs the "
    "layer type on Gemma-3 in transformers 5; each layer gets it bound to its own type (sliding: local "
    "RoPE base, full: global), the RoPE the layer itself applies"
)


def rope_needs_layer_type(model: Any) -> bool:
    """Whether the model's rotary embedding takes a ``layer_type`` (Gemma-3 in transformers 5)."""
    import inspect

    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None:
        return False
    return "layer_type" in inspect.signature(type(rotary).forward).parameters


def bind_layer_rope(model: Any) -> list[Any]:
    """Before every attention forward, replace the shared rotary embedding kvpress assigned to the layer
    (``layer.self_attn.rotary_emb``) with one bound to the layer's own type; returns the hook handles."""
    from torch import nn

    rotary = model.model.rotary_emb

    class LayerRope(nn.Module):
        def __init__(self, layer_type: str) -> None:
            super().__init__()
            self.rotary = rotary
            self.layer_type = layer_type

        def forward(self, x: Any, position_ids: Any) -> Any:
            return self.rotary(x, position_ids, self.layer_type)

    def pre(module: Any, args: Any) -> None:
        if getattr(module, "rotary_emb", None) is rotary:
            module.rotary_emb = LayerRope(module.layer_type)

    return [layer.self_attn.register_forward_pre_hook(pre) for layer in model.model.layers]


def layer_bytes(cache: Any) -> list[int]:
    """Bytes of keys and values per cache layer."""
    return [
        sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        for layer in cache.layers
    ]


class ForwardTimer:
    """Times the pipeline's forward passes. The context prefill (with the press) is a call of the
    decoder stack ``model.model`` on its own; the question and every decode step are calls of the
    whole model (stack + LM head), as in flowsieve's ``generate``. ``times[0]`` is the context,
    ``times[1]`` the question, the rest decode steps; the cache is recorded after the first two."""

    def __init__(self, model: Any, cache: Any) -> None:
        self.cache = cache
        self.times: list[float] = []
        self.kv_after: list[int] = []
        self.stored_after: list[int] = []
        self.per_layer_context: list[int] = []  # entries stored per layer, after the context
        self.per_layer: list[int] = []  # entries stored per layer, after the question
        self.bytes_per_layer: list[int] = []
        self._t0 = 0.0
        self._depth = 0  # > 0 while inside a call of the whole model
        self._handles = []
        for module, outer in ((model, True), (model.model, False)):
            self._handles += [
                module.register_forward_pre_hook(lambda m, a, outer=outer: self._pre(outer)),
                module.register_forward_hook(lambda m, a, o, outer=outer: self._post(outer)),
            ]

    def _pre(self, outer: bool) -> None:
        if outer or self._depth == 0:
            self._t0 = time.perf_counter()
        self._depth += outer

    def _post(self, outer: bool) -> None:
        self._depth -= outer
        if self._depth == 0:  # the end of an outermost call
            self.times.append(time.perf_counter() - self._t0)
            if len(self.times) <= 2:
                self.kv_after.append(kv_bytes(self.cache))
                self.stored_after.append(stored_tokens(self.cache))
                self.per_layer = [int(layer.keys.shape[-2]) for layer in self.cache.layers]
                if len(self.times) == 1:
                    self.per_layer_context = list(self.per_layer)
                self.bytes_per_layer = layer_bytes(self.cache)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def unpressed_entries(cache_layer: Any, n_tokens: int) -> int:
    """Entries a cache layer holds after a prefill of ``n_tokens`` without a press: all of them, or the
    last ``sliding_window - 1`` on transformers' sliding-window cache layers."""
    if getattr(cache_layer, "is_sliding", False) and getattr(cache_layer, "sliding_window", None):
        return min(n_tokens, int(cache_layer.sliding_window) - 1)
    return n_tokens


def layer_budgets(kept_per_layer: list[int]) -> str:
    """What PyramidKV did with the pressed layers' budgets, read from their stored entries."""
    if len(set(kept_per_layer)) > 1:
        mean = sum(kept_per_layer) / len(kept_per_layer)
        return (
            f"per layer (pyramid): {min(kept_per_layer)} to {max(kept_per_layer)} entries, "
            f"{mean:.1f} on average over the pressed layers"
        )
    return (
        "uniform: kvpress's PyramidKVPress fell back to SnapKV's budget on every layer (the prompt is "
        "too short for its pyramid at this ratio, window_size and beta)"
    )


def split_ids(ids: list[int], split: int, mode: str) -> tuple[list[int], list[int]]:
    """(compressed, appended) token ids of a plain prompt: query-agnostic splits at flowsieve's
    ``Prompt.split``; query-aware compresses everything but the last token (see the module docstring)."""
    if mode == "query_aware":
        return ids[:-1], ids[-1:]
    if not 0 < split < len(ids):
        raise PeerError(f"the prompt's context/question split {split} is outside its {len(ids)} tokens")
    return ids[:split], ids[split:]


def run(items: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
    import torch
    from transformers import DynamicCache, pipeline

    set_threads(cfg["threads"])
    method, keep, mode = cfg["method"], float(cfg["keep"]), cfg["mode"]
    chat = bool(cfg.get("chat", True))
    ratio = round(1.0 - keep, 6)
    layers = (cfg.get("options") or {}).get("layers", "full")
    if layers not in LAYERS:
        raise PeerError(f"layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    press = make_press(method, ratio)
    base_press = press
    if method in LAYERWISE:
        fit_sdpa_masks()
    attn = "eager" if method == "observed_attention" else "sdpa"  # ObservedAttention reads attention weights
    t0 = time.perf_counter()
    model, tok, model_dir = load_model(cfg, attn_implementation=attn)
    load_s = time.perf_counter() - t0
    if chat and getattr(tok, "chat_template", None) is None:
        raise PeerError(f"{cfg.get('model_name')} has no chat template; run it with chat=False (--no-chat)")
    rope_hooks = bind_layer_rope(model) if rope_needs_layer_type(model) else []
    n_layers = int(model.config.num_hidden_layers)
    layer_types = list(getattr(model.config, "layer_types", None) or [])
    sliding = [i for i, t in enumerate(layer_types) if t == "sliding_attention"]
    window = getattr(model.config, "sliding_window", None)
    pressed = pressed_layers(layer_types, n_layers, layers)
    mask_hooks: list[Any] = []
    if len(pressed) < n_layers:
        press = pressed_layers_only(press, pressed, n_layers)
        mask_hooks = fit_full_attention_masks(model, pressed)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    n_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    instruction = cfg.get("instruction")
    max_new = int(cfg["max_new_tokens"])
    elt = next(model.parameters()).element_size()
    if chat:
        compressed_span = (
            "every token before the question, including the chat template's system prompt and user header"
        )
        aware = "only the assistant header is appended"
    else:
        compressed_span = (
            "<bos> and the context (flowsieve's Prompt.split); the question and instruction are appended"
        )
        aware = "only the prompt's last token is appended (no chat template, no assistant header)"
    common = {
        "peer": "kvpress",
        "versions": versions("kvpress", "tokenizers"),
        "press": repr(press),
        "press_class": type(base_press).__name__,
        "compression_ratio": ratio,
        "layers": layers,
        "pressed_layers": pressed,
        "attn_implementation": attn,
        "model": cfg.get("model_name"),
        "model_class": type(model).__name__,
        "model_dir": str(model_dir),
        "chat": chat,
        "prompt_ids": (
            "kvpress pipeline preprocessing (chat template), compared with flowsieve's ids"
            if chat
            else "flowsieve's build_prompt(chat=False) ids (checked equal), given to the pipeline's forward"
        ),
        "load_s": round(load_s, 3),
        "threads": torch.get_num_threads(),
        "mode_detail": (
            f"query_aware: context + question + instruction compressed together as kvpress's context "
            f"(question tokens can be evicted); {aware}"
            if mode == "query_aware"
            else "query_agnostic: kvpress pipeline as shipped, context compressed before the question is seen"
        ),
        "compressed_span": compressed_span if mode == "query_agnostic" else "all but what is appended",
        "decode_stop": "kvpress stops at generation_config.eos_token_id only",
        "peak_rss": "the runner process (its own libraries and model included), sampled every 5 ms",
        "positions": "question and answer keep their original RoPE positions (kvpress pipeline)",
        "kv_bytes_full": "flowsieve's full_kv_bytes: sliding-window layers capped at their window",
    }
    if sliding:
        if len(pressed) < n_layers:
            how = (
                "through kvpress's PerLayerCompressionPress, ratio 0 on the sliding-window layers"
                if type(press).__name__ == "PerLayerCompressionPress"
                else f"{type(base_press).__name__} is not a scorer press, which PerLayerCompressionPress "
                "requires, so a wrapper of ours runs its hook on those layers only"
            )
            keep_window = window - 1 if window else window
            common["sliding_layers"] = FULL_LAYERS_NOTE.format(
                layers=pressed, how=how, keep_window=keep_window
            )
        else:
            common["sliding_layers"] = SLIDING_NOTE.format(window=window)
        common["sliding_layer_indices"] = sliding
        common["sliding_window"] = window
    if rope_hooks:
        common["rope"] = ROPE_NOTE
    if method in LAYERWISE:
        common["mask_fit"] = MASK_FIT
    if getattr(base_press, "compression_ratio", None) is not None:
        common["compression_ratio"] = float(base_press.compression_ratio)
    rows = []
    for n, it in enumerate(items, 1):
        flowsieve_ids = [int(i) for i in it["prompt_ids"]]
        tail = question_tail(it["question"], instruction)
        if chat:
            if mode == "query_aware":
                context, question = it["context"].strip() + tail, ""
            else:
                context, question = it["context"].strip(), tail
            # the pipeline's own preprocessing: the token ids kvpress will see
            pre = pipe.preprocess(
                context,
                questions=[question],
                answer_prefix="",
                max_context_length=int(1e10),
            )
            ctx_ids = pre["context_ids"][0].tolist()
            q_ids = pre["questions_ids"][0][0].tolist()
            match = compare_ids(flowsieve_ids, ctx_ids + q_ids)
        else:
            ids, split = flowsieve_prompt(tok, it["context"], it["question"], instruction, chat=False)
            if ids != flowsieve_ids or split != int(it["prompt_split"]):
                diff = compare_ids(flowsieve_ids, ids).get(
                    "token_diff", f"split {split} != {it['prompt_split']}"
                )
                raise PeerError(
                    f"item {it['item_id']}: the peer's tokenizer builds another prompt than flowsieve's ({diff})"
                )
            ctx_ids, q_ids = split_ids(ids, split, mode)
            match = {"tokens_match_flowsieve": True}
        prompt_tokens = len(ctx_ids) + len(q_ids)
        if n_pos and prompt_tokens + max_new > n_pos:
            raise PeerError(
                f"item {it['item_id']}: the prompt is {prompt_tokens} tokens (+{max_new} new), longer than "
                f"the model's context of {n_pos}"
            )
        # layers=full on a model with sliding-window layers: transformers' own cache layers, so the
        # unpressed sliding layers keep their window; otherwise the pipeline's own DynamicCache()
        cache = DynamicCache(config=model.config) if len(pressed) < n_layers else DynamicCache()
        timer = ForwardTimer(model, cache)
        rss = PeakRSS()
        try:
            if chat:
                out = pipe(context, question=question, press=press, max_new_tokens=max_new, cache=cache)
            else:
                inputs = {"context_ids": torch.tensor([ctx_ids]), "questions_ids": [torch.tensor([q_ids])]}
                answers = pipe.forward(inputs, press=press, max_new_tokens=max_new, cache=cache)
                out = pipe.postprocess(answers, single_question=True)
        except Exception as e:  # the press's own checks (e.g. SnapKV: more tokens than its window)
            traceback.print_exc()
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise PeerError(
                f"kvpress {type(base_press).__name__} cannot run on item {it['item_id']} "
                f"({len(ctx_ids)} compressed + {len(q_ids)} appended tokens, layers={layers}): "
                f"{type(e).__name__}: {why}"
            ) from e
        finally:
            peak = rss.stop()
            timer.remove()
        if len(timer.times) < 2:
            raise PeerError("kvpress ran fewer forward passes than expected (context prefill, question)")
        decode_times = timer.times[2:]
        steps = len(decode_times)
        # the press's count: the largest on a pressed layer (unpressed sliding layers hold their window)
        kept_context = max(timer.per_layer_context[i] for i in pressed)
        kept = max(timer.per_layer[i] for i in pressed)
        extra = dict(common)
        extra.update(match)
        extra.update(
            {
                "context_tokens": len(ctx_ids),
                "question_tokens": len(q_ids),
                "kept_context_tokens": kept_context,
                # layer-wise presses keep different counts per layer; kept_tokens is the largest
                "kept_tokens_mean_per_layer": round(sum(timer.per_layer) / len(timer.per_layer), 1),
                "stored_per_layer": timer.per_layer,
                "kv_bytes_context": timer.kv_after[0],
                "context_prefill_s": round(timer.times[0], 4),
                "question_prefill_s": round(timer.times[1], 4),
            }
        )
        if sliding:
            full_layers = [i for i in range(len(timer.per_layer)) if i not in sliding]
            extra["kv_bytes_sliding_layers"] = sum(timer.bytes_per_layer[i] for i in sliding)
            extra["kv_bytes_full_attention_layers"] = sum(timer.bytes_per_layer[i] for i in full_layers)
            # measured, not assumed: whether the press pruned the sliding layers of this prompt (fewer
            # entries after the context than the cache layer keeps unpressed: all, or its window)
            extra["sliding_layers_compressed"] = all(
                timer.per_layer_context[i] < unpressed_entries(cache.layers[i], len(ctx_ids)) for i in sliding
            )
        if method in LAYERWISE:
            extra["layer_budgets"] = layer_budgets([timer.per_layer_context[i] for i in pressed])
        if type(base_press).__name__ == "AdaKVPress":
            from kvpress.utils import compute_n_kept

            extra["headwise"] = "AdaKV masks entries per head; the cache keeps all entries"
            extra["kept_per_head_on_average"] = int(compute_n_kept(len(ctx_ids), ratio))
        rows.append(
            {
                "item_id": it["item_id"],
                "prediction": out["answer"],
                "prompt_tokens": prompt_tokens,
                "kept_tokens": kept,
                "kv_bytes": timer.kv_after[1],
                "kv_bytes_full": full_kv_bytes(model.config, prompt_tokens, elt),
                "peak_rss_mb": round(peak, 1),
                "prefill_s": round(timer.times[0] + timer.times[1], 4),
                "decode_tok_s": round(steps / sum(decode_times), 3)
                if steps and sum(decode_times) > 0
                else 0.0,
                "new_tokens": steps + 1,
                "extra": extra,
            }
        )
        log(f"{n}/{len(items)} {it['item_id']}: {out['answer'][:60]!r}")
    for h in rope_hooks + mask_hooks:
        h.remove()
    return rows


if __name__ == "__main__":
    main(run)
