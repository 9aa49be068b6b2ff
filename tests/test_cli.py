"""The command line: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json

import pytest

from flowsieve.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["trace", "--text-file", "/no/such/file.txt", "--json", "x.json"], "text file not found"),
        (["trace", "--text", "   ", "--json", "x.json"], "the text is empty"),
        (["trace", "--text", "hello", "--question", " ", "--json", "x.json"], "the question is empty"),
        (["trace", "--text", "hello"], "nothing to write"),
        (["trace", "--model", "smolm2", "--text", "hi", "--json", "x.json"], "did you mean 'smollm2'"),
        (
            ["trace", "--model", "gema3-270m", "--text", "hi", "--json", "x.json"],
            "did you mean 'gemma3-270m'",
        ),
        (["trace", "--threads", "0", "--text", "hi", "--json", "x.json"], "--threads"),
    ],
)
def test_bad_input_one_line_exit_2(capsys, argv, msg):
    code, _out, err = _run(capsys, *argv)
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowsieve: error:") and msg in lines[0], err


def test_not_utf8(capsys, tmp_path):
    p = tmp_path / "bin.txt"
    p.write_bytes(b"\xff\xfe\x00bad")
    code, _, err = _run(capsys, "trace", "--text-file", str(p), "--json", str(tmp_path / "o.json"))
    assert code == 2 and "not UTF-8" in err


def test_models_json(capsys):
    code, out, _ = _run(capsys, "models", "--json")
    assert code == 0
    rows = json.loads(out)["models"]
    assert {r["name"] for r in rows} >= {"smollm2", "gemma3-270m", "minilm"}
    assert [r["name"] for r in rows if r["default"]] == ["smollm2"]


def test_help_on_each_subcommand(capsys):
    for sub in ("models", "trace"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0
        assert "usage: flowsieve" in capsys.readouterr().out


# --- generate: every Sieve field is a flag --------------------------------------------------------

# Sieve field -> the `flowsieve generate` flag that sets it; a new Sieve field fails the test below
# until it gets a flag here and in the parser.
SIEVE_FLAGS = {
    "method": "--sieve",
    "keep": "--keep",
    "budget": "--budget",
    "site": "--site",
    "window": "--window",
    "chunk": "--chunk",
    "seed": "--seed",
    "options": "--option",
    "units": "--units",
    "refeed": "--refeed",
    "rows": "--rows",
}


def _generate_spy(monkeypatch, model_tok=None):
    """Replace the model loader (and, unless ``model_tok`` gives a model to run, generation itself)
    for ``flowsieve generate``; returns the list of calls' (args, kwargs) of ``generate``."""
    import flowsieve.generate
    import flowsieve.models
    from flowsieve.generate import GenResult

    calls = []
    real = flowsieve.generate.generate

    def fake_generate(*args, **kwargs):
        calls.append((args, kwargs))
        if model_tok is not None:
            return real(*args, **kwargs)
        return GenResult("ok", [1], 10, 5, 100, 200, 0.1, 1.0, 1.0, 1)

    monkeypatch.setattr(flowsieve.generate, "generate", fake_generate)
    monkeypatch.setattr(flowsieve.models, "load", lambda *a, **k: model_tok or (None, None))
    return calls


@pytest.mark.parametrize(
    "extra,want",
    [
        (
            ["--budget", "40", "--window", "8", "--chunk", "16", "--seed", "7", "--units", "sentence"],
            {"budget": 40, "keep": None, "window": 8, "chunk": 16, "seed": 7, "units": "sentence"},
        ),
        (
            [
                "--keep",
                "0.5",
                "--refeed",
                "--rows",
                "window",
                "--option",
                "kernel=3",
                "--option",
                "pooling=max",
            ],
            {
                "keep": 0.5,
                "budget": None,
                "refeed": True,
                "rows": "window",
                "options": {"kernel": 3, "pooling": "max"},
                "chunk": None,
                "units": "token",
                "seed": 0,
            },
        ),
    ],
)
def test_generate_flags_reach_the_sieve(capsys, monkeypatch, extra, want):
    calls = _generate_spy(monkeypatch)
    argv = ["generate", "--prompt", "Ab. Cd.", "--question", "Q?", "--sieve", "snapkv", "--json", *extra]
    code, out, err = _run(capsys, *argv)
    assert code == 0, err
    ((_, kwargs),) = calls
    sieve = kwargs["sieve"]
    assert sieve.method == "snapkv" and sieve.site == "prefill"
    assert {f: getattr(sieve, f) for f in want} == want
    assert json.loads(out)["text"] == "ok"


