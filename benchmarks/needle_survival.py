"""Which needle tokens survive a KV sieve: per method and keep, the share of the needle sentence's
tokens (and of its answer digits) still in each compressed layer's cache after the prefill
(query-aware: the question is in the prompt; query-agnostic: the context alone is compressed).

This separates two failure causes: the sieve dropped the needle (selection) or kept it and the model
still did not answer (reading). Items are the bench's ``needle`` task; one observed prefill per item is
shared by all methods and keeps (:func:`flowsieve.generate.generate_many` does the same); methods
that replay the context (KVzip) add their own replay passes on a copy of the prefilled cache.

Usage: .venv/bin/python benchmarks/needle_survival.py --model gemma3-270m --no-chat --length 2048 \\
           --items 5 --methods snapkv,flowcut,tova --keeps 0.5,0.25,0.1 [--threads 1] \
           [--mode query_agnostic] [--seed 0]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--items", type=int, default=5)
    ap.add_argument("--methods", default="snapkv,flowcut,tova,pyramid,transprune")
    ap.add_argument("--keeps", default="0.5,0.25,0.1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", default="query_aware", choices=("query_aware", "query_agnostic"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    import flowsieve
    from flowsieve.bench.config import _make_sieve
    from flowsieve.bench.tasks import get_task
    from flowsieve.inputs import build_prompt
    from flowsieve.kvcache import SieveCache
    from flowsieve.observe import observe
    from flowsieve.sieve import Sieve
    from flowsieve.sites.base import units_for
    from flowsieve.sites.prefill import merge_specs, replay_observe

    model, tok = flowsieve.load(a.model)
    chat = not a.no_chat
    task = get_task("needle", length=a.length)
    methods = [m for m in a.methods.split(",") if m]
    keeps = [float(k) for k in a.keeps.split(",")]
    kept: dict[tuple[str, float], list[float]] = {}
    digits: dict[tuple[str, float], list[float]] = {}
    for item in task.items(tok, a.items, a.seed):
        prompt = build_prompt(tok, item.context, item.question, chat=chat)
        pieces = [tok.decode([t]) for t in prompt.ids]  # ASCII prose: pieces concatenate to the text
        text = "".join(pieces)
        ends = list(itertools.accumulate(len(p) for p in pieces))
        value = item.answers[0]
        sentence = next(s for s in item.context.split(". ") if value in s)
        c0 = text.find(sentence)
        d0 = text.find(value, c0)
        if c0 < 0 or d0 < 0:
            raise SystemExit(f"needle of {item.item_id} not found in the rendered prompt")
        span = [i for i, e in enumerate(ends) if e > c0 and e - len(pieces[i]) < c0 + len(sentence)]
        dspan = [i for i, e in enumerate(ends) if e > d0 and e - len(pieces[i]) < d0 + len(value)]
        T = prompt.split if a.mode == "query_agnostic" else len(prompt)
        head = list(prompt.ids[:T])
        c_start, c_end = prompt.context
        w = 32
        win = tuple(range(T - w, T))
        protect = torch.ones(T, dtype=torch.bool)
        protect[c_start:c_end] = False
        protect[T - w :] = True
        sieves = [(m, k, _make_sieve(Sieve, m, k, None, "prefill")) for m in methods for k in keeps]
        layers = SieveCache(model).sieve_layers
        base = SieveCache(model)
        with (
            torch.inference_mode(),
            observe(model, merge_specs([s.observe_spec(win, layers) for _, _, s in sieves])) as obs,
        ):
            model(input_ids=torch.tensor([head]), cache=base, use_cache=True, logits_to_keep=1)
        replays: dict[str, object] = {}
        for m, k, s in sieves:
            cache = base.clone()
            with torch.inference_mode():
                o = obs
                if s.scorer.replays:
                    if m not in replays:
                        replays[m] = replay_observe(model, tok, base.clone(), head, (c_start, c_end), s, chat)
                    o = replays[m]
                s.compress(o, cache, protect, win, k=s.target(T), units=units_for(s, prompt))
            for i in layers:
                pos = cache.layer(i).positions
                for head in pos.reshape(-1, pos.shape[-1]):  # per KV head when heads keep different entries
                    have = set(head.tolist())
                    kept.setdefault((m, k), []).append(sum(p in have for p in span) / len(span))
                    digits.setdefault((m, k), []).append(sum(p in have for p in dspan) / len(dspan))
        print(f"{item.item_id}: needle tokens {span[0]}..{span[-1]} of {T}", flush=True)
    print(
        f"\nmodel {a.model}, {a.items} items of {a.length} tokens, {a.mode}, seed {a.seed}; "
        "mean share kept over items x compressed layers x KV heads"
    )
    print(f"{'method':<18} {'keep':>5} {'needle sentence':>16} {'answer digits':>14}")
    for m in methods:
        for k in keeps:
            print(
                f"{m:<18} {k:>5} {statistics.mean(kept[(m, k)]):16.2f} {statistics.mean(digits[(m, k)]):14.2f}"
            )


if __name__ == "__main__":
    main()
