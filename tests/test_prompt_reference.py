"""LLMLingua-1 (``selfinfo``) and LongLLMLingua (``longllmlingua``) against brute-force references.

The references follow the papers' rules as the scorers' module docstrings state them, and use
nothing from flowsieve's language-model code: every NLL comes from a full forward of the tiny
random Llama over the whole conditioning sequence (no cache), ``log_softmax`` in float64 and a
gather; thresholds come from sorting the scores; the selection is a plain sort by (tier, priority,
position). The character tokenizer has no BOS, so a text's first token has no prediction (NLL
``inf``); a variant of it with a BOS checks the scorers' BOS paths, and the window scores are also
checked on a model with sliding-window layers.

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
from dataclasses import dataclass

import pytest
import torch
from conftest import CharTokenizer, tiny_gemma3, tiny_llama

from flowsieve.methods.prompt.base import SEPARATOR, build_doc
from flowsieve.methods.prompt.longllmlingua import QUESTION_SUFFIX, LongLLMLingua, dynamic_ratios
from flowsieve.methods.prompt.selfinfo import SelfInfo
from flowsieve.sites.prompt import compress_prompt

INF = math.inf
SUFFIX = " We can get the answer to this question in the given documents."  # after the question, coarse stage
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


def sharp_llama():
    """The tiny random Llama with its LM head scaled up tenfold."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def lm():
    return sharp_llama(), CharTokenizer()


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


def itpc_reference(model, ids, seq, forced, ratio, window, question=None, sign=1.0, bos=()):
    """The iterative token-level rule over the context tokens ``seq`` (indices, text order).

    Without ``question``: LLMLingua-1, score = NLL given the kept prefix, ``gamma`` the
    ``floor(tau * N)``-th largest (``ratio`` holds ``tau`` for every token). With ``question`` (its
    ids and the separator): LongLLMLingua, score = ``sign * (NLL without the question - NLL with
    it)`` over the same kept prefix, ``gamma`` per segment share (:func:`segment_threshold`).

    ``bos``: the tokenizer's special tokens, in front of both conditionings.

    Returns per context token (lists of length n): score, gamma and kept (False outside ``seq``).
    """
    n = len(ids)
    score, gamma, kept = [-INF] * n, [INF] * n, [False] * n
    prefix: list[int] = []  # ids of the tokens kept so far
    pool_kept: list[float] = []  # their scores
    for w0 in range(0, len(seq), window):
        idx = seq[w0 : w0 + window]
        win = [ids[t] for t in idx]
        plain = nll_given(model, [*bos, *prefix], win)
        if question is None:
            s = plain
        else:
            cond = nll_given(model, [*bos, *question, *prefix], win)
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


def take_whole(order: list[int], sizes: list[int], budget: int) -> list[int]:
    """Whole units in ``order`` until ``budget`` is used up; the one that crosses it is the last."""
    out = []
    for i in order:
        out.append(i)
        budget -= sizes[i]
        if budget < 0:
            break
    return out


@dataclass
class Reference:
    """A scorer's outcome by the reference: per context token the tier (0: unit dropped, 1: rejected
    by the threshold rule, 2: kept by it), the priority and the margin ``s - gamma``; the units
    (paragraphs or segments) in rank order and the kept ones."""

    tier: list[int]
    priority: list[float]
    margin: list[float]
    order: list[int]
    kept_units: list[int]


def selfinfo_reference(model, doc, window: int, slack: int = 100, bos=()) -> Reference:
    """LLMLingua-1 on ``doc`` (the priority is the NLL).

    Budget controller over the blank-line paragraphs: mean NLL of each paragraph alone (given the
    BOS, or from its second token without one), highest first, whole paragraphs until ``T* + slack``
    is used up; then ITPC over the kept paragraphs in text order at ``tau = T* / kept tokens``.
    """
    ids, n, target = doc.context_ids, doc.n_context, max(doc.budget, 0)
    para = doc.paragraphs.tolist()
    spans = [(para.index(p), n - para[::-1].index(p)) for p in sorted(set(para))]
    kept_para = order = list(range(len(spans)))
    if len(spans) > 1:
        mean = []
        for a, b in spans:
            v = (
                nll_given(model, list(bos), ids[a:b])
                if bos
                else nll_given(model, ids[a : a + 1], ids[a + 1 : b])
            )
            mean.append(sum(v) / len(v) if v else 0.0)
        order = sorted(range(len(spans)), key=lambda i: -mean[i])
        kept_para = sorted(take_whole(order, [b - a for a, b in spans], target + slack))
    seq = [t for i in kept_para for t in range(*spans[i])]
    tau = min(1.0, target / len(seq))
    s, g, kept = itpc_reference(model, ids, seq, doc.forced.tolist(), [tau] * n, window, bos=bos)
    in_seq = set(seq)
    margin = [a - b if t in in_seq else -INF for t, (a, b) in enumerate(zip(s, g))]
    tier = [1 + k if t in in_seq else 0 for t, k in enumerate(kept)]
    return Reference(tier, s, margin, order, kept_para)


