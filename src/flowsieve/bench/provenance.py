"""Provenance of a sweep's rows: package versions, the checkout's commit and the machine, and the
writer (:class:`_Writer`) that stamps every row with them, stores it, records failures and counts."""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flowsieve.bench.config import Cell
from flowsieve.bench.store import ANY, Store


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


__all__ = ["git_hash", "machine", "versions"]
