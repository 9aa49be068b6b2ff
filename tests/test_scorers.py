"""Invariants of the flow, transition and sink scorers on synthetic tensors."""

from __future__ import annotations

import torch

from flowsieve.methods.flow_signals import ema_accumulate, flowcut_score, ttv
from flowsieve.methods.sink_signals import dormant_heads, layer_sinks, sink_mask, sink_share


def test_flowcut_terms_normalised_and_weighted():
    B, H, Hk, T = 1, 4, 2, 6
    rel = torch.softmax(torch.randn(B, H, T), -1)
    vv = torch.softmax(torch.randn(B, Hk, T), -1)
    ones = torch.ones(B, T)
    s = flowcut_score(rel, vv, ones)
    assert torch.allclose(s.sum(-1), torch.tensor([2.0]))  # rel and sem each sum to 1
    w = torch.arange(1.0, T + 1)[None]
    assert torch.allclose(flowcut_score(rel, vv, w), s * w)  # value-norm weighting
    assert (s >= 0).all()


def test_flowcut_candidates_renormalise():
    rel = torch.tensor([[[0.5, 0.25, 0.25]]])
    vv = torch.tensor([[[0.5, 0.25, 0.25]]])
    cand = torch.tensor([False, True, True])
    s = flowcut_score(rel, vv, torch.ones(1, 3), cand)
    assert s[0, 0] == 0
    assert torch.allclose(s[0, 1:], torch.tensor([1.0, 1.0]))  # 0.5 + 0.5 each after renormalising


def test_ema_definition():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = ema_accumulate(x)
    assert torch.allclose(out[0], torch.tensor([1.0, 0.0]))
    assert torch.allclose(out[1], torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[2], torch.tensor([0.25, 0.75]))


def test_ttv_identity_block_is_uniform():
    # TransPrune: an identity module (after == before) gives TTV = 1/T for every token
    T = 7
    ratio = torch.ones(1, T)
    dist = torch.zeros(1, T)
    assert torch.allclose(ttv(ratio, dist), torch.full((1, T), 1 / T))


def test_sink_detection_synthetic():
    T = 64
    # head 0 puts all attention on token 0; head 1 is uniform over visible keys
    visible = torch.arange(T, 0, -1).float()  # causal: key j is seen by T - j queries
    received = torch.zeros(2, T)
    received[0, 0] = T
    for i in range(T):
        received[1, : i + 1] += 1.0 / (i + 1)
    m = sink_mask(received, visible, alpha=0.1, min_visible=16)
    assert m[0, 0] and m[0].sum() == 1
    assert not m[1, 1:].any()  # uniform head: early keys get ~H_T/T each, below 0.1 after token 0
    sinks = layer_sinks(received, visible, 0.1, 16)
    assert sinks[0] and sinks.sum() == 1
    share = sink_share(received, T, sinks)
    assert torch.isclose(share[0], torch.tensor(1.0))
    assert share[1] < 0.2


def test_dormant_rules():
    share = torch.tensor([[0.95, 0.2, 0.3]])
    out_norm = torch.tensor([[1.0, 1.0, 0.05]])
    d = dormant_heads(share, out_norm, park=0.9, quiet=0.1)
    assert d.tolist() == [[True, False, True]]
