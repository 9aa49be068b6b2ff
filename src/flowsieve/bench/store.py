"""The results store: one SQLite row per bench cell, resumable, exportable to CSV and Parquet.

A *cell* is one generation: (model, system, method, site, keep, budget, task, item_id, mode, seed,
max_new_tokens). That tuple is the table's unique key, so writing a cell twice keeps the first
row, and a sweep that was killed and started again only fills the cells that are missing. Every row
is committed on its own in WAL mode: a killed process loses at most the cell it was computing.

Besides ``results`` the store keeps ``runs`` (one row per sweep: its settings, machine, versions)
and ``failures`` (cells or peer batches that could not run, with the reason; cleared when the
cell later succeeds). Wildcards in a failure's identity (``"*"`` or ``-1``) mean "all of them".
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from flowsieve.errors import FlowsieveError, did_you_mean

SCHEMA_VERSION = 1

SYSTEMS = ("flowsieve", "kvpress", "llmlingua")
"""Who compressed: this library or one of the peers run side by side."""
MODES = ("query_aware", "query_agnostic")
"""Whether the question was seen while compressing. Never mixed in one table or plot."""
FULL = "full"
"""The method name of the uncompressed reference run."""
FULL_SITE = "none"
"""The site recorded for the uncompressed reference (its keep is 1.0 and its budget 0)."""
ANY = "*"
"""Wildcard in a failure's identity."""

IDENTITY = (
    "model",
    "system",
    "method",
    "site",
    "keep",
    "budget",
    "task",
    "item_id",
    "mode",
    "seed",
    "max_new_tokens",
)
"""The columns that name a cell; unique together."""

MEASURES = (
    "prediction",
    "score",
    "prompt_tokens",
    "kept_tokens",
    "kv_bytes",
    "kv_bytes_full",
    "peak_rss_mb",
    "prefill_s",
    "decode_tok_s",
    "new_tokens",
    "token_agreement",
    "kl_answer_start",
    "bits_per_byte",
)
"""What a cell produced and cost. The last three compare with the full-context run of the same item
(flowsieve cells; NULL for peers and where not measured): ``token_agreement``, the share of the
full run's first N generated tokens reproduced before the first difference (N in
``extra.agree_tokens``); ``kl_answer_start``, KL(full ‖ cell) in nats of the next-token
distribution at the first generated position; ``bits_per_byte``, the NLL of a teacher-forced
continuation in bits per UTF-8 byte (``lm`` task; lower is better)."""

ADDED = ("token_agreement", "kl_answer_start", "bits_per_byte")
"""Nullable measures added after the first schema: a store without them gains them on opening."""

COLUMNS = (*IDENTITY, "task_params", *MEASURES, "versions", "git_hash", "run_id", "created_at", "extra")
"""Every column of ``results`` in export order (``id`` excluded)."""

JSON_COLUMNS = frozenset({"task_params", "versions", "extra"})

