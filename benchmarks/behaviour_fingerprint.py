"""Fingerprint of what the sieves do, to check that a refactor changes no behaviour.

Runs a fixed sweep on both bundled models (every site, both modes, several methods) and writes,
per cell, what a refactor must not change: the generated tokens, the kept-token counts and cache
bytes, the bench's scores and bits per byte, and the positions every compressed layer keeps after
a prefill-site compression. Timings, RSS and run metadata are left out.

    python benchmarks/behaviour_fingerprint.py out/fingerprint-before.json
    ... refactor ...
    python benchmarks/behaviour_fingerprint.py out/fingerprint-after.json --compare out/fingerprint-before.json

Exit status 1 when ``--compare`` finds a difference (each is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

MODELS = {"smollm2": True, "gemma3-270m": False}  # name -> chat template
QUESTION = "Who kept the lighthouse lamp burning during the storm?"
TEXT = Path(__file__).resolve().parents[1] / "examples" / "lighthouse.txt"
# (method, site, options): a spread of rules (sums, windows, flows, replay, per-layer budgets)
KV_CELLS = [
    ("snapkv", "prefill", {}),
    ("flowcut", "prefill", {}),
    ("flowcut", "prefill", {"kernel": 5}),
    ("h2o", "prefill", {}),
    ("tova", "prefill", {}),
    ("streamingllm", "prefill", {}),
    ("keyformer", "prefill", {}),
    ("pyramid", "prefill", {}),
    ("todre", "prefill", {}),
    ("vflowopt", "prefill", {}),
    ("random", "decode", {}),
    ("kvzip", "prefill", {}),
    ("h2o", "decode", {}),
    ("tova", "decode", {}),
    ("tokenselect", "select", {}),
    ("actqkv", "select", {}),
    ("fastv", "layer", {}),
    ("flowcut", "layer", {}),
    ("pyramid", "layer", {}),
    ("transprune", "layer", {}),
]
EXTRA_SIEVES = [  # Sieve fields beyond method/site
    ("snapkv", {"chunk": 96}),
    ("h2o", {"chunk": 96}),
    ("snapkv", {"units": "sentence"}),
    ("snapkv", {"refeed": True}),
    ("flowcut", {"rows": "window"}),
]
DROP = {"id", "peak_rss_mb", "prefill_s", "decode_tok_s", "versions", "git_hash", "run_id", "created_at"}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def _kept_positions(cache: Any) -> dict[str, str]:
    return {str(i): _digest(cache.layer(i).positions) for i in cache.sieve_layers}


def _build_prompt(tok: Any, chat: bool) -> Any:
    try:
        from flowsieve.inputs import build_prompt
    except ImportError:  # the layout before the site split
        from flowsieve.generate import build_prompt
    return build_prompt(tok, TEXT.read_text(), QUESTION, chat=chat)


def _prefill(model: Any, tok: Any, sieve: Any, mode: str, chat: bool) -> Any:
    try:
        from flowsieve.sites import prefill_cache

        return prefill_cache(model, _build_prompt(tok, chat), sieve, mode, tok, chat).cache
    except ImportError:  # the layout before the site split
        from flowsieve.generate import prefill_with_sieve

        return prefill_with_sieve(model, _build_prompt(tok, chat), sieve, mode, tok, chat)[0]


def direct(name: str, chat: bool) -> dict[str, Any]:
    """Tokens and kept positions through the Python API."""
    from flowsieve import Sieve, load
    from flowsieve.generate import generate, generate_many

    model, tok = load(name)
    text = TEXT.read_text()
    out: dict[str, Any] = {}
    sieves = [(m, dict(site=s, options=o)) for m, s, o in KV_CELLS] + [
        (m, dict(site="prefill", **kw)) for m, kw in EXTRA_SIEVES
    ]
    for mode in ("query_aware", "query_agnostic"):
        for method, kw in sieves:
            if kw.get("refeed") and mode != "query_aware":
                continue
            key = f"{name}/{mode}/{method}/{json.dumps(kw, sort_keys=True)}"
            sieve = Sieve(method, keep=0.25, **kw)
            try:
                r = generate(model, tok, text, QUESTION, sieve=sieve, mode=mode, chat=chat, max_new_tokens=12)
            except Exception as e:
                out[key] = {"error": f"{type(e).__name__}: {e}"}
                continue
            cell: dict[str, Any] = {
                "tokens": r.token_ids,
                "kept": r.kept_tokens,
                "kv_bytes": r.kv_bytes,
                "extra": {k: v for k, v in r.extra.items() if not k.endswith("_s") and k != "chunk"},
            }
            if kw["site"] == "prefill":
                try:
                    cell["positions"] = _kept_positions(
                        _prefill(model, tok, Sieve(method, keep=0.25, **kw), mode, chat)
                    )
                except Exception as e:
                    cell["positions"] = {"error": f"{type(e).__name__}: {e}"}
            out[key] = cell
        shared = [Sieve(m, keep=0.25) for m in ("snapkv", "flowcut", "h2o", "tova", "keyformer")]
        try:
            res = generate_many(model, tok, text, QUESTION, shared, mode=mode, chat=chat, max_new_tokens=12)
            out[f"{name}/{mode}/generate_many"] = [[r.token_ids, r.kept_tokens, r.kv_bytes] for r in res]
        except Exception as e:
            out[f"{name}/{mode}/generate_many"] = {"error": f"{type(e).__name__}: {e}"}
    # Sieve.on inside model.generate (query-aware: the question is the protected tail)
    prompt = _build_prompt(tok, chat)
    ids = torch.tensor([prompt.ids])
    for method, site in (
        ("snapkv", "prefill"),
        ("h2o", "decode"),
        ("tokenselect", "select"),
        ("fastv", "layer"),
    ):
        try:
            sieve = Sieve(method, keep=0.25, site=site)
            with sieve.on(model, protect_last=len(prompt) - prompt.split):
                g = model.generate(ids, max_new_tokens=8, do_sample=False)
            out[f"{name}/on/{method}/{site}"] = g[0, ids.shape[1] :].tolist()
        except Exception as e:
            out[f"{name}/on/{method}/{site}"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def bench_rows(name: str, chat: bool, db: Path) -> dict[str, Any]:
    """A small bench sweep through the CLI (runner, shared prefill, LM task, prompt site)."""
    exe = Path(sys.executable).parent / "flowsieve"
    common = [str(exe), "bench", "--model", name, "--db", str(db), "--keep", "0.5,0.25", "-q"]
    common += ["--limit", "2", "--max-new-tokens", "12", "--length", "512"]
    if not chat:
        common.append("--no-chat")
    runs = [
        [
            "--methods",
            "snapkv,flowcut,h2o",
            "--sites",
            "prefill",
            "--tasks",
            "needle,lm",
            "--modes",
            "query_aware,query_agnostic",
        ],
        ["--methods", "snapkv,flowcut", "--sites", "prefill", "--tasks", "multi_needle", "--share-prefill"],
        ["--methods", "h2o", "--sites", "decode", "--tasks", "needle,lm"],
        ["--methods", "tokenselect", "--sites", "select", "--tasks", "needle"],
        ["--methods", "fastv,flowcut", "--sites", "layer", "--tasks", "needle"],
        ["--methods", "selfinfo,lexrank", "--sites", "prompt", "--tasks", "needle,lm"],
    ]
    codes = [subprocess.run(common + extra, capture_output=True).returncode for extra in runs]
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    rows = []
    for r in con.execute(
        "SELECT * FROM results ORDER BY model, system, method, site, keep, task, item_id, mode"
    ):
        d = {k: r[k] for k in r.keys() if k not in DROP}
        extra = json.loads(d.pop("extra") or "{}")
        d["extra"] = {k: v for k, v in extra.items() if not str(k).endswith("_s") and "rss" not in k}
        rows.append(d)
    failures = [
        tuple(r)[1:-2]
        for r in con.execute("SELECT * FROM failures ORDER BY model, method, site, keep, task, item_id, mode")
    ]
    return {"exit_codes": codes, "rows": rows, "failures": [list(f) for f in failures]}


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{path}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
    elif a != b:
        out.append(f"{path}: {a!r} -> {b!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--compare", type=Path, help="an earlier fingerprint to compare with")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, chat in MODELS.items():
            result.update(direct(name, chat))
            result[f"{name}/bench"] = bench_rows(name, chat, Path(tmp) / f"{name}.sqlite")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"{len(result)} entries -> {args.out}")
    if args.compare:
        diffs: list[str] = []
        _diff(json.loads(args.compare.read_text()), json.loads(args.out.read_text()), "", diffs)
        for d in diffs:
            print(d)
        print(f"{len(diffs)} differences")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
