"""LLMLingua-1 (``selfinfo``) and LongLLMLingua (``longllmlingua``) against brute-force references.

The references follow the papers' rules as the scorers' module docstrings state them, and use
nothing from flowsieve's language-model code: every NLL comes from a full forward of the tiny
random Llama over the whole conditioning sequence (no cache), ``log_softmax`` in float64 and a
gather; thresholds come from sorting the scores; the selection is a plain sort by (tier, priority,
position). The character tokenizer has no BOS, so a text's first token has no prediction (NLL
``inf``).

- LLMLingua-1 ITPC (arXiv 2310.05736): windows of the text are scored by surprisal given the kept
  prefix; ``gamma`` is the ``floor(tau * N)``-th largest score among the ``N`` tokens kept so far
  plus the window's; the window's tokens above ``gamma`` are kept. The budget controller ranks
  paragraphs by mean NLL, highest first.
- LongLLMLingua (arXiv 2310.06839): the fine score is the contrastive perplexity
  ``s_i = NLL(x_i | x_<i) - NLL(x_i | question, x_<i)`` (higher: the question helps predict the
  token, kept first); the coarse stage ranks segments by the mean NLL of the question (plus the
  fixed suffix) given the segment, lowest first, and keeps whole segments in that order until the
  budget ``T* + slack`` is used up.

The LM head is scaled up so that NLLs spread over a few nats (at the random initialisation every
prediction is near uniform and the keep rules would be decided by rounding).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CharTokenizer, tiny_llama

from flowsieve.prompt import compress_prompt
from flowsieve.prompt.base import SEPARATOR, build_doc
from flowsieve.prompt.longllmlingua import QUESTION_SUFFIX, LongLLMLingua, dynamic_ratios
from flowsieve.prompt.selfinfo import SelfInfo

INF = math.inf
QUESTION = "Who kept the lamp burning?"
ONE_PARAGRAPH = (
    "The keeper was an old sailor named Tobias Wren. Why did he stay? His niece Mara kept the "
    "lamp burning until dawn, and the boats came home one by one."
)
PARAGRAPHS = "\n\n".join(
    [
        "The ferry stopped running every winter.",
        "Mara kept the lamp burning until dawn.",
        "The harbour wall cracked in two places.",
        "Tobias painted the iron rails each spring.",
        "Fog filled the valley and carters lit lamps.",
    ]
)


@pytest.fixture(scope="module")
def lm():
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model, CharTokenizer()


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------ references


@torch.no_grad()
def nll_given(model, prefix: list[int], tokens: list[int]) -> list[float]:
    """NLL of each of ``tokens`` given ``prefix`` and the tokens before it, by one full forward."""
    seq = list(prefix) + list(tokens)
    logp = torch.log_softmax(model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].double(), -1)
    out = []
    for j, t in enumerate(tokens):
        pos = len(prefix) + j
        out.append(INF if pos == 0 else -float(logp[pos - 1, t]))
    return out


def kth_largest(pool: list[float], ratio: float) -> float:
    """The ``floor(ratio * N)``-th largest of the pool (1-based), ``inf`` when that is below 1."""
    k = math.floor(ratio * len(pool))
    return sorted(pool, reverse=True)[k - 1] if k >= 1 else INF


def segment_threshold(pool: list[float], ratio: float) -> float:
    """LongLLMLingua's per-segment threshold: ``-inf`` for a share of 1, else the ``floor(r * N)``-th
    largest score, or the largest finite score when that threshold would let nothing finite pass."""
    if ratio >= 1.0:
        return -INF
    g = kth_largest(pool, ratio)
    if math.isinf(g):
        g = max((v for v in pool if math.isfinite(v)), default=0.0)
    return g


def itpc_reference(model, ids, seq, forced, ratio, window, question=None, sign=1.0):
    """The iterative token-level rule over the context tokens ``seq`` (indices, text order).

    Without ``question``: LLMLingua-1, score = NLL given the kept prefix, ``gamma`` the
    ``floor(tau * N)``-th largest (``ratio`` holds ``tau`` for every token). With ``question`` (its
    ids and the separator): LongLLMLingua, score = ``sign * (NLL without the question - NLL with
    it)`` over the same kept prefix, ``gamma`` per segment share (:func:`segment_threshold`).

    Returns per context token (lists of length n): score, gamma and kept (False outside ``seq``).
    """
    n = len(ids)
    score, gamma, kept = [-INF] * n, [INF] * n, [False] * n
    prefix: list[int] = []  # ids of the tokens kept so far
    pool_kept: list[float] = []  # their scores
    for w0 in range(0, len(seq), window):
        idx = seq[w0 : w0 + window]
        win = [ids[t] for t in idx]
        plain = nll_given(model, prefix, win)
        if question is None:
            s = plain
        else:
            cond = nll_given(model, question + prefix, win)
            s = [sign * (a - b) for a, b in zip(plain, cond)]
        pool = pool_kept + s
        for t, v in zip(idx, s):
            g = kth_largest(pool, ratio[t]) if question is None else segment_threshold(pool, ratio[t])
            score[t], gamma[t], kept[t] = v, g, v > g or bool(forced[t])
        prefix += [ids[t] for t in idx if kept[t]]
        pool_kept += [score[t] for t in idx if kept[t]]
    return score, gamma, kept


def reference_selection(tier, priority, forced, budget: int) -> torch.Tensor:
    """Forced tokens, then the others by tier, priority and position until ``budget`` tokens."""
    n = len(tier)
    keep = [bool(f) for f in forced]
    room = budget - sum(keep)
    order = sorted((i for i in range(n) if not keep[i]), key=lambda i: (-tier[i], -priority[i], i))
    for i in order[: max(room, 0)]:
        keep[i] = True
    return torch.tensor(keep)


def question_nll(model, segment: list[int], sep: list[int], question: list[int]) -> float:
    """Mean NLL of ``question`` given ``segment`` and the separator."""
    v = nll_given(model, segment + sep, question)
    return sum(v) / len(v)


def assert_scores_close(got: torch.Tensor, ref: list[float], atol: float = 1e-4) -> None:
    ref_t = torch.tensor(ref, dtype=torch.float64)
    got = got.double()
    inf = torch.isinf(ref_t)
    assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref_t[inf])
    assert torch.allclose(got[~inf], ref_t[~inf], atol=atol), (got[~inf] - ref_t[~inf]).abs().max()


# ----------------------------------------------------------------------- LongLLMLingua, fine stage


def test_window_scores_are_the_nll_drop_the_question_brings(lm):
    """``window_scores`` = NLL(x_i | kept prefix) - NLL(x_i | question, kept prefix), window after
    window, over a kept prefix that skips tokens."""
    model, tok = lm
    doc = build_doc(tok, ONE_PARAGRAPH, QUESTION, 0.4)
    sc = LongLLMLingua(window=32)
    streams = sc.streams(doc, model)
    question = ids_of(tok, QUESTION) + ids_of(tok, SEPARATOR)
    ids = doc.context_ids
    prefix: list[int] = []
    for w0 in range(0, 96, 32):
        win = ids[w0 : w0 + 32]
        got = sc.window_scores(streams, win)
        plain, cond = nll_given(model, prefix, win), nll_given(model, question + prefix, win)
        ref = [a - b for a, b in zip(plain, cond)]
        assert_scores_close(got, ref)
        assert max(abs(v) for v in ref if math.isfinite(v)) > 0.1  # the question does change the NLLs
        kept = win[::3]
        for st in streams:
            st.accept(kept)
        prefix += kept
    assert math.isinf(nll_given(model, [], ids[:1])[0])  # the text's first token: no prediction


def test_longllmlingua_fine_stage_matches_reference_and_the_sign_matters(lm):
    """One segment, so one share ``tau = T* / n``: priorities are ``s - gamma``, the rule's keeps
    tier 2; the final cut is the reference selection. Negating the contrastive score keeps other
    tokens."""
    model, tok = lm
    keep = 0.4
    doc = build_doc(tok, ONE_PARAGRAPH, QUESTION, keep)
    sc = LongLLMLingua(window=32)
    scores = sc.score(doc, model)
    n = doc.n_context
    assert n > 3 * 32 and doc.forced.sum() == 1  # several windows; the "?" is forced
    tau = doc.budget / n
    assert scores.extra["segments_kept"] == [0] and scores.extra["shares"] == pytest.approx([tau])
    question = ids_of(tok, QUESTION) + ids_of(tok, SEPARATOR)
    args = (model, doc.context_ids, list(range(n)), doc.forced.tolist(), [tau] * n, 32, question)
    s, g, kept = itpc_reference(*args)
    assert scores.tier.tolist() == [1 + k for k in kept]
    assert_scores_close(scores.priority, [a - b for a, b in zip(s, g)])

    r = compress_prompt(
        ONE_PARAGRAPH,
        scorer="longllmlingua",
        keep=keep,
        question=QUESTION,
        model=model,
        tokenizer=tok,
        window=32,
    )
    margin = [a - b for a, b in zip(s, g)]
    ref_mask = reference_selection([1 + k for k in kept], margin, doc.forced, doc.budget)
    assert torch.equal(r.kept_mask[:n], ref_mask)
    assert r.kept_tokens == round(keep * doc.total)

    fs, fg, fkept = itpc_reference(*args, sign=-1.0)
    flipped = reference_selection(
        [1 + k for k in fkept], [a - b for a, b in zip(fs, fg)], doc.forced, doc.budget
    )
    assert sum(a != b for a, b in zip(kept, fkept)) > n // 10
    assert (flipped != ref_mask).sum() > n // 10


# ---------------------------------------------------------------------------------- LLMLingua-1


def test_selfinfo_itpc_matches_reference(lm):
    """Window by window, surprisal given the kept prefix against the ``floor(tau * N)``-th largest
    score so far; ``tau = T* / n``. Scores, thresholds, the rule's keeps and the final cut agree."""
    model, tok = lm
    keep, window = 0.35, 40
    text = ONE_PARAGRAPH + " Nobody knew the reason, and he never said a word of it to anyone."
    doc = build_doc(tok, text, None, keep)
    n = doc.n_context
    assert n >= 4 * window
    scores = SelfInfo(window=window, context_filter=False).score(doc, model)
    tau = doc.budget / n
    assert scores.extra["tau"] == pytest.approx(tau)
    s, g, kept = itpc_reference(
        model, doc.context_ids, list(range(n)), doc.forced.tolist(), [tau] * n, window
    )
    assert_scores_close(scores.priority, s)
    assert scores.tier.tolist() == [1 + k for k in kept]
    assert scores.extra["gammas"] == pytest.approx([g[w0] for w0 in range(0, n, window)], abs=1e-4)
    # the rule is conditioned on the compressed prefix: scoring on the full prefix keeps other tokens
    full = [INF, *nll_given(model, doc.context_ids[:1], doc.context_ids[1:])]
    assert max(abs(a - b) for a, b in zip(s[window:], full[window:])) > 0.1

    r = compress_prompt(
        text, scorer="selfinfo", keep=keep, model=model, tokenizer=tok, window=window, context_filter=False
    )
    ref_mask = reference_selection([1 + k for k in kept], s, doc.forced, doc.budget)
    assert torch.equal(r.kept_mask, ref_mask)
    assert r.kept_tokens == round(keep * doc.total)


