"""Peers (kvpress, LLMLingua) run in their own venvs: the plumbing without them, then real runs.

The unit tests stand in for a peer venv with a fake ``python`` (a script that answers the runner
protocol), so they need neither venv. The integration tests build both venvs from PyPI (minutes, once
per checkout; reused afterwards) and run two needle items through each peer; set
``FLOWSIEVE_SKIP_PEERS=1`` to skip those two.
"""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from flowsieve import FlowsieveError
from flowsieve.bench import Item, get_task
from flowsieve.bench import peers as P

RUNNERS = Path(P.__file__).resolve().parents[3] / "bench" / "peers"


def _item(i: int, **kw) -> Item:
    base = dict(
        task="needle",
        item_id=f"needle-x-{i}",
        context=f"Some context {i} with ünïcode — and a needle: 4817.\nSecond line.",
        question="What is the code?",
        answers=("4817",),
        meta={"depth": 0.5, "needles": [{"key": "blue door", "value": "4817"}], "span": (1, 2)},
    )
    base.update(kw)
    return Item(**base)


# --- names ---------------------------------------------------------------------------------------------


def test_peer_methods_map_our_names_to_the_peers():
    assert P.PEER_METHODS["kvpress"]["snapkv"] == "SnapKVPress"
    assert P.PEER_METHODS["kvpress"]["adakv_expected_attention"] == "AdaKVPress(ExpectedAttentionPress)"
    assert set(P.PEER_METHODS["kvpress"]) == {
        "snapkv",
        "streaming_llm",
        "tova",
        "knorm",
        "observed_attention",
        "expected_attention",
        "keydiff",
        "pyramidkv",
        "adakv_expected_attention",
    }
    assert set(P.PEER_METHODS["llmlingua"]) == {"llmlingua", "longllmlingua"}
    assert P.peer_method("llmlingua", "longllmlingua").startswith("LongLLMLingua")


@pytest.mark.parametrize(
    ("system", "method", "hint"),
    [
        ("kvpress", "snapk", "did you mean 'snapkv'"),
        ("kvpress", "streamingllm", "did you mean 'streaming_llm'"),
        ("llmlingua", "longlingua", "did you mean 'longllmlingua'"),
    ],
)
def test_unknown_method_suggests_the_closest(system, method, hint):
    with pytest.raises(FlowsieveError, match=hint) as e:
        P.peer_method(system, method)
    assert "\n" not in str(e.value)


def test_unknown_system_suggests_the_closest():
    with pytest.raises(FlowsieveError, match="did you mean 'kvpress'"):
        P.peer_spec("kvpres")
    with pytest.raises(FlowsieveError, match="unknown peer 'vllm'"):
        P.run_peer("vllm", [_item(0)], "snapkv", 0.5)


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"keep": 0.0}, "keep must be"),
        ({"keep": 1.5}, "keep must be"),
        ({"keep": True}, "keep must be"),
        ({"mode": "query-aware"}, "did you mean 'query_aware'"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"threads": 0}, "threads"),
        ({"model_name": "gemma3-270m"}, "only with the bundled smollm2"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kw, msg, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    args = {"keep": 0.5} | kw
    with pytest.raises(FlowsieveError, match=msg):
        P.run_peer("kvpress", [_item(0)], "snapkv", build=False, **args)
    assert not any(tmp_path.iterdir())  # nothing was built


def test_longllmlingua_is_query_aware_only():
    with pytest.raises(FlowsieveError, match="longllmlingua runs query_aware only"):
        P.run_peer("llmlingua", [_item(0)], "longllmlingua", 0.5, mode="query_agnostic", build=False)


def test_no_items_no_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    assert P.run_peer("kvpress", [], "snapkv", 0.5, build=False) == []


# --- JSONL ---------------------------------------------------------------------------------------------


def test_items_round_trip_through_jsonl(tmp_path):
    items = [_item(0), _item(1, question="Wer?\tTab", answers=("a", "b"))]
    path = tmp_path / "items.jsonl"
    assert P.write_jsonl(path, (P.item_record(it) for it in items)) == 2
    back = P.read_jsonl(path)
    for r, it in zip(back, items):
        assert r | {"answers": tuple(r["answers"]), "meta": None} == vars(it) | {"meta": None}
    assert back[0]["meta"] == {
        "depth": 0.5,
        "needles": [{"key": "blue door", "value": "4817"}],
        "span": [1, 2],
    }
    assert back[0]["context"] == items[0].context  # unicode and newlines survive
    assert len(path.read_text(encoding="utf-8").splitlines()) == 2  # one line per item


def test_read_jsonl_names_a_bad_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n')
    with pytest.raises(FlowsieveError, match="line 3 is not JSON"):
        P.read_jsonl(path)


def test_one_line_picks_the_reason():
    assert P.one_line("a\nb\nFLOWSIEVE-PEER-ERROR: it broke\nexit") == "it broke"
    assert P.one_line("x\nERROR: No matching distribution found for kvpress==9\nmore") == (
        "ERROR: No matching distribution found for kvpress==9"
    )
    assert P.one_line("Traceback\n  File x\nValueError: bad\n") == "ValueError: bad"
    assert P.one_line("") == ""
    assert len(P.one_line("x" * 1000)) == 400


# --- environments and the runner protocol, with a fake peer python ---------------------------------------


def test_missing_env_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path / "nowhere"))
    assert not P.env_ready("kvpress")
    with pytest.raises(FlowsieveError) as e:
        P.run_peer("kvpress", [_item(0)], "snapkv", 0.5, build=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert "kvpress environment" in msg and "does not exist" in msg and "ensure_env" in msg


def _fake_env(root: Path, system: str, body: str, monkeypatch) -> Path:
    """A peer 'venv' whose python is a script running ``body`` under this interpreter."""
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(root))
    monkeypatch.setenv("FLOWSIEVE_CACHE", str(root / "cache"))  # failure logs land there
    env = root / system
    (env / "bin").mkdir(parents=True)
    py = env / "bin" / "python"
    py.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    py.chmod(py.stat().st_mode | stat.S_IXUSR)
    (env / P.STAMP).write_text(json.dumps({"spec": P._spec_hash(P.peer_spec(system))}))
    return env


