"""Prompt site: selection invariants on tiny random models with a character tokenizer (no download)."""

from __future__ import annotations

import argparse
import itertools
import math

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_bert, tiny_gemma3, tiny_llama
from test_prompt_reference import (
    SUFFIX,
    assert_cut,
    assert_decided,
    ids_of,
    longllmlingua_reference,
    question_nll,
    selfinfo_reference,
    sharp_llama,
)

from flowsieve.errors import FlowsieveError
from flowsieve.methods.prompt import SCORERS
from flowsieve.methods.prompt.base import (
    Scores,
    build_doc,
    paragraph_spans,
    select_units,
    sentence_spans,
    tokenize_spans,
    unit_scores,
    word_units,
)
from flowsieve.methods.prompt.lexrank import lexrank, tfidf_cosine
from flowsieve.methods.prompt.lm import SurprisalStream, _nll
from flowsieve.methods.prompt.selfinfo import gamma_threshold
from flowsieve.sites.prompt import compress_prompt

# ~420 characters: with the character tokenizer, ~420 tokens (tiny models have 256 positions, so the
# LM scorers also exercise the eviction of the oldest compressed tokens)
TEXT = (
    "The lighthouse on Carrow Point had been dark for ninety years. "
    "Each winter the ferry stopped running and the island was alone.\n\n"
    "The keeper was an old sailor named Tobias Wren. He painted the iron rails every spring. "
    "Why did he stay? Nobody knew, and he never said.\n\n"
    "In January a storm came in from the north and the harbour wall cracked in two places. "
    "His niece Mara kept the lamp burning until dawn."
)
SHORT = (
    "The storm came in from the north. Mara kept the lamp lit all night. The wind was loud and "
    "the harbour wall cracked. Tobias slept in his chair. The boats came home at dawn, one by one."
)
QUESTION = "Who kept the lamp burning?"
LM_SCORERS = ["selfinfo", "longllmlingua", "flow"]


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(ch in it for ch in small)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(), CharTokenizer()


def _run(llama, scorer, text=TEXT, question=QUESTION, keep=0.33, **kw):
    model, tok = llama
    if scorer == "flow":
        text = SHORT  # one forward over the whole prompt: stay inside 256 positions
    return compress_prompt(
        text, scorer=scorer, keep=keep, question=question, model=model, tokenizer=tok, **kw
    )


# ------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("keep", [0.2, 0.33, 0.5])
@pytest.mark.parametrize("scorer", [*LM_SCORERS, "lexrank"])
def test_ratio_within_tolerance(llama, scorer, keep):
    r = _run(llama, scorer, keep=keep)
    assert abs(r.ratio - keep) <= 0.03, (r.ratio, keep)
    assert r.kept_tokens == len(r.text)  # character tokenizer: tokens are characters
    assert r.total_tokens == r.kept_mask.numel()
    assert r.kept_tokens == int(r.kept_mask.sum())
    assert r.seconds >= 0 and r.scorer == scorer


@pytest.mark.parametrize("scorer", [*LM_SCORERS, "lexrank"])
def test_order_question_and_forced_tokens(llama, scorer):
    r = _run(llama, scorer, force_words=("Mara",))
    full = (SHORT if scorer == "flow" else TEXT).rstrip() + "\n\n" + QUESTION
    assert _is_subsequence(r.text, full)
    assert r.text.endswith("\n\n" + QUESTION)
    q_tokens = len("\n\n" + QUESTION)
    assert r.kept_mask[-q_tokens:].all()
    ctx = r.text[:-q_tokens]
    src = full[:-q_tokens]
    assert ctx.count("\n") == src.count("\n")
    assert ctx.count("?") == src.count("?")
    assert ctx.count("Mara") == src.count("Mara")
    # word-level scorers keep whole words: every kept word is a word of the source
    if SCORERS.get(scorer).level == "word":
        assert set(ctx.split()) <= set(src.split())


@pytest.mark.parametrize("scorer", [*LM_SCORERS, "lexrank"])
def test_keep_one_is_identity(llama, scorer):
    model, tok = llama
    q = QUESTION if scorer in ("longllmlingua", "flow") else None
    r = compress_prompt(TEXT + "\n", scorer=scorer, keep=1.0, question=q, model=model, tokenizer=tok)
    assert r.text == (TEXT + "\n" if q is None else TEXT + "\n\n" + q)
    assert r.ratio == 1.0 and r.kept_mask.all()


