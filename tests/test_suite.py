"""Held-out evaluation settings: declared seed sets, task specs with their own parameters, and the
named suites (``flowsieve bench --suite core``), expanded to cells without running a model."""

from __future__ import annotations

import logging

import pytest

from flowsieve import FlowsieveError
from flowsieve.bench.config import (
    DEV_SEEDS,
    HEADLINE_SEEDS,
    SweepConfig,
    expand_seeds,
    format_task,
    parse_task,
    plan,
)
from flowsieve.bench.store import FULL, MODES
from flowsieve.bench.suite import SUITES, describe_suite, suite_config
from flowsieve.cli import build_parser
from flowsieve.cli.bench import _config, parse_seeds


class WordTokenizer:
    def __call__(self, text: str, **_: object) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def variants(config: SweepConfig) -> list[tuple[str, dict]]:
    return [(t.name, t.params()) for t in config.task_variants()]


# --- seeds -----------------------------------------------------------------------------------------


def test_seed_sets_are_declared_and_disjoint():
    assert DEV_SEEDS == (0, 1, 2) and HEADLINE_SEEDS == (1000, 1001, 1002)
    assert set(DEV_SEEDS).isdisjoint(HEADLINE_SEEDS)
    assert expand_seeds(["dev"]) == DEV_SEEDS and expand_seeds(["headline"]) == HEADLINE_SEEDS
    assert expand_seeds(["dev", 7, "1", "headline", 0]) == (0, 1, 2, 7, 1000, 1001, 1002)
    assert parse_seeds("headline") == HEADLINE_SEEDS and parse_seeds("0,5") == (0, 5)
    with pytest.raises(FlowsieveError, match="did you mean 'headline'"):
        expand_seeds(["headlines"])
    with pytest.raises(FlowsieveError, match="integer or one of dev, headline"):
        expand_seeds([1.5])


def _args(*argv: str):
    return build_parser().parse_args(["bench", "--db", "x.sqlite", *argv])


def test_cli_seed_names():
    assert _config(_args("--seed", "headline")).seeds == HEADLINE_SEEDS
    assert _config(_args("--seeds", "dev")).seeds == DEV_SEEDS
    assert _config(_args()).seeds == (0,)  # the default, unchanged


# --- task specs ------------------------------------------------------------------------------------


def test_task_specs():
    assert parse_task("needle") == ("needle", {})
    assert parse_task("needle@haystack=wiki@depth=0.5") == ("needle", {"haystack": "wiki", "depth": 0.5})
    assert parse_task("needle:haystack=wiki") == ("needle", {"haystack": "wiki"})
    assert format_task("qa", {"length": 768}) == "qa@length=768"
    assert parse_task(format_task("needle", {"haystack": "wiki", "depth": None})) == (
        "needle",
        {"haystack": "wiki", "depth": None},
    )
    with pytest.raises(FlowsieveError, match="NAME@PARAM=VALUE"):
        parse_task("needle@wiki")


def test_task_specs_in_a_sweep():
    cfg = SweepConfig(
        tasks=["needle:haystack=wiki", "needle@haystack=wiki", "needle", "qa@length=500"],
        lengths=[100, 200],
        task_params={"depth": 0.5},
    )
    assert cfg.tasks == ("needle@haystack=wiki", "needle", "qa@length=500")
    assert variants(cfg) == [
        ("needle", {"length": 100, "depth": 0.5, "haystack": "wiki"}),
        ("needle", {"length": 200, "depth": 0.5, "haystack": "wiki"}),
        ("needle", {"length": 100, "depth": 0.5}),
        ("needle", {"length": 200, "depth": 0.5}),
        ("qa", {"length": 500}),  # its spec sets the length
    ]
    # a spec's value wins over --param
    cfg = SweepConfig(tasks=["needle@haystack=wiki", "multi_needle"], task_params={"haystack": "essays"})
    assert [p.get("haystack", "essays") for _, p in variants(cfg)] == ["wiki", "essays"]


@pytest.mark.parametrize(
    ("tasks", "msg"),
    [
        (["needle@haystack=wik"], "haystack must be one of essays, wiki, got 'wik'"),
        (["needle@haystak=wiki"], "did you mean 'haystack'"),
        (["needel@haystack=wiki"], "did you mean 'needle'"),
    ],
)
def test_bad_task_specs_fail_early(tasks, msg):
    with pytest.raises(FlowsieveError, match=msg):
        SweepConfig(tasks=tasks)


def test_cli_task_spec():
    cfg = _config(_args("--tasks", "needle:haystack=wiki,needle", "--length", "500"))
    assert variants(cfg) == [
        ("needle", {"length": 500, "depth": None, "haystack": "wiki"}),
        ("needle", {"length": 500, "depth": None}),
    ]
    assert variants(_config(_args("--param", "haystack=wiki")))[0][1]["haystack"] == "wiki"


# --- suites ----------------------------------------------------------------------------------------

CORE_VARIANTS = [
    *(
        (task, {"length": n, **params, **({"haystack": "wiki"} if hay == "wiki" else {})})
        for task, params in (
            ("needle", {"depth": None}),
            ("multi_needle", {"num_needles": 3, "placement": "random"}),
            ("needle_thread", {"hops": 3, "direction": "forward", "placement": "random"}),
        )
        for hay in ("essays", "wiki")
        for n in (1000, 2000)
    ),
    ("qa", {"length": 768}),
    ("multidoc_qa", {}),
    ("lm", {"length": 1024, "continuation": 128}),
]


