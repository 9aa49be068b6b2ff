"""The ``bench`` and ``report`` subcommands (wired into ``flowsieve`` through :func:`add_commands`).

``flowsieve bench --model smollm2 --methods full,snapkv --sites prefill --keep 0.5,0.25,0.1
--tasks needle,qa --length 2000,4000 --limit 20 --db results.sqlite`` runs a sweep into a SQLite
store (a killed sweep started again finishes the missing cells only); ``flowsieve report --db
results.sqlite --out DIR`` writes the plots and ``index.html``.

``flowsieve bench --suite core --methods full,snapkv --db held_out.sqlite`` runs a named suite
(:data:`flowsieve.bench.suite.SUITES`); flags given with it override or narrow its settings.
``--seed dev`` / ``--seed headline`` stand for the declared seed sets.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path
from typing import Any

from flowsieve.errors import FlowsieveError

_EXPORTS = (".csv", ".parquet")


def _names(flag: str, text: str | None) -> list[str]:
    if text is None:
        return []
    names = [x.strip() for x in re.split(r",(?![^\[]*\])", text)]  # commas inside [...] are a value's
    if not all(names):
        raise FlowsieveError(f"{flag} takes comma-separated names, got {text!r}")
    return names


def _numbers(flag: str, text: str | None, kind: type) -> list[Any]:
    out: list[Any] = []
    for x in _names(flag, text):
        try:
            out.append(kind(x))
        except ValueError:
            what = "integers" if kind is int else "numbers"
            raise FlowsieveError(f"{flag} takes comma-separated {what}, got {x!r}") from None
    return out


def parse_peers(text: str | None) -> dict[str, list[str]]:
    """``kvpress,llmlingua`` or ``kvpress:snapkv+keydiff,llmlingua`` -> {peer: [methods]}."""
    peers: dict[str, list[str]] = {}
    for part in _names("--peers", text):
        system, _, methods = part.partition(":")
        chosen = [m.strip() for m in methods.split("+")] if methods else []
        if methods and not all(chosen):
            raise FlowsieveError(f"--peers: bad method list in {part!r} (use peer:method+method)")
        peers.setdefault(system.strip(), []).extend(chosen)
    return peers


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``["depth=0.5", "placement=spread"]`` -> {"depth": 0.5, "placement": "spread"} (JSON values)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FlowsieveError(f"--param takes NAME=VALUE, got {pair!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1); ``"headline"`` -> HEADLINE_SEEDS, ``"dev"`` -> DEV_SEEDS (names and numbers mix)."""
    from flowsieve.bench.config import expand_seeds

    return expand_seeds(_names("--seed", text))


# the settings a suite provides: None on the command line means "the suite's, else this default"
_DEFAULTS = {"tasks": "needle", "keep": "0.5,0.25,0.1", "modes": "query_aware", "seed": "0", "limit": 20}


def _config(args: argparse.Namespace) -> Any:
    from flowsieve.bench.config import SweepConfig
    from flowsieve.bench.suite import suite_config

    def given(name: str) -> Any:
        value = getattr(args, name)
        return _DEFAULTS.get(name) if value is None and not args.suite else value

    tasks, keep, modes, seed, limit = (given(k) for k in ("tasks", "keep", "modes", "seed", "limit"))
    settings = dict(
        model=args.model,
        methods=_names("--methods", args.methods),
        sites=_names("--sites", args.sites),
        keeps=None if keep is None else _numbers("--keep", keep, float),
        budgets=_numbers("--budget", args.budget, int),
        tasks=None if tasks is None else _names("--tasks", tasks),
        lengths=_numbers("--length", args.length, int) or None,
        task_params=parse_params(args.param),
        limit=limit,
        seeds=None if seed is None else parse_seeds(seed),
        modes=None if modes is None else _names("--modes", modes),
        max_new_tokens=args.max_new_tokens,
        peers=parse_peers(args.peers),
        threads=args.threads,
        chat=not args.no_chat,
        share_prefill=args.share_prefill,
        compressor=args.compressor,
    )
    if args.suite:
        return suite_config(args.suite, **settings)
    return SweepConfig(**{k: v for k, v in settings.items() if v is not None})