_TYPES = {
    "model": "TEXT NOT NULL",
    "system": "TEXT NOT NULL",
    "method": "TEXT NOT NULL",
    "site": "TEXT NOT NULL",
    "keep": "REAL NOT NULL",
    "budget": "INTEGER NOT NULL",
    "task": "TEXT NOT NULL",
    "item_id": "TEXT NOT NULL",
    "mode": "TEXT NOT NULL",
    "seed": "INTEGER NOT NULL",
    "max_new_tokens": "INTEGER NOT NULL",
    "task_params": "TEXT NOT NULL",
    "prediction": "TEXT NOT NULL",
    "score": "REAL NOT NULL",
    "prompt_tokens": "INTEGER",
    "kept_tokens": "INTEGER",
    "kv_bytes": "INTEGER",
    "kv_bytes_full": "INTEGER",
    "peak_rss_mb": "REAL",
    "prefill_s": "REAL",
    "decode_tok_s": "REAL",
    "new_tokens": "INTEGER",
    "token_agreement": "REAL",
    "kl_answer_start": "REAL",
    "bits_per_byte": "REAL",
    "versions": "TEXT NOT NULL",
    "git_hash": "TEXT NOT NULL",
    "run_id": "INTEGER",
    "created_at": "TEXT NOT NULL",
    "extra": "TEXT NOT NULL",
}
_INTS = frozenset(c for c, t in _TYPES.items() if t.startswith("INTEGER"))
_FLOATS = frozenset(c for c, t in _TYPES.items() if t.startswith("REAL"))

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    {", ".join(f"{c} {_TYPES[c]}" for c in COLUMNS)},
    UNIQUE ({", ".join(IDENTITY)})
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    config TEXT NOT NULL,
    machine TEXT NOT NULL,
    versions TEXT NOT NULL,
    git_hash TEXT NOT NULL,
    cells_planned INTEGER,
    cells_written INTEGER,
    cells_failed INTEGER
);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY,
    {", ".join(f"{c} {_TYPES[c]}" for c in IDENTITY)},
    error TEXT NOT NULL,
    run_id INTEGER,
    created_at TEXT NOT NULL,
    UNIQUE ({", ".join(IDENTITY)})
);
"""


def now() -> str:
    """The current UTC time as ISO 8601 with seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def normalize_keep(keep: float) -> float:
    """Keep ratios are stored rounded to 6 decimals so that equal keeps compare equal in SQL."""
    return round(float(keep), 6)


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise FlowsieveError(
            f"{name} must be one of {', '.join(choices)}, got {value!r}{did_you_mean(str(value), choices)}"
        )


def _json(value: Any) -> str:
    return json.dumps(value if value is not None else {}, sort_keys=True, default=str, allow_nan=False)