@pytest.mark.parametrize("scorer", ["selfinfo", "longllmlingua"])
def test_keep_below_one_runs_the_scorer_as_the_reference(scorer):
    """Below keep = 1 the scorer runs (the identity above returns before it): the kept tokens are the
    brute-force reference's (test_prompt_reference.py), window after window. The LM head is scaled
    up so that no keep decision is a near-tie."""
    from flowsieve.methods.prompt.longllmlingua import LongLLMLingua
    from flowsieve.methods.prompt.selfinfo import SelfInfo

    model, tok = sharp_llama(), CharTokenizer()
    keep, text = 0.4, SHORT + "\n"
    doc = build_doc(tok, text, QUESTION, keep)
    if scorer == "selfinfo":
        sc, ref = SelfInfo(window=64), selfinfo_reference(model, doc, 64)
    else:
        sc = LongLLMLingua(window=64)
        ref = longllmlingua_reference(model, doc, sc)
    assert_decided(ref.margin, doc.forced)
    scores = sc.score(doc, model)
    assert scores.tier.tolist() == ref.tier and 1 in ref.tier and 2 in ref.tier
    r = compress_prompt(
        text, scorer=scorer, keep=keep, question=QUESTION, model=model, tokenizer=tok, window=64
    )
    assert abs(r.ratio - keep) <= 0.03 and r.text.endswith("\n\n" + QUESTION)
    assert_cut(r.kept_mask[: doc.n_context], ref.tier, ref.priority, doc.forced)


@pytest.mark.parametrize("scorer", [*LM_SCORERS, "lexrank"])
def test_deterministic(llama, scorer):
    a = _run(llama, scorer)
    b = _run(llama, scorer)
    assert a.text == b.text and torch.equal(a.kept_mask, b.kept_mask)


def test_without_question_keeps_text_prefix_order(llama):
    r = _run(llama, "selfinfo", question=None, keep=0.4)
    assert _is_subsequence(r.text, TEXT)
    assert abs(r.ratio - 0.4) <= 0.03


def test_forced_tokens_beyond_budget_are_kept(llama, caplog):
    model, tok = llama
    text = "a?\nb?\nc?\nd?\ne?\nf?\n" * 3
    r = compress_prompt(text, scorer="lexrank", keep=0.1, model=model, tokenizer=tok)
    assert r.text.count("?") == text.count("?") and r.text.count("\n") == text.count("\n")
    assert r.ratio > 0.1 + 0.03
    assert "force-kept" in caplog.text


def test_no_force_tokens(llama):
    model, tok = llama
    r = compress_prompt(TEXT, scorer="lexrank", keep=0.2, model=model, tokenizer=tok, force_tokens=())
    assert abs(r.ratio - 0.2) <= 0.03


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text", ["", "   \n ", None, 3])
def test_empty_text_is_an_error(llama, text):
    model, tok = llama
    with pytest.raises(FlowsieveError, match="empty"):
        compress_prompt(text, scorer="lexrank", model=model, tokenizer=tok)


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "0.3", None])
def test_bad_keep_is_an_error(llama, keep):
    model, tok = llama
    with pytest.raises(FlowsieveError, match="keep"):
        compress_prompt(TEXT, scorer="lexrank", keep=keep, model=model, tokenizer=tok)


def test_unknown_scorer_suggests_a_name(llama):
    model, tok = llama
    with pytest.raises(FlowsieveError, match="did you mean 'selfinfo'"):
        compress_prompt(TEXT, scorer="selfinf", model=model, tokenizer=tok)
    with pytest.raises(FlowsieveError, match="known: distilled, flow, lexrank, longllmlingua, selfinfo"):
        compress_prompt(TEXT, scorer="zzz", model=model, tokenizer=tok)


