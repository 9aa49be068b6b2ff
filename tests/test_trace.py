"""trace() on tiny random models: schema, shapes, invariants and input errors."""

from __future__ import annotations

import json

import pytest
import torch

from flowsieve.errors import FlowsieveError
from flowsieve.trace import TraceConfig, build_input, trace


def test_trace_schema_and_shapes(tiny_causal, char_tok):
    _, model = tiny_causal
    text = "The keeper lit the lamp. " * 4
    t = trace(model, char_tok, text, "Who lit it?")
    T = len(t["tokens"])
    assert t["tokens"] == list(text.rstrip() + "\n\nWho lit it?")
    assert t["n_layers"] == model.config.num_hidden_layers
    assert t["relay"] == T - 1
    a, b = t["question_span"]
    assert "".join(t["tokens"][a:b]) == "Who lit it?" and b == T
    for name in ("relay_flow", "flow_accumulated", "relay_attention", "attention_received", "transition"):
        s = torch.tensor(t["scores"][name])
        assert s.shape == (t["n_layers"], T), name
        assert torch.isfinite(s).all() and (s >= 0).all()
    # each query row sums to 1, so the received attention over all keys sums to T per layer
    recv = torch.tensor(t["scores"]["attention_received"]).sum(-1)
    assert torch.allclose(recv, torch.full_like(recv, T), rtol=1e-3)
    # the relay attention row is a distribution
    rel = torch.tensor(t["scores"]["relay_attention"]).sum(-1)
    assert torch.allclose(rel, torch.ones_like(rel), atol=1e-3)
    acc = torch.tensor(t["scores"]["flow_accumulated"]).sum(-1)
    assert torch.allclose(acc, torch.ones_like(acc), atol=1e-3)
    assert len(t["heads"]["sink_share"]) == t["n_layers"]
    assert all(len(r) == model.config.num_attention_heads for r in t["heads"]["out_norm_ratio"])
    for lh in t["dormant_heads"]:
        assert 0 <= lh[0] < t["n_layers"] and 0 <= lh[1] < model.config.num_attention_heads
    json.dumps(t)  # serialisable


def test_trace_relay_flow_matches_eager(char_tok):
    """relay_attention equals the eager attention row of the last token, averaged over heads."""
    from conftest import tiny_llama

    model = tiny_llama()
    text = "abcdefghij klmnop"
    t = trace(model, char_tok, text, config=TraceConfig(chunk=5, digits=8))
    ids = torch.tensor([char_tok(text)["input_ids"]])
    model.set_attn_implementation("eager")
    att = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("sdpa")
    for i, a in enumerate(att):
        ref = a[0, :, -1].mean(0)
        assert torch.allclose(torch.tensor(t["scores"]["relay_attention"][i]), ref, atol=1e-5)
        assert torch.allclose(
            torch.tensor(t["scores"]["attention_received"][i]), a[0].sum(-2).mean(0), atol=1e-4
        )


def test_trace_encoder_uses_cls(char_tok):
    from conftest import tiny_bert

    model = tiny_bert()
    t = trace(model, char_tok, "hello encoder world")
    assert t["relay"] == 0
    assert "transition" not in t["scores"] and "transition" in t["unavailable"]
    assert torch.tensor(t["scores"]["relay_flow"]).shape[0] == 2


@pytest.mark.parametrize(
    "text,question,msg",
    [
        ("", None, "the text is empty"),
        ("   \n", None, "the text is empty"),
        ("text", "  ", "the question is empty"),
    ],
)
def test_empty_inputs(char_tok, text, question, msg):
    with pytest.raises(FlowsieveError, match=msg):
        build_input(char_tok, text, question, True)


def test_too_long_for_context(char_tok):
    from conftest import tiny_llama

    model = tiny_llama()  # 256 positions
    with pytest.raises(FlowsieveError, match="longer than the model's context"):
        trace(model, char_tok, "x" * 300)


def test_bad_config():
    with pytest.raises(FlowsieveError, match=r"sink_alpha must be in \(0, 1\]"):
        TraceConfig(sink_alpha=0)
    with pytest.raises(FlowsieveError, match="chunk and row_stride must be >= 1"):
        TraceConfig(chunk=0)