def test_generate_defaults_match_sieve_defaults(capsys, monkeypatch):
    import dataclasses

    from flowsieve.sieve import Sieve

    calls = _generate_spy(monkeypatch)
    code, _, err = _run(capsys, "generate", "--prompt", "Ab.", "--sieve", "snapkv", "--json")
    assert code == 0, err
    sieve = calls[0][1]["sieve"]
    for f in dataclasses.fields(Sieve):
        if f.name not in ("method", "keep", "budget"):  # the CLI's own default: --keep 0.25
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert getattr(sieve, f.name) == default, f.name
    assert (sieve.keep, sieve.budget) == (0.25, None)


@pytest.mark.parametrize(
    "extra,msg",
    [
        (["--refeed", "--agnostic"], "refeed needs a question"),
        (["--refeed", "--chunk", "64"], "refeed applies to an unchunked prefill-site sieve"),
        (
            ["--units", "sentence", "--site", "decode", "--sieve", "h2o"],
            "units='sentence' applies at the prefill",
        ),
        (["--chunk", "8"], "chunk (8) must be at least the window (32)"),
        (["--sieve", "kvzip", "--chunk", "64"], "no chunked prefill"),
        (["--window", "0"], "window must be >= 1"),
        (["--option", "nokernel=3"], "bad option for method 'snapkv'"),
    ],
)
def test_generate_bad_combination_one_line_exit_2(capsys, monkeypatch, extra, msg):
    calls = _generate_spy(monkeypatch)
    argv = ["generate", "--prompt", "Ab. Cd.", "--question", "Q?", "--sieve", "snapkv", *extra]
    code, _out, err = _run(capsys, *argv)
    assert code == 2 and not calls  # rejected before loading or generating
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowsieve: error:") and msg in lines[0], err


@pytest.mark.parametrize("extra", [["--units", "bogus"], ["--rows", "all"], ["--chunk", "x"]])
def test_generate_bad_flag_value_is_a_usage_error(capsys, extra):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "Ab.", "--sieve", "snapkv", *extra])
    assert e.value.code == 2
    assert "invalid" in capsys.readouterr().err


def test_generate_help_lists_a_flag_for_every_sieve_field(capsys, monkeypatch):
    import argparse
    import dataclasses

    from flowsieve.cli import build_parser
    from flowsieve.sieve import Sieve

    assert {f.name for f in dataclasses.fields(Sieve)} == set(SIEVE_FLAGS), "map every Sieve field to a flag"
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    actions = {s: a for a in sub.choices["generate"]._actions for s in a.option_strings}
    lines = text.splitlines()
    for field, flag in SIEVE_FLAGS.items():
        assert flag in actions, f"Sieve.{field}: no {flag} flag"
        helpstr = actions[flag].help
        assert helpstr and "\n" not in helpstr, f"{flag} has no one-line help"
        # documented in one line of --help at 100 columns (the help text does not wrap)
        assert any(helpstr in x for x in lines), f"{flag}: help wraps or is missing:\n{text}"


def test_generate_sentence_units_and_refeed_run_end_to_end(capsys, monkeypatch, tiny_llama_model, char_tok):
    """The real generate gets the prompt's sentence map (units='sentence') and refeeds the question."""
    calls = _generate_spy(monkeypatch, (tiny_llama_model, char_tok))
    ctx = "One two three. Four five six seven. Eight nine. Ten eleven twelve thirteen."
    for extra in (["--units", "sentence"], ["--refeed"]):
        argv = ["generate", "--prompt", ctx, "--question", "Which?", "--no-chat", "--sieve", "snapkv"]
        argv += ["--keep", "0.5", "--window", "4", "--max-new-tokens", "2", "--json", *extra]
        code, out, err = _run(capsys, *argv)
        assert code == 0, err
        r = json.loads(out)
        assert 0 < r["kept_tokens"] < r["prompt_tokens"]
    assert calls[0][1]["sieve"].units == "sentence" and calls[1][1]["sieve"].refeed
    assert r["extra"].get("refeed_tokens", 0) > 0