def _finite(v: Any) -> Any:
    """NaN and infinities become NULL (SQLite and JSON have no place for them)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _clean_json(value: Any) -> Any:
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, Mapping):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    return value


def identity_of(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """The cell key of a row, normalised the way the store keeps it."""
    missing = [c for c in IDENTITY if c not in row]
    if missing:
        raise FlowsieveError(f"a result row lacks {', '.join(missing)}")
    key = []
    for c in IDENTITY:
        v = row[c]
        if c == "keep":
            v = normalize_keep(v)
        elif c in _INTS:
            v = int(v)
        else:
            v = str(v)
        key.append(v)
    return tuple(key)


class Store:
    """A results database (SQLite). Use as a context manager or call :meth:`close`.

    Args:
        path: the ``.sqlite`` file.
        create: make the file if it does not exist; ``False`` raises a :class:`FlowsieveError`
            for a missing file (what ``flowsieve report`` wants).
    """

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FlowsieveError(
                f"no results database at {self.path}; run `flowsieve bench --db {self.path}` first"
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 60000")
            self._db.execute("PRAGMA journal_mode = WAL")
            # in WAL mode, NORMAL keeps every committed row when the process is killed
            self._db.execute("PRAGMA synchronous = NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise FlowsieveError(f"{self.path} is not a SQLite results database: {e}") from None
        if (tables and "results" not in tables) or version not in (0, SCHEMA_VERSION):
            self._db.close()
            raise FlowsieveError(
                f"{self.path} is not a flowsieve results database (tables: {', '.join(sorted(tables))}; "
                f"schema version {version})"
            )
        if "results" in tables:
            have = {r[1] for r in self._db.execute("PRAGMA table_info(results)")}
            for c in ADDED:
                if c not in have:
                    try:
                        self._db.execute(f"ALTER TABLE results ADD COLUMN {c} {_TYPES[c]}")
                    except sqlite3.OperationalError as e:  # another process added it meanwhile
                        if "duplicate column" not in str(e):
                            raise
                    have.add(c)
            lacking = [c for c in COLUMNS if c not in have]
            if lacking:
                self._db.close()
                raise FlowsieveError(f"{self.path}: the results table lacks {', '.join(lacking)}")
        self._db.executescript(_SCHEMA)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # --- lifecycle ---------------------------------------------------------------------------------

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- results -----------------------------------------------------------------------------------

    def add(self, row: Mapping[str, Any]) -> bool:
        """Write one result row and commit it. Returns False when the cell was already there.

        ``row`` holds every column of :data:`COLUMNS` except those with defaults: ``task_params``,
        ``versions`` and ``extra`` (dicts, stored as JSON), ``git_hash``, ``run_id``, ``created_at``.
        """
        values = self._row_values(row)
        cur = self._db.execute(
            f"INSERT OR IGNORE INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            values,
        )
        inserted = cur.rowcount == 1
        if inserted:
            self._db.execute(
                f"DELETE FROM failures WHERE {' AND '.join(f'{c} = ?' for c in IDENTITY)}",
                values[: len(IDENTITY)],
            )
        return inserted

    def _row_values(self, row: Mapping[str, Any]) -> list[Any]:
        key = identity_of(row)
        check_choice("system", row["system"], SYSTEMS)
        check_choice("mode", row["mode"], MODES)
        keep = key[IDENTITY.index("keep")]
        if not 0.0 <= keep <= 1.0:
            raise FlowsieveError(f"keep must be in [0, 1], got {keep}")
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise FlowsieveError(f"score must be a number in [0, 1], got {score!r}")
        values: list[Any] = list(key)
        for c in COLUMNS[len(IDENTITY) :]:
            v = row.get(c)
            if c in JSON_COLUMNS:
                v = _json(_clean_json(v))
            elif c == "created_at":
                v = v or now()
            elif c == "git_hash":
                v = v or "unknown"
            elif c == "prediction":
                v = "" if v is None else str(v)
            elif v is not None and c in _INTS:
                v = int(v)
            elif v is not None and c in _FLOATS:
                v = _finite(float(v))
            values.append(v)
        return values

    def keys(self) -> set[tuple[Any, ...]]:
        """The identities of every stored cell (see :data:`IDENTITY`)."""
        return {tuple(r) for r in self._db.execute(f"SELECT {', '.join(IDENTITY)} FROM results")}

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def __contains__(self, row: object) -> bool:
        if not isinstance(row, Mapping):
            return False
        where = " AND ".join(f"{c} = ?" for c in IDENTITY)
        return (
            self._db.execute(f"SELECT 1 FROM results WHERE {where}", identity_of(row)).fetchone() is not None
        )

    def rows(self, **where: Any) -> list[dict[str, Any]]:
        """Result rows (JSON columns decoded), in insertion order; ``where`` filters by equality."""
        return list(self.iter_rows(**where))

    def iter_rows(self, **where: Any) -> Iterator[dict[str, Any]]:
        for c in where:
            if c not in COLUMNS:
                raise FlowsieveError(f"unknown column '{c}'{did_you_mean(c, COLUMNS)}")
        sql = f"SELECT {', '.join(COLUMNS)} FROM results"
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c in where)
        for r in self._db.execute(sql + " ORDER BY id", list(where.values())):
            d = dict(r)
            for c in JSON_COLUMNS:
                d[c] = json.loads(d[c]) if d[c] else {}
            yield d

    # --- runs --------------------------------------------------------------------------------------

    def start_run(
        self,
        config: Mapping[str, Any],
        machine: Mapping[str, Any],
        versions: Mapping[str, Any],
        git_hash: str,
    ) -> int:
        """Record the start of a sweep; returns its id (written into each row's ``run_id``)."""
        cur = self._db.execute(
            "INSERT INTO runs (started_at, config, machine, versions, git_hash) VALUES (?, ?, ?, ?, ?)",
            (now(), _json(_clean_json(config)), _json(machine), _json(versions), git_hash),
        )
        return int(cur.lastrowid or 0)

    def finish_run(self, run_id: int, *, planned: int, written: int, failed: int) -> None:
        self._db.execute(
            "UPDATE runs SET finished_at = ?, cells_planned = ?, cells_written = ?, cells_failed = ? "
            "WHERE id = ?",
            (now(), planned, written, failed, run_id),
        )

    def runs(self) -> list[dict[str, Any]]:
        """Every sweep recorded, oldest first (``finished_at`` is None for one that was killed)."""
        out = []
        for r in self._db.execute("SELECT * FROM runs ORDER BY id"):
            d = dict(r)
            for c in ("config", "machine", "versions"):
                d[c] = json.loads(d[c]) if d[c] else {}
            out.append(d)
        return out

    # --- failures ----------------------------------------------------------------------------------

    def add_failure(self, identity: Mapping[str, Any], error: str, run_id: int | None = None) -> None:
        """Record why a cell (or, with ``"*"``/``-1`` wildcards, a group of cells) did not run."""
        full = {"model": ANY, "system": ANY, "method": ANY, "site": ANY, "keep": -1, "budget": -1}
        full |= {"task": ANY, "item_id": ANY, "mode": ANY, "seed": -1, "max_new_tokens": -1}
        full |= {k: v for k, v in identity.items() if k in IDENTITY}
        key = identity_of(full)
        self._db.execute(
            f"INSERT INTO failures ({', '.join(IDENTITY)}, error, run_id, created_at) "
            f"VALUES ({', '.join('?' * (len(IDENTITY) + 3))}) "
            f"ON CONFLICT ({', '.join(IDENTITY)}) DO UPDATE SET error = excluded.error, "
            "run_id = excluded.run_id, created_at = excluded.created_at",
            (*key, str(error), run_id, now()),
        )

    def clear_failures(self, **where: Any) -> int:
        """Delete the failures matching ``where`` (equality on identity columns); returns how many."""
        for c in where:
            if c not in IDENTITY:
                raise FlowsieveError(f"unknown failure column '{c}'{did_you_mean(c, IDENTITY)}")
        sql = "DELETE FROM failures"
        if where:
            sql += " WHERE " + " AND ".join(f"{c} = ?" for c in where)
        return self._db.execute(sql, list(where.values())).rowcount

    def failures(self) -> list[dict[str, Any]]:
        """Recorded failures, oldest first."""
        return [dict(r) for r in self._db.execute("SELECT * FROM failures ORDER BY id")]

    # --- export ------------------------------------------------------------------------------------

    def export(self, path: str | Path) -> Path:
        """Write every result row to ``path``: ``.csv`` or ``.parquet`` (JSON columns as JSON text)."""
        p = Path(path)
        suffix = p.suffix.lower()
        if suffix not in (".csv", ".parquet"):
            raise FlowsieveError(f"export to .csv or .parquet, not '{p.suffix or p.name}'")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        rows = self._raw_rows()
        if suffix == ".csv":
            with tmp.open("w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(COLUMNS)
                w.writerows(rows)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            def typ(c: str) -> Any:
                return pa.int64() if c in _INTS else pa.float64() if c in _FLOATS else pa.string()

            schema = pa.schema([pa.field(c, typ(c)) for c in COLUMNS])
            table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(COLUMNS)}, schema=schema)
            pq.write_table(table, tmp)
        tmp.replace(p)
        return p

    def _raw_rows(self) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM results ORDER BY id")]


def read_export(path: str | Path) -> list[dict[str, Any]]:
    """Read back a CSV or Parquet export as rows typed like :meth:`Store.rows` (JSON decoded)."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        raw = pq.read_table(p).to_pylist()
    else:
        with p.open(newline="", encoding="utf-8") as f:
            raw = []
            for r in csv.DictReader(f):
                d: dict[str, Any] = {}
                for c, v in r.items():
                    if v == "" and c not in ("prediction", "item_id"):
                        d[c] = None
                    elif c in _INTS:
                        d[c] = int(v)
                    elif c in _FLOATS:
                        d[c] = float(v)
                    else:
                        d[c] = v
                raw.append(d)
    for d in raw:
        for c in JSON_COLUMNS:
            d[c] = json.loads(d[c]) if d.get(c) else {}
    return raw
