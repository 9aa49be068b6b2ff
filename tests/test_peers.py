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
from flowsieve.bench import peer_envs as E
from flowsieve.bench import peers as P

RUNNERS = Path(P.__file__).resolve().parents[3] / "benchmarks" / "peers"


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
    assert E.PEER_METHODS["kvpress"]["snapkv"] == "SnapKVPress"
    assert E.PEER_METHODS["kvpress"]["adakv_expected_attention"] == "AdaKVPress(ExpectedAttentionPress)"
    assert set(E.PEER_METHODS["kvpress"]) == {
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
    assert set(E.PEER_METHODS["llmlingua"]) == {"llmlingua", "longllmlingua"}
    assert E.peer_method("llmlingua", "longllmlingua").startswith("LongLLMLingua")


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
        E.peer_method(system, method)
    assert "\n" not in str(e.value)


def test_kvpress_layers_option_is_parsed_with_its_default():
    assert E.parse_peer_method("kvpress", "snapkv") == ("snapkv", {"layers": "full"})
    assert E.parse_peer_method("kvpress", "tova@layers=all") == ("tova", {"layers": "all"})
    assert E.parse_peer_method("llmlingua", "llmlingua") == ("llmlingua", {})
    assert E.peer_method("kvpress", "snapkv") == "SnapKVPress"
    assert E.peer_method("kvpress", "snapkv@layers=all") == "SnapKVPress (layers=all)"
    assert E.peer_method("kvpress", "adakv_expected_attention@layers=full").endswith("(layers=full)")


@pytest.mark.parametrize(
    ("method", "msg"),
    [
        ("snapkv@layer=all", r"no method option 'layer' \(did you mean 'layers'\?\); options: layers"),
        ("snapkv@layers=al", r"layers must be one of full, all, got 'al' \(did you mean 'all'\?\)"),
        ("snapkv@layers", "is not NAME=VALUE"),
        ("snapk@layers=all", "did you mean 'snapkv'"),
        ("llmlingua@layers=all", "llmlingua has no method option 'layers'"),
    ],
)
def test_bad_method_options_fail_before_anything_runs(method, msg, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    system = method.split("@")[0] if method.startswith("llmlingua") else "kvpress"
    with pytest.raises(FlowsieveError, match=msg) as e:
        P.run_peer(system, [_item(0)], method, 0.5, build=False)
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


def test_unknown_system_suggests_the_closest():
    with pytest.raises(FlowsieveError, match="did you mean 'kvpress'"):
        E.peer_spec("kvpres")
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
        ({"model_name": "minilm"}, "kvpress runs with the bundled smollm2 and gemma3-270m only"),
        ({"chat": "no"}, "chat must be True or False"),
    ],
)
def test_bad_arguments_fail_before_anything_runs(kw, msg, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    args = {"keep": 0.5} | kw
    with pytest.raises(FlowsieveError, match=msg):
        P.run_peer("kvpress", [_item(0)], "snapkv", build=False, **args)
    assert not any(tmp_path.iterdir())  # nothing was built


def test_llmlingua_refuses_gemma3_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    with pytest.raises(FlowsieveError, match=r"transformers 4\.44 cannot read Gemma-3") as e:
        P.run_peer("llmlingua", [_item(0)], "llmlingua", 0.5, "gemma3-270m", chat=False, build=False)
    assert "\n" not in str(e.value) and not any(tmp_path.iterdir())


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
    assert E.one_line("a\nb\nFLOWSIEVE-PEER-ERROR: it broke\nexit") == "it broke"
    assert E.one_line("x\nERROR: No matching distribution found for kvpress==9\nmore") == (
        "ERROR: No matching distribution found for kvpress==9"
    )
    assert E.one_line("Traceback\n  File x\nValueError: bad\n") == "ValueError: bad"
    assert E.one_line("") == ""
    assert len(E.one_line("x" * 1000)) == 400


# --- environments and the runner protocol, with a fake peer python ---------------------------------------


def test_missing_env_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path / "nowhere"))
    assert not E.env_ready("kvpress")
    with pytest.raises(FlowsieveError, match=r"kvpress environment .* does not exist") as e:
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
    (env / E.STAMP).write_text(json.dumps({"spec": E._spec_hash(E.peer_spec(system))}))
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
                         "prompt_ids": it["prompt_ids"], "prompt_split": it["prompt_split"],
                         "omp": os.environ.get("OMP_NUM_THREADS"), "offline": os.environ.get("HF_HUB_OFFLINE")}}
        out.write(json.dumps(row) + "\\n")
