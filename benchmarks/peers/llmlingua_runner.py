"""Run Microsoft LLMLingua on task items (executed with the llmlingua venv's python by flowsieve.bench.peers).

LLMLingua-1 and LongLLMLingua (``PromptCompressor.compress_prompt`` with ``rank_method`` "llmlingua"
or "longllmlingua") use the bundled SmolLM2 as their scoring model; the same model then answers the
compressed prompt inside this runner (one process, one model load), with flowsieve's prompt format
(``compressed context + "\\n\\n" + question + "\\nAnswer briefly."``: one user turn of the chat
template with ``chat=True``, plain text with the tokenizer's special tokens with ``chat=False``) and
greedy decoding measured like flowsieve's ``generate``. ``prompt_tokens`` is the length of flowsieve's
uncompressed prompt (the ids flowsieve's tokenizer gave, handed over with each item). The compressed context is also returned in
``extra`` so a caller can answer it with another harness.

Three conditions make LLMLingua-1 run offline here: transformers 4.44 (v5 breaks its tuple-cache
code); a SmolLM2 directory whose tokenizer was saved by that same version (converted from the GGUF
in this venv and cached); and ``tiktoken.encoding_for_model`` replaced before ``PromptCompressor`` is
built (it would download OpenAI's encoding; it only counts tokens, so the model's tokenizer counts
them instead, which makes LLMLingua's token counts SmolLM2 tokens).

Budget: ``keep`` applies to the context alone: ``rate=keep`` and ``target_token = round(keep ×
context tokens)`` (LLMLingua otherwise counts the question into the budget it scales). The context
goes in as LLMLingua's list of documents: its blank-line paragraphs; for LongLLMLingua a context
without paragraphs is cut into runs of whole sentences of about ``chunk_tokens`` tokens, since its
coarse, question-ranked stage needs documents to rank. LLMLingua rejoins documents with blank lines.

Modes: LongLLMLingua is query-aware by design (question-conditioned document ranking and token
perplexities; it refuses to run without a question), so it runs ``query_aware`` only. LLMLingua-1
scores perplexities without the question (``condition_in_question="none"``): it gets the question in
``query_aware`` mode, but both modes compress identically.
"""

from __future__ import annotations

import re
import time
from typing import Any

from _common import (
    PeakRSS,
    PeerError,
    chat_text,
    compare_ids,
    converted_model_dir,
    eos_ids,
    flowsieve_ids,
    full_kv_bytes,
    kv_bytes,
    log,
    main,
    question_tail,
    set_threads,
    stored_tokens,
    versions,
)

CHUNK_TOKENS = 100
LONGLLMLINGUA = {  # the LongLLMLingua recipe of LLMLingua's README
    "condition_in_question": "after_condition",
    "reorder_context": "sort",
    "dynamic_context_compression_ratio": 0.3,
    "condition_compare": True,
    "context_budget": "+100",
    "rank_method": "longllmlingua",
}
LLMLINGUA = {"rank_method": "llmlingua"}  # LLMLingua-1: compress_prompt's defaults otherwise


class ModelTokenCounter:
    """Stands in for tiktoken's encoding: LLMLingua only calls ``encode`` to count tokens."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def patch_tiktoken(tokenizer: Any) -> None:
    import tiktoken

    counter = ModelTokenCounter(tokenizer)
    tiktoken.encoding_for_model = lambda *a, **k: counter  # type: ignore[assignment]


def split_documents(context: str, count: Any, method: str, chunk_tokens: int = CHUNK_TOKENS) -> list[str]:
    """The context as LLMLingua's list of documents (see the module docstring)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", context.strip()) if p.strip()]
    if len(paras) > 1 or method != "longllmlingua":
        return paras
    sentences = re.split(r"(?<=[.!?])\s+", paras[0]) if paras else []
    docs: list[str] = []
    cur: list[str] = []
    n = 0
    for s in sentences:
        cur.append(s)
        n += count(s)
        if n >= chunk_tokens:
            docs.append(" ".join(cur))
            cur, n = [], 0
    if cur:
        docs.append(" ".join(cur))
    return docs


