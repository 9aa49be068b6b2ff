"""KV sieves on needle-in-a-haystack items: accuracy, memory and time per method and keep ratio.

Items come from the ``needle`` task (Paul Graham's essays as shipped with NVIDIA's RULER data, a
short fact inserted at a spread of depths). Every (item, method, keep) cell is one greedy
generation on the bundled model; rows are appended to a JSONL file as they finish, so a killed run
resumes where it stopped (cells already in the file are skipped). The full-context run of each
item is the reference: ``hit ratio`` = hits of a method / hits of the full context, and time and
memory ratios are against the same item's full run.

Usage: .venv/bin/python benchmarks/kv_needle.py --lengths 2000,4000 --items 6 --keeps 0.5,0.25,0.1 \
           --methods streamingllm,h2o,snapkv,tova,flowcut --out out/kv_needle.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path


def run(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    import flowsieve
    from flowsieve.bench import get_task
    from flowsieve.generate import generate
    from flowsieve.sieve import Sieve

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["item_id"], r["method"], r["keep"], r["mode"]))
    model, tok = flowsieve.load(a.model)
    methods = [m for m in a.methods.split(",") if m]
    keeps = [float(k) for k in a.keeps.split(",")]
    modes = a.modes.split(",")
    cells = []
    for length in [int(x) for x in a.lengths.split(",")]:
        task = get_task("needle", length=length)
        for it in task.items(tok, a.items, seed=a.seed):
            for mode in modes:
                cells.append((task, it, length, "full", 1.0, mode))
                cells += [(task, it, length, m, k, mode) for m in methods for k in keeps]
    todo = [c for c in cells if (c[1].item_id, c[3], c[4], c[5]) not in done]
    print(f"{len(cells)} cells, {len(cells) - len(todo)} already done", flush=True)
    from tqdm import tqdm

    with out.open("a") as f:
        for task, it, length, method, keep, mode in tqdm(todo, desc="cells"):
            sieve = None if method == "full" else Sieve(method, keep=keep, window=a.window)
            t0 = time.perf_counter()
            r = generate(
                model, tok, it.context, it.question, sieve=sieve, mode=mode, max_new_tokens=a.max_new_tokens
            )
            row = {
                "item_id": it.item_id,
                "length": length,
                "depth": it.meta.get("depth"),
                "method": method,
                "keep": keep,
                "mode": mode,
                "prediction": r.text,
                "score": task.score(it, r.text),
                "prompt_tokens": r.prompt_tokens,
                "kept_tokens": r.kept_tokens,
                "kv_bytes": r.kv_bytes,
                "kv_bytes_full": r.kv_bytes_full,
                "prefill_s": r.prefill_s,
                "decode_tok_s": r.decode_tok_s,
                "peak_rss_mb": r.peak_rss_mb,
                "wall_s": time.perf_counter() - t0,
                "threads": a.threads,
            }
            f.write(json.dumps(row) + "\n")
            f.flush()
    summarize(out)


def summarize(path: Path) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    full = {(r["item_id"], r["mode"]): r for r in rows if r["method"] == "full"}
    cell: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "full":
            cell[(r["mode"], r["length"], r["method"], r["keep"])].append(r)
    print("\nmode           length method        keep  hits  full-hits  hit-ratio  kv-ratio  prefill-ratio")
    for key in sorted(cell, key=lambda k: (k[0], k[1], k[2], -k[3])):
        rs = cell[key]
        refs = [full[(r["item_id"], r["mode"])] for r in rs if (r["item_id"], r["mode"]) in full]
        hits = sum(r["score"] for r in rs)
        fh = sum(f["score"] for f in refs)
        kv = statistics.mean(r["kv_bytes"] / r["kv_bytes_full"] for r in rs)
        pre = statistics.median(r["prefill_s"] / f["prefill_s"] for r, f in zip(rs, refs))
        ratio = f"{hits / fh:.2f}" if fh else "n/a"
        print(
            f"{key[0]:<14} {key[1]:>6} {key[2]:<13} {key[3]:<5} {hits:>4.0f}/{len(rs):<3} {fh:>5.0f}      {ratio:>6}"
            f"     {kv:.3f}    {pre:.2f}"
        )
    for mode in sorted({r["mode"] for r in rows}):
        fr = [r for r in full.values() if r["mode"] == mode]
        print(f"full context ({mode}): {sum(r['score'] for r in fr):.0f}/{len(fr)} hits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--lengths", default="2000,4000")
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--keeps", default="0.5,0.25,0.1")
    ap.add_argument("--methods", default="streamingllm,h2o,snapkv,tova,flowcut")
    ap.add_argument("--modes", default="query_aware")
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/kv_needle.jsonl")
    ap.add_argument("--summary", action="store_true", help="only print the table of an existing file")
    a = ap.parse_args()
    if a.summary:
        summarize(Path(a.out))
    else:
        run(a)


if __name__ == "__main__":
    main()
