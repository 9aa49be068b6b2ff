"""Integration tests on the bundled models (slow; marked, still run in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowsieve.observe import ObserveSpec, observe

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def test_smollm2_loads_from_cache_quickly(smollm2):
    import flowsieve

    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    t0 = time.perf_counter()
    flowsieve.load("smollm2")
    assert time.perf_counter() - t0 < 60  # cached fp32 safetensors, not a second GGUF conversion
    assert tok.decode(tok("Hello, world")["input_ids"]) == "Hello, world"


def test_smollm2_observation_matches_sdpa(smollm2):
    model, tok = smollm2
    ids = tok("The lighthouse keeper wrote the weather in a green ledger every day.", return_tensors="pt")[
        "input_ids"
    ]
    with torch.inference_mode():
        ref = model(ids).logits
        with observe(model, ObserveSpec(rows=(-1,), received=True, head_stats=True, transitions=True)) as obs:
            got = model(ids).logits
    assert (got - ref).abs().max().item() < 1e-4
    assert len(obs.layers) == 30


def test_trace_cli_end_to_end(smollm2, tmp_path):
    out_json, out_html = tmp_path / "t.json", tmp_path / "t.html"
    cmd = [
        sys.executable,
        "-m",
        "flowsieve.cli",
        "trace",
        "--model",
        "smollm2",
        "--text-file",
        str(ROOT / "examples/lighthouse.txt"),
        "--question",
        "Who kept the lighthouse lamp burning during the storm?",
        "--json",
        str(out_json),
        "--html",
        str(out_html),
        "--quiet",
        "--threads",
        "2",
    ]
    subprocess.run(cmd, check=True, timeout=600)
    t = json.loads(out_json.read_text())
    for key in ("model", "tokens", "n_layers", "scores", "sinks", "dormant_heads"):
        assert key in t
    assert t["model"] == "smollm2" and t["n_layers"] == 30
    T = len(t["tokens"])
    assert all(len(t["scores"]["relay_flow"][i]) == T for i in range(30))
    a, b = t["question_span"]
    assert "".join(t["tokens"][a:b]).strip().startswith("Who kept")
    # the first token is an attention sink in a model of this family
    assert t["sinks"]["tokens"] and t["sinks"]["tokens"][0]["index"] == 0
    html = out_html.read_text()
    assert "<html" in html.lower() and "trace-data" in html


def test_trace_too_long_text(smollm2, capsys):
    from flowsieve.cli import main

    code = main(["trace", "--text", "word " * 9000, "--json", "/tmp/never.json", "--quiet"])
    assert code == 2
    assert "longer than the model's context of 8192" in capsys.readouterr().err


def test_minilm_trace(char_tok):
    import flowsieve
    from flowsieve.trace import trace

    model, tok = flowsieve.load("minilm")
    t = trace(model, tok, "The lighthouse keeper wrote the weather in a green ledger.")
    assert t["relay"] == 0 and t["tokens"][0] == "[CLS]"
    assert t["n_layers"] == 6 and t["n_heads"] == 12
