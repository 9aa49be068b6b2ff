"""Bench sweeps: expand settings into cells, skip the cells already stored, run the rest, one row each.

A sweep (:class:`SweepConfig`) crosses a model with methods × sites × keep ratios (or token budgets)
× tasks (× lengths) × items × seeds × modes. Each crossing is a :class:`Cell`; :func:`run_sweep`
runs every cell the :class:`~flowsieve.bench.store.Store` does not hold yet and writes its row as
soon as it is done, so a killed sweep started again finishes the missing cells only.

The uncompressed reference (method ``full``) is always part of a sweep: it runs once per (model,
item, mode, max_new_tokens) and every compressed cell of that item is compared with it at report
time (score, speed and memory ratios, agreement of the generated tokens). Two comparisons are made
here, where both runs are at hand: ``token_agreement`` (the share of the full run's first
``agree_tokens`` tokens a cell reproduces before the first difference) and ``kl_answer_start``
(KL(full ‖ cell), in nats, of the next-token distribution at the first generated position). A
forward hook (:class:`_Recorder`) keeps the log-probabilities of a cell's own passes, so measuring
costs no extra forward pass; the full run's distribution and tokens are kept in memory per item
(:func:`_reference`, a few items) and recomputed with one full generation when a cell's reference
is not there (a resumed sweep, another Ray worker). Peers' rows carry neither.

Teacher-forced tasks (``lm``) generate nothing: :func:`run_lm` prefills (and compresses) the context,
feeds the held-out continuation through the cache and records ``bits_per_byte``; their
``kl_answer_start`` is at the continuation's first token.

Compressed cells go through :func:`run_compressed` (the :class:`flowsieve.sieve.Sieve` facade);
cells of the peers (kvpress, llmlingua) through ``flowsieve.bench.peers.run_peer``, which runs them
in their own environments. Predictions are always scored here, with the task's ``score()``.
With ``ray_address`` set, cells run as Ray tasks on actors that each load the model once; the
driver writes every row to the same store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flowsieve.generate as _gen
from flowsieve.bench.store import (
    ANY,
    FULL,
    FULL_SITE,
    IDENTITY,
    MEASURES,
    MODES,
    Store,
    check_choice,
    identity_of,
    normalize_keep,
)
from flowsieve.bench.tasks import TASKS, Item, Task, get_task
from flowsieve.errors import FlowsieveError, did_you_mean
from flowsieve.generate import GenResult
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
        tasks: task names (``flowsieve.bench.TASKS``).
        lengths: context lengths in tokens, crossed with every task that has a ``length`` parameter.
        task_params: further task parameters, given to every selected task that has them.
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
        for t in self.tasks:
            TASKS.get(t)  # unknown -> did you mean
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
        forced = [t for t in self.tasks if TASKS.get(t).teacher_forced]
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
        fields = {t: {f.name for f in dataclasses.fields(TASKS.get(t))} for t in self.tasks}  # type: ignore[arg-type]
        known = sorted(set().union(*fields.values()))
        params = dict(self.task_params)
        for p in params:
            if p == "length":
                raise FlowsieveError("give lengths with `lengths` (--length), not as a task parameter")
            if p not in known:
                raise FlowsieveError(
                    f"no selected task has a parameter '{p}'{did_you_mean(p, known)}; "
                    f"their parameters: {', '.join(known) or '(none)'}"
                )
        put("task_params", params)
        if self.lengths and not any("length" in f for f in fields.values()):
            raise FlowsieveError(f"none of the tasks {', '.join(self.tasks)} takes a length")

    def task_variants(self) -> list[Task]:
        """One task object per (task, length); tasks without a length parameter appear once."""
        out: list[Task] = []
        for name in self.tasks:
            fields = {f.name for f in dataclasses.fields(TASKS.get(name))}  # type: ignore[arg-type]
            params = {k: v for k, v in self.task_params.items() if k in fields}
            if self.lengths and "length" in fields:
                out += [get_task(name, **params, length=n) for n in self.lengths]
            else:
                if self.lengths:
                    log.warning("task %s has no length parameter; it runs at its own length", name)
                out.append(get_task(name, **params))
        return out

    def peer_methods(self, system: str) -> tuple[str, ...]:
        """The methods run for a peer: those given, else the peer's defaults."""
        return tuple(self.peers.get(system, ())) or _default_peer_methods(system)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON data (recorded with the run)."""
        d = dataclasses.asdict(self)
        d["peers"] = {s: list(self.peer_methods(s)) for s in self.peers}
        return json.loads(json.dumps(d, default=list))


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


# --- running one cell ------------------------------------------------------------------------------


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
        if registry is not None and method not in registry and config.sites != ("prompt",):
            known = [FULL, *registry]
            raise FlowsieveError(
                f"unknown method '{method}'{did_you_mean(method, known)}; known: {', '.join(known)}"
            )
        for site in config.sites:
            if site == "prompt":
                from flowsieve.prompt import SCORERS

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


def run_compressed(
    model: Any,
    tok: Any,
    item: Item,
    method: str,
    site: str,
    keep: float | None,
    budget: int | None,
    mode: str,
    max_new_tokens: int,
    *,
    chat: bool = True,
    compressor: str | None = None,
) -> GenResult:
    """One compressed generation through the :class:`flowsieve.sieve.Sieve` facade (or, at the
    ``prompt`` site, :func:`flowsieve.prompt.compress_prompt` followed by a plain generation).

    ``keep`` is None for a budget cell and ``budget`` None for a keep cell. Raises
    :class:`FlowsieveError` when the method cannot run; never falls back to the full context.
    """
    if site == "prompt":
        return run_prompt_site(
            model, tok, item, method, keep, mode, max_new_tokens, chat=chat, compressor=compressor
        )
    try:
        _, sieve_cls = _sieve_class()
    except FlowsieveError as e:
        raise FlowsieveError(f"method '{method}' is not available: {e}") from None
    params = inspect.signature(_gen.generate).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any and not {"sieve", "mode"} <= set(params):
        raise FlowsieveError(f"method '{method}' is not available: generate() takes no sieve and mode")
    sieve = _make_sieve(sieve_cls, method, keep, budget, site)
    return _gen.generate(
        model,
        tok,
        item.context,
        item.question,
        chat=chat,
        max_new_tokens=max_new_tokens,
        sieve=sieve,
        mode=mode,
    )


@functools.lru_cache(maxsize=2)
def _compressor(name: str) -> tuple[Any, Any]:
    from flowsieve.models import load

    return load(name)


def run_prompt_site(
    model: Any,
    tok: Any,
    item: Item,
    scorer: str,
    keep: float | None,
    mode: str,
    max_new_tokens: int,
    *,
    chat: bool = True,
    compressor: str | None = None,
) -> GenResult:
    """Compress the item's context with a prompt scorer, then answer the shorter prompt with ``model``.

    Query-aware: the scorer sees the question (it is never cut); query-agnostic: the context is
    compressed alone. ``keep`` is the share of the compressor's tokens of context + question
    (:func:`flowsieve.prompt.compress_prompt`). The row's ``prefill_s`` includes the compression
    time (time to first token); ``prompt_tokens`` and ``kv_bytes_full`` are the uncompressed
    prompt's, ``kept_tokens`` and ``kv_bytes`` the compressed one's.
    """
    from flowsieve.prompt import compress_prompt

    if keep is None:
        raise FlowsieveError("the prompt site takes keep ratios, not token budgets")
    cmodel, ctok = (model, tok) if compressor is None else _compressor(compressor)
    question = item.question if mode == "query_aware" else None
    name, options = parse_method(scorer)
    cp = compress_prompt(
        item.context, scorer=name, keep=keep, question=question, model=cmodel, tokenizer=ctok, **options
    )
    context = cp.text
    if question is not None:
        q = question.strip()
        if not context.rstrip().endswith(q):
            raise FlowsieveError("the compressed prompt does not end with the question")
        context = context.rstrip()[: -len(q)].rstrip()
    if not context.strip():
        raise FlowsieveError(f"{scorer} kept nothing of the context at keep {keep}")
    result = _gen.generate(model, tok, context, item.question, chat=chat, max_new_tokens=max_new_tokens)
    full = _gen.build_prompt(tok, item.context, item.question, chat=chat)
    result.kv_bytes_full = _gen.full_kv_bytes(model, len(full), _gen._dtype_bytes(model))
    result.kept_tokens = result.prompt_tokens
    result.prompt_tokens = len(full)
    result.prefill_s += cp.seconds
    result.extra.update(
        {
            "compress_s": round(cp.seconds, 4),
            "compress_ratio": round(cp.ratio, 4),
            "compressor": compressor or "(the answering model)",
        }
    )
    return result


def _result_fields(result: GenResult | Mapping[str, Any]) -> dict[str, Any]:
    d = result.to_dict() if isinstance(result, GenResult) else dict(result)
    out = {k: d.get(k) for k in MEASURES if k not in ("prediction", "score")}
    out["prediction"] = d.get("text", d.get("prediction")) or ""
    extra = dict(d.get("extra") or {})
    if d.get("token_ids") is not None:
        extra["token_ids"] = [int(t) for t in d["token_ids"]]
    out["extra"] = extra
    versions = d.get("versions") or extra.get("versions")  # a peer reports its environment's
    if isinstance(versions, Mapping):
        out["versions"] = dict(versions)
    return out


def score_row(job: Job, result: GenResult | Mapping[str, Any]) -> dict[str, Any]:
    """The result row of ``job``: its identity, measures and the task's score of the prediction
    (teacher-forced tasks: the score of the result's ``bits_per_byte``)."""
    row = dataclasses.asdict(job.cell)
    row |= _result_fields(result)
    if job.task.teacher_forced:
        bpb = row.get("bits_per_byte")
        if bpb is None:
            raise FlowsieveError(
                f"task {job.task.name} is teacher-forced but the result has no bits_per_byte"
            )
        score = float(job.task.score_bits(bpb))  # type: ignore[attr-defined]
    else:
        score = float(job.task.score(job.item, row["prediction"]))
    if not 0.0 <= score <= 1.0:
        raise FlowsieveError(f"task {job.task.name} scored {score}, outside [0, 1]")
    row["score"] = score
    row["task_params"] = job.task.params()
    meta = job.item.meta
    row["extra"] = {
        **{k: meta[k] for k in ("length_tokens", "depth") if k in meta},
        **row["extra"],
    }
    return row


# --- comparison with the full run ------------------------------------------------------------------


@dataclass
class _Pass:
    """One forward pass seen by :class:`_Recorder`."""

    fed: int
    """Tokens fed."""
    last: int
    """The last token fed."""
    logprobs: Any
    """Log-probabilities of the next token after the last fed one, (V,) float32."""


@dataclass
class _Segment:
    """Consecutive passes on one cache object (a generation, or one sieve's copy in a shared run)."""

    first_fed: int
    passes: deque[_Pass]


class _Recorder:
    """A forward hook on the model that keeps the next-token log-probabilities of its recent passes,
    grouped by the cache each pass used (at most ``keep`` passes per cache); removed on exit.

    A greedy generation of ``n`` tokens ends with ``n - 1`` single-token passes, each feeding the
    token the previous pass chose; the pass before them chose the first token: its distribution
    is the answer start. Models without forward hooks (test doubles) record nothing.
    """

    def __init__(self, model: Any, keep: int) -> None:
        self.model, self.keep = model, max(1, keep)
        self.segments: list[_Segment] = []
        self._cache: Any = None
        self._handle: Any = None

    def __enter__(self) -> _Recorder:
        hook = getattr(self.model, "register_forward_hook", None)
        if callable(hook):
            self._handle = hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._cache = None

    def _hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        import torch

        logits = getattr(output, "logits", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(logits, torch.Tensor) or not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            return
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if not self.segments or cache is not self._cache:
            self.segments.append(_Segment(int(ids.shape[-1]), deque(maxlen=self.keep)))
            self._cache = cache
        lp = torch.log_softmax(logits[0, -1].detach().float(), dim=-1).cpu()
        self.segments[-1].passes.append(_Pass(int(ids.shape[-1]), int(ids[0, -1]), lp))

    def answer_start(self, token_ids: Sequence[int]) -> Any:
        """The log-probabilities that chose ``token_ids[0]`` in the last generation, or None."""
        return _answer_start(self.segments[-1], token_ids) if self.segments else None

    def shared_answer_starts(
        self, results: Sequence[GenResult], prompt_len: int, split: int, mode: str
    ) -> list[Any]:
        """Per result of one :func:`flowsieve.generate.generate_many` call, the log-probabilities of its
        first token (None where they cannot be told apart)."""
        if mode == "query_aware":
            # every sieve's first token comes from the shared pass over the whole prompt
            shared = [sg for sg in self.segments if sg.first_fed == prompt_len and sg.passes]
            if not shared:
                return [None] * len(results)
            lp = shared[0].passes[0].logprobs
            return [lp if r.token_ids and int(lp.argmax()) == r.token_ids[0] else None for r in results]
        # query-agnostic: each sieve's copy of the cache takes the question, then decodes
        own = [sg for sg in self.segments if sg.first_fed != split]
        if len(own) != len(results):
            return [None] * len(results)
        return [_answer_start(sg, r.token_ids) for sg, r in zip(own, results, strict=True)]


def _answer_start(segment: _Segment, token_ids: Sequence[int]) -> Any:
    n = len(token_ids)
    passes = list(segment.passes)
    if n == 0 or len(passes) < n:
        return None
    tail = passes[len(passes) - n :]
    if any(p.fed != 1 or p.last != t for p, t in zip(tail[1:], token_ids[:-1], strict=True)):
        return None
    lp = tail[0].logprobs
    return lp if int(lp.argmax()) == int(token_ids[0]) else None


def token_agreement(ids: Sequence[int] | None, ref: Sequence[int] | None, n: int) -> float | None:
    """The share of ``ref[:n]`` (the full run's first ``n`` tokens) that ``ids`` reproduces before
    the first difference; None without tokens."""
    ref = list(ref or [])[:n]
    if not ref or ids is None:
        return None
    k = 0
    for a, b in zip(ids, ref):
        if int(a) != int(b):
            break
        k += 1
    return k / len(ref)


def kl_divergence(ref_logprobs: Any, logprobs: Any) -> float | None:
    """KL(ref ‖ cell) in nats between two next-token distributions given as log-probabilities (V,);
    None when either is missing or the vocabularies differ."""
    if ref_logprobs is None or logprobs is None or ref_logprobs.shape != logprobs.shape:
        return None
    p, q = ref_logprobs.double(), logprobs.double()
    kl = float((p.exp() * (p - q)).nan_to_num(nan=0.0).sum())  # 0 · log 0 = 0
    return max(kl, 0.0)  # rounding can give -1e-12


@dataclass
class _Reference:
    """What a cell is compared with: the full run's answer-start log-probabilities and tokens."""

    logprobs: Any
    token_ids: list[int]


_REFERENCES: OrderedDict[tuple[Any, ...], _Reference] = OrderedDict()
_REFERENCE_ITEMS = 8  # sweeps run the cells of one item together; a few items are enough


def _reference_key(model: Any, item: Item, chat: bool, max_new_tokens: int) -> tuple[Any, ...]:
    return (id(model), item.task, item.item_id, item.context, item.question, chat, max_new_tokens)


def _remember(key: tuple[Any, ...], ref: _Reference) -> _Reference:
    _REFERENCES[key] = ref
    _REFERENCES.move_to_end(key)
    while len(_REFERENCES) > _REFERENCE_ITEMS:
        _REFERENCES.popitem(last=False)
    return ref


def _reference(model: Any, tok: Any, job: Job, chat: bool) -> _Reference:
    """The full run of ``job``'s item: from memory, else computed now (and kept)."""
    c = job.cell
    key = _reference_key(model, job.item, chat, c.max_new_tokens)
    ref = _REFERENCES.get(key)
    if ref is not None:
        _REFERENCES.move_to_end(key)
        return ref
    if job.task.teacher_forced:
        _, lp = run_lm(model, tok, job.item)
        return _remember(key, _Reference(lp, []))
    with _Recorder(model, c.max_new_tokens) as rec:
        res = _gen.generate(
            model, tok, job.item.context, job.item.question, chat=chat, max_new_tokens=c.max_new_tokens
        )
    return _remember(key, _Reference(rec.answer_start(res.token_ids), list(res.token_ids)))


def _compare(
    row: dict[str, Any], logprobs: Any, ref: _Reference | None, agree_tokens: int, teacher_forced: bool
) -> dict[str, Any]:
    """``row`` with ``token_agreement`` and ``kl_answer_start`` against ``ref``."""
    ids = (row.get("extra") or {}).get("token_ids")
    row["token_agreement"] = (
        None if teacher_forced or ref is None else token_agreement(ids, ref.token_ids, agree_tokens)
    )
    row["kl_answer_start"] = None if ref is None else kl_divergence(ref.logprobs, logprobs)
    if not teacher_forced:
        row["extra"] = {**row["extra"], "agree_tokens": agree_tokens}
    return row


def execute(
    job: Job,
    model: Any,
    tok: Any,
    *,
    chat: bool = True,
    compressor: str | None = None,
    agree_tokens: int = AGREE_TOKENS,
) -> dict[str, Any]:
    """Run one flowsieve cell (full or compressed) and return its scored row, compared with the
    full run of the same item (``token_agreement``, ``kl_answer_start``)."""
    import torch

    c = job.cell
    forced = job.task.teacher_forced
    ref = None if c.is_full else _reference(model, tok, job, chat)
    torch.manual_seed(c.seed)  # methods that draw at random (the `random` baseline) repeat
    keep, budget = (c.keep if c.budget == 0 else None), (c.budget or None)
    if forced:
        site = None if c.is_full else c.site
        result, lp = run_lm(model, tok, job.item, c.method, site, keep, budget, c.mode, compressor=compressor)
    else:
        with _Recorder(model, c.max_new_tokens) as rec:
            if c.is_full:
                result = _gen.generate(
                    model,
                    tok,
                    job.item.context,
                    job.item.question,
                    chat=chat,
                    max_new_tokens=c.max_new_tokens,
                )
            else:
                result = run_compressed(
                    model,
                    tok,
                    job.item,
                    c.method,
                    c.site,
                    keep,
                    budget,
                    c.mode,
                    c.max_new_tokens,
                    chat=chat,
                    compressor=compressor,
                )
        lp = rec.answer_start(result.token_ids)
    row = score_row(job, result)
    if c.is_full:
        ids = [] if forced else list(result.token_ids)
        ref = _remember(_reference_key(model, job.item, chat, c.max_new_tokens), _Reference(lp, ids))
    return _compare(row, lp, ref, agree_tokens, forced)


def _shareable(job: Job) -> bool:
    c = job.cell
    if c.system != "flowsieve" or c.is_full or c.site != "prefill" or job.task.teacher_forced:
        return False
    from flowsieve.sieves import METHODS

    return not getattr(METHODS.get(parse_method(c.method)[0]), "replays", False)  # replays: own passes


def _share_groups(jobs: list[Job]) -> list[list[Job]]:
    """Consecutive prefill-site cells of the same item, mode and seed form one group; others alone."""
    groups: list[list[Job]] = []
    last: tuple[Any, ...] | None = None
    for job in jobs:
        c = job.cell
        key = (c.task, json.dumps(job.task.params(), sort_keys=True), c.item_id, c.mode, c.seed)
        key += (c.max_new_tokens,)
        if _shareable(job) and key == last:
            groups[-1].append(job)
            continue
        groups.append([job])
        last = key if _shareable(job) else None
    return groups


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


def execute_shared(
    jobs: Sequence[Job], model: Any, tok: Any, *, chat: bool = True, agree_tokens: int = AGREE_TOKENS
) -> list[dict[str, Any]]:
    """Run prefill-site cells of one item and mode from one shared observed prefill
    (:func:`flowsieve.generate.generate_many`); returns their scored rows in order."""
    import torch

    _, sieve_cls = _sieve_class()
    first = jobs[0]
    ref = _reference(model, tok, first, chat)
    torch.manual_seed(first.cell.seed)
    sieves = [
        _make_sieve(
            sieve_cls,
            j.cell.method,
            j.cell.keep if j.cell.budget == 0 else None,
            j.cell.budget or None,
            j.cell.site,
        )
        for j in jobs
    ]
    with _Recorder(model, first.cell.max_new_tokens) as rec:
        results = _gen.generate_many(
            model,
            tok,
            first.item.context,
            first.item.question,
            sieves,
            mode=first.cell.mode,
            chat=chat,
            max_new_tokens=first.cell.max_new_tokens,
        )
    prompt = _gen.build_prompt(tok, first.item.context, first.item.question, chat=chat)
    starts = rec.shared_answer_starts(results, len(prompt), prompt.split, first.cell.mode)
    return [
        _compare(score_row(j, r), lp, ref, agree_tokens, False)
        for j, r, lp in zip(jobs, results, starts, strict=True)
    ]


# --- teacher-forced cells (lm) ---------------------------------------------------------------------


def _encode(tok: Any, text: str) -> list[int]:
    try:
        ids = tok(text, add_special_tokens=False)["input_ids"]
    except TypeError:
        ids = tok(text)["input_ids"]
    return [int(i) for i in ids]


def _uniform(cache: Any) -> bool:
    """Whether every compressed layer holds as many entries (a multi-token chunk can share a mask)."""
    layers = getattr(cache, "sieve_layers", None)
    return layers is None or len({cache.layer(i).stored_length for i in layers}) <= 1


def run_lm(
    model: Any,
    tok: Any,
    item: Item,
    method: str = FULL,
    site: str | None = None,
    keep: float | None = None,
    budget: int | None = None,
    mode: str = "query_aware",
    *,
    compressor: str | None = None,
) -> tuple[dict[str, Any], Any]:
    """A teacher-forced cell: the negative log-likelihood of ``item.answers[0]`` (the held-out
    continuation) after ``item.context``, the context compressed with ``method`` at ``site``
    (None: the full context). Returns (result fields with ``bits_per_byte``, the log-probabilities
    of the continuation's first token (V,)).

    The context is plain text (no chat template, no question; both modes are the same run). At
    the ``prompt`` site the context text is compressed first; at the other sites the sieve
    compresses the prefilled cache (:func:`flowsieve.generate.prefill_with_sieve`), and the
    continuation is fed through it as decoding would: one chunk where every layer holds as many
    entries, else one token at a time (the decode site keeps evicting, the select and layer sites
    keep their runtimes active). ``extra``: ``nll_bits``, ``scored_tokens``, ``scored_bytes``
    (UTF-8 bytes of the continuation, leading space included) and ``flops_per_token``
    (:func:`flowsieve.bench.tasks.lm.decode_flops_per_token`, for Information Capacity).
    """
    import torch

    from flowsieve.bench.tasks.lm import decode_flops_per_token
    from flowsieve.models import context_length

    if not item.answers or not item.answers[0]:
        raise FlowsieveError(f"item {item.item_id} has no continuation to score")
    continuation = item.answers[0]
    context, extra0, compress_s = item.context, {}, 0.0
    sieve = None
    if site == "prompt":
        from flowsieve.prompt import compress_prompt

        if keep is None:
            raise FlowsieveError("the prompt site takes keep ratios, not token budgets")
        cmodel, ctok = (model, tok) if compressor is None else _compressor(compressor)
        name, options = parse_method(method)
        cp = compress_prompt(context, scorer=name, keep=keep, model=cmodel, tokenizer=ctok, **options)
        if not cp.text.strip():
            raise FlowsieveError(f"{method} kept nothing of the context at keep {keep}")
        context, compress_s = cp.text, cp.seconds
        extra0 = {"compress_s": round(cp.seconds, 4), "compress_ratio": round(cp.ratio, 4)}
    elif site is not None:
        _, sieve_cls = _sieve_class()
        sieve = _make_sieve(sieve_cls, method, keep, budget, site)
    full = _gen.build_prompt(tok, item.context, None, chat=False)
    prompt = full if site != "prompt" else _gen.build_prompt(tok, context, None, chat=False)
    cont = _encode(tok, continuation)
    if not cont:
        raise FlowsieveError(f"the continuation of item {item.item_id} has no tokens")
    limit = context_length(model)
    if limit is not None and len(prompt) + len(cont) > limit:
        raise FlowsieveError(
            f"context ({len(prompt)}) and continuation ({len(cont)}) tokens exceed the model's context of {limit}"
        )
    rss = _gen._PeakRSS()
    t0 = time.perf_counter()
    runtimes: list[Any] = []
    step = None
    with torch.inference_mode():
        if sieve is None:
            from transformers import DynamicCache

            cache = DynamicCache(config=model.config)
            logits = model(
                input_ids=torch.tensor([prompt.ids]), cache=cache, use_cache=True, logits_to_keep=1
            ).logits
            extra: dict[str, Any] = {}
            kept = _gen.stored_tokens(cache)
        else:
            cache, logits, extra = _gen.prefill_with_sieve(model, prompt, sieve, mode, tok, chat=False)
            kept = extra["kept_entries"]
            protect = extra.pop("protect_mask", None)
            runtimes = [r for r in (extra.pop("select_runtime", None), extra.pop("layer_runtime", None)) if r]
            if sieve.site == "decode":
                step = _gen.DecodeEvictor(model, cache, sieve, protect, sieve.window)
        prefill_s = time.perf_counter() - t0 + compress_s
        kv = _gen.kv_bytes(cache)
        first = torch.log_softmax(logits[0, -1].float(), dim=-1)
        nll = -float(first[cont[0]])
        t1 = time.perf_counter()
        with contextlib.ExitStack() as stack:
            for r in runtimes:
                stack.enter_context(r.active())
            if len(cont) > 1 and step is None and not runtimes and _uniform(cache):
                out = model(input_ids=torch.tensor([cont[:-1]]), cache=cache, use_cache=True).logits
                lp = torch.log_softmax(out[0].float(), dim=-1)
                nll -= float(lp.gather(1, torch.tensor(cont[1:]).unsqueeze(1)).double().sum())
            else:
                for t, nxt in itertools.pairwise(cont):
                    if step is None:
                        out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
                    else:
                        with step() as after:
                            out = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits
                        after()
                    nll -= float(torch.log_softmax(out[0, -1].float(), dim=-1)[nxt])
        feed_s = time.perf_counter() - t1
    if step is not None:
        kv = max(kv, _gen.kv_bytes(cache))
        extra.update({"evicted": step.evicted, "max_stored": step.max_stored, "capacity": step.capacity})
    for r in runtimes:
        if hasattr(r, "summary"):
            extra.update(r.summary())
    peak = rss.stop()
    bits = nll / math.log(2)
    n_bytes = len(continuation.encode("utf-8"))
    extra = {
        **extra0,
        **{k: v for k, v in extra.items() if not hasattr(v, "shape")},
        "nll_bits": bits,
        "scored_tokens": len(cont),
        "scored_bytes": n_bytes,
        "score_tok_s": round(len(cont) / feed_s, 2) if feed_s > 0 else None,
        "flops_per_token": decode_flops_per_token(model.config),
    }
    result = {
        "prediction": "",
        "prompt_tokens": len(full),
        "kept_tokens": kept,
        "kv_bytes": kv,
        "kv_bytes_full": _gen.full_kv_bytes(model, len(full), _gen._dtype_bytes(model)),
        "peak_rss_mb": peak,
        "prefill_s": prefill_s,
        "decode_tok_s": None,
        "new_tokens": 0,
        "bits_per_byte": bits / n_bytes,
        "extra": extra,
    }
    return result, first


# --- provenance ------------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    import flowsieve

    out = {"flowsieve": flowsieve.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_hash() -> str:
    """The commit of the flowsieve checkout (``+dirty`` with uncommitted changes), or ``unknown``."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def machine() -> dict[str, Any]:
    """The machine a sweep ran on."""
    import psutil
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "hostname": platform.node(),
    }


# --- sweeps ----------------------------------------------------------------------------------------


@dataclass
class SweepSummary:
    """What a sweep did."""

    run_id: int
    planned: int
    already: int
    """Cells found in the store and skipped."""
    written: int
    failed: int
    """Cells that raised (recorded in the store's failures, retried by the next sweep)."""
    peer_errors: dict[str, str] = field(default_factory=dict)
    """Peer system -> why some or all of its cells did not run."""
    seconds: float = 0.0

    @property
    def missing(self) -> int:
        return self.planned - self.already - self.written


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


def _set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


class _Writer:
    """Adds provenance to rows, writes them, records failures, counts."""

    def __init__(
        self, store: Store, run_id: int, vers: dict[str, str], ghash: str, pbar: Any, fail_fast: bool
    ):
        self.store, self.run_id, self.versions, self.git_hash = store, run_id, vers, ghash
        self.pbar, self.fail_fast = pbar, fail_fast
        self.written = self.failed = 0

    def row(self, row: dict[str, Any]) -> None:
        row = {**row, "run_id": self.run_id, "git_hash": self.git_hash}
        own = {"flowsieve": self.versions["flowsieve"]}
        row["versions"] = {**own, **row["versions"]} if row.get("versions") else self.versions
        if self.store.add(row):
            self.written += 1
        self.pbar.update(1)

    def failure(self, cell: Cell | Mapping[str, Any], error: str, count: int = 1) -> None:
        ident = dataclasses.asdict(cell) if isinstance(cell, Cell) else dict(cell)
        self.store.add_failure(ident, error, self.run_id)
        self.failed += count
        self.pbar.update(count)
        name = ident.get("method", ANY)
        where = f"{ident.get('system', ANY)}:{name} {ident.get('item_id', ANY)}"
        self.pbar.write(f"flowsieve bench: {where}: {error}", file=sys.stderr)


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_sweep(
    config: SweepConfig,
    store: Store,
    *,
    model: Any = None,
    tokenizer: Any = None,
    loader: Loader | None = None,
    progress: bool = True,
    ray_address: str | None = None,
    ray_workers: int | None = None,
    fail_fast: bool = False,
) -> SweepSummary:
    """Run every cell of ``config`` that ``store`` lacks; each row is committed as soon as it exists.

    Args:
        config: the sweep.
        store: where rows go (and which cells are done already).
        model, tokenizer: an already loaded model (else ``loader(config.model)`` loads it).
        loader: ``name -> (model, tokenizer)``; :func:`flowsieve.models.load` by default. With Ray
            it runs in every worker, so it must be picklable.
        progress: show a progress bar with an ETA.
        ray_address: run the flowsieve cells as Ray tasks: ``"local"`` starts a local Ray, anything
            else is passed to ``ray.init(address=...)`` (``"auto"``, ``"ray://host:10001"``).
        ray_workers: Ray actors (each loads the model); default: cluster CPUs // threads.
        fail_fast: stop at the first cell that raises (it is still recorded as a failure).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    check_methods(config)
    if loader is None:
        from flowsieve.models import load as loader  # type: ignore[assignment]
    if tokenizer is None:
        model, tokenizer = loader(config.model)  # type: ignore[misc]
    _set_threads(config.threads)
    jobs = plan(config, tokenizer)
    done = store.keys()
    todo = [j for j in jobs if j.cell.key() not in done]
    summary = SweepSummary(0, len(jobs), len(jobs) - len(todo), 0, 0)
    vers = versions()
    ghash = git_hash()
    summary.run_id = store.start_run(config.to_dict(), machine(), vers, ghash)
    local = [j for j in todo if j.cell.system == "flowsieve"]
    peer = [j for j in todo if j.cell.system != "flowsieve"]
    pbar = tqdm(total=len(todo), desc="bench", unit="cell", disable=not progress, dynamic_ncols=True)
    writer = _Writer(store, summary.run_id, vers, ghash, pbar, fail_fast)
    try:
        if local and ray_address is not None:
            model = None
            _run_ray(local, config, writer, ray_address, ray_workers, loader)
        elif local:
            if model is None:
                model, tokenizer = loader(config.model)  # type: ignore[misc]
            groups = _share_groups(local) if config.share_prefill else [[j] for j in local]
            for group in groups:
                if len(group) > 1:
                    c = group[0].cell
                    pbar.set_postfix_str(f"{len(group)} prefill cells, shared, {c.mode}", refresh=False)
                    try:
                        rows = execute_shared(
                            group, model, tokenizer, chat=config.chat, agree_tokens=config.agree_tokens
                        )
                    except Exception as e:  # each cell then runs alone and records its own outcome
                        log.warning("shared prefill failed (%s); running the cells one by one", _describe(e))
                    else:
                        for row in rows:
                            writer.row(row)
                        continue
                for job in group:
                    c = job.cell
                    pbar.set_postfix_str(f"{c.method} {c.site} {c.keep or c.budget} {c.mode}", refresh=False)
                    try:
                        row = execute(
                            job,
                            model,
                            tokenizer,
                            chat=config.chat,
                            compressor=config.compressor,
                            agree_tokens=config.agree_tokens,
                        )
                    except Exception as e:
                        writer.failure(c, _describe(e))
                        if fail_fast:
                            raise
                        continue
                    writer.row(row)
        if peer:
            summary.peer_errors = _run_peers(peer, config, writer, model, tokenizer, loader)
    finally:
        pbar.close()
        summary.written, summary.failed = writer.written, writer.failed
        store.finish_run(summary.run_id, planned=len(jobs), written=writer.written, failed=writer.failed)
        summary.seconds = time.perf_counter() - t0
    return summary


def _answer_compressed(
    model: Any, tok: Any, job: Job, row: Mapping[str, Any], config: SweepConfig
) -> dict[str, Any]:
    """A prompt-site peer row answered again by the sweep's model: the peer compressed the context
    with ``config.compressor``; the sweep's model answers the compressed context, as flowsieve's own
    prompt-site cells do (:func:`run_prompt_site`)."""
    extra = dict(row.get("extra") or {})
    context = extra.get("compressed_context")
    if not isinstance(context, str) or not context.strip():
        raise FlowsieveError("the peer row carries no compressed context to answer")
    res = _gen.generate(
        model, tok, context, job.item.question, chat=config.chat, max_new_tokens=config.max_new_tokens
    )
    full = _gen.build_prompt(tok, job.item.context, job.item.question, chat=config.chat)
    compress_s = float(extra.get("compress_s") or 0.0)
    extra.update(
        {
            "compressor": config.compressor,
            "answered_by": config.model,
            "compressor_answer": row.get("prediction"),
            "token_ids": res.token_ids,
        }
    )
    return {
        "item_id": row["item_id"],
        "prediction": res.text,
        "prompt_tokens": len(full),
        "kept_tokens": res.prompt_tokens,
        "kv_bytes": res.kv_bytes,
        "kv_bytes_full": _gen.full_kv_bytes(model, len(full), _gen._dtype_bytes(model)),
        "peak_rss_mb": res.peak_rss_mb,
        "prefill_s": res.prefill_s + compress_s,
        "decode_tok_s": res.decode_tok_s,
        "new_tokens": res.new_tokens,
        "versions": row.get("versions"),
        "extra": extra,
    }


def _run_peers(
    jobs: list[Job],
    config: SweepConfig,
    writer: _Writer,
    model: Any = None,
    tok: Any = None,
    loader: Loader | None = None,
) -> dict[str, str]:
    """Run peer cells in batches (system, method, keep, mode, task variant, seed) through ``run_peer``.

    A prompt-site peer (llmlingua) with ``config.compressor`` set compresses with that model (in its
    own environment); the sweep's model then answers every compressed context here."""
    errors: dict[str, str] = {}
    try:
        peers = _peers_module()
    except Exception as e:
        peers, why = (
            None,
            f"peer runner not available: flowsieve.bench.peers failed to import ({_describe(e)})",
        )
    else:
        why = "peer runner not available: flowsieve.bench.peers is not installed"
    run_peer = getattr(peers, "run_peer", None)
    if run_peer is None:
        for system in _unique(j.cell.system for j in jobs):
            n = sum(j.cell.system == system for j in jobs)
            writer.failure({"model": config.model, "system": system}, why, count=n)
            errors[system] = why
        return errors
    try:
        params = inspect.signature(run_peer).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    peer_kw: dict[str, Any] = {"threads": config.threads} if "threads" in params else {}
    if "chat" in params:
        peer_kw["chat"] = config.chat
    elif not config.chat:
        # a run_peer without ``chat`` builds chat prompts only: never run it on the wrong prompt
        why = "peer runner cannot build plain (--no-chat) prompts: its run_peer takes no chat argument"
        for system in _unique(j.cell.system for j in jobs):
            n = sum(j.cell.system == system for j in jobs)
            writer.failure({"model": config.model, "system": system}, why, count=n)
            errors[system] = why
        return errors
    batches: dict[tuple[Any, ...], list[Job]] = {}
    for j in jobs:
        c = j.cell
        key = (
            c.system,
            c.method,
            c.keep,
            c.mode,
            c.task,
            json.dumps(j.task.params(), sort_keys=True),
            c.seed,
        )
        batches.setdefault(key, []).append(j)
    for (system, method, keep, mode, task, params, _seed), batch in batches.items():
        writer.pbar.set_postfix_str(f"{system}:{method} {keep} {mode}", refresh=False)
        reanswer = PEER_SITES[system] == "prompt" and config.compressor not in (None, config.model)
        kw = dict(peer_kw)
        if reanswer and "chat" in kw:
            kw["chat"] = True  # the compressor's own prompt; its answer is replaced below
        group = {"model": config.model, "system": system, "method": method, "keep": keep, "mode": mode}
        group |= {"site": PEER_SITES[system], "task": task, "item_id": f"{ANY}{params}"}
        try:
            name = config.compressor if reanswer else config.model
            args = (system, [j.item for j in batch], method, keep, name, mode, config.max_new_tokens)
            rows = run_peer(*args, **kw)
        except Exception as e:
            why = f"{system}:{method} at keep {keep} ({mode}) failed: {_describe(e)}"
            writer.failure(group, why, count=len(batch))
            errors[system] = why
            if writer.fail_fast:
                raise
            continue
        writer.store.clear_failures(model=config.model, system=system, method=ANY)
        writer.store.clear_failures(**group)
        by_id = {}
        for r in rows or []:
            if isinstance(r, Mapping) and "item_id" in r:
                by_id[str(r["item_id"])] = r
        for j in batch:
            r = by_id.get(j.item.item_id)
            if r is None:
                writer.failure(j.cell, f"the {system} runner returned no row for this item")
                errors[system] = f"{system}:{method} returned no row for some items"
                continue
            try:
                if reanswer:
                    if model is None:
                        model, tok = (loader or _compressor)(config.model)
                    r = _answer_compressed(model, tok, j, r, config)
                writer.row(score_row(j, r))
            except Exception as e:
                writer.failure(j.cell, f"bad row from the {system} runner: {_describe(e)}")
                errors[system] = f"{system}:{method} returned bad rows ({_describe(e)})"
    return errors


class _RayWorker:
    """A Ray actor: loads the model once, then runs cells."""

    def __init__(
        self,
        model_name: str,
        threads: int,
        chat: bool,
        loader: Loader | None,
        agree_tokens: int = AGREE_TOKENS,
    ) -> None:
        _set_threads(threads)
        if loader is None:
            from flowsieve.models import load as loader  # type: ignore[assignment]
        self.model, self.tok = loader(model_name)  # type: ignore[misc]
        self.chat, self.agree_tokens = chat, agree_tokens

    def run(self, job: Job) -> tuple[Cell, dict[str, Any] | None, str | None]:
        try:
            return (
                job.cell,
                execute(job, self.model, self.tok, chat=self.chat, agree_tokens=self.agree_tokens),
                None,
            )
        except Exception as e:
            return job.cell, None, _describe(e)


def _run_ray(
    jobs: list[Job],
    config: SweepConfig,
    writer: _Writer,
    address: str,
    workers: int | None,
    loader: Loader | None,
) -> None:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise FlowsieveError("--ray needs Ray: pip install 'flowsieve[ray]' (or: pip install ray)") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        try:
            if address == "local":
                ray.init(**kw)
            else:
                ray.init(address=address, **kw)
        except Exception as e:
            raise FlowsieveError(f"cannot start or reach Ray at {address}: {_describe(e)}") from None
        started = True
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_actor = min(config.threads, cpus)
        # an actor holds its CPUs for its whole life: more than fit would never be scheduled
        if workers is not None and workers > max(1, cpus // per_actor):
            raise FlowsieveError(
                f"{workers} Ray workers need {workers * per_actor} CPUs ({per_actor} each); "
                f"the cluster has {cpus}: use fewer --ray-workers or --threads"
            )
        n = workers or cpus // per_actor
        n = max(1, min(n, len(jobs)))
        actor = ray.remote(num_cpus=per_actor)(_RayWorker)
        actors = [
            actor.remote(config.model, config.threads, config.chat, loader, config.agree_tokens)
            for _ in range(n)
        ]
        pool = ActorPool(actors)
        for job in jobs:
            pool.submit(lambda a, j: a.run.remote(j), job)
        while pool.has_next():
            try:
                cell, row, error = pool.get_next_unordered()
            except Exception as e:  # a worker died (e.g. the model failed to load)
                raise FlowsieveError(f"a Ray worker failed: {_describe(e)}") from None
            if row is not None:
                writer.row(row)
            else:
                writer.failure(cell, error or "unknown error")
                if writer.fail_fast:
                    raise FlowsieveError(f"cell failed: {error}")
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()


__all__ = [
    "IDENTITY",
    "PEERS",
    "PEER_METHODS",
    "PEER_SITES",
    "SITES",
    "Cell",
    "Job",
    "SweepConfig",
    "SweepSummary",
    "check_methods",
    "execute",
    "execute_shared",
    "kl_divergence",
    "parse_method",
    "plan",
    "run_compressed",
    "run_lm",
    "run_prompt_site",
    "run_sweep",
    "score_row",
    "token_agreement",
]