def test_core_suite_expands_to_the_expected_cells(caplog):
    cfg = suite_config("core")
    assert cfg.suite == "core" and cfg.to_dict()["suite"] == "core"
    assert cfg.keeps == (0.5, 0.25, 0.1) and cfg.modes == MODES == ("query_aware", "query_agnostic")
    assert cfg.seeds == HEADLINE_SEEDS and cfg.lengths == (1000, 2000) and cfg.limit == 20
    with caplog.at_level(logging.WARNING):
        assert variants(cfg) == CORE_VARIANTS
    assert not caplog.records  # multidoc_qa running at its own length is the suite's design

    jobs = plan(suite_config("core", limit=1, methods=["full", "a"]), WordTokenizer())
    # 15 task variants x 3 seeds x 1 item x 2 modes x (full + a at 3 keeps)
    assert len(jobs) == 15 * 3 * 2 * (1 + 3)
    assert len({j.cell.key() for j in jobs}) == len(jobs)
    assert {j.cell.seed for j in jobs} == set(HEADLINE_SEEDS)
    assert {j.cell.mode for j in jobs} == set(MODES)
    assert {j.cell.keep for j in jobs if j.cell.method != FULL} == {0.5, 0.25, 0.1}
    assert {j.cell.task for j in jobs} == {
        "needle",
        "multi_needle",
        "needle_thread",
        "qa",
        "multidoc_qa",
        "lm",
    }
    haystacks = {(j.cell.task, j.item.meta.get("haystack")) for j in jobs}
    for task in ("needle", "multi_needle", "needle_thread"):
        assert {(task, "essays"), (task, "wiki")} <= haystacks
    assert all(abs(j.item.meta["length_tokens"] - 768) <= 0.05 * 768 for j in jobs if j.cell.task == "qa")


def test_suite_is_documented_in_help():
    text = build_parser().format_help() + _bench_help()
    assert "--suite" in text and describe_suite("core").split(";")[0] in " ".join(text.split())
    assert set(SUITES) == {"core"}


def _bench_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["bench"].format_help()


def test_explicit_settings_override_or_narrow_the_suite():
    cfg = suite_config(
        "core", model="gemma3-270m", limit=10, seeds=DEV_SEEDS, keeps=[0.5], modes=["query_aware"]
    )
    assert (cfg.model, cfg.limit, cfg.seeds, cfg.keeps, cfg.modes) == (
        "gemma3-270m",
        10,
        DEV_SEEDS,
        (0.5,),
        ("query_aware",),
    )
    assert variants(cfg) == CORE_VARIANTS
    # --tasks narrows: both haystacks of needle are kept
    assert variants(suite_config("core", tasks=["needle"], lengths=[1500])) == [
        ("needle", {"length": 1500, "depth": None}),
        ("needle", {"length": 1500, "depth": None, "haystack": "wiki"}),
    ]
    # a spec or --param narrows to one haystack (equal variants merge)
    wiki = suite_config("core", tasks=["needle:haystack=wiki", "qa"])
    assert [(n, p.get("haystack")) for n, p in variants(wiki)] == [
        ("needle", "wiki"),
        ("needle", "wiki"),
        ("qa", None),
    ]
    only_wiki = variants(suite_config("core", task_params={"haystack": "wiki"}))
    assert len(only_wiki) == 6 + 3 and all(p.get("haystack") == "wiki" for _, p in only_wiki[:6])
    assert variants(suite_config("core", tasks=["qa@length=500"])) == [("qa", {"length": 500})]


@pytest.mark.parametrize(
    ("given", "msg"),
    [
        ({"tasks": ["multi_thread"]}, "suite core has no task 'multi_thread'"),
        ({"peers": {"kvpress": []}}, "teacher-forced task lm, which peers cannot run"),
        ({"tasks": ["qa"], "lengths": [500]}, "none of the tasks qa@length=768 takes a length"),
        ({"task_params": {"haystack": "wikipedia"}}, "haystack must be one of"),
    ],
)
def test_suite_conflicts_are_one_line_errors(given, msg):
    with pytest.raises(FlowsieveError, match=msg) as e:
        suite_config("core", **given)
    assert "\n" not in str(e.value)
    with pytest.raises(FlowsieveError, match="did you mean 'core'"):
        suite_config("cor")


def test_cli_suite():
    cfg = _config(_args("--suite", "core"))
    assert cfg == suite_config("core")
    cfg = _config(_args("--suite", "core", "--model", "smollm2", "--limit", "10", "--tasks", "needle,qa"))
    assert cfg.limit == 10 and cfg.seeds == HEADLINE_SEEDS and cfg.modes == MODES
    assert cfg.tasks == ("needle@haystack=essays", "needle@haystack=wiki", "qa@length=768")
    cfg = _config(
        _args("--suite", "core", "--seed", "dev", "--keep", "0.25", "--tasks", "needle", "--peers", "kvpress")
    )
    assert cfg.seeds == DEV_SEEDS and cfg.keeps == (0.25,) and "kvpress" in cfg.peers
    with pytest.raises(FlowsieveError, match="peers cannot run"):
        _config(_args("--suite", "core", "--peers", "kvpress"))