def test_selfinfo_budget_controller_ranks_by_mean_nll(lm):
    """Paragraphs ranked by mean NLL (highest first; no BOS, so from their second token), taken until
    ``T* + slack`` is used up, then ITPC over the kept ones in text order."""
    model, tok = lm
    doc = build_doc(tok, PARAGRAPHS, None, 0.3)
    sc = SelfInfo(window=32, slack=0)
    para = doc.paragraphs.tolist()
    spans = [(para.index(p), len(para) - para[::-1].index(p)) for p in sorted(set(para))]
    ids = doc.context_ids
    mean = [sum(v) / len(v) for v in (nll_given(model, ids[a : a + 1], ids[a + 1 : b]) for a, b in spans)]
    order = sorted(range(len(spans)), key=lambda i: -mean[i])
    assert min(abs(mean[i] - mean[j]) for i in range(5) for j in range(i)) > 1e-3
    assert sc.rank_paragraphs(doc, model, spans) == order
    budget, taken = doc.budget + sc.slack, []
    for i in order:
        taken.append(i)
        budget -= spans[i][1] - spans[i][0]
        if budget < 0:
            break
    scores = sc.score(doc, model)
    assert scores.extra["paragraphs_kept"] == sorted(taken) and 0 < len(taken) < len(spans)
    seq = [t for i in sorted(taken) for t in range(*spans[i])]
    tau = min(1.0, doc.budget / len(seq))
    s, _, kept = itpc_reference(model, ids, seq, doc.forced.tolist(), [tau] * len(ids), 32)
    in_seq = set(seq)
    assert scores.tier.tolist() == [1 + k if t in in_seq else 0 for t, k in enumerate(kept)]
    assert_scores_close(scores.priority, s)