def longllmlingua_reference(model, doc, sc: LongLLMLingua, bos=()) -> Reference:
    """LongLLMLingua on ``doc`` (the priority is the margin; the kept segments best first).

    The segments are the scorer's own (:meth:`LongLLMLingua.segments`); each is ranked by the mean NLL
    of question + suffix given BOS + segment + blank line, lowest first; whole segments are taken
    until ``T* + slack`` is used up; shares by rank (:func:`dynamic_ratios`); contrastive ITPC over
    the kept segments in text order; priority = ``s - gamma``.
    """
    tok, ids, n, target = doc.tokenizer, doc.context_ids, doc.n_context, max(doc.budget, 0)
    sep = ids_of(tok, SEPARATOR)
    spans = sc.segments(doc)
    sizes = [b - a for a, b in spans]
    order = kept_segments = list(range(len(spans)))
    spread = 0.0
    if sc.context_filter and len(spans) > 1:
        q = ids_of(tok, doc.question + SUFFIX)
        nll = [question_nll(model, [*bos, *ids[a:b]], sep, q) for a, b in spans]
        order = sorted(range(len(spans)), key=lambda i: nll[i])
        kept_segments, spread = take_whole(order, sizes, target + sc.slack), sc.dynamic_ratio
    shares, _ = dynamic_ratios([sizes[i] for i in kept_segments], spread, target)
    ratio = [0.0] * n
    for i, r in zip(kept_segments, shares):
        ratio[spans[i][0] : spans[i][1]] = [r] * sizes[i]
    seq = [t for i in sorted(kept_segments) for t in range(*spans[i])]
    question = ids_of(tok, doc.question) + sep
    s, g, kept = itpc_reference(model, ids, seq, doc.forced.tolist(), ratio, sc.window, question, bos=bos)
    in_seq = set(seq)
    tier = [1 + k if t in in_seq else 0 for t, k in enumerate(kept)]
    margin = [a - b if t in in_seq else -INF for t, (a, b) in enumerate(zip(s, g))]
    return Reference(tier, margin, margin, order, kept_segments)


def assert_decided(margin: list[float], forced, atol: float = 1e-4) -> None:
    """No token's keep decision is a near-tie with its threshold (the token that sets it aside)."""
    close = [
        t
        for t, m in enumerate(margin)
        if math.isfinite(m) and m != 0 and abs(m) <= atol and not bool(forced[t])
    ]
    assert not close, [margin[t] for t in close]


def assert_cut(
    mask: torch.Tensor, tier: list[int], priority: list[float], forced, atol: float = 1e-4
) -> None:
    """``mask`` (n,) keeps the forced tokens and the first ``m`` others by (tier, priority, position),
    ``m`` being how many others it keeps; the cut between the last taken and the first left is no
    near-tie (float rounding cannot decide it)."""
    forced = [bool(f) for f in forced]
    order = sorted((i for i in range(len(tier)) if not forced[i]), key=lambda i: (-tier[i], -priority[i], i))
    m = int(mask.sum()) - sum(forced)
    expect = [bool(f) for f in forced]
    for i in order[:m]:
        expect[i] = True
    assert mask.tolist() == expect
    if 0 < m < len(order):
        a, b = order[m - 1], order[m]
        pa, pb = priority[a], priority[b]
        assert tier[a] != tier[b] or (math.isinf(pa) and pa == pb) or pa - pb > atol, (pa, pb)


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
    assert QUESTION_SUFFIX == SUFFIX
    sep, q = ids_of(tok, SEPARATOR), ids_of(tok, QUESTION + SUFFIX)
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


# ------------------------------------------------------------------- a BOS, sliding-window layers

BOS = 1
BOS_PARAGRAPHS = "\n\n".join(
    [
        "The ferry stopped running every winter.",
        "Mara kept the lamp burning until dawn.",
        "X marks it.",
        "Bread came at nine.",
        "Wind.",
    ]
)