ECHO = """
import json, os, sys
args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
cfg = json.load(open(args["--config"]))
with open(args["--out"], "w") as out:
    for line in open(args["--items"], encoding="utf-8"):
        it = json.loads(line)
        row = {"item_id": it["item_id"], "prediction": it["answers"][0], "prompt_tokens": 10,
               "kept_tokens": 5, "kv_bytes": 50, "kv_bytes_full": 100, "peak_rss_mb": 1.0,
               "prefill_s": 0.1, "decode_tok_s": 2.0, "new_tokens": 3,
               "extra": {"cfg": cfg, "script": os.path.basename(sys.argv[1]),
                         "omp": os.environ.get("OMP_NUM_THREADS"), "offline": os.environ.get("HF_HUB_OFFLINE")}}
        out.write(json.dumps(row) + "\\n")
"""


def test_run_peer_speaks_the_runner_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    _fake_env(tmp_path, "kvpress", ECHO, monkeypatch)
    assert P.env_ready("kvpress")
    items = [_item(0), _item(1)]
    rows = P.run_peer("kvpress", items, "tova", 0.25, mode="query_agnostic", max_new_tokens=7, threads=1)
    assert [r["item_id"] for r in rows] == [it.item_id for it in items]
    assert all(list(r) == list(P.ROW_FIELDS) for r in rows)
    extra = rows[0]["extra"]
    assert extra["script"] == "kvpress_runner.py"
    assert extra["omp"] == "1" and extra["offline"] == "1"
    cfg = extra["cfg"]
    assert cfg["method"] == "tova" and cfg["peer_method"] == "TOVAPress"
    assert cfg["keep"] == 0.25 and cfg["mode"] == "query_agnostic" and cfg["max_new_tokens"] == 7
    assert cfg["instruction"] == "Answer briefly."
    assert Path(cfg["gguf_dir"], cfg["gguf_file"]).exists()


def test_runner_failure_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    _fake_env(
        tmp_path,
        "llmlingua",
        """
        import sys
        print("Traceback (most recent call last):\\n  File 'x'\\nKeyError: 'y'", file=sys.stderr)
        print("FLOWSIEVE-PEER-ERROR: KeyError: 'y' in the compressor", file=sys.stderr)
        sys.exit(1)
        """,
        monkeypatch,
    )
    with pytest.raises(FlowsieveError) as e:
        P.run_peer("llmlingua", [_item(0)], "llmlingua", 0.5)
    msg = str(e.value)
    assert msg.startswith("llmlingua (llmlingua) failed: KeyError: 'y' in the compressor")
    assert "\n" not in msg
    log = Path(msg.split("(full log: ")[1].rstrip(")"))
    assert log.is_relative_to(tmp_path) and "Traceback" in log.read_text()


