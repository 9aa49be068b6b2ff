"""Flowsieve cells as Ray tasks: actors that each load the model once (:class:`_RayWorker`) run the
cells; the driver writes every row to the same store (:func:`_run_ray`, called by
:func:`flowsieve.bench.runner.run_sweep` with ``ray_address`` set)."""

from __future__ import annotations

from typing import Any

from flowsieve.bench.cells import _describe, _set_threads, execute
from flowsieve.bench.config import AGREE_TOKENS, Cell, Job, Loader, SweepConfig
from flowsieve.bench.provenance import _Writer
from flowsieve.errors import FlowsieveError


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
