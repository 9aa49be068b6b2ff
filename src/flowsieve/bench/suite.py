"""Named sweeps: the held-out ``core`` suite (``flowsieve bench --suite core``) and how explicit
settings combine with a suite (:func:`suite_config`)."""

from __future__ import annotations

from typing import Any

from flowsieve.bench.config import (
    HEADLINE_SEEDS,
    SEED_SETS,
    SweepConfig,
    _fields,
    format_task,
    parse_task,
)
from flowsieve.bench.store import check_choice
from flowsieve.bench.tasks import TASKS
from flowsieve.errors import FlowsieveError, did_you_mean

SUITES: dict[str, dict[str, Any]] = {
    # The held-out evaluation. Needle tasks on both haystacks (essays: where the methods were
    # developed; wiki: HotpotQA's Wikipedia paragraphs, held out) at 1000 and 2000 tokens, where the
    # bundled models find needles well above chance (SmolLM2 about half at 1-3k, Gemma-3-270M about
    # three in four at 2k); SQuAD at 768 tokens (the gold paragraph and a few other paragraphs: the
    # longest gold paragraph is 799 SmolLM2 tokens, within the 5% tolerance; at 2k tokens both models
    # score about zero); HotpotQA at the data's own length (10 paragraphs, about 1-1.5k tokens);
    # bits per byte at 1024 tokens. Both modes, the three keep ratios, the headline seeds.
    "core": {
        "tasks": (
            "needle@haystack=essays",
            "needle@haystack=wiki",
            "multi_needle@haystack=essays",
            "multi_needle@haystack=wiki",
            "needle_thread@haystack=essays",
            "needle_thread@haystack=wiki",
            "qa@length=768",
            "multidoc_qa",
            "lm@length=1024",
        ),
        "lengths": (1000, 2000),
        "keeps": (0.5, 0.25, 0.1),
        "modes": ("query_aware", "query_agnostic"),
        "seeds": HEADLINE_SEEDS,
    },
}
"""Named sweeps (``flowsieve bench --suite NAME``): :class:`SweepConfig` fields; ``lengths`` apply to the
tasks whose spec sets no length. :func:`suite_config` combines one with explicit settings."""


def describe_suite(name: str) -> str:
    """One line that spells out suite ``name`` (for ``--help``)."""
    s = SUITES[name]
    seeds = next((k for k, v in SEED_SETS.items() if v == tuple(s["seeds"])), None)
    seed_text = f"{seeds} seeds {','.join(map(str, s['seeds']))}" if seeds else ",".join(map(str, s["seeds"]))
    return (
        f"{name} = tasks {', '.join(s['tasks'])}; lengths {','.join(map(str, s['lengths']))} for the tasks "
        f"that take one and set none; keep {','.join(map(str, s['keeps']))}; modes {','.join(s['modes'])}; {seed_text}"
    )


def suite_config(name: str, **given: Any) -> SweepConfig:
    """The :class:`SweepConfig` of suite ``name`` (:data:`SUITES`) with explicit settings ``given``.

    ``given`` are :class:`SweepConfig` fields (None or absent: the suite's value, else the usual
    default). They override the suite's ``lengths``, ``keeps``, ``modes``, ``seeds`` and the rest;
    ``tasks`` narrows the suite to the named tasks (``needle`` keeps both of its haystacks), and
    parameters in those specs or in ``task_params`` override the suite's (``needle@haystack=wiki``,
    or ``task_params={"haystack": "wiki"}``, leave the wiki variants only, as equal variants merge).
    A task the suite lacks, and peers with a suite that holds a teacher-forced task, are errors.
    """
    check_choice("suite", name, list(SUITES))
    suite = SUITES[name]
    given = {k: v for k, v in given.items() if v is not None}
    if "suite" in given:
        raise FlowsieveError("give the suite as the first argument of suite_config")
    specs = [parse_task(t) for t in suite["tasks"]]
    if "tasks" in given:
        if isinstance(given["tasks"], str):
            raise FlowsieveError(f"tasks must be a list of names, got {given['tasks']!r}")
        narrowed: list[tuple[str, dict[str, Any]]] = []
        for spec in given["tasks"]:
            task, params = parse_task(spec)
            chosen = [(t, p | params) for t, p in specs if t == task]
            if not chosen:
                names = list(dict.fromkeys(t for t, _ in specs))
                raise FlowsieveError(
                    f"suite {name} has no task '{task}'{did_you_mean(task, names)}; its tasks: "
                    f"{', '.join(names)} (drop --suite to run others)"
                )
            narrowed += chosen
        specs = narrowed
    task_params = dict(given.get("task_params") or {})
    specs = [(t, {k: task_params.get(k, v) for k, v in p.items()}) for t, p in specs]
    settings = {k: suite[k] for k in ("lengths", "keeps", "modes", "seeds")}
    if not any("length" in _fields(t) and "length" not in p for t, p in specs):
        settings["lengths"] = ()  # narrowed to tasks of fixed length: the suite's lengths do not apply
    settings |= given
    settings["tasks"] = list(dict.fromkeys(format_task(t, p) for t, p in specs))
    forced = [t for t, _ in specs if TASKS.get(t).teacher_forced]
    if forced and settings.get("peers"):
        raise FlowsieveError(
            f"suite {name} holds the teacher-forced task {forced[0]}, which peers cannot run: "
            f"narrow it with --tasks (without {forced[0]}) or drop --peers"
        )
    return SweepConfig(**settings, suite=name)


__all__ = ["SUITES", "describe_suite", "suite_config"]