def test_rows_that_do_not_match_the_items_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    _fake_env(
        tmp_path, "kvpress", ECHO.replace('it["item_id"], "prediction"', '"other", "prediction"'), monkeypatch
    )
    with pytest.raises(FlowsieveError, match="returned rows for"):
        P.run_peer("kvpress", [_item(0)], "knorm", 0.5)


def test_a_hanging_runner_times_out(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    _fake_env(tmp_path, "kvpress", "import time\ntime.sleep(30)\n", monkeypatch)
    with pytest.raises(FlowsieveError, match=r"did not finish 1 items in 1s"):
        P.run_peer("kvpress", [_item(0)], "knorm", 0.5, timeout=1)


def test_a_failed_build_is_a_one_line_error_and_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    calls = []

    def fake_step(cmd, what, timeout):
        calls.append(list(cmd))
        if "venv" in cmd:
            (tmp_path / "kvpress" / "bin").mkdir(parents=True)
            (tmp_path / "kvpress" / "bin" / "python").touch()
            return
        if "kvpress==0.5.5" in cmd:
            raise FlowsieveError(f"{what} failed: ERROR: No matching distribution found for kvpress==0.5.5")

    monkeypatch.setattr(P, "_run_step", fake_step)
    with pytest.raises(FlowsieveError, match="No matching distribution") as e:
        P.ensure_env("kvpress")
    assert "\n" not in str(e.value)
    assert not P.env_ready("kvpress")  # no stamp: the next call starts over
    torch_step, peer_step = calls[1], calls[2]
    assert torch_step[-1] == "torch==2.13.0"  # torch alone, first: the CPU wheel
    assert "kvpress==0.5.5" in peer_step and "transformers>=4.56,<5.3" in peer_step
    ll_steps = P._install_steps(P.peer_spec("llmlingua"))
    assert ll_steps[0] == ["torch==2.13.0"] and "transformers==4.44.*" in ll_steps[1]


# --- the runners' own helpers (stdlib + a tokenizer; no peer venv) ---------------------------------------


def _runner_module(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(RUNNERS))
    spec = importlib.util.spec_from_file_location(f"_flowsieve_test_{name}", RUNNERS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_longllmlingua_documents(monkeypatch):
    ll = _runner_module("llmlingua_runner", monkeypatch)

    def words(s):
        return len(s.split())

    text = " ".join(f"Sentence number {i} is here." for i in range(40))  # 5 words each
    docs = ll.split_documents(text, words, "longllmlingua", chunk_tokens=20)
    assert len(docs) == 10 and " ".join(docs) == text
    assert ll.split_documents(text, words, "llmlingua") == [text]  # LLMLingua-1: the text as it is
    paras = "First para.\n\nSecond para.\n \nThird."
    assert ll.split_documents(paras, words, "longllmlingua") == ["First para.", "Second para.", "Third."]


def test_runner_prompt_tail_matches_flowsieve(monkeypatch):
    common = _runner_module("_common", monkeypatch)
    assert common.question_tail("  Who?  ", "Answer briefly.") == "\n\nWho?\nAnswer briefly."
    assert common.question_tail("Who?", None) == "\n\nWho?"
    assert common.compare_ids([1, 2, 3], [1, 2, 3]) == {"tokens_match_flowsieve": True}
    diff = common.compare_ids([1, 2, 3], [1, 9])
    assert diff["tokens_match_flowsieve"] is False and "token 1" in diff["token_diff"]


def test_layerwise_mask_fit_equals_token_by_token(monkeypatch):
    """PyramidKV on CPU: one multi-token forward over per-layer caches of different lengths gives the
    logits of feeding the tokens one at a time (which needs no mask)."""
    import torch
    from conftest import tiny_llama
    from transformers import DynamicCache
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    kv = _runner_module("kvpress_runner", monkeypatch)
    model = tiny_llama()
    ctx, qs = torch.randint(3, 128, (1, 40)), torch.randint(3, 128, (1, 6))
    pos = torch.arange(40, 46).unsqueeze(0)

    def pruned_cache():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(input_ids=ctx, cache=cache)
        for i, layer in enumerate(cache.layers):  # layer i keeps its last 40 - 7 i entries
            layer.keys, layer.values = layer.keys[:, :, 7 * i :], layer.values[:, :, 7 * i :]
        return cache

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    try:
        kv.fit_sdpa_masks()
        with torch.no_grad():
            at_once = model(input_ids=qs, cache=pruned_cache(), position_ids=pos).logits[0]
            cache = pruned_cache()
            one_by_one = torch.stack(
                [
                    model(input_ids=qs[:, j : j + 1], cache=cache, position_ids=pos[:, j : j + 1]).logits[
                        0, -1
                    ]
                    for j in range(6)
                ]
            )
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    torch.testing.assert_close(at_once, one_by_one, atol=1e-5, rtol=1e-4)


@pytest.mark.integration
def test_runner_prompt_ids_match_build_prompt(smollm2, monkeypatch):
    from flowsieve.generate import DEFAULT_INSTRUCTION, build_prompt

    common = _runner_module("_common", monkeypatch)
    _, tok = smollm2
    for it in get_task("needle", length=300).items(tok, 2):
        ours = build_prompt(tok, it.context, it.question, chat=True).ids
        assert common.flowsieve_ids(tok, it.context, it.question, DEFAULT_INSTRUCTION) == list(ours)


# --- real peers ------------------------------------------------------------------------------------------

needs_peers = pytest.mark.skipif(
    os.environ.get("FLOWSIEVE_SKIP_PEERS") == "1", reason="FLOWSIEVE_SKIP_PEERS=1: peer venvs not built"
)


@pytest.fixture(scope="module")
def needle_items(smollm2):
    _, tok = smollm2
    return get_task("needle", length=500).items(tok, 2)


def _check_rows(rows, items, tok):
    from flowsieve.generate import build_prompt

    assert [r["item_id"] for r in rows] == [it.item_id for it in items]
    for r, it in zip(rows, items):
        assert list(r) == list(P.ROW_FIELDS)
        assert isinstance(r["prediction"], str)
        # the same prompt as flowsieve's, token for token in length
        assert r["prompt_tokens"] == len(build_prompt(tok, it.context, it.question, chat=True))
        assert 0 < r["kept_tokens"] < r["prompt_tokens"]
        assert r["prefill_s"] > 0 and r["peak_rss_mb"] > 100
        assert 1 <= r["new_tokens"] <= 8
        assert r["decode_tok_s"] >= 0


@pytest.mark.integration
@needs_peers
def test_kvpress_runs_side_by_side(smollm2, needle_items):
    _, tok = smollm2
    P.ensure_env("kvpress")
    rows = P.run_peer(
        "kvpress", needle_items, "snapkv", 0.5, mode="query_agnostic", max_new_tokens=8, threads=2
    )
    _check_rows(rows, needle_items, tok)
    for r in rows:
        assert 0 < r["kv_bytes"] < r["kv_bytes_full"]
        extra = r["extra"]
        assert extra["versions"]["kvpress"] == "0.5.5"
        assert extra["press"].startswith("SnapKVPress(compression_ratio=0.5")
        assert extra["tokens_match_flowsieve"] is True
        # half the context (chat prefix included) is kept; the question is appended whole
        assert extra["kept_context_tokens"] == extra["context_tokens"] - int(extra["context_tokens"] * 0.5)
        assert r["kept_tokens"] == extra["kept_context_tokens"] + extra["question_tokens"]


@pytest.mark.integration
@needs_peers
def test_llmlingua_runs_side_by_side(smollm2, needle_items):
    _, tok = smollm2
    P.ensure_env("llmlingua")
    rows = P.run_peer(
        "llmlingua", needle_items, "llmlingua", 0.5, mode="query_aware", max_new_tokens=8, threads=2
    )
    _check_rows(rows, needle_items, tok)
    for r in rows:
        assert 0 < r["kv_bytes"] < r["kv_bytes_full"]
        extra = r["extra"]
        assert extra["versions"]["llmlingua"] == "0.2.2"
        assert extra["versions"]["transformers"].startswith("4.44.")
        assert extra["settings"]["rank_method"] == "llmlingua" and extra["settings"]["rate"] == 0.5
        assert 0 < extra["kept_context_tokens"] < extra["context_tokens"]
        assert extra["compress_s"] > 0
        assert extra["compressed_context"]


def test_env_dir_defaults_to_the_checkout(monkeypatch):
    monkeypatch.delenv("FLOWSIEVE_PEERS_DIR", raising=False)
    assert P.peers_dir() == P.repo_root() / ".venv-peers"
    assert (P.repo_root() / "pyproject.toml").exists()
    assert P.runner_path("kvpress").name == "kvpress_runner.py"
    assert os.access(P.runner_path("llmlingua"), os.R_OK)
