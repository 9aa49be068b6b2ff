"""Rank fusion of flow and surprisal: ranks and fusion against a brute-force reference written from
the formula, the EMA of the flow term, the surprisal term against plain logits, and the kept set."""

from __future__ import annotations

import random

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.methods.fusion import RRF_K, FusionScorer, ranks, rrf
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache


def _brute_ranks(row: list[float]) -> list[int]:
    """1-based ranks: higher score first, ties by position."""
    order = sorted(range(len(row)), key=lambda i: (-row[i], i))
    out = [0] * len(row)
    for r, i in enumerate(order, start=1):
        out[i] = r
    return out


def _brute_rrf(a: list[float], b: list[float], k: float = RRF_K) -> list[float]:
    ra, rb = _brute_ranks(a), _brute_ranks(b)
    return [1 / (k + x) + 1 / (k + y) for x, y in zip(ra, rb, strict=True)]


@pytest.mark.parametrize("seed", range(5))
def test_ranks_and_rrf_match_the_formula(seed):
    rng = random.Random(seed)
    T = 23
    a = [float(rng.randint(0, 6)) for _ in range(T)]  # many ties
    b = [rng.random() for _ in range(T)]
    assert ranks(torch.tensor([a]))[0].tolist() == _brute_ranks(a)
    got = rrf(torch.tensor([a]), torch.tensor([b]), k=7)[0]
    torch.testing.assert_close(got, torch.tensor(_brute_rrf(a, b, k=7)))


def test_best_in_both_wins_and_order_matters():
    # entry 2 is first by both signals, entry 0 last by both
    a = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    b = torch.tensor([[-1.0, 3.0, 9.0, 0.0]])
    f = rrf(a, b)[0]
    assert int(f.argmax()) == 2 and int(f.argmin()) == 0
    # a negated signal reverses its ranks: the fused order changes
    assert not torch.equal(rrf(-a, b), f[None])


def test_rejects_a_bad_k():
    with pytest.raises(FlowsieveError, match="k must be"):
        FusionScorer(k=-1)
    with pytest.raises(FlowsieveError, match="no chunked prefill"):
        Sieve("fusion", keep=0.5, chunk=32)


@torch.inference_mode()
def test_prefill_keeps_the_fused_top(tiny_llama_model, monkeypatch):
    """Through the prefill site: the fused scores are the EMA'd flow and the surprisal ranked and
    fused as the formula says, the surprisal equals the model's own logits, and every layer keeps
    the protected tokens plus the best fused candidates."""
    model = tiny_llama_model
    T, c1 = 48, 40
    ids = torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(3)).tolist()
    p = Prompt(ids=tuple(ids), context=(0, c1), question=(c1, T), split=c1)
    seen: dict[str, list[torch.Tensor]] = {}
    orig = FusionScorer.accumulate

    def spy(self, scores):
        seen["raw"] = [s.clone() for s in scores]
        out = orig(self, scores)
        seen["fused"] = [s.clone() for s in out]
        return out

    monkeypatch.setattr(FusionScorer, "accumulate", spy)
    budget = 20
    pre = prefill_cache(model, p, Sieve("fusion", budget=budget), "query_aware")
    raw, fused = seen["raw"], seen["fused"]
    # surprisal term: -log p(token | prefix) from plain logits, first token 0
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    nll = torch.zeros(T)
    nll[1:] = -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(raw[0][1][0], nll, atol=1e-4, rtol=1e-4)
    acc = None
    for layer, (r, f) in enumerate(zip(raw, fused, strict=True)):
        flow = r[0][0]
        acc = flow if acc is None else 0.5 * acc + 0.5 * flow  # FlowCut's EMA, weight 0.5
        want = torch.tensor(_brute_rrf(acc.tolist(), r[1][0].tolist()))
        torch.testing.assert_close(f[0], want)
        kept = set(pre.cache.layer(layer).positions[0, 0, :budget].tolist())
        protected = set(range(c1, T)) | {0}  # the question span and what observation protects
        cand = [t for t in range(T) if t not in protected]
        n_free = budget - len(protected & kept)
        best = sorted(cand, key=lambda t: (-float(want[t]), t))[:n_free]
        assert set(range(c1, T)) <= kept
        assert kept == set(best) | (protected & kept)
