"""Sweep settings: :class:`SweepConfig`, method specs and their checks, and the plan of cells.

A sweep (:class:`SweepConfig`) crosses a model with methods × sites × keep ratios (or token budgets)
× tasks (× lengths) × items × seeds × modes. Each crossing is a :class:`Cell` (the identity of one
result row); :func:`plan` lists them as :class:`Job` objects (a cell with its task and item). Method
specs carry options (``fastv@layer=6``, :func:`parse_method`), and so do task specs
(``needle@haystack=wiki``, :func:`parse_task`); :func:`check_methods` fails early for methods that
cannot run. The peers' method names are checked against ``flowsieve.bench.peers`` when it imports
(:func:`_peers_module`), else against :data:`PEER_METHODS`.

Held-out evaluation: :data:`DEV_SEEDS` and :data:`HEADLINE_SEEDS` (:func:`expand_seeds`), and the
named suites of :data:`flowsieve.bench.suite.SUITES` (``flowsieve bench --suite core``).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowsieve.bench.store import (
    FULL,
    FULL_SITE,
    MODES,
    check_choice,
    identity_of,
    normalize_keep,
)
from flowsieve.bench.tasks import TASKS, Item, Task, get_task
from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.registry import Registry

log = logging.getLogger("flowsieve.bench")

SITES = ("prompt", "prefill", "decode", "select", "layer", "encoder")
"""Where a sieve applies: prompt text, prefill cache, decode cache, per-step key selection, in-model layers, encoder."""

PEERS = ("kvpress", "llmlingua")
PEER_SITES = {"kvpress": "prefill", "llmlingua": "prompt"}
"""The site each peer compresses at (recorded in its rows)."""
PEER_METHODS: dict[str, tuple[str, ...]] = {
    "kvpress": (
        "snapkv",
        "streaming_llm",
        "tova",
        "knorm",
        "observed_attention",
        "expected_attention",
        "keydiff",
        "pyramidkv",
        "adakv_expected_attention",
    ),
    "llmlingua": ("llmlingua", "longllmlingua"),
}
"""Each peer's methods run when ``--peers`` names the peer alone (the peers module may override)."""

Loader = Callable[[str], tuple[Any, Any]]

AGREE_TOKENS = 16
"""Default N of ``token_agreement``: the full run's first N generated tokens are compared."""

# --- seeds -----------------------------------------------------------------------------------------

# Item seeds are split in two so that headline numbers come from items no method was tuned on:
# DEV_SEEDS are the seeds used while developing and choosing methods (items, defaults and
# hyper-parameters were looked at on them); HEADLINE_SEEDS were never used while developing and are
# for the held-out evaluation only (the ``core`` suite's default). Do not tune anything on them.
DEV_SEEDS = (0, 1, 2)
"""Seeds used while developing methods (results on them are not held out)."""
HEADLINE_SEEDS = (1000, 1001, 1002)
"""Seeds never used while developing methods: the held-out, headline evaluation."""
SEED_SETS: dict[str, tuple[int, ...]] = {"dev": DEV_SEEDS, "headline": HEADLINE_SEEDS}
"""Named seed sets, usable wherever seeds are given (``--seed headline``)."""


def expand_seeds(values: Iterable[int | str]) -> tuple[int, ...]:
    """Seeds from integers and seed-set names: ``["dev", 7]`` -> ``(0, 1, 2, 7)`` (order kept, once each)."""
    out: list[int] = []
    for v in values:
        if isinstance(v, str) and v.strip() in SEED_SETS:
            out += SEED_SETS[v.strip()]
            continue
        try:
            if isinstance(v, (bool, float)):
                raise ValueError
            out.append(int(v))
        except ValueError:
            names = [*SEED_SETS]
            raise FlowsieveError(
                f"a seed is an integer or one of {', '.join(names)}, got {v!r}{did_you_mean(str(v), names)}"
            ) from None
    return _unique(out)


# --- task specs ------------------------------------------------------------------------------------


