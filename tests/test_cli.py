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
