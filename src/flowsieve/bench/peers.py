"""Peer systems run side by side with flowsieve: NVIDIA kvpress and Microsoft LLMLingua.

Each peer runs in its own virtual environment (kvpress needs ``transformers<5.3``, LLMLingua-1 needs
``transformers==4.44``; flowsieve needs 5.24), created once by :func:`ensure_env` under
``.venv-peers/<system>/`` in the repository root and reused afterwards. :func:`run_peer` writes the
items to a JSONL file, runs the peer's runner script (``benchmarks/peers/<system>_runner.py``) with that
environment's python, and reads back one row per item with the same fields flowsieve's own runs
report (:class:`flowsieve.generate.GenResult`). The runners call the peers' public APIs; no peer
code is copied into flowsieve.

Models: both runners load the bundled SmolLM2; kvpress also the bundled Gemma-3-270M
(``PeerSpec.models``; LLMLingua's transformers 4.44 cannot read Gemma-3). The GGUF is converted once
inside each peer's environment (a tokenizer must be read by the transformers version that saved it;
Gemma-3's tokenizer is the one flowsieve's transformers converts, see ``benchmarks/peers/_common.py``).

Gemma-3 and kvpress (option ``layers``, spelled ``snapkv@layers=all``): kvpress 0.5.5 presses every
layer of a text-only ``Gemma3ForCausalLM``, its sliding-window layers included (it leaves them out for
the multimodal Gemma-3 only); measured on gemma3-270m that gave degenerate answers and a cache larger
than the uncompressed one. Our adaptation, the default ``layers=full``, presses only the full-attention
layers (through kvpress's ``PerLayerCompressionPress`` with ratio 0 on the sliding-window layers; AdaKV
through a small wrapper in the runner), keeps transformers' sliding-window cache layers (at most the
window) and fixes the question's mask on the pressed layers; see ``benchmarks/peers/kvpress_runner.py``.
``layers=all`` is kvpress as shipped. SmolLM2 has full-attention layers only: both are the same there.
Rows record the choice (``extra["layers"]``, ``extra["pressed_layers"]``).

Prompt: flowsieve's :func:`flowsieve.inputs.build_prompt` with ``chat`` as the sweep has it: the
text ``context + "\\n\\n" + question + "\\nAnswer briefly."`` as one user turn of the chat template
(``chat=True``), or as it is with the tokenizer's special tokens (``chat=False``, e.g. Gemma-3's
``<bos>``); greedy decoding. :func:`run_peer` tokenizes every item with flowsieve's own tokenizer and
hands the token ids to the runner: the kvpress runner runs a plain prompt on exactly those ids (and
fails if its own tokenizer disagrees); rows say whether the peer's tokens matched
(``extra["tokens_match_flowsieve"]``).

Modes (see each runner's docstring for the details, which are also written into every row's
``extra``):

- kvpress ``query_agnostic``: its ``kv-press-text-generation`` pipeline as shipped, which compresses
  the context's KV cache before the question is seen, then appends the question. ``query_aware``:
  context, question and instruction all go in as kvpress's context with an empty question (what its
  ``evaluate.py`` does with ``compress_questions``), so the press sees the question while it
  compresses, and question tokens can be evicted too. kvpress has no mode that compresses the
  context only while conditioning on the question.
- LLMLingua: ``longllmlingua`` is query-aware by design (question-conditioned ranking and token
  perplexities; it refuses to run without a question), so it runs ``query_aware`` only.
  ``llmlingua`` (LLMLingua-1) scores perplexities without the question in either mode; it is passed
  the question in ``query_aware`` mode and not otherwise, which compresses identically. The
  compressed prompt is answered by the same SmolLM2 inside the runner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flowsieve.bench.peer_envs import (
    MODES,
    PEER_METHODS,
    _locked,
    ensure_env,
    env_python,
    env_ready,
    one_line,
    parse_peer_method,
    peer_method,
    peer_spec,
    peers_dir,
    runner_path,
)
from flowsieve.errors import FlowsieveError, did_you_mean

ROW_FIELDS = (
    "item_id",
    "prediction",
    "prompt_tokens",
    "kept_tokens",
    "kv_bytes",
    "kv_bytes_full",
    "peak_rss_mb",
    "prefill_s",
    "decode_tok_s",
    "new_tokens",
    "extra",
)
"""The keys of every row :func:`run_peer` returns."""


# --- items and rows ----------------------------------------------------------------------------------


def item_record(item: Any) -> dict[str, Any]:
    """The JSON-safe fields of a task item the runners read."""
    meta = getattr(item, "meta", None) or {}
    return {
        "task": str(item.task),
        "item_id": str(item.item_id),
        "context": str(item.context),
        "question": str(item.question),
        "answers": [str(a) for a in item.answers],
        "meta": json.loads(json.dumps(meta, default=str)),
    }


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> int:
    """Write one JSON object per line (UTF-8); returns how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by :func:`write_jsonl` (blank lines skipped)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                raise FlowsieveError(f"{path}: line {i} is not JSON ({e})") from e
    return out


