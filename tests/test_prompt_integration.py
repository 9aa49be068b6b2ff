"""Prompt site on the bundled SmolLM2 (and MiniLM for ``distilled``): every scorer on a ~1k-token text."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from flowsieve.methods.prompt import SCORERS
from flowsieve.methods.prompt.base import build_doc
from flowsieve.sites.prompt import compress_prompt

pytestmark = pytest.mark.integration

QUESTION = "What does the author say about working on startups?"
FORCE_WORD = "startup"


@pytest.fixture(scope="module")
def essay(smollm2):
    """About 1,000 SmolLM2 tokens of Paul Graham's essays, in paragraphs of eight sentences."""
    from flowsieve.bench.tasks.data import essay_sentences

    _, tok = smollm2
    sents = [s for s in essay_sentences()[2000:2400]]
    paras, cur = [], []
    for s in sents:
        cur.append(s)
        if len(cur) == 8:
            paras.append(" ".join(cur))
            cur = []
        text = "\n\n".join(paras)
        if len(tok(text)["input_ids"]) >= 1000:
            return text
    return "\n\n".join(paras)


@pytest.fixture(scope="module")
def results(smollm2, essay):
    model, tok = smollm2
    torch.set_num_threads(2)
    out = {}
    for name in SCORERS:
        out[name] = compress_prompt(
            essay,
            scorer=name,
            keep=0.33,
            question=QUESTION,
            model=model,
            tokenizer=tok,
            force_words=(FORCE_WORD,),
        )
    return out


@pytest.mark.parametrize("scorer", ["selfinfo", "longllmlingua", "lexrank", "flow", "distilled"])
def test_scorer_on_1k_tokens(smollm2, essay, results, scorer):
    _, tok = smollm2
    r = results[scorer]
    full = essay.rstrip() + "\n\n" + QUESTION
    assert 950 <= r.total_tokens <= 1300
    assert r.total_tokens == len(tok(full, add_special_tokens=False)["input_ids"])
    assert abs(r.ratio - 0.33) <= 0.03, r.ratio
    assert r.kept_tokens == len(tok(r.text, add_special_tokens=False)["input_ids"])
    # the question is whole and last; line breaks, question marks and the forced word survive
    assert r.text.endswith("\n\n" + QUESTION)
    ctx, src = r.text[: -len(QUESTION)], full[: -len(QUESTION)]
    assert ctx.count("\n") == src.count("\n") and ctx.count("?") == src.count("?")
    assert ctx.count(FORCE_WORD) >= src.count(f" {FORCE_WORD} ")
    # order: the text is the kept tokens of the original, in order
    doc = build_doc(tok, essay, QUESTION, 0.33)
    assert doc.assemble(r.kept_mask[: doc.n_context])[0] == r.text
    if SCORERS.get(scorer).level == "word":
        assert set(ctx.split()) <= set(src.split())


def test_scorers_differ(results):
    texts = {name: r.text for name, r in results.items()}
    assert len(set(texts.values())) == len(texts)


def test_compressed_prompt_feeds_another_model(smollm2, results):
    """The output is plain text: another model's tokenizer and forward take it as is."""
    import flowsieve

    enc, etok = flowsieve.load("minilm")
    x = etok(results["selfinfo"].text, return_tensors="pt", truncation=True, max_length=512)
    with torch.inference_mode():
        h = enc(**x).last_hidden_state
    assert h.shape[1] == x["input_ids"].shape[1] and torch.isfinite(h).all()


def test_cli_compress_json(smollm2, essay, tmp_path, capsys):
    from flowsieve.cli.prompt import add_commands

    f = tmp_path / "essay.txt"
    f.write_text(essay, encoding="utf-8")
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(
        [
            *("compress", "--model", "smollm2", "--scorer", "lexrank", "--keep", "0.33"),
            *("--question", QUESTION, "--text-file", str(f), "--json", "--threads", "2"),
        ]
    )
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"text", "kept_tokens", "total_tokens", "ratio", "seconds"} <= set(out)
    assert abs(out["ratio"] - 0.33) <= 0.03 and out["text"].endswith(QUESTION)
