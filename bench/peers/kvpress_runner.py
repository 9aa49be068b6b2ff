"""Run NVIDIA kvpress on task items (executed with the kvpress venv's python by flowsieve.bench.peers).

kvpress is called through its own ``kv-press-text-generation`` pipeline: it renders the chat template
around the context, prefills the context with the press active (the press prunes each layer's KV
cache right after that layer's attention), then feeds the question and decodes greedily.

Prompt: the pipeline tokenizes ``chat_prefix + context`` and ``question + chat_suffix`` separately and
puts no separator between them, so the question is passed as ``"\\n\\n" + question + "\\nAnswer
briefly."``: the text is then exactly flowsieve's ``build_prompt(..., chat=True)``; whether the
*tokens* match too (separate tokenization at the seam) is checked per item and written to ``extra``.

Modes:
- ``query_agnostic`` is the pipeline as shipped: the context (with the chat template's system prompt
  and user header) is compressed before the question is seen; the question and the assistant header
  are appended to the compressed cache.
- ``query_aware``: context, question and instruction all go in as kvpress's context and the question
  is empty, so the press sees the question while it compresses (kvpress's ``evaluate.py`` does the
  same with its ``compress_questions`` / query-aware option). The question's tokens are then subject
  to eviction too; only the assistant header is appended uncompressed.

Measured per item like flowsieve's ``generate``: prefill seconds (context prefill with the press +
the question forward), decode tokens/s (forward passes after the first new token), KV bytes of the
cache at the start of decoding (compressed context + question) and of the uncompressed prompt, peak
RSS. Head-wise presses (AdaKV) mask entries instead of dropping them: their cache keeps its full size,
as kvpress documents ("does not reduce peak memory"); ``extra`` then gives the per-head kept count.
"""

from __future__ import annotations

import time
from typing import Any

from _common import (
    PeakRSS,
    PeerError,
    compare_ids,
    flowsieve_ids,
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

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def run(items: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
    import torch
    from transformers import DynamicCache, pipeline

    set_threads(cfg["threads"])
    method, keep, mode = cfg["method"], float(cfg["keep"]), cfg["mode"]
    ratio = round(1.0 - keep, 6)
    press = make_press(method, ratio)
    if method in LAYERWISE:
        fit_sdpa_masks()
    attn = "eager" if method == "observed_attention" else "sdpa"  # ObservedAttention reads attention weights
    t0 = time.perf_counter()
    model, tok, model_dir = load_model(cfg, attn_implementation=attn)
    load_s = time.perf_counter() - t0
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
    n_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    instruction = cfg.get("instruction")
    max_new = int(cfg["max_new_tokens"])
    common = {
        "peer": "kvpress",
        "versions": versions("kvpress", "tokenizers"),
        "press": repr(press),
        "press_class": type(press).__name__,
        "compression_ratio": ratio,
        "attn_implementation": attn,
        "model_dir": str(model_dir),
        "load_s": round(load_s, 3),
        "threads": torch.get_num_threads(),
        "mode_detail": (
            "query_aware: context + question + instruction compressed together as kvpress's context "
            "(question tokens can be evicted); only the assistant header is appended"
            if mode == "query_aware"
            else "query_agnostic: kvpress pipeline as shipped, context compressed before the question is seen"
        ),
        "compressed_span": "every token before the question, including the chat template's system prompt and user header",
        "decode_stop": "kvpress stops at generation_config.eos_token_id only",
        "peak_rss": "the runner process (its own libraries and model included), sampled every 5 ms",
        "positions": "question and answer keep their original RoPE positions (kvpress pipeline)",
    }
    if method in LAYERWISE:
        common["mask_fit"] = MASK_FIT
    if getattr(press, "compression_ratio", None) is not None:
        common["compression_ratio"] = float(press.compression_ratio)
    rows = []
    for n, it in enumerate(items, 1):
        tail = question_tail(it["question"], instruction)
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
        prompt_tokens = len(ctx_ids) + len(q_ids)
        if n_pos and prompt_tokens + max_new > n_pos:
            raise PeerError(
                f"item {it['item_id']}: the prompt is {prompt_tokens} tokens (+{max_new} new), longer than "
                f"the model's context of {n_pos}"
            )
        match = compare_ids(flowsieve_ids(tok, it["context"], it["question"], instruction), ctx_ids + q_ids)
        cache = DynamicCache()
        timer = ForwardTimer(model, cache)
        rss = PeakRSS()
        try:
            out = pipe(context, question=question, press=press, max_new_tokens=max_new, cache=cache)
        finally:
            peak = rss.stop()
            timer.remove()
        if len(timer.times) < 2:
            raise PeerError("kvpress ran fewer forward passes than expected (context prefill, question)")
        per_token = full_kv_bytes(model.config, 1, next(model.parameters()).element_size())
        decode_times = timer.times[2:]
        steps = len(decode_times)
        kept_context = timer.stored_after[0]
        extra = dict(common)
        extra.update(match)
        extra.update(
            {
                "context_tokens": len(ctx_ids),
                "question_tokens": len(q_ids),
                "kept_context_tokens": kept_context,
                # layer-wise presses keep different counts per layer; kept_tokens is the largest
                "kept_tokens_mean_per_layer": round(timer.kv_after[1] / per_token, 1),
                "kv_bytes_context": timer.kv_after[0],
                "context_prefill_s": round(timer.times[0], 4),
                "question_prefill_s": round(timer.times[1], 4),
            }
        )
        if type(press).__name__ == "AdaKVPress":
            from kvpress.utils import compute_n_kept

            extra["headwise"] = "AdaKV masks entries per head; the cache keeps all entries"
            extra["kept_per_head_on_average"] = int(compute_n_kept(len(ctx_ids), ratio))
        rows.append(
            {
                "item_id": it["item_id"],
                "prediction": out["answer"],
                "prompt_tokens": prompt_tokens,
                "kept_tokens": timer.stored_after[1],
                "kv_bytes": timer.kv_after[1],
                "kv_bytes_full": full_kv_bytes(
                    model.config, prompt_tokens, next(model.parameters()).element_size()
                ),
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
    return rows


if __name__ == "__main__":
    main(run)