def _check_rows(system: str, rows: list[dict[str, Any]], ids: list[str]) -> list[dict[str, Any]]:
    got = [r.get("item_id") for r in rows]
    if got != ids:
        raise FlowsieveError(f"the {system} runner returned rows for {len(got)} items, expected {len(ids)}")
    for r in rows:
        missing = [f for f in ROW_FIELDS if f not in r]
        if missing:
            raise FlowsieveError(f"the {system} runner's row for {r['item_id']} lacks {', '.join(missing)}")
        r["extra"] = dict(r.get("extra") or {})
    return [{f: r[f] for f in ROW_FIELDS} for r in rows]


# --- running -----------------------------------------------------------------------------------------


def _check_args(
    system: str,
    method: str,
    keep: float,
    mode: str,
    max_new_tokens: int,
    threads: int,
    model_name: str,
    chat: bool,
) -> None:
    name, _ = parse_peer_method(system, method)
    spec = peer_spec(system)
    if model_name not in spec.models:
        why = f" ({spec.models_note})" if spec.models_note else ""
        raise FlowsieveError(
            f"{system} runs with the bundled {' and '.join(spec.models)} only, not '{model_name}'{why}"
        )
    if not isinstance(chat, bool):
        raise FlowsieveError(f"chat must be True or False, got {chat!r}")
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise FlowsieveError(f"keep must be a fraction in (0, 1], got {keep!r}")
    if mode not in MODES:
        raise FlowsieveError(
            f"mode must be one of {', '.join(MODES)}, got {mode!r}{did_you_mean(str(mode), MODES)}"
        )
    allowed = peer_spec(system).modes(name)
    if mode not in allowed:
        raise FlowsieveError(f"{system} method {name} runs {' and '.join(allowed)} only, not {mode}")
    for name, v in (("max_new_tokens", max_new_tokens), ("threads", threads)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FlowsieveError(f"{name} must be a positive integer, got {v!r}")


def peer_cache_dir() -> Path:
    """Where the runners keep the bundled models converted by their own transformers (``<cache>/peers``)."""
    from flowsieve.models import cache_dir

    return cache_dir() / "peers"


_TOKENIZERS: dict[str, Any] = {}


def flowsieve_tokenizer(model_name: str) -> tuple[Any, Path]:
    """Flowsieve's tokenizer of bundled ``model_name`` (what its own cells tokenize with) and a directory
    it is saved in (``<cache>/peers/flowsieve-tokenizers/<name>-tf<version>``), converted from the GGUF
    by flowsieve's transformers once. Loaded once per process."""
    from flowsieve.models import bundled_tokenizer, transformers_version

    target = peer_cache_dir() / "flowsieve-tokenizers" / f"{model_name}-tf{transformers_version()}"
    tok = _TOKENIZERS.get(model_name)
    if tok is None:
        tok = bundled_tokenizer(model_name, target)
        _TOKENIZERS[model_name] = tok
    if not (target / "tokenizer_config.json").exists():
        with _locked(target.with_name(target.name + ".lock")):
            if not (target / "tokenizer_config.json").exists():
                tmp = target.with_name(target.name + f".tmp{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                tok.save_pretrained(tmp)
                tmp.rename(target)
    return tok, target


def run_peer(
    system: str,
    items: Sequence[Any],
    method: str,
    keep: float,
    model_name: str = "smollm2",
    mode: str = "query_aware",
    max_new_tokens: int = 32,
    threads: int = 2,
    *,
    chat: bool = True,
    timeout: float | None = None,
    build: bool = True,
) -> list[dict[str, Any]]:
    """Run peer ``system`` with ``method`` at ``keep`` on ``items``; one row per item, in order.

    Args:
        system: ``kvpress`` or ``llmlingua``.
        items: task items (anything with task, item_id, context, question, answers, meta).
        method: our name of the peer's method (``PEER_METHODS[system]``), with options as
            ``name@option=value`` (``PeerSpec.options``; kvpress: ``layers=full`` or ``all``, see the
            module docstring).
        keep: fraction of the context kept (kvpress ``compression_ratio = 1 - keep``; LLMLingua
            ``rate = keep``).
        model_name: the bundled model (``PEERS[system].models``: ``smollm2``; kvpress also
            ``gemma3-270m``).
        mode: ``query_aware`` (question seen while compressing) or ``query_agnostic``.
        max_new_tokens: greedy decoding length limit.
        threads: torch threads in the runner.
        chat: flowsieve's prompt with the chat template (``True``) or plain text with the tokenizer's
            special tokens (``False``; models without a chat template, e.g. gemma3-270m), as
            :func:`flowsieve.inputs.build_prompt` builds it.
        timeout: seconds for the whole run (default: 600 + 600 per item; a guard against hangs:
            LongLLMLingua alone took up to 100 s per 500-token item on a busy 2-core machine).
        build: create the environment when it is missing (else a missing one is an error).

    Returns:
        Rows with the keys :data:`ROW_FIELDS`; ``extra`` holds the peer's version, the exact press or
        compressor settings, the mode as the peer implements it, and any prompt difference from
        flowsieve's.

    Raises:
        FlowsieveError: bad arguments, or the peer could not be set up or run (one readable line).
    """
    _check_args(system, method, keep, mode, max_new_tokens, threads, model_name, chat)
    items = list(items)
    if not items:
        return []
    ids = [str(it.item_id) for it in items]
    if len(set(ids)) != len(ids):
        raise FlowsieveError("item ids must be unique")
    script = runner_path(system)
    if build:
        env = ensure_env(system)
    else:
        env = peers_dir() / system
        if not env_ready(system):
            raise FlowsieveError(
                f"the {system} environment {env} does not exist or is incomplete; create it with "
                f"flowsieve.bench.peers.ensure_env('{system}')"
            )
    from flowsieve.inputs import build_prompt
    from flowsieve.models import BUNDLED

    gguf_dir, gguf_file = BUNDLED[model_name].locate()
    tok, tok_dir = flowsieve_tokenizer(model_name)
    records = []
    for it in items:
        prompt = build_prompt(tok, it.context, it.question, chat=chat, instruction=_instruction())
        records.append(item_record(it) | {"prompt_ids": list(prompt.ids), "prompt_split": prompt.split})
    if timeout is None:
        timeout = 600 + 600 * len(items)
    name, options = parse_peer_method(system, method)
    config = {
        "method": name,
        "method_spec": method,
        "options": options,
        "peer_method": peer_method(system, method),
        "keep": float(keep),
        "mode": mode,
        "max_new_tokens": max_new_tokens,
        "threads": threads,
        "model_name": model_name,
        "chat": chat,
        "tokenizer_dir": str(tok_dir),
        "gguf_dir": str(gguf_dir),
        "gguf_file": gguf_file,
        "cache_dir": str(peer_cache_dir()),
        "instruction": _instruction(),
    }
    with tempfile.TemporaryDirectory(prefix=f"flowsieve-{system}-") as tmp:
        tmpd = Path(tmp)
        write_jsonl(tmpd / "items.jsonl", records)
        (tmpd / "config.json").write_text(json.dumps(config))
        cmd = [
            str(env_python(env)),
            str(script),
            "--items",
            str(tmpd / "items.jsonl"),
            "--config",
            str(tmpd / "config.json"),
            "--out",
            str(tmpd / "rows.jsonl"),
        ]
        proc_env = _runner_env(threads)
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=proc_env,
                stdin=subprocess.DEVNULL,
                cwd=tmp,
            )
        except subprocess.TimeoutExpired as e:
            raise FlowsieveError(
                f"{system} ({method}) did not finish {len(items)} items in {timeout:.0f}s"
            ) from e
        except OSError as e:
            raise FlowsieveError(f"{system} runner could not start: {e}") from e
        if proc.returncode != 0:
            reason = one_line(proc.stderr) or f"exit status {proc.returncode}"
            log_path = _save_log(system, method, proc.stderr)
            where = f" (full log: {log_path})" if log_path else ""
            raise FlowsieveError(f"{system} ({method}) failed: {reason}{where}")
        if not (tmpd / "rows.jsonl").exists():
            raise FlowsieveError(f"{system} ({method}) wrote no results: {one_line(proc.stderr)}")
        rows = read_jsonl(tmpd / "rows.jsonl")
    return _check_rows(system, rows, ids)


def _save_log(system: str, method: str, text: str) -> Path | None:
    """Keep a failed runner's stderr under ``<cache>/peers/logs/`` (the error names the file)."""
    try:
        d = peer_cache_dir() / "logs"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{system}-{method}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(text or "", encoding="utf-8")
        return path
    except OSError:
        return None


def _instruction() -> str:
    from flowsieve.inputs import DEFAULT_INSTRUCTION

    return DEFAULT_INSTRUCTION


def _runner_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        {
            # nothing is downloaded: the runners read the bundled GGUF and their own caches
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads),
            "PYTHONUNBUFFERED": "1",
            "PYTHONNOUSERSITE": "1",
            # keep the runner's stderr (kept as the log of a failure) free of progress bars
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TQDM_DISABLE": "1",
        }
    )
    return env


__all__ = [
    "PEER_METHODS",
    "ROW_FIELDS",
    "ensure_env",
    "flowsieve_tokenizer",
    "item_record",
    "parse_peer_method",
    "peer_cache_dir",
    "read_jsonl",
    "run_peer",
    "write_jsonl",
]
