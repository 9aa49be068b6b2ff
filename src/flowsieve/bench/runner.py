"""Bench sweeps: expand settings into cells, skip the cells already stored, run the rest, one row each.

A sweep (:class:`~flowsieve.bench.config.SweepConfig`) crosses a model with methods × sites × keep
ratios (or token budgets) × tasks (× lengths) × items × seeds × modes. Each crossing is a
:class:`~flowsieve.bench.config.Cell`; :func:`run_sweep` runs every cell the
:class:`~flowsieve.bench.store.Store` does not hold yet and writes its row as soon as it is done, so
a killed sweep started again finishes the missing cells only.

The uncompressed reference (method ``full``) is always part of a sweep: it runs once per (model,
item, mode, max_new_tokens) and every compressed cell of that item is compared with it at report
time (score, speed and memory ratios, agreement of the generated tokens). Two comparisons are made
while running, where both runs are at hand: ``token_agreement`` and ``kl_answer_start``
(:mod:`flowsieve.bench.references`). Peers' rows carry neither.

Flowsieve cells run through :func:`flowsieve.bench.cells.execute` (one cell) or
:func:`flowsieve.bench.cells.execute_shared` (prefill-site cells of one item from one shared
prefill, ``share_prefill``); cells of the peers (kvpress, llmlingua) through
``flowsieve.bench.peers.run_peer``, which runs them in their own environments. Predictions are
always scored here, with the task's ``score()``. With ``ray_address`` set, cells run as Ray tasks
on actors that each load the model once (:mod:`flowsieve.bench.ray_runner`); the driver writes
every row to the same store.

The modules: :mod:`~flowsieve.bench.config` (settings, method specs, the plan of cells),
:mod:`~flowsieve.bench.cells` (running one cell), :mod:`~flowsieve.bench.references` (the
comparison with the full run), :mod:`~flowsieve.bench.provenance` (versions, commit, machine, the
row writer), :mod:`~flowsieve.bench.ray_runner` (Ray) and this one (the sweep and the peers' cells).
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import flowsieve.generate as _gen
from flowsieve.bench.cells import (
    _compressor,
    _describe,
    _set_threads,
    execute,
    execute_shared,
    score_row,
)
from flowsieve.bench.config import (
    PEER_SITES,
    Job,
    Loader,
    SweepConfig,
    _peers_module,
    _unique,
    check_methods,
    parse_method,
    plan,
)
from flowsieve.bench.provenance import _Writer, git_hash, machine, versions
from flowsieve.bench.ray_runner import _run_ray
from flowsieve.bench.store import ANY, Store
from flowsieve.errors import FlowsieveError
from flowsieve.inputs import build_prompt
from flowsieve.kvcache import full_kv_bytes

log = logging.getLogger("flowsieve.bench")


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


def _shareable(job: Job) -> bool:
    c = job.cell
    if c.system != "flowsieve" or c.is_full or c.site != "prefill" or job.task.teacher_forced:
        return False
    from flowsieve.methods import METHODS
    from flowsieve.sieve import DEFAULT

    name = parse_method(c.method)[0]
    if name == DEFAULT:  # resolved per mode; no default replays
        return True
    return not getattr(METHODS.get(name), "replays", False)  # replays: own passes


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
    full = build_prompt(tok, job.item.context, job.item.question, chat=config.chat)
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
        "kv_bytes_full": full_kv_bytes(model, len(full)),
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


__all__ = ["SweepSummary", "run_sweep"]