def cmd_bench(args: argparse.Namespace) -> int:
    """Run (or resume) a sweep; print a JSON summary. Exit status 1 when some cells failed."""
    from flowsieve.bench.config import check_methods
    from flowsieve.bench.runner import run_sweep
    from flowsieve.bench.store import Store
    from flowsieve.models import load

    if args.export and Path(args.export).suffix.lower() not in _EXPORTS:
        raise FlowsieveError(f"--export writes .csv or .parquet, not {args.export!r}")
    config = _config(args)
    check_methods(config)
    if args.ray_workers is not None and args.ray_workers < 1:
        raise FlowsieveError(f"--ray-workers must be >= 1, got {args.ray_workers}")
    loader = functools.partial(load, trust_remote_code=True) if args.trust_remote_code else load
    with Store(args.db) as store:
        summary = run_sweep(
            config,
            store,
            loader=loader,
            progress=not args.quiet,
            ray_address=args.ray,
            ray_workers=args.ray_workers,
            fail_fast=args.fail_fast,
        )
        exported = str(store.export(args.export)) if args.export else None
        rows = len(store)
    print(
        json.dumps(
            {
                "db": str(args.db),
                "run_id": summary.run_id,
                "cells": summary.planned,
                "already_stored": summary.already,
                "written": summary.written,
                "failed": summary.failed,
                "rows_in_store": rows,
                "peer_errors": summary.peer_errors,
                "seconds": round(summary.seconds, 1),
                "export": exported,
            },
            indent=2,
        )
    )
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the plots and ``index.html`` for a results store."""
    from flowsieve.bench.report import write_report

    index = write_report(args.db, args.out)
    print(str(index))
    return 0


def cmd_choose(args: argparse.Namespace) -> int:
    """Print the pre-declared aggregate of every candidate per mode, and each mode's winner."""
    from flowsieve.bench.choose import markdown, winners
    from flowsieve.bench.store import Store

    rows: list[dict[str, Any]] = []
    for db in args.db:
        if not Path(db).exists():
            raise FlowsieveError(f"no results store at {db}")
        with Store(db, create=False) as store:
            rows += store.rows()
    if not rows:
        raise FlowsieveError("the stores hold no rows")
    print(markdown(rows))
    for mode, w in winners(rows).items():
        print(f"winner ({mode}): {w.label} — aggregate {100 * w.aggregate:.1f}% over {w.cells} cells")
    if args.out:
        from flowsieve.bench.headline import write

        for path in write(rows, args.out):
            print(path)
    return 0


