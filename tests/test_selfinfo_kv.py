"""Self-information at the KV site: the surprisal observation equals the model's own logits, whole
sentences rank by their mean surprisal, and the method is refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.inputs import Prompt
from flowsieve.kvcache import SieveCache
from flowsieve.methods.base import unit_pool
from flowsieve.methods.selection import select_topk
from flowsieve.observe import ObserveSpec, observe
from flowsieve.sieve import Sieve
from flowsieve.sites import prefill_cache


def _ids(T: int, seed: int = 4) -> list[int]:
    return torch.randint(0, 128, (T,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def _reference_nll(model, ids: list[int]) -> torch.Tensor:
    lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    out = torch.zeros(len(ids))
    out[1:] = -lp[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return out


@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("split", [None, 17])
def test_surprisal_equals_the_models_logits(tiny_causal, cap, split):
    """One forward or two (the second token batch scored from the first's last position), with and
    without final-logit soft-capping; the observation runs the head in blocks of rows."""
    name, model = tiny_causal
    if cap is not None:
        if name != "gemma3":
            pytest.skip("soft-capping is a Gemma setting")
        model.config.final_logit_softcapping = cap
    ids = _ids(40)
    ref = _reference_nll(model, ids)
    cache = SieveCache(model)
    parts = [ids] if split is None else [ids[:split], ids[split:]]
    with torch.inference_mode(), observe(model, ObserveSpec(surprisal=True)) as obs:
        for part in parts:
            model(input_ids=torch.tensor([part]), cache=cache, use_cache=True, logits_to_keep=1)
    torch.testing.assert_close(obs.token_nll[0], ref, atol=1e-4, rtol=1e-4)
    assert obs.layer(0).token_nll is obs.token_nll


def test_unit_pool_mean_ranks_units_by_their_mean():
    scores = torch.tensor([[5.0, 0.0, 0.0, 2.0, 2.0, 2.0, 3.0, float("-inf")]])
    units = torch.tensor([[[0, 0, 0, 1, 1, 1, 2, 2]]])
    # means: u0 5/3, u1 2, u2 3 (the -inf entry is left out of the mean) -> u2, u1, u0
    prot = torch.zeros(8, dtype=torch.bool)
    assert select_topk(unit_pool(scores, units, "mean"), prot, 2).tolist() == [6, 7]
    assert select_topk(unit_pool(scores, units, "mean"), prot, 5).tolist() == [3, 4, 5, 6, 7]
    assert select_topk(unit_pool(scores, units, "max"), prot, 3).tolist() == [0, 1, 2]  # u0's max is 5
    with pytest.raises(FlowsieveError, match="'max' or 'mean'"):
        unit_pool(scores, units, "median")


def test_sentences_kept_by_mean_surprisal(tiny_llama_model):
    """selfinfo@units=sentence keeps, in every layer, exactly the context sentences of highest
    mean surprisal (computed here from plain logits), then the protected tokens."""
    model = tiny_llama_model
    T, c0, c1, sent = 60, 0, 50, 5
    ids = _ids(T)
    p = Prompt(
        ids=tuple(ids),
        context=(c0, c1),
        question=(c1, T),
        split=c1,
        sentences=tuple(t // sent for t in range(T)),
    )
    sieve = Sieve("selfinfo", budget=30, window=4, units="sentence")
    pre = prefill_cache(model, p, sieve, "query_agnostic")
    cache = pre.cache
    nll = _reference_nll(model, ids[:c1])
    means = nll.view(-1, sent).mean(1)  # 10 context sentences
    # protected: the last 4 context tokens (the window); 30 - 4 = 26 -> 5 best sentences + 1 token
    best = means.argsort(descending=True).tolist()
    want_full = set()
    for u in best[:5]:
        want_full |= set(range(u * sent, u * sent + sent))
    for li in cache.sieve_layers:
        kept = set(cache.layer(li).positions[0, 0, :30].tolist())
        assert want_full <= kept
        assert set(range(c1 - 4, c1)) <= kept
        assert len(kept) == 30
    assert pre.kept == 30 + (T - c1)


def test_refused_where_it_cannot_run(tiny_llama_model):
    with pytest.raises(FlowsieveError, match="no chunked prefill"):
        Sieve("selfinfo", keep=0.5, chunk=32)
    with pytest.raises(FlowsieveError, match="does not support site"):
        Sieve("selfinfo", keep=0.5, site="decode")