class BosCharTokenizer(CharTokenizer):
    """The character tokenizer with a BOS (id 1) in front when special tokens are asked for."""

    def __call__(self, text, return_offsets_mapping=False, add_special_tokens=True, return_tensors=None):
        enc = super().__call__(text, return_offsets_mapping, add_special_tokens=False)
        if add_special_tokens:
            enc["input_ids"] = [BOS, *enc["input_ids"]]
            if return_offsets_mapping:
                enc["offset_mapping"] = [(0, 0), *enc["offset_mapping"]]
        if return_tensors == "pt":
            enc = {"input_ids": torch.tensor([enc["input_ids"]])}
        return enc


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_window_scores_from_a_bos_on_full_and_sliding_window_models(make):
    """With a BOS both conditionings start from it and every token (the text's first too) has a
    finite contrastive score; Gemma-3's sliding-window layers take the stream's recompute path."""
    model, tok = make(), BosCharTokenizer()
    doc = build_doc(tok, ONE_PARAGRAPH, QUESTION, 0.4)
    sc = LongLLMLingua(window=32)
    streams = sc.streams(doc, model)
    question = ids_of(tok, QUESTION) + ids_of(tok, SEPARATOR)
    ids, prefix = doc.context_ids, []
    for w0 in range(0, 96, 32):
        win = ids[w0 : w0 + 32]
        got = sc.window_scores(streams, win)
        plain, cond = nll_given(model, [BOS, *prefix], win), nll_given(model, [BOS, *question, *prefix], win)
        ref = [a - b for a, b in zip(plain, cond)]
        assert all(math.isfinite(v) for v in ref)
        assert_scores_close(got, ref)
        kept = win[1::4]
        for st in streams:
            st.accept(kept)
        prefix += kept


def test_bos_paragraph_ranking_and_shares_too_small_for_a_token(lm):
    """With a BOS, LLMLingua-1's controller averages the NLL of every token of a paragraph given the
    BOS, and LongLLMLingua ranks segments by the question's NLL given BOS + segment (on this text
    both orders change without the BOS). With ``dynamic_ratio = 1`` the worst kept segments' share is
    0: the threshold is the largest finite score so far, so none of their tokens passes (tier 1,
    finite margins <= 0). Both scorers and their final cuts agree with the references."""
    model, _ = lm
    tok = BosCharTokenizer()
    keep = 0.25
    doc = build_doc(tok, BOS_PARAGRAPHS, QUESTION, keep)
    n = doc.n_context
    spans = LongLLMLingua().segments(doc)
    assert len(spans) == 5

    sc = SelfInfo(window=32, slack=0)
    ref = selfinfo_reference(model, doc, 32, slack=0, bos=[BOS])
    assert sc.rank_paragraphs(doc, model, spans) == ref.order
    assert_decided(ref.margin, doc.forced)
    scores = sc.score(doc, model)
    assert scores.extra["paragraphs_kept"] == ref.kept_units and 0 < len(ref.kept_units) < 5
    assert scores.tier.tolist() == ref.tier
    assert_scores_close(scores.priority, ref.priority)
    r = compress_prompt(
        BOS_PARAGRAPHS,
        scorer="selfinfo",
        keep=keep,
        question=QUESTION,
        model=model,
        tokenizer=tok,
        window=32,
        slack=0,
    )
    assert_cut(r.kept_mask[:n], ref.tier, ref.priority, doc.forced)
    assert r.kept_tokens == round(keep * doc.total)

    sc = LongLLMLingua(window=32, dynamic_ratio=1.0)
    ref = longllmlingua_reference(model, doc, sc, bos=[BOS])
    assert sc.rank_paragraphs(doc, model, spans) == ref.order
    assert_decided(ref.margin, doc.forced)
    scores = sc.score(doc, model)
    assert scores.extra["segments_kept"] == ref.kept_units and len(ref.kept_units) >= 3
    shares = scores.extra["shares"]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0 and shares[-1] == 0.0
    assert scores.tier.tolist() == ref.tier
    assert_scores_close(scores.priority, ref.priority)
    a, b = spans[ref.kept_units[-1]]
    free = [t for t in range(a, b) if not doc.forced[t]]
    assert all(ref.tier[t] == 1 and -INF < ref.margin[t] <= 0 for t in free)
    r = compress_prompt(
        BOS_PARAGRAPHS,
        scorer="longllmlingua",
        keep=keep,
        question=QUESTION,
        model=model,
        tokenizer=tok,
        window=32,
        dynamic_ratio=1.0,
    )
    assert_cut(r.kept_mask[:n], ref.tier, ref.priority, doc.forced)
    assert r.kept_tokens == round(keep * doc.total)