def add_commands(subparsers: Any) -> None:
    """Add ``bench`` and ``report`` to the ``flowsieve`` subcommands (``parser.add_subparsers()``)."""
    from flowsieve.bench.config import DEV_SEEDS, HEADLINE_SEEDS, PEERS, SITES
    from flowsieve.bench.store import MODES
    from flowsieve.bench.suite import SUITES, describe_suite
    from flowsieve.bench.tasks import TASKS
    from flowsieve.bench.tasks.data import HAYSTACKS
    from flowsieve.models import DEFAULT_MODEL

    b = subparsers.add_parser(
        "bench",
        help="run a benchmark sweep into a results store",
        description="Run methods × sites × keep ratios × tasks × items on a model (and the peers on the "
        "same items), one SQLite row per cell. The full-context reference always runs. A sweep that "
        "was stopped finishes only the missing cells when started again. --suite NAME runs a named "
        "suite; flags given with it override its settings (--keep, --modes, --seed, --length, "
        "--limit) or narrow it (--tasks needle keeps both haystacks of needle; --param haystack=wiki "
        "keeps the wiki ones).",
    )
    b.add_argument(
        "--suite",
        choices=list(SUITES),
        help="a named suite: " + " | ".join(describe_suite(s) for s in SUITES),
    )
    b.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"bundled name, local path or HF id (default {DEFAULT_MODEL})"
    )
    b.add_argument(
        "--methods",
        default="full",
        help="comma-separated sieve methods, each with options as NAME@OPT=VALUE@... "
        "(e.g. fastv@layer=6; default: full only)",
    )
    b.add_argument(
        "--sites", default="prefill", help=f"comma-separated sites: {', '.join(SITES)} (default prefill)"
    )
    b.add_argument(
        "--keep", help=f"comma-separated keep ratios in (0, 1] (default {_DEFAULTS['keep']}, or the suite's)"
    )
    b.add_argument("--budget", help="comma-separated token budgets, besides or instead of --keep")
    b.add_argument(
        "--tasks",
        help=f"comma-separated tasks: {', '.join(TASKS)}, each optionally with its own parameters "
        f"as NAME@PARAM=VALUE@... (e.g. needle@haystack=wiki, qa@length=768; haystacks of the needle "
        f"tasks: {', '.join(HAYSTACKS)}) (default {_DEFAULTS['tasks']}; with --suite: the suite's "
        "variants of the tasks named)",
    )
    b.add_argument(
        "--length",
        help="comma-separated context lengths in tokens, for tasks that take a length and whose spec "
        "sets none (default: each task's own, or the suite's)",
    )
    b.add_argument(
        "--param",
        action="append",
        metavar="NAME=VALUE",
        help="a task parameter (JSON value) for every selected task that has it, repeatable: "
        "--param depth=0.5, --param haystack=wiki",
    )
    b.add_argument(
        "--limit", type=int, help=f"items per task, length and seed (default {_DEFAULTS['limit']})"
    )
    b.add_argument("--db", required=True, help="the SQLite results store (created if missing)")
    b.add_argument(
        "--peers",
        help=f"peers run side by side: {', '.join(PEERS)}; pick methods with peer:m1+m2 (default: each peer's own list)",
    )
    b.add_argument(
        "--modes",
        help=f"comma-separated: {', '.join(MODES)} (default {_DEFAULTS['modes']}, or the suite's)",
    )
    b.add_argument(
        "--seed",
        "--seeds",
        dest="seed",
        help="comma-separated item seeds, or a declared set: dev = "
        f"{','.join(map(str, DEV_SEEDS))} (used while developing methods), headline = "
        f"{','.join(map(str, HEADLINE_SEEDS))} (held out; never used while developing) "
        f"(default {_DEFAULTS['seed']}, or the suite's)",
    )
    b.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens per answer (default 32)")
    b.add_argument("--threads", type=int, default=2, help="torch CPU threads per process (default 2)")
    b.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run cells as Ray tasks: a local Ray, or the cluster at ADDRESS (auto, ray://host:10001)",
    )
    b.add_argument(
        "--ray-workers", type=int, help="Ray actors, each with the model loaded (default CPUs // threads)"
    )
    b.add_argument("--export", metavar="OUT.csv|OUT.parquet", help="export every row of the store afterwards")
    b.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    b.add_argument(
        "--compressor",
        metavar="MODEL",
        help="the model that scores tokens at the prompt site (default: --model); --model answers",
    )
    b.add_argument(
        "--share-prefill",
        action="store_true",
        help="run the prefill-site cells of an item from one shared observed prefill: same tokens, far "
        "less time, but prefill_s and peak RSS are then not per method (rows are marked)",
    )
    b.add_argument("--fail-fast", action="store_true", help="stop at the first cell that fails")
    b.add_argument(
        "--trust-remote-code", action="store_true", help="allow modelling code shipped with a checkpoint"
    )
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    r = subparsers.add_parser(
        "report",
        help="write plots and an HTML report from a results store",
        description="Write PNG plots (score vs keep, Pareto of score vs prefill time and KV memory) and "
        "one self-contained index.html with the tables, plots, settings and failures.",
    )
    r.add_argument("--db", required=True, help="the SQLite results store")
    r.add_argument("--out", required=True, help="output directory")
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser(
        "choose",
        help="rank candidates by the pre-declared aggregate (flowsieve.bench.choose)",
        description="Per mode: every candidate's mean share of the full context's result kept, over "
        "the (model, task, keep) cells where the full context scores above chance; and the winner.",
    )
    c.add_argument("--db", required=True, action="append", help="a results store (repeatable)")
    c.add_argument(
        "--out",
        metavar="DIR",
        help="also write headline.md and one plot per model, task and mode (old plots removed)",
    )
    c.set_defaults(func=cmd_choose)


__all__ = [
    "add_commands",
    "cmd_bench",
    "cmd_choose",
    "cmd_report",
    "parse_params",
    "parse_peers",
    "parse_seeds",
]