def test_other_bad_input(llama):
    model, tok = llama
    with pytest.raises(FlowsieveError, match="did you mean 'window'"):
        compress_prompt(TEXT, scorer="selfinfo", model=model, tokenizer=tok, windw=10)
    with pytest.raises(FlowsieveError, match="window must be"):
        compress_prompt(TEXT, scorer="selfinfo", model=model, tokenizer=tok, window=0)
    with pytest.raises(FlowsieveError, match="needs a question"):
        compress_prompt(TEXT, scorer="longllmlingua", model=model, tokenizer=tok)
    with pytest.raises(FlowsieveError, match="question is empty"):
        compress_prompt(TEXT, scorer="lexrank", question="  ", model=model, tokenizer=tok)
    with pytest.raises(FlowsieveError, match="tokenizer"):
        compress_prompt(TEXT, scorer="selfinfo", model=model)
    with pytest.raises(FlowsieveError, match="needs a causal LM"):
        compress_prompt(TEXT, scorer="selfinfo", tokenizer=tok)
    with pytest.raises(FlowsieveError, match="non-empty strings"):
        compress_prompt(TEXT, scorer="lexrank", model=model, tokenizer=tok, force_tokens=("",))
    with pytest.raises(FlowsieveError, match="layer 7 is out of range"):
        compress_prompt(SHORT, scorer="flow", question=QUESTION, model=model, tokenizer=tok, layer=7)
    with pytest.raises(FlowsieveError, match="longer than the model's context"):
        compress_prompt(TEXT, scorer="flow", question=QUESTION, model=model, tokenizer=tok)


# ------------------------------------------------------------------------------ text and selection


@pytest.mark.parametrize("text", [TEXT, " lead", "a  b\n\n\nc ", "x"])
def test_spans_tile_the_text(text):
    ids, spans = tokenize_spans(CharTokenizer(), text)
    assert len(ids) == len(text)
    assert "".join(text[a:b] for a, b in spans) == text
    for parts in (sentence_spans(text), paragraph_spans(text)):
        assert "".join(text[a:b] for a, b in parts) == text


def test_sentences_and_paragraphs():
    text = "Dr. E. B. White wrote. Did he?\nYes! Then\n\nnew paragraph. End"
    s = [text[a:b] for a, b in sentence_spans(text)]
    assert s == ["Dr. E. B. White wrote.", " Did he?", "\nYes!", " Then", "\n\nnew paragraph.", " End"]
    p = [text[a:b] for a, b in paragraph_spans(text)]
    assert p == ["Dr. E. B. White wrote. Did he?\nYes! Then\n\n", "new paragraph. End"]


def test_word_units_group_whole_words():
    text = "ab  cd\nef?"
    _, spans = tokenize_spans(CharTokenizer(), text)
    # a b | ' ' ' ' c d | \n e f ? : spaces go with the word after them
    assert word_units(text, spans).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # ... unless marked separate (a forced line break), or no word follows
    sep = torch.tensor([c == "\n" for c in text])
    assert word_units(text, spans, sep).tolist() == [0, 0, 1, 1, 1, 1, 2, 3, 3, 3]
    _, spans = tokenize_spans(CharTokenizer(), "ab ")
    assert word_units("ab ", spans).tolist() == [0, 0, 1]


def test_select_units_fill_and_forced():
    units = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    pr, tier = unit_scores(Scores(priority=torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0, 0.0, 4.0])), units)
    assert np.allclose(pr, [2.0, 5.0, 0.0, 4.0])
    forced = torch.zeros(7, dtype=torch.bool)
    keep = select_units(units, pr, tier, forced, budget=4)
    assert keep.tolist() == [True, True, True, False, False, False, True]  # 1 + 1 + 2 tokens
    # "stop" ends at the first unit that does not fit; "skip" tries the next
    keep = select_units(units, pr, tier, forced, budget=5, fill="stop")
    assert int(keep.sum()) == 4
    keep = select_units(units, np.array([5.0, 4.0, 3.0, 2.0]), tier, forced, budget=4, fill="skip")
    assert keep.tolist() == [True, True, True, False, False, False, True]
    # a forced token keeps its whole unit, even over the budget
    forced[4] = True
    keep = select_units(units, pr, tier, forced, budget=1)
    assert keep.tolist() == [False, False, False, True, True, True, False]
    # a higher tier beats a higher priority
    pr2, tier2 = unit_scores(
        Scores(priority=torch.arange(7.0), tier=torch.tensor([1, 1, 1, 0, 0, 0, 0])), units
    )
    keep = select_units(units, pr2, tier2, torch.zeros(7, dtype=torch.bool), budget=3)
    assert keep.tolist() == [True, True, True, False, False, False, False]


