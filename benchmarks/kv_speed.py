"""Prefill cost, decode speed and peak memory of KV sieves against the full cache, measured in one run.

Each measurement runs in a fresh child process (so its peak RSS is its own). The child loads the
model, builds one ``needle`` item of ``--tokens`` tokens (Paul Graham's essays as shipped with
NVIDIA's RULER data), then

- ``plain``: prefills the prompt into a stock cache (SDPA);
- ``METHOD``: prefills while observing what the method needs, scores and shrinks the cache to
  ``--keep`` (``--mode``, query-aware by default; one pass); ``default`` is the mode's default sieve;
- ``METHOD#chunk``: the same in chunks of ``--chunk`` tokens, compressing after each chunk, so the
  cache never holds more than budget + chunk entries;

and then decodes exactly ``--decode`` greedy tokens (end-of-sequence ignored, so every job does
the same number of steps). Jobs alternate, ``--repeats`` times each; medians are reported with
ratios against ``plain``: prefill time (target <= 1.10), decode tokens/s, KV bytes and peak RSS
(total, and above the loaded model).

Usage: .venv/bin/python benchmarks/kv_speed.py --tokens 4096 --methods snapkv,flowcut,h2o \\
           [--keep 0.25] [--mode query_agnostic] [--chunk 512] [--decode 64] [--threads 2] \\
           [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(job: str, a: argparse.Namespace) -> dict:
    import psutil
    import torch

    torch.set_num_threads(a.threads)
    import flowsieve
    from flowsieve.bench.tasks import get_task
    from flowsieve.generate import PeakRSS
    from flowsieve.inputs import build_prompt
    from flowsieve.kvcache import kv_bytes
    from flowsieve.sieve import Sieve
    from flowsieve.sites import prefill_cache

    model, tok = flowsieve.load(a.model)
    item = get_task("needle", length=a.tokens).items(tok, 1, 0)[0]
    chat = getattr(tok, "chat_template", None) is not None  # base models (gemma3-270m): plain text
    prompt = build_prompt(tok, item.context, item.question, chat=chat)
    with torch.inference_mode():  # page the (memory-mapped) weights in and warm the kernels
        model(input_ids=torch.tensor([prompt.ids[:64]]), use_cache=False, logits_to_keep=1)
    base = psutil.Process().memory_info().rss / 2**20
    rss = PeakRSS()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if job == "plain":
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            logits = model(
                input_ids=torch.tensor([prompt.ids]), cache=cache, use_cache=True, logits_to_keep=1
            ).logits
        else:
            from flowsieve.bench.config import parse_method

            method, _, chunk = job.partition("#")
            name, options = parse_method(method)
            units = options.pop("units", "token")  # Sieve settings, not scorer options
            refeed = bool(options.pop("refeed", False))
            sieve = Sieve(
                name,
                keep=a.keep,
                chunk=int(chunk) if chunk else None,
                options=options,
                units=units,
                refeed=refeed,
            )
            pre = prefill_cache(model, prompt, sieve, a.mode, tok, chat)
            cache, logits = pre.cache, pre.logits
        prefill_s = time.perf_counter() - t0
        prefill_peak = rss.stop()
        kv = kv_bytes(cache)
        nxt = int(logits[0, -1].argmax())
        t1 = time.perf_counter()
        for _ in range(a.decode):
            logits = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True).logits
            nxt = int(logits[0, -1].argmax())
        decode_s = time.perf_counter() - t1
    return {
        "job": job,
        "tokens": len(prompt),
        "prefill_s": prefill_s,
        "decode_tok_s": a.decode / decode_s,
        "kv_bytes": kv,
        "rss_base_mb": base,
        "rss_peak_mb": prefill_peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--methods", default="snapkv,flowcut,h2o")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--mode", default="query_aware", choices=("query_aware", "query_agnostic"))
    ap.add_argument("--chunk", type=int, default=512, help="also run the first method chunked (0: no)")
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    methods = [m for m in a.methods.split(",") if m]
    jobs = ["plain", *methods] + ([f"{methods[0]}#{a.chunk}"] if a.chunk and methods else [])
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    for r in range(a.repeats):
        for job in jobs if r % 2 == 0 else jobs[::-1]:
            args = [sys.executable, __file__, "--child", job]
            for k in ("model", "tokens", "keep", "mode", "decode", "threads"):
                args += [f"--{k}", str(getattr(a, k))]
            proc = subprocess.run(args, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{job} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[job].append(row)
            print(
                f"  {job:<16} prefill {row['prefill_s']:6.2f} s  decode {row['decode_tok_s']:6.1f} tok/s  "
                f"KV {row['kv_bytes'] / 2**20:6.1f} MiB  peak RSS {row['rss_peak_mb']:.0f} MB "
                f"(+{row['rss_peak_mb'] - row['rss_base_mb']:.0f})",
                flush=True,
            )

    def med(job: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[job])

    def over(job: str) -> float:
        return statistics.median(x["rss_peak_mb"] - x["rss_base_mb"] for x in runs[job])

    summary = {"settings": vars(a) | {"json": str(a.json) if a.json else None}, "jobs": {}}
    print(
        f"\nmodel {a.model}, {runs['plain'][0]['tokens']} prompt tokens, keep {a.keep}, "
        f"{a.decode} decode steps, {a.threads} threads, {a.repeats} runs each (medians)"
    )
    print(
        f"{'job':<16} {'prefill s':>9} {'x plain':>8} {'tok/s':>7} {'x plain':>8} {'KV x':>6} "
        f"{'peak MB':>8} {'+MB':>6} {'+MB x':>6}"
    )
    for job in jobs:
        d = {
            "prefill_s": med(job, "prefill_s"),
            "decode_tok_s": med(job, "decode_tok_s"),
            "kv_bytes": med(job, "kv_bytes"),
            "rss_peak_mb": med(job, "rss_peak_mb"),
            "rss_over_model_mb": over(job),
        }
        d["prefill_ratio"] = d["prefill_s"] / med("plain", "prefill_s")
        d["decode_ratio"] = d["decode_tok_s"] / med("plain", "decode_tok_s")
        d["kv_ratio"] = d["kv_bytes"] / med("plain", "kv_bytes")
        d["rss_over_model_ratio"] = d["rss_over_model_mb"] / max(over("plain"), 1e-9)
        summary["jobs"][job] = d | {"runs": runs[job]}
        print(
            f"{job:<16} {d['prefill_s']:9.2f} {d['prefill_ratio']:8.2f} {d['decode_tok_s']:7.1f} "
            f"{d['decode_ratio']:8.2f} {d['kv_ratio']:6.2f} {d['rss_peak_mb']:8.0f} "
            f"{d['rss_over_model_mb']:6.0f} {d['rss_over_model_ratio']:6.2f}"
        )
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