def parse_task(spec: str) -> tuple[str, dict[str, Any]]:
    """``"needle@haystack=wiki@depth=0.5"`` -> ``("needle", {"haystack": "wiki", "depth": 0.5})``.

    The syntax of method options (:func:`parse_method`): values are read as JSON, else kept as text.
    ``needle:haystack=wiki`` (a colon before the first option) is read the same way.
    """
    spec = re.sub(r"^([^@:]*):", r"\1@", spec.strip())
    try:
        return parse_method(spec)
    except FlowsieveError:
        raise FlowsieveError(f"task spec {spec!r} is not NAME@PARAM=VALUE@...") from None


def format_task(name: str, params: Mapping[str, Any]) -> str:
    """The task spec of ``name`` with ``params`` (the inverse of :func:`parse_task`)."""

    def value(v: Any) -> str:
        if isinstance(v, str):
            try:
                json.loads(v)
            except json.JSONDecodeError:
                return v  # read back as text
        return json.dumps(v)

    return name + "".join(f"@{k}={value(v)}" for k, v in params.items())


# --- configuration ---------------------------------------------------------------------------------


def _unique(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs. Sequences are deduplicated (order kept) and validated on construction.

    Attributes:
        model: bundled model name, local path or HF id (recorded in every row).
        methods: sieve methods; ``full`` (the reference) is always run, listed or not.
        sites: sites the sieve methods are applied at.
        keeps: keep ratios in (0, 1].
        budgets: token budgets (>= 1), an alternative to keep ratios (rows have keep 0).
        tasks: task names (``flowsieve.bench.TASKS``), each optionally with its own parameters as a
            spec ``name@param=value@...`` (:func:`parse_task`): ``needle@haystack=wiki``,
            ``qa@length=768``. Variants that come out equal run once.
        lengths: context lengths in tokens, crossed with every task that has a ``length`` parameter
            and whose spec does not set one.
        task_params: further task parameters, given to every selected task that has them (a value
            in a task's spec wins).
        limit: items per task variant and seed.
        seeds: item seeds.
        modes: ``query_aware`` and/or ``query_agnostic``.
        max_new_tokens: greedy tokens generated per cell.
        peers: peer system -> its methods (empty: the peer's default methods).
        threads: torch CPU threads per process.
        chat: build prompts with the model's chat template.
        share_prefill: run the prefill-site cells of one item and mode from one shared observed
            prefill (:func:`flowsieve.generate.generate_many`): same kept entries and tokens, a
            fraction of the time, but ``prefill_s`` and peak RSS are then not one method's own
            (rows say ``extra.shared_prefill``). Off for timing runs.
        compressor: the model that scores tokens at the ``prompt`` site (None: the sweep's model);
            the compressed prompt is then answered by ``model``.
        agree_tokens: N of the rows' ``token_agreement`` (the full run's first N tokens).
        suite: the name of the suite (:data:`SUITES`) the settings were made from, recorded with the
            run; :func:`suite_config` sets it.
    """

    model: str = "smollm2"
    methods: Sequence[str] = (FULL,)
    sites: Sequence[str] = ("prefill",)
    keeps: Sequence[float] = (0.5, 0.25, 0.1)
    budgets: Sequence[int] = ()
    tasks: Sequence[str] = ("needle",)
    lengths: Sequence[int] = ()
    task_params: Mapping[str, Any] = field(default_factory=dict)
    limit: int = 20
    seeds: Sequence[int] = (0,)
    modes: Sequence[str] = ("query_aware",)
    max_new_tokens: int = 32
    peers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    threads: int = 2
    chat: bool = True
    share_prefill: bool = False
    compressor: str | None = None
    agree_tokens: int = AGREE_TOKENS
    suite: str | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if not isinstance(self.model, str) or not self.model.strip():
            raise FlowsieveError("the model name is empty")
        for name in ("methods", "sites", "tasks", "modes"):
            values = getattr(self, name)
            if isinstance(values, str) or not all(isinstance(v, str) and v.strip() for v in values):
                raise FlowsieveError(f"{name} must be a list of names, got {values!r}")
            put(name, _unique(v.strip() for v in values))
        put("methods", _unique((FULL, *self.methods)))
        for name in ("keeps", "budgets", "lengths", "seeds"):
            values = getattr(self, name)
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise FlowsieveError(f"{name} must be a list of numbers, got {values!r}")
            put(name, tuple(values))
        for k in self.keeps:
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0.0 < k <= 1.0:
                raise FlowsieveError(f"keep must be in (0, 1], got {k!r}")
        put("keeps", _unique(normalize_keep(k) for k in self.keeps))
        for name, minimum in (("budgets", 1), ("lengths", 1), ("seeds", None)):
            for v in getattr(self, name):
                if not _is_int(v) or (minimum is not None and v < minimum):
                    what = "an integer" if minimum is None else f"an integer >= {minimum}"
                    raise FlowsieveError(f"each of {name} must be {what}, got {v!r}")
            put(name, _unique(getattr(self, name)))
        for name, minimum in (("limit", 1), ("max_new_tokens", 1), ("threads", 1), ("agree_tokens", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < minimum:
                raise FlowsieveError(f"{name} must be an integer >= {minimum}, got {v!r}")
        if not self.tasks:
            raise FlowsieveError("no task given")
        if not self.seeds:
            raise FlowsieveError("no seed given")
        if not self.modes:
            raise FlowsieveError("no mode given")
        put("tasks", _unique(format_task(*parse_task(t)) for t in self.tasks))
        specs = [parse_task(t) for t in self.tasks]
        for name, _ in specs:
            TASKS.get(name)  # unknown -> did you mean
        if self.suite is not None and not isinstance(self.suite, str):
            raise FlowsieveError(f"suite must be a suite's name, got {self.suite!r}")
        for m in self.modes:
            check_choice("mode", m, MODES)
        for s in self.sites:
            check_choice("site", s, SITES)
        compressed = len(self.methods) > 1 or bool(self.peers)
        if compressed and not (self.keeps or self.budgets):
            raise FlowsieveError("give keep ratios (--keep) or token budgets (--budget)")
        if len(self.methods) > 1 and not self.sites:
            raise FlowsieveError("give at least one site (--sites) for the sieve methods")
        peers: dict[str, tuple[str, ...]] = {}
        for system, methods in dict(self.peers).items():
            check_choice("peer", system, PEERS)
            if isinstance(methods, str):
                raise FlowsieveError(f"the methods of peer {system} must be a list, got {methods!r}")
            peers[system] = _unique(methods)
        put("peers", peers)
        forced = [name for name, _ in specs if TASKS.get(name).teacher_forced]
        if forced and peers:
            raise FlowsieveError(
                f"the task {forced[0]} is teacher-forced (scored from log-likelihoods); the peers "
                "only generate: run it without --peers"
            )
        for system, methods in peers.items():
            known = _default_peer_methods(system)
            peers_mod = _peers_module()
            for m in methods:
                if peers_mod is not None and hasattr(peers_mod, "parse_peer_method"):
                    peers_mod.parse_peer_method(system, m)  # name and options (did you mean)
                elif m not in known:
                    raise FlowsieveError(
                        f"{system} has no method '{m}'{did_you_mean(m, known)}; methods: {', '.join(known)}"
                    )
        fields = [_fields(name) for name, _ in specs]
        known = sorted(set().union(*fields))
        params = dict(self.task_params)
        for p in params:
            if p == "length":
                raise FlowsieveError(
                    "give lengths with `lengths` (--length) or in a task spec (qa@length=768), "
                    "not as a task parameter"
                )
            if p not in known:
                raise FlowsieveError(
                    f"no selected task has a parameter '{p}'{did_you_mean(p, known)}; "
                    f"their parameters: {', '.join(known) or '(none)'}"
                )
        put("task_params", params)
        if self.lengths and not any(
            "length" in f and "length" not in sp for f, (_, sp) in zip(fields, specs)
        ):
            raise FlowsieveError(
                f"none of the tasks {', '.join(self.tasks)} takes a length from `lengths` (--length)"
            )
        for name, spec_params in specs:  # bad parameters and values fail here, before any model loads
            get_task(name, **self._params(name, spec_params))

    def _params(self, name: str, spec_params: Mapping[str, Any]) -> dict[str, Any]:
        fields = _fields(name)
        return {k: v for k, v in self.task_params.items() if k in fields} | dict(spec_params)

    def task_variants(self) -> list[Task]:
        """One task object per (task spec, length); a task without a length parameter, or whose spec
        sets one, appears once. Variants that come out equal appear once."""
        out: list[Task] = []
        for spec in self.tasks:
            name, spec_params = parse_task(spec)
            params = self._params(name, spec_params)
            if self.lengths and "length" in _fields(name) and "length" not in params:
                out += [get_task(name, **params, length=n) for n in self.lengths]
            else:
                if self.lengths and "length" not in _fields(name) and self.suite is None:
                    log.warning("task %s has no length parameter; it runs at its own length", name)
                out.append(get_task(name, **params))
        return list(_unique(out))

    def peer_methods(self, system: str) -> tuple[str, ...]:
        """The methods run for a peer: those given, else the peer's defaults."""
        return tuple(self.peers.get(system, ())) or _default_peer_methods(system)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON data (recorded with the run)."""
        d = dataclasses.asdict(self)
        d["peers"] = {s: list(self.peer_methods(s)) for s in self.peers}
        return json.loads(json.dumps(d, default=list))


def _fields(task: str) -> set[str]:
    return {f.name for f in dataclasses.fields(TASKS.get(task))}  # type: ignore[arg-type]


# --- cells -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """The identity of one result row (see :data:`flowsieve.bench.store.IDENTITY`)."""

    model: str
    system: str
    method: str
    site: str
    keep: float
    budget: int
    task: str
    item_id: str
    mode: str
    seed: int
    max_new_tokens: int

    def key(self) -> tuple[Any, ...]:
        return identity_of(dataclasses.asdict(self))

    @property
    def is_full(self) -> bool:
        return self.method == FULL and self.system == "flowsieve"


@dataclass(frozen=True)
class Job:
    """A cell with the task and item it needs."""

    cell: Cell
    task: Task
    item: Item


def plan(config: SweepConfig, tokenizer: Any) -> list[Job]:
    """Every cell of the sweep, items outermost (a stopped sweep has whole items done).

    Per item and mode: the full reference first, then methods × sites × (keeps, budgets), then peers.
    """
    jobs: list[Job] = []
    settings = [(k, 0) for k in config.keeps] + [(0.0, b) for b in config.budgets]
    methods = [m for m in config.methods if m != FULL]
    peers = [(p, m) for p in config.peers for m in config.peer_methods(p)]
    for task in config.task_variants():
        for seed in config.seeds:
            for item in task.items(tokenizer, config.limit, seed):
                ident = {"model": config.model, "task": task.name, "item_id": item.item_id}
                ident |= {"seed": seed, "max_new_tokens": config.max_new_tokens}
                cells = []
                for mode in config.modes:
                    new = functools.partial(Cell, mode=mode, **ident)
                    cells.append(new(system="flowsieve", method=FULL, site=FULL_SITE, keep=1.0, budget=0))
                    cells += [
                        new(system="flowsieve", method=m, site=s, keep=k, budget=b)
                        for m in methods
                        for s in config.sites
                        for k, b in settings
                    ]
                    cells += [
                        new(system=p, method=m, site=PEER_SITES[p], keep=k, budget=0)
                        for p, m in peers
                        for k in config.keeps
                    ]
                jobs += [Job(c, task, item) for c in cells]
    return jobs


# --- methods ---------------------------------------------------------------------------------------


def _method_registry(module: Any) -> Registry[Any] | None:
    for name in ("METHODS", "SIEVES", "SCORERS"):
        reg = getattr(module, name, None)
        if isinstance(reg, Registry):
            return reg
    regs = [v for v in vars(module).values() if isinstance(v, Registry)]
    return regs[0] if len(regs) == 1 else None


def _sieve_class() -> tuple[Any, Any]:
    try:
        module = importlib.import_module("flowsieve.sieve")
    except ImportError as e:
        raise FlowsieveError(f"flowsieve.sieve cannot be imported ({e})") from None
    sieve = getattr(module, "Sieve", None)
    if sieve is None:
        raise FlowsieveError("flowsieve.sieve has no Sieve class")
    return module, sieve


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fastv@layer=6@x=0.5"`` -> ``("fastv", {"layer": 6, "x": 0.5})``: a method with options.

    Values are read as JSON (numbers, true/false, null, quoted strings), else kept as text. The
    whole spec is the row's ``method``, so differently configured runs are different cells.
    """
    name, *opts = spec.split("@")
    options: dict[str, Any] = {}
    for opt in opts:
        key, sep, text = opt.partition("=")
        if not sep or not key.strip():
            raise FlowsieveError(f"method option '{opt}' in '{spec}' is not NAME=VALUE")
        try:
            options[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            options[key.strip()] = text
    return name.strip(), options


def check_methods(config: SweepConfig) -> None:
    """Fail early, with a clear message, for sieve methods that cannot run (never fall back to full)."""
    others = [m for m in config.methods if m != FULL]
    if not others:
        return
    try:
        module, sieve = _sieve_class()
    except FlowsieveError as e:
        raise FlowsieveError(f"method '{others[0]}' is not available: {e}; only '{FULL}' runs") from None
    registry = _method_registry(module)
    for spec in others:
        method = parse_method(spec)[0]
        default = getattr(module, "DEFAULT", None)  # method="default": the mode's default sieve
        known_here = registry is None or method in registry or method == default
        if not known_here and config.sites != ("prompt",):
            known = [FULL, *registry]
            raise FlowsieveError(
                f"unknown method '{method}'{did_you_mean(method, known)}; known: {', '.join(known)}"
            )
        for site in config.sites:
            if site == "prompt":
                from flowsieve.methods.prompt import SCORERS

                if method not in SCORERS:
                    raise FlowsieveError(
                        f"'{method}' is not a prompt scorer{did_you_mean(method, list(SCORERS))}; "
                        f"prompt scorers: {', '.join(SCORERS)}"
                    )
                if config.budgets:
                    raise FlowsieveError("the prompt site takes keep ratios (--keep), not token budgets")
                continue
            keep = config.keeps[0] if config.keeps else None
            budget = None if config.keeps else config.budgets[0]
            try:
                _make_sieve(sieve, spec, keep, budget, site)
            except FlowsieveError as e:
                raise FlowsieveError(f"method '{method}' at site '{site}': {e}") from None
            except TypeError as e:
                raise FlowsieveError(
                    f"method '{method}' is not available: Sieve(...) rejected its settings: {e}"
                ) from None


def _make_sieve(sieve_cls: Any, method: str, keep: float | None, budget: int | None, site: str) -> Any:
    """The sieve of a cell: ``method`` may carry options (``fastv@layer=6``, :func:`parse_method`)."""
    name, options = parse_method(method)
    extra: dict[str, Any] = {}
    for key in ("units", "refeed", "rows"):  # Sieve settings, not scorer options
        if key in options:
            extra[key] = options.pop(key)
    if options:
        extra["options"] = options
    return sieve_cls(name, keep=keep, budget=budget, site=site, **extra)


# --- peers -----------------------------------------------------------------------------------------


def _default_peer_methods(system: str) -> tuple[str, ...]:
    """The peer's methods as its runner module lists them (else :data:`PEER_METHODS`)."""
    try:
        peers = _peers_module()
    except Exception:  # a broken peers module is reported when its cells run
        peers = None
    listed = getattr(peers, "PEER_METHODS", None) if peers is not None else None
    if isinstance(listed, Mapping) and listed.get(system):
        return tuple(listed[system])
    return PEER_METHODS[system]


def _peers_module() -> Any | None:
    try:
        return importlib.import_module("flowsieve.bench.peers")
    except ModuleNotFoundError as e:
        if e.name in ("flowsieve.bench.peers", "flowsieve.bench"):
            return None
        raise


__all__ = [
    "AGREE_TOKENS",
    "DEV_SEEDS",
    "HEADLINE_SEEDS",
    "PEERS",
    "PEER_METHODS",
    "PEER_SITES",
    "SEED_SETS",
    "SITES",
    "Cell",
    "Job",
    "Loader",
    "SweepConfig",
    "check_methods",
    "expand_seeds",
    "format_task",
    "parse_method",
    "parse_task",
    "plan",
]