# ---------------------------------------------------------------------- LongLLMLingua, coarse stage


def test_longllmlingua_coarse_stage_ranks_by_question_nll(lm):
    """Segments ranked by the mean NLL of question + suffix given the segment (lowest first, the
    real ``rank_paragraphs``); whole segments taken until ``T* + slack`` is used up; the kept ones
    get dynamic shares by rank and go through the contrastive ITPC; the final cut agrees."""
    model, tok = lm
    keep = 0.4
    doc = build_doc(tok, PARAGRAPHS, QUESTION, keep, force_tokens=())
    sc = LongLLMLingua(window=32, slack=0)
    spans = sc.segments(doc)
    assert len(spans) == 5
    ids = doc.context_ids
    sep, q = ids_of(tok, SEPARATOR), ids_of(tok, QUESTION + QUESTION_SUFFIX)
    nll = [question_nll(model, ids[a:b], sep, q) for a, b in spans]
    order = sorted(range(len(spans)), key=lambda i: nll[i])
    assert min(abs(nll[i] - nll[j]) for i in range(5) for j in range(i)) > 1e-3
    assert sc.rank_paragraphs(doc, model, spans) == order

    def take(ranking):
        budget, out = doc.budget + sc.slack, []
        for i in ranking:
            out.append(i)
            budget -= spans[i][1] - spans[i][0]
            if budget < 0:
                break
        return out

    scores = sc.score(doc, model)
    kept_segments = scores.extra["segments_kept"]
    assert kept_segments == take(order) and 0 < len(kept_segments) < len(spans)
    assert sorted(take(order[::-1])) != sorted(kept_segments)  # the ranking's direction matters

    shares, _ = dynamic_ratios(
        [spans[i][1] - spans[i][0] for i in kept_segments], sc.dynamic_ratio, doc.budget
    )
    assert scores.extra["shares"] == pytest.approx(shares) and shares[0] > shares[-1]
    ratio = [0.0] * len(ids)
    for i, r in zip(kept_segments, shares):
        ratio[spans[i][0] : spans[i][1]] = [r] * (spans[i][1] - spans[i][0])
    seq = [t for i in sorted(kept_segments) for t in range(*spans[i])]
    question = ids_of(tok, QUESTION) + sep
    s, g, kept = itpc_reference(model, ids, seq, doc.forced.tolist(), ratio, 32, question)
    in_seq = set(seq)
    tier = [1 + k if t in in_seq else 0 for t, k in enumerate(kept)]
    margin = [a - b if t in in_seq else -INF for t, (a, b) in enumerate(zip(s, g))]
    assert scores.tier.tolist() == tier
    assert_scores_close(scores.priority, margin)

    r = compress_prompt(
        PARAGRAPHS,
        scorer="longllmlingua",
        keep=keep,
        question=QUESTION,
        model=model,
        tokenizer=tok,
        force_tokens=(),
        window=32,
        slack=0,
    )
    assert torch.equal(
        r.kept_mask[: doc.n_context], reference_selection(tier, margin, doc.forced, doc.budget)
    )
    assert r.kept_tokens == round(keep * doc.total)