def test_unit_scores_infinities():
    units = torch.tensor([0, 0, 1, 1, 2])
    pr, _ = unit_scores(Scores(priority=torch.tensor([math.inf, 0.0, -math.inf, 2.0, float("nan")])), units)
    assert pr[0] == math.inf and pr[1] == 2.0 and pr[2] == -math.inf


def test_budget_counts_the_question():
    tok = CharTokenizer()
    doc = build_doc(tok, "abcdefghij", "q?", 0.5)
    assert doc.total == 10 + 2 + 2 and doc.n_context == 10
    assert doc.budget == 7 - 4
    assert doc.forced.sum() == 0


# ----------------------------------------------------------------------------------------- LLMLingua


def test_gamma_threshold_matches_the_rule():
    s = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    assert gamma_threshold(s, 0.4) == 4.0  # floor(0.4 * 5) = 2nd largest
    assert gamma_threshold(s, 0.1) == math.inf
    assert gamma_threshold(s, 1.0) == 1.0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_stream_matches_full_recompute(make):
    """Cached window scoring == scoring prefix + window from scratch, window after window."""
    model = make()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (90,), generator=g).tolist()
    stream = SurprisalStream(model, prefix=[1])
    kept_so_far = [1]
    for w0 in range(0, 90, 30):
        win = ids[w0 : w0 + 30]
        got = stream.score(win)
        seq = kept_so_far + win
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([seq])).logits[0]
        p = len(kept_so_far)
        ref = _nll(logits[p - 1 : -1], torch.tensor(win))
        assert torch.allclose(got, ref, atol=1e-4), (w0, (got - ref).abs().max())
        kept = win[::3]
        stream.accept(kept)
        kept_so_far += kept