def greedy(model: Any, tok: Any, ids: list[int], max_new: int, eos: set[int]) -> dict[str, Any]:
    """Prefill + greedy decoding with flowsieve's measurements (logits only at the last position)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.model(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True)
        logits = model.lm_head(out.last_hidden_state[:, -1:])
        prefill_s = time.perf_counter() - t0
        cache = out.past_key_values
        kv, kept = kv_bytes(cache), stored_tokens(cache)
        new = [int(logits[0, -1].argmax())]
        t1 = time.perf_counter()
        while new[-1] not in eos and len(new) < max_new:
            out = model.model(input_ids=torch.tensor([[new[-1]]]), past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            new.append(int(model.lm_head(out.last_hidden_state[:, -1:])[0, -1].argmax()))
        dec_s = time.perf_counter() - t1
    steps = len(new) - 1
    return {
        "text": tok.decode(new, skip_special_tokens=True),
        "new_tokens": len(new),
        "prefill_s": prefill_s,
        "decode_tok_s": steps / dec_s if steps > 0 and dec_s > 0 else 0.0,
        "kv_bytes": kv,
        "kept_tokens": kept,
    }


def run(items: list[dict[str, Any]], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoTokenizer

    set_threads(cfg["threads"])
    method, keep, mode = cfg["method"], float(cfg["keep"]), cfg["mode"]
    chat = bool(cfg.get("chat", True))
    if method not in ("llmlingua", "longllmlingua"):
        raise PeerError(f"llmlingua runner has no method '{method}'; known: llmlingua, longllmlingua")
    if method == "longllmlingua" and mode != "query_aware":
        raise PeerError("LongLLMLingua needs the question while compressing; it runs query_aware only")
    t0 = time.perf_counter()
    model_dir = converted_model_dir(cfg)
    patch_tiktoken(AutoTokenizer.from_pretrained(model_dir))
    from llmlingua import PromptCompressor

    compressor = PromptCompressor(
        model_name=str(model_dir), device_map="cpu", model_config={"trust_remote_code": False}
    )
    model, tok = compressor.model, compressor.tokenizer
    model.eval()
    load_s = time.perf_counter() - t0
    settings = dict(LONGLLMLINGUA if method == "longllmlingua" else LLMLINGUA)
    instruction = cfg.get("instruction")
    max_new = int(cfg["max_new_tokens"])
    eos = eos_ids(model, tok)
    n_pos = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    elt = next(model.parameters()).element_size()

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    common = {
        "peer": "llmlingua",
        "versions": versions("llmlingua", "tokenizers"),
        "variant": "LongLLMLingua" if method == "longllmlingua" else "LLMLingua-1",
        "compressor_model": f"{cfg.get('model_name', 'smollm2')} ({model_dir})",
        "answered_by": (
            "the same model in this runner (transformers 4.44), flowsieve's "
            + ("chat prompt" if chat else "plain prompt (chat=False)")
            + ", greedy"
        ),
        "chat": chat,
        "load_s": round(load_s, 3),
        "threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "mode_detail": (
            "question conditions the compression"
            if method == "longllmlingua"
            else (
                "LLMLingua-1 scores perplexity without the question (condition_in_question='none'); "
                + ("the question is passed" if mode == "query_aware" else "the question is withheld")
            )
        ),
        "peak_rss": "the runner process (its own libraries and model included), sampled every 5 ms",
        "token_counter": "tiktoken.encoding_for_model replaced by the model's tokenizer",
    }
    rows = []
    for n, it in enumerate(items, 1):
        context, question = it["context"].strip(), it["question"].strip()
        full_ids = [int(i) for i in it["prompt_ids"]]  # flowsieve's own tokenizer
        match = compare_ids(full_ids, flowsieve_ids(tok, context, question, instruction, chat=chat))
        ctx_tokens = count(context)
        docs = split_documents(context, count, method)
        target = max(1, round(keep * ctx_tokens))
        kwargs = dict(
            settings,
            instruction="",
            question=question if mode == "query_aware" else "",
            rate=keep,
            target_token=target,
            concate_question=False,
        )
        rss = PeakRSS()
        try:
            t1 = time.perf_counter()
            res = compressor.compress_prompt(docs, **kwargs)
            compress_s = time.perf_counter() - t1
            compressed = res["compressed_prompt"].strip()
            if not compressed:
                raise PeerError(f"item {it['item_id']}: LLMLingua returned an empty prompt")
            text = compressed + question_tail(question, instruction)
            if chat:
                text = chat_text(tok, text)
            ids = list(tok(text, add_special_tokens=not chat)["input_ids"])
            if n_pos and len(ids) + max_new > n_pos:
                raise PeerError(
                    f"item {it['item_id']}: the compressed prompt is {len(ids)} tokens (+{max_new} new), "
                    f"longer than the model's context of {n_pos}"
                )
            gen = greedy(model, tok, ids, max_new, eos)
        finally:
            peak = rss.stop()
        kept_ctx = count(compressed)
        extra = dict(common)
        extra.update(match)
        extra.update(
            {
                "settings": {k: v for k, v in kwargs.items() if k != "question"},
                "question_passed": bool(kwargs["question"]),
                "documents": len(docs),
                "context_tokens": ctx_tokens,
                "kept_context_tokens": kept_ctx,
                "achieved_context_rate": round(kept_ctx / ctx_tokens, 4) if ctx_tokens else None,
                "compress_s": round(compress_s, 4),
                "time_to_first_token_s": round(compress_s + gen["prefill_s"], 4),
                "compressed_context": compressed,
                "llmlingua_result": {
                    k: res[k] for k in ("origin_tokens", "compressed_tokens", "rate") if k in res
                },
            }
        )
        rows.append(
            {
                "item_id": it["item_id"],
                "prediction": gen["text"],
                "prompt_tokens": len(full_ids),
                "kept_tokens": gen["kept_tokens"],
                "kv_bytes": gen["kv_bytes"],
                "kv_bytes_full": full_kv_bytes(model.config, len(full_ids), elt),
                "peak_rss_mb": round(peak, 1),
                "prefill_s": round(gen["prefill_s"], 4),
                "decode_tok_s": round(gen["decode_tok_s"], 3),
                "new_tokens": gen["new_tokens"],
                "extra": extra,
            }
        )
        log(
            f"{n}/{len(items)} {it['item_id']}: kept {kept_ctx}/{ctx_tokens} context tokens; {gen['text'][:60]!r}"
        )
    return rows


if __name__ == "__main__":
    main(run)