"""


@pytest.mark.parametrize("chat", [True, False])
def test_run_peer_speaks_the_runner_protocol(chat, tmp_path, monkeypatch):
    from flowsieve.inputs import build_prompt

    monkeypatch.setenv("FLOWSIEVE_PEERS_DIR", str(tmp_path))
    _fake_env(tmp_path, "kvpress", ECHO, monkeypatch)
    assert E.env_ready("kvpress")
    items = [_item(0), _item(1)]
    rows = P.run_peer(
        "kvpress", items, "tova", 0.25, mode="query_agnostic", max_new_tokens=7, threads=1, chat=chat
    )
    assert [r["item_id"] for r in rows] == [it.item_id for it in items]
    assert all(list(r) == list(P.ROW_FIELDS) for r in rows)
    extra = rows[0]["extra"]
    assert extra["script"] == "kvpress_runner.py"
    assert extra["omp"] == "1" and extra["offline"] == "1"
    cfg = extra["cfg"]
    assert cfg["method"] == "tova" and cfg["peer_method"] == "TOVAPress"
    assert cfg["options"] == {"layers": "full"}  # the default: full-attention layers only
    assert cfg["keep"] == 0.25 and cfg["mode"] == "query_agnostic" and cfg["max_new_tokens"] == 7
    assert cfg["instruction"] == "Answer briefly."
    assert Path(cfg["gguf_dir"], cfg["gguf_file"]).exists()
    assert cfg["chat"] is chat and cfg["model_name"] == "smollm2"
    # each item carries flowsieve's own prompt: its tokenizer, its build_prompt, the sweep's chat setting
    tok, tok_dir = P.flowsieve_tokenizer("smollm2")
    assert Path(cfg["tokenizer_dir"]) == tok_dir and (tok_dir / "tokenizer_config.json").exists()
    for r, it in zip(rows, items):
        prompt = build_prompt(tok, it.context, it.question, chat=chat)
        assert r["extra"]["prompt_ids"] == list(prompt.ids) and r["extra"]["prompt_split"] == prompt.split
    plain, templated = (build_prompt(tok, items[0].context, items[0].question, chat=c) for c in (False, True))
    assert len(plain) < len(templated)  # the two settings really differ


def test_method_options_reach_the_runner(tmp_path, monkeypatch):
    _fake_env(tmp_path, "kvpress", ECHO, monkeypatch)
    (row,) = P.run_peer("kvpress", [_item(0)], "knorm@layers=all", 0.5, threads=1)
    cfg = row["extra"]["cfg"]
    assert cfg["method"] == "knorm" and cfg["method_spec"] == "knorm@layers=all"
    assert cfg["options"] == {"layers": "all"} and cfg["peer_method"] == "KnormPress (layers=all)"


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
    with pytest.raises(FlowsieveError, match=r"^llmlingua \(llmlingua\) failed: KeyError") as e:
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

    monkeypatch.setattr(E, "_run_step", fake_step)
    with pytest.raises(FlowsieveError, match="No matching distribution") as e:
        E.ensure_env("kvpress")
    assert "\n" not in str(e.value)
    assert not E.env_ready("kvpress")  # no stamp: the next call starts over
    torch_step, peer_step = calls[1], calls[2]
    assert torch_step[-1] == "torch==2.13.0"  # torch alone, first: the CPU wheel
    assert "kvpress==0.5.5" in peer_step and "transformers>=4.56,<5.3" in peer_step
    ll_steps = E._install_steps(E.peer_spec("llmlingua"))
    assert ll_steps[0] == ["torch==2.13.0"] and "transformers==4.44.*" in ll_steps[1]


# --- the sweep hands its prompt setting to run_peer ----------------------------------------------------


def _fake_sweep(monkeypatch, tmp_path, run_peer, chat: bool):
    """A sweep with fake flowsieve cells (tests/test_bench_runner.py's fakes) and ``run_peer`` as the peer."""
    import types

    import test_bench_runner as tb

    from flowsieve.bench.store import Store

    monkeypatch.setattr(tb.gen, "generate", tb.fake_generate)
    monkeypatch.setattr(tb.cells, "run_compressed", tb.fake_run_compressed)
    monkeypatch.setattr(tb.runner, "check_methods", lambda config: None)
    peers = types.ModuleType("flowsieve.bench.peers")
    peers.run_peer = run_peer
    monkeypatch.setitem(sys.modules, "flowsieve.bench.peers", peers)
    cfg = tb.small_config(
        methods=["full"], modes=["query_aware"], keeps=[0.5], peers={"kvpress": ["snapkv"]}, chat=chat
    )
    with Store(tmp_path / "r.sqlite") as store:
        return tb.sweep(cfg, store), store.failures()


@pytest.mark.parametrize("chat", [True, False])
def test_sweep_passes_chat_to_run_peer(chat, monkeypatch, tmp_path):
    seen = []

    def run_peer(system, items, method, keep, model_name, mode, max_new_tokens, threads=2, *, chat=True):
        seen.append((system, method, chat))
        return []

    _fake_sweep(monkeypatch, tmp_path, run_peer, chat)
    assert seen == [("kvpress", "snapkv", chat)]


def test_a_run_peer_without_chat_is_not_run_on_plain_prompts(monkeypatch, tmp_path):
    seen = []

    def run_peer(system, items, method, keep, model_name, mode, max_new_tokens):
        seen.append(system)
        return []

    summary, failures = _fake_sweep(monkeypatch, tmp_path, run_peer, chat=False)
    assert seen == [] and "cannot build plain (--no-chat) prompts" in summary.peer_errors["kvpress"]
    assert any("cannot build plain" in f["error"] for f in failures if f["system"] == "kvpress")
    _fake_sweep(monkeypatch, tmp_path / "chat", run_peer, chat=True)
    assert seen == ["kvpress"]  # with chat prompts it runs as before


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


def test_runner_plain_prompt_and_split_match_build_prompt(char_tok, monkeypatch):
    """The runner's copy of build_prompt(chat=False), on a tokenizer with offsets (no model needed)."""
    from flowsieve.inputs import DEFAULT_INSTRUCTION, build_prompt

    common = _runner_module("_common", monkeypatch)
    for context, question in [("  ctx one.\n", " Q? "), ("a" * 50, "what")]:
        ours = build_prompt(char_tok, context, question, chat=False)
        ids, split = common.flowsieve_prompt(char_tok, context, question, DEFAULT_INSTRUCTION, chat=False)
        assert ids == list(ours.ids) and split == ours.split
        assert common.flowsieve_ids(char_tok, context, question, DEFAULT_INSTRUCTION, chat=False) == ids
    with pytest.raises(common.PeerError, match="no chat template"):
        common.flowsieve_ids(char_tok, "ctx", "q", DEFAULT_INSTRUCTION, chat=True)


def test_plain_prompt_split_for_kvpress(monkeypatch):
    kv = _runner_module("kvpress_runner", monkeypatch)
    ids = [2, 10, 11, 12, 13, 14]
    assert kv.split_ids(ids, 3, "query_agnostic") == ([2, 10, 11], [12, 13, 14])
    assert kv.split_ids(ids, 3, "query_aware") == ([2, 10, 11, 12, 13], [14])
    with pytest.raises(kv.PeerError, match="outside"):
        kv.split_ids(ids, 6, "query_agnostic")


GEMMA3_270M_LAYERS = ["sliding_attention"] * 5 + ["full_attention"]
GEMMA3_270M_LAYERS = GEMMA3_270M_LAYERS * 3  # 18 layers, full attention at 5, 11, 17


def test_pressed_layers_leave_sliding_window_layers_out_by_default(monkeypatch):
    kv = _runner_module("kvpress_runner", monkeypatch)
    assert kv.pressed_layers(GEMMA3_270M_LAYERS, 18, "full") == [5, 11, 17]
    assert kv.pressed_layers(GEMMA3_270M_LAYERS, 18, "all") == list(range(18))
    # SmolLM2: no layer types, or full attention everywhere: every layer either way
    assert kv.pressed_layers([], 30, "full") == kv.pressed_layers(["full_attention"] * 30, 30, "full")
    assert kv.pressed_layers([], 30, "full") == list(range(30))
    with pytest.raises(kv.PeerError, match="layers must be one of full, all"):
        kv.pressed_layers(GEMMA3_270M_LAYERS, 18, "sliding")


def test_unpressed_entries_and_pyramid_budgets(monkeypatch):
    import types

    kv = _runner_module("kvpress_runner", monkeypatch)
    sliding = types.SimpleNamespace(is_sliding=True, sliding_window=512)
    assert kv.unpressed_entries(sliding, 1037) == 511 and kv.unpressed_entries(sliding, 300) == 300
    assert kv.unpressed_entries(types.SimpleNamespace(is_sliding=False), 1037) == 1037
    assert kv.unpressed_entries(object(), 1037) == 1037
    assert kv.layer_budgets([272] * 30).startswith("uniform: kvpress's PyramidKVPress fell back")
    assert kv.layer_budgets([707, 386, 65]) == (
        "per layer (pyramid): 65 to 707 entries, 386.0 on average over the pressed layers"
    )


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_after_stored_mask(kind, monkeypatch):
    import torch

    kv = _runner_module("kvpress_runner", monkeypatch)
    like = torch.zeros(1, 1, 3, 9, dtype=torch.bool if kind == "bool" else torch.float32)
    mask = kv.causal_after_stored(like, stored=4, q=3)
    assert mask.shape == (1, 1, 3, 7) and mask.dtype == like.dtype
    visible = mask if kind == "bool" else mask == 0
    expected = torch.tensor(
        [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(visible[0, 0], expected)
    if kind == "float":
        assert mask.min().item() == torch.finfo(torch.float32).min


def _at_once_and_one_by_one(model, qs, pos, pruned_cache):
    """Logits of the query tokens ``qs`` fed in one forward and one token at a time, each on a
    fresh ``pruned_cache()``."""
    import torch

    with torch.no_grad():
        at_once = model(input_ids=qs, cache=pruned_cache(), position_ids=pos).logits[0]
        cache = pruned_cache()
        one_by_one = torch.stack(
            [
                model(input_ids=qs[:, j : j + 1], cache=cache, position_ids=pos[:, j : j + 1]).logits[0, -1]
                for j in range(qs.shape[1])
            ]
        )
    return at_once, one_by_one


def test_full_attention_masks_on_gemma3_equal_token_by_token(monkeypatch):
    """layers=full on a Gemma-3: the sliding layers keep their window, the full-attention layer is
    pruned; one forward of the question gives the logits of feeding it one token at a time. (On
    flowsieve's transformers the mask is right without the hooks too; the peer's transformers needs
    them: test_full_attention_masks_are_needed_in_the_kvpress_env.)"""
    import torch
    from conftest import tiny_gemma3
    from transformers import DynamicCache

    kv = _runner_module("kvpress_runner", monkeypatch)
    model = tiny_gemma3()
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    assert kv.pressed_layers(model.config.layer_types, 3, "full") == full == [2]
    ctx, qs = torch.randint(3, 128, (1, 40)), torch.randint(3, 128, (1, 6))
    pos = torch.arange(40, 46).unsqueeze(0)  # the question keeps its original positions

    def pruned_cache():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(input_ids=ctx, cache=cache)
        for i in full:  # a press keeps every third entry
            layer = cache.layers[i]
            layer.keys, layer.values = layer.keys[:, :, ::3], layer.values[:, :, ::3]
        return cache

    hooks = kv.fit_full_attention_masks(model, full)
    try:
        at_once, one_by_one = _at_once_and_one_by_one(model, qs, pos, pruned_cache)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(at_once, one_by_one, atol=1e-5, rtol=1e-4)


def test_full_kv_bytes_caps_sliding_layers_like_flowsieve(monkeypatch):
    from conftest import tiny_gemma3, tiny_llama

    from flowsieve.kvcache import full_kv_bytes

    common = _runner_module("_common", monkeypatch)
    for model in (tiny_llama(), tiny_gemma3()):
        for n in (1, 7, 300):
            assert common.full_kv_bytes(model.config, n, 4) == full_kv_bytes(model, n)  # fp32 models: 4 bytes
    gemma = tiny_gemma3().config
    assert "sliding_attention" in gemma.layer_types and gemma.sliding_window < 300
    per_token = common.full_kv_bytes(gemma, 1, 4)
    assert common.full_kv_bytes(gemma, 300, 4) < 300 * per_token  # sliding layers hold their window only


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
        at_once, one_by_one = _at_once_and_one_by_one(model, qs, pos, pruned_cache)
    finally:
        ALL_ATTENTION_FUNCTIONS["sdpa"] = original
    torch.testing.assert_close(at_once, one_by_one, atol=1e-5, rtol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("model_name", "chat"), [("smollm2", True), ("smollm2", False), ("gemma3-270m", False)]
)
def test_runner_prompt_ids_match_build_prompt(model_name, chat, monkeypatch):
    """The prompt format the runners duplicate: their ids (and split) equal flowsieve's build_prompt's on
    the bundled tokenizers, with and without the chat template (gemma3-270m has none)."""
    from flowsieve.inputs import DEFAULT_INSTRUCTION, build_prompt

    common = _runner_module("_common", monkeypatch)
    tok, _ = P.flowsieve_tokenizer(model_name)
    for it in get_task("needle", length=300).items(tok, 2):
        ours = build_prompt(tok, it.context, it.question, chat=chat)
        assert common.flowsieve_ids(tok, it.context, it.question, DEFAULT_INSTRUCTION, chat=chat) == list(
            ours.ids
        )
        ids, split = common.flowsieve_prompt(tok, it.context, it.question, DEFAULT_INSTRUCTION, chat=chat)
        assert ids == list(ours.ids) and split == ours.split
        if model_name == "gemma3-270m":
            assert ids[0] == tok.bos_token_id == 2  # add_special_tokens=True: <bos> first
    if model_name == "gemma3-270m":
        with pytest.raises(FlowsieveError, match="no chat template"):
            build_prompt(tok, "ctx", "q", chat=True)
        with pytest.raises(common.PeerError, match="no chat template"):
            common.flowsieve_ids(tok, "ctx", "q", DEFAULT_INSTRUCTION, chat=True)


# --- real peers ------------------------------------------------------------------------------------------

needs_peers = pytest.mark.skipif(
    os.environ.get("FLOWSIEVE_SKIP_PEERS") == "1", reason="FLOWSIEVE_SKIP_PEERS=1: peer venvs not built"
)


@pytest.fixture(scope="module")
def needle_items(smollm2):
    _, tok = smollm2
    return get_task("needle", length=500).items(tok, 2)


def _check_rows(rows, items, tok):
    from flowsieve.inputs import build_prompt

    assert [r["item_id"] for r in rows] == [it.item_id for it in items]
    for r, it in zip(rows, items):
        assert list(r) == list(P.ROW_FIELDS)
        # the answer alone (no echo of the prompt): about as many tokens as were generated
        assert len(tok(r["prediction"], add_special_tokens=False)["input_ids"]) <= r["new_tokens"] + 2
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
    E.ensure_env("kvpress")
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
    E.ensure_env("llmlingua")
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


@pytest.fixture(scope="module")
def gemma3():
    import flowsieve

    return flowsieve.load("gemma3-270m")


PEER_LOGITS = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import _common as C
cfg = json.load(open(sys.argv[2]))
model, tok, _ = C.load_model(cfg)
with torch.no_grad():
    logits = model(input_ids=torch.tensor([cfg["ids"]])).logits[0, -cfg["last"]:]
import transformers
torch.save({"logits": logits, "class": type(model).__name__, "ids": tok(cfg["text"])["input_ids"],
            "transformers": transformers.__version__}, sys.argv[3])
"""


@pytest.mark.integration
@needs_peers
def test_kvpress_gemma3_has_flowsieves_weights(gemma3, tmp_path):
    """The kvpress venv's gemma3-270m (its transformers, converted from the same GGUF) gives flowsieve's
    logits on the same ids, and its tokenizer flowsieve's ids."""
    import subprocess

    import torch
    import transformers

    from flowsieve.inputs import build_prompt
    from flowsieve.models import BUNDLED

    model, tok = gemma3
    env = E.ensure_env("kvpress")
    item = get_task("needle", length=200).items(tok, 1)[0]
    prompt = build_prompt(tok, item.context, item.question, chat=False)
    gguf_dir, gguf_file = BUNDLED["gemma3-270m"].locate()
    _, tok_dir = P.flowsieve_tokenizer("gemma3-270m")
    text = item.context.strip() + "\n\n" + item.question.strip() + "\nAnswer briefly."
    cfg = {
        "model_name": "gemma3-270m",
        "gguf_dir": str(gguf_dir),
        "gguf_file": gguf_file,
        "tokenizer_dir": str(tok_dir),
        "cache_dir": str(P.peer_cache_dir()),
        "ids": list(prompt.ids),
        "text": text,
        "last": 16,
    }
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "peer.py").write_text(PEER_LOGITS)
    proc = subprocess.run(
        [
            str(E.env_python(env)),
            str(tmp_path / "peer.py"),
            str(RUNNERS),
            str(tmp_path / "cfg.json"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        env=P._runner_env(2),
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peer = torch.load(tmp_path / "out.pt")
    assert peer["transformers"] != transformers.__version__  # really the peer's own transformers
    assert peer["class"] == type(model).__name__ == "Gemma3ForCausalLM"
    assert peer["ids"] == list(prompt.ids)  # the peer's tokenizer: flowsieve's ids, <bos> included
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([prompt.ids])).logits[0, -16:]
    diff = (peer["logits"] - ours).abs().max().item()
    print(f"gemma3-270m logits, kvpress venv vs flowsieve: max abs difference {diff:.3g}")
    assert diff < 1e-3
    assert torch.equal(peer["logits"].argmax(-1), ours.argmax(-1))


PEER_MASKS = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import kvpress_runner as kv
from transformers import DynamicCache, Gemma3ForCausalLM, Gemma3TextConfig
out = {}
for impl in ("sdpa", "eager"):
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
        sliding_window=8, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg._attn_implementation = impl
    model = Gemma3ForCausalLM(cfg).eval()
    ctx, qs = torch.randint(3, 128, (1, 40)), torch.randint(3, 128, (1, 6))
    pos = torch.arange(40, 46).unsqueeze(0)
    def pruned():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model.model(input_ids=ctx, past_key_values=cache)
        layer = cache.layers[2]
        layer.keys, layer.values = layer.keys[:, :, ::3], layer.values[:, :, ::3]
        return cache
    def at_once():
        with torch.no_grad():
            return model(input_ids=qs, past_key_values=pruned(), position_ids=pos).logits[0]
    cache = pruned()
    with torch.no_grad():
        one = torch.stack([model(input_ids=qs[:, j:j + 1], past_key_values=cache,
                                 position_ids=pos[:, j:j + 1]).logits[0, -1] for j in range(6)])
    plain = at_once()
    hooks = kv.fit_full_attention_masks(model, [2])
    fitted = at_once()
    for h in hooks:
        h.remove()
    out[impl] = [(plain - one).abs().max().item(), (fitted - one).abs().max().item()]
print(json.dumps(out))
"""


@pytest.mark.integration
@needs_peers
def test_full_attention_masks_are_needed_in_the_kvpress_env(tmp_path):
    """In the kvpress env (transformers 5.2), a Gemma-3 with its first (sliding) layer unpruned and its
    full layer pruned gets a question mask that is not causal on the full layer; the runner's fitted
    mask gives the token-by-token logits, with SDPA and eager attention."""
    import subprocess

    env = E.ensure_env("kvpress")
    (tmp_path / "masks.py").write_text(PEER_MASKS)
    proc = subprocess.run(
        [str(E.env_python(env)), str(tmp_path / "masks.py"), str(RUNNERS)],
        capture_output=True,
        text=True,
        env=P._runner_env(1),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    for impl, (plain, fitted) in diffs.items():
        assert plain > 1e-3, f"{impl}: transformers' own mask was right ({plain:.3g})"
        assert fitted < 1e-4, f"{impl}: the fitted mask differs from token by token ({fitted:.3g})"


@pytest.mark.integration
@needs_peers
@pytest.mark.parametrize(
    ("method", "mode"),
    [
        ("expected_attention", "query_agnostic"),
        ("snapkv", "query_aware"),
        ("adakv_expected_attention", "query_agnostic"),
        ("snapkv@layers=all", "query_aware"),
    ],
)
def test_kvpress_runs_gemma3_on_flowsieves_plain_prompt(method, mode, gemma3):
    from flowsieve.inputs import build_prompt
    from flowsieve.kvcache import full_kv_bytes

    model, tok = gemma3
    items = get_task("needle", length=500).items(tok, 2)
    E.ensure_env("kvpress")
    rows = P.run_peer(
        "kvpress", items, method, 0.5, "gemma3-270m", mode, max_new_tokens=6, threads=2, chat=False
    )
    cfg = model.config
    per_entry = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # keys + values, fp32
    assert [r["item_id"] for r in rows] == [it.item_id for it in items]
    for r, it in zip(rows, items):
        prompt = build_prompt(tok, it.context, it.question, chat=False)
        extra = r["extra"]
        assert r["prompt_tokens"] == len(prompt) and extra["tokens_match_flowsieve"] is True
        assert extra["chat"] is False and extra["model_class"] == "Gemma3ForCausalLM"
        assert r["kv_bytes_full"] == full_kv_bytes(model, len(prompt))  # sliding layers capped, as flowsieve
        # kv_bytes is what the cache's tensors hold, layer by layer (18 layers)
        stored = extra["stored_per_layer"]
        assert len(stored) == cfg.num_hidden_layers and r["kv_bytes"] == sum(stored) * per_entry
        sliding = [i for i, t in enumerate(cfg.layer_types) if t == "sliding_attention"]
        full = [i for i in range(cfg.num_hidden_layers) if i not in sliding]
        assert extra["sliding_layer_indices"] == sliding and full == [5, 11, 17]
        assert extra["kv_bytes_sliding_layers"] + extra["kv_bytes_full_attention_layers"] == r["kv_bytes"]
        n_ctx, n_q = extra["context_tokens"], extra["question_tokens"]
        if mode == "query_agnostic":  # <bos> + context compressed, question + instruction appended
            assert n_ctx == prompt.split
        else:  # everything but the last token compressed
            assert n_ctx == len(prompt) - 1 and n_q == 1
        if method.endswith("@layers=all"):  # kvpress as shipped: every layer pressed alike
            assert extra["layers"] == "all" and extra["pressed_layers"] == list(range(18))
            assert extra["sliding_layers_compressed"] is True and "compressed too" in extra["sliding_layers"]
            assert set(stored) == {int(n_ctx * 0.5) + n_q}
        else:  # our adaptation: full-attention layers pressed, sliding layers keep their window
            assert extra["layers"] == "full" and extra["pressed_layers"] == full
            assert extra["sliding_layers_compressed"] is False and "adaptation" in extra["sliding_layers"]
            assert all(stored[i] == min(n_ctx + n_q, cfg.sliding_window - 1) for i in sliding)
            if method.startswith("adakv"):  # head-wise masking: the pressed layers keep every entry
                assert all(stored[i] == n_ctx + n_q for i in full)
                assert "wrapper of ours" in extra["sliding_layers"]
            else:
                assert all(stored[i] == int(n_ctx * 0.5) + n_q for i in full)
                assert "PerLayerCompressionPress" in extra["press"]
                assert r["kv_bytes"] < r["kv_bytes_full"]
        kept = max(stored[i] for i in extra["pressed_layers"])
        assert r["kept_tokens"] == extra["kept_context_tokens"] + n_q == kept
        assert 1 <= r["new_tokens"] <= 6 and r["prefill_s"] > 0
        assert len(tok(r["prediction"], add_special_tokens=False)["input_ids"]) <= r["new_tokens"] + 2
        if method.startswith("expected_attention"):
            assert "bound to its own type" in extra["rope"]


def test_env_dir_defaults_to_the_checkout(monkeypatch):
    monkeypatch.delenv("FLOWSIEVE_PEERS_DIR", raising=False)
    assert E.peers_dir() == E.repo_root() / ".venv-peers"
    assert (E.repo_root() / "pyproject.toml").exists()
    assert E.runner_path("kvpress").name == "kvpress_runner.py"
    assert os.access(E.runner_path("llmlingua"), os.R_OK)