def test_stream_evicts_past_the_context():
    model = tiny_llama()
    ids = torch.randint(0, 128, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    stream = SurprisalStream(model, prefix=[], max_positions=64, keep_first=4)
    for w0 in range(0, 300, 20):
        nll = stream.score(ids[w0 : w0 + 20])
        assert torch.isfinite(nll[1:]).all()
        stream.accept(ids[w0 : w0 + 20])  # keep everything: the prefix must be cut
        assert len(stream.committed) + len(stream.pending) <= 64
    with pytest.raises(FlowsieveError, match="does not fit"):
        SurprisalStream(model, prefix=[1] * 10, max_positions=16).score(ids[:20])


def test_selfinfo_budget_controller_drops_paragraphs(llama):
    model, tok = llama
    paragraphs = "\n\n".join(f"Paragraph {i} says something about item {i}." for i in range(8))
    from flowsieve.methods.prompt.selfinfo import SelfInfo

    doc = build_doc(tok, paragraphs, None, 0.2)
    scores = SelfInfo().score(doc, model)
    kept = scores.extra["paragraphs_kept"]
    assert 0 < len(kept) < 8 and kept == sorted(kept)
    assert (scores.tier == 0).any() and (scores.priority[scores.tier == 0] == -math.inf).all()
    r = compress_prompt(paragraphs, scorer="selfinfo", keep=0.2, model=model, tokenizer=tok)
    assert abs(r.ratio - 0.2) <= 0.03


def test_selfinfo_keep_tail_keeps_the_last_partial_window_whole(llama):
    """keep_tail: the ``len % window`` last tokens the ITPC sees are all kept (upstream's loop never
    compresses them); the ratio still meets the budget. Off: that tail is compressed like the rest."""
    model, tok = llama
    from flowsieve.methods.prompt.selfinfo import SelfInfo

    doc = build_doc(tok, TEXT, None, 0.33)
    on = SelfInfo(window=64, keep_tail=True, context_filter=False).score(doc, model)
    off = SelfInfo(window=64, keep_tail=False, context_filter=False).score(doc, model)
    tail = doc.n_context % 64
    assert tail > 0
    assert (on.tier[-tail:] == 3).all() and (on.tier[:-tail] < 3).all()
    assert (off.tier < 3).all() and (off.tier[-tail:] == 1).any()  # the rule rejects some of it
    r = compress_prompt(
        TEXT,
        scorer="selfinfo",
        keep=0.33,
        model=model,
        tokenizer=tok,
        window=64,
        keep_tail=True,
        context_filter=False,
        force_tokens=(),
    )
    assert abs(r.ratio - 0.33) <= 0.03
    assert r.kept_mask[doc.n_context - tail : doc.n_context].all()


# ---------------------------------------------------------------------------------------------- flow


def test_flow_scores_equal_the_trace(llama):
    from flowsieve.methods.prompt.flow import Flow
    from flowsieve.trace import trace

    model, tok = llama
    doc = build_doc(tok, SHORT, QUESTION, 0.3)
    got = Flow().score(doc, model).priority
    ref = torch.tensor(trace(model, tok, SHORT, QUESTION)["scores"]["flow_accumulated"][-1])[: doc.n_context]
    assert torch.allclose(got, ref, rtol=2e-3, atol=1e-6)


# ------------------------------------------------------------------------------------------- lexrank


def test_lexrank_centrality():
    sents = ["cats eat fish", "dogs eat meat", "cats and dogs eat", "quantum chromodynamics lattice"]
    sim = tfidf_cosine(sents)
    assert np.allclose(np.diag(sim)[:4], 1.0) and np.allclose(sim, sim.T)
    p = lexrank(sim, threshold=0.1)
    # the hub is most central; an isolated sentence keeps the uniform 1/S (self-links, as in the paper)
    assert math.isclose(p.sum(), 1.0) and p.argmax() == 2 and math.isclose(p[3], 0.25)
    assert p[0] < 0.25 and p[1] < 0.25
    pc = lexrank(sim, continuous=True)
    assert pc.argmax() == 2


def test_lexrank_keeps_whole_central_sentences(llama):
    model, tok = llama
    text = (
        "Cats eat fish every day. Dogs eat meat every day. Cats and dogs eat every day. "
        "Quantum chromodynamics is hard."
    )
    r = compress_prompt(text, scorer="lexrank", keep=0.3, model=model, tokenizer=tok)
    assert "Cats and dogs eat every day." in r.text


# ----------------------------------------------------------------------------------------- distilled


def _tiny_distilled():
    from flowsieve.methods.prompt.distilled import DistilledHead

    torch.manual_seed(0)
    enc = tiny_bert()
    head = DistilledHead(64 * 2, hidden=16, layers=(1, 2)).eval()
    return {"encoder_model": enc, "encoder_tokenizer": CharTokenizer(), "head_module": head}


@pytest.mark.parametrize("keep", [0.25, 0.5])
def test_distilled_invariants(llama, keep):
    _, tok = llama
    kw = _tiny_distilled()
    r = compress_prompt(
        TEXT, scorer="distilled", keep=keep, question=QUESTION, tokenizer=tok, max_length=40, **kw
    )
    assert abs(r.ratio - keep) <= 0.03
    assert r.text.endswith("\n\n" + QUESTION)
    assert r.text.count("\n") == (TEXT + "\n\n" + QUESTION).count("\n")
    assert set(r.text.split()) <= set((TEXT + " " + QUESTION).split())
    again = compress_prompt(
        TEXT, scorer="distilled", keep=keep, question=QUESTION, tokenizer=tok, max_length=40, **kw
    )
    assert again.text == r.text


def test_distilled_features_chunk_at_words():
    from flowsieve.methods.prompt.distilled import _chunks, encoder_features, word_probabilities

    runs = [0, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    chunks = _chunks(runs, 4)
    assert chunks[0] == (0, 3) and all(b - a <= 4 for a, b in chunks)
    assert sum(b - a for a, b in chunks) == len(runs)
    kw = _tiny_distilled()
    enc, tok, head = kw["encoder_model"], kw["encoder_tokenizer"], kw["head_module"]
    feats, wruns = encoder_features(enc, tok, TEXT, head.layers, max_length=30, batch_size=3)
    assert feats.shape == (len(TEXT), 128) and wruns.numel() == len(TEXT)
    # chunking changes the context each piece sees, not what is returned
    p_small = word_probabilities(head, enc, tok, TEXT, max_length=30)
    p_big = word_probabilities(head, enc, tok, TEXT, max_length=128)
    assert p_small.shape == p_big.shape == (len(TEXT.split()),)
    assert ((p_small >= 0) & (p_small <= 1)).all()


def test_percentile_threshold():
    from flowsieve.methods.prompt.distilled import percentile_threshold

    x = np.arange(100, dtype=float)
    assert percentile_threshold(x, 0.33) == pytest.approx(np.percentile(x, 68))
    assert percentile_threshold(x, 0.0) == pytest.approx(99.0)
    assert percentile_threshold(np.zeros(0), 0.5) == math.inf


def test_head_trains_saves_and_loads(tmp_path):
    from flowsieve.methods.prompt.distilled import (
        TrainConfig,
        classification_stats,
        load_head,
        save_head,
        train_head,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0.8).long()  # imbalanced, separable
    head = train_head(x, y, layers=(-1,), config=TrainConfig(hidden=16, epochs=30, lr=1e-2, batch=64))
    with torch.inference_mode():
        p = head.keep_prob(x)
    stats = classification_stats(p, y)
    assert stats["accuracy"] > 0.9 and stats["auc"] > 0.95
    head.meta["teacher"] = "test"
    path = tmp_path / "head.safetensors"
    save_head(head, path)
    back = load_head(path)
    assert back.layers == (-1,) and back.meta["teacher"] == "test"
    with torch.inference_mode():
        assert torch.allclose(back.keep_prob(x), p)
    with pytest.raises(FlowsieveError, match="no trained head"):
        load_head(tmp_path / "missing.safetensors")
    with pytest.raises(FlowsieveError):
        TrainConfig(epochs=0)


def test_word_labels_from_teacher_mask():
    from flowsieve.methods.prompt.distilled import word_labels

    tok = CharTokenizer()
    doc = build_doc(tok, "ab cd ef", None, 0.5)
    kept = torch.tensor([1, 1, 0, 1, 0, 0, 0, 0], dtype=torch.bool)  # ab | " c" | nothing of ef
    assert word_labels(doc, kept).tolist() == [1.0, 1.0, 0.0]


def test_packaged_head_is_small_and_loads():
    from flowsieve.methods.prompt.distilled import DEFAULT_HEAD, load_head

    assert DEFAULT_HEAD.is_file(), "train it with scripts/train_distilled.py"
    assert DEFAULT_HEAD.stat().st_size < 2 * 1024 * 1024
    head = load_head(DEFAULT_HEAD)
    assert head.meta["encoder"] == "minilm" and head.meta["teacher"] in ("selfinfo", "flow")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_parses_compress():
    from flowsieve.cli.prompt import _setting, add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(
        ["compress", "--scorer", "lexrank", "--keep", "0.5", "--text", "x", "--set", "window=100", "--json"]
    )
    assert args.scorer == "lexrank" and args.keep == 0.5 and args.json and args.set == ["window=100"]
    assert _setting("window=100") == ("window", 100)
    assert _setting("continuous=true") == ("continuous", True)
    assert _setting("head=/tmp/h.safetensors") == ("head", "/tmp/h.safetensors")
    with pytest.raises(FlowsieveError):
        _setting("novalue")


def test_cli_rejects_unknown_scorer_before_loading(capsys):
    from flowsieve.cli.prompt import add_commands

    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers(dest="command"))
    args = p.parse_args(["compress", "--scorer", "lexrnk", "--text", "hello"])
    with pytest.raises(FlowsieveError, match="did you mean 'lexrank'"):
        args.func(args)


# ------------------------------------------------------------------------------------- LongLLMLingua

# one paragraph (no blank line), ~700 characters: the coarse stage must cut it into sentence groups
HAYSTACK = (
    "The river town sat in a narrow valley. Boats came up from the coast every week in summer. "
    "The mill by the bridge ground wheat and barley for three villages. Its wheel was made of oak. "
    "Children fished from the stone steps below the church. The secret code is 4635. "
    "Nobody remembered who had built the old tower on the hill. Its bell rang only at weddings. "
    "In autumn the valley filled with fog, and the carters lit lamps at noon. "
    "The baker opened before dawn and sold out of bread by nine. "
    "Merchants from the north traded wool for salt and dried fish. "
    "A small school stood at the end of the market square, with one teacher and twenty pupils."
)
CODE_QUESTION = "What is the secret code?"


def _lll(**kw):
    from flowsieve.methods.prompt.longllmlingua import LongLLMLingua

    return LongLLMLingua(**kw)


def test_longllmlingua_segments_tile_one_paragraph():
    tok = CharTokenizer()
    doc = build_doc(tok, HAYSTACK, CODE_QUESTION, 0.33)
    seg = 80
    spans = _lll(segment_tokens=seg).segments(doc)
    assert len(spans) > 3
    # contiguous, tiling [0, n)
    assert spans[0][0] == 0 and spans[-1][1] == doc.n_context
    assert all(b0 == a1 for (_, b0), (a1, _) in itertools.pairwise(spans))
    # every cut is at a sentence start; each group closes at the first sentence end past `seg`
    starts = {a for a, _ in sentence_spans(doc.context)}
    ends = {b for _, b in sentence_spans(doc.context)}
    for a, b in spans:
        assert doc.spans[a][0] in starts and doc.spans[b - 1][1] in ends
        inner = [e for e in ends if doc.spans[a][0] < e < doc.spans[b - 1][1]]
        assert all(e - doc.spans[a][0] < seg for e in inner)  # no earlier sentence end reached seg
    assert all(b - a >= seg for a, b in spans[:-1]) and spans[-1][1] - spans[-1][0] >= seg / 2
    # short paragraphs stay whole; a long one among them is cut
    doc = build_doc(tok, TEXT, QUESTION, 0.33)
    paras = paragraph_spans(doc.context)
    assert _lll().segments(doc) == [(a, b) for a, b in paras]  # character tokenizer: tokens == chars
    mixed = TEXT + "\n\n" + HAYSTACK
    doc = build_doc(tok, mixed, QUESTION, 0.33)
    spans = _lll().segments(doc)
    assert spans[:3] == [(a, b) for a, b in paras[:2]] + [(paras[2][0], paras[2][1] + 2)]
    assert len(spans) > 4 and spans[-1][1] == doc.n_context


def test_longllmlingua_dynamic_ratios():
    from flowsieve.methods.prompt.longllmlingua import dynamic_ratios

    shares, tau = dynamic_ratios([100, 100, 100], 0.3, 150)
    assert shares == pytest.approx([0.8, 0.5, 0.2], abs=1e-6) and tau == pytest.approx(0.5, abs=1e-6)
    # linear in rank, best first, summing to the target even when the ends are clipped
    sizes = [50, 120, 80, 100, 60]
    shares, _ = dynamic_ratios(sizes, 0.3, 330)
    assert shares == sorted(shares, reverse=True) and shares[0] == 1.0
    assert sum(r * s for r, s in zip(shares, sizes)) == pytest.approx(330, abs=1e-4)
    steps = np.diff([r for r in shares if 0 < r < 1])
    assert np.allclose(steps, -0.15, atol=1e-6)
    assert dynamic_ratios([40, 60], 0.0, 50)[0] == pytest.approx([0.5, 0.5])
    assert dynamic_ratios([40], 0.3, 10)[0] == pytest.approx([0.25])
    assert dynamic_ratios([40, 60], 0.3, 500)[0] == [1.0, 1.0]


def test_longllmlingua_coarse_keeps_whole_segments_in_rank_order(llama):
    """The real ranking: the mean NLL of question + suffix given the segment, by a full forward."""
    from flowsieve.methods.prompt.longllmlingua import LongLLMLingua

    model, tok = llama
    keep = 0.2
    doc = build_doc(tok, HAYSTACK, CODE_QUESTION, keep, force_tokens=())
    sc = LongLLMLingua(segment_tokens=60)
    spans = sc.segments(doc)
    order = sc.rank_paragraphs(doc, model, spans)
    sep, q = ids_of(tok, "\n\n"), ids_of(tok, CODE_QUESTION + SUFFIX)
    nll = [question_nll(model, doc.context_ids[a:b], sep, q) for a, b in spans]
    assert order == sorted(range(len(spans)), key=lambda i: nll[i])
    scores = sc.score(doc, model)
    kept = scores.extra["segments_kept"]
    # whole segments in rank order until T* + slack is used up (the last one crosses it)
    budget, expect = doc.budget + sc.slack, []
    for i in order:
        expect.append(i)
        budget -= spans[i][1] - spans[i][0]
        if budget < 0:
            break
    assert kept == expect and 0 < len(kept) < len(spans)
    # shares fall with the rank
    assert scores.extra["shares"] == sorted(scores.extra["shares"], reverse=True)
    dropped = [i for i in range(len(spans)) if i not in kept]
    for i in dropped:
        a, b = spans[i]
        assert (scores.tier[a:b] == 0).all() and (scores.priority[a:b] == -math.inf).all()
    for i in kept:
        a, b = spans[i]
        assert (scores.tier[a:b] >= 1).all()
    # in the output, dropped segments are fully absent; text order is kept
    r = compress_prompt(
        HAYSTACK,
        scorer="longllmlingua",
        keep=keep,
        question=CODE_QUESTION,
        model=model,
        tokenizer=tok,
        force_tokens=(),
        segment_tokens=60,
    )
    for i in dropped:
        a, b = spans[i]
        assert not r.kept_mask[a:b].any()
    assert _is_subsequence(r.text, HAYSTACK + "\n\n" + CODE_QUESTION)
    assert abs(r.ratio - keep) <= 0.03


def test_longllmlingua_best_segment_keeps_most(llama):
    from flowsieve.methods.prompt.longllmlingua import LongLLMLingua

    model, tok = llama
    doc = build_doc(tok, HAYSTACK, CODE_QUESTION, 0.33)
    sc = LongLLMLingua(segment_tokens=60, dynamic_ratio=1.0)
    scores = sc.score(doc, model)
    kept, shares = scores.extra["segments_kept"], scores.extra["shares"]
    assert shares[0] == 1.0 and shares[-1] < shares[0]
    # a share of 1 keeps the whole segment, first in the fill
    a, b = scores.extra["segments"][kept[0]]
    assert (scores.tier[a:b] == 2).all() and (scores.priority[a:b] == math.inf).all()
    r = compress_prompt(
        HAYSTACK,
        scorer="longllmlingua",
        keep=0.33,
        question=CODE_QUESTION,
        model=model,
        tokenizer=tok,
        segment_tokens=60,
        dynamic_ratio=1.0,
    )
    assert r.kept_mask[a:b].all()


@pytest.mark.parametrize("keep", [0.1, 0.2, 0.33, 0.5, 0.7])
def test_longllmlingua_ratio_and_forced_on_one_paragraph(llama, keep):
    model, tok = llama
    text = HAYSTACK.replace("fog, and", "fog?\nand")
    r = compress_prompt(
        text,
        scorer="longllmlingua",
        keep=keep,
        question=CODE_QUESTION,
        model=model,
        tokenizer=tok,
        force_words=("4635",),
    )
    assert abs(r.ratio - keep) <= 0.03, (r.ratio, keep)
    assert "4635" in r.text and r.text.endswith("\n\n" + CODE_QUESTION)
    ctx = r.text[: -len("\n\n" + CODE_QUESTION)]
    assert ctx.count("?") == 1 and ctx.count("\n") == 1
    assert _is_subsequence(r.text, text + "\n\n" + CODE_QUESTION)


@pytest.mark.parametrize(
    "kw",
    [
        {"segment_tokens": 0},
        {"segment_tokens": -5},
        {"segment_tokens": 2.5},
        {"segment_tokens": True},
        {"dynamic_ratio": -0.1},
        {"dynamic_ratio": 1.5},
        {"dynamic_ratio": float("nan")},
        {"dynamic_ratio": "0.3"},
        {"slack": -1},
    ],
)
def test_longllmlingua_bad_options(llama, kw):
    model, tok = llama
    with pytest.raises(FlowsieveError, match=next(iter(kw))):
        compress_prompt(
            HAYSTACK, scorer="longllmlingua", question=CODE_QUESTION, model=model, tokenizer=tok, **kw
        )
