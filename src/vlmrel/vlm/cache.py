"""Persistent, content-addressed response cache: one SQLite file in WAL mode.

Every finished response (an answer or a recorded failure) is committed on its own as
soon as it is validated (a few event-loop turns after it arrives, once the request that
took its slot is on the wire), so ``kill -9`` loses only requests still in flight, at most
two per slot; a re-run sends
only what is missing. WAL mode with ``synchronous=NORMAL`` keeps every committed row
across a crash of the process (a power cut may lose the last few commits, never corrupt
the file). Several jobs may share one cache: readers never block, writers wait up to
``busy_timeout``.

The key (see :func:`vlmrel.vlm.client.chat_key`) hashes backend, model, prompt, encoded
image bytes, schema and generation parameters; never an endpoint or a credential. Rows
hold no API key: error messages are redacted before they get here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1"

_DDL = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    text TEXT,
    parsed TEXT,
    failure_kind TEXT,
    error TEXT,
    latency_s REAL,
    endpoint TEXT,
    backend TEXT,
    model TEXT,
    attempts INTEGER,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS embeddings (
    key TEXT PRIMARY KEY,
    backend TEXT,
    model TEXT,
    dim INTEGER NOT NULL,
    vector BLOB NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class CachedResponse:
    """One row of the ``responses`` table."""

    key: str
    status: str
    text: str | None
    parsed: Any
    failure_kind: str | None
    error: str | None
    latency_s: float | None
    endpoint: str | None
    attempts: int | None


class ResponseCache:
    """SQLite-backed cache of chat responses and text embeddings. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, WAL is required")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_DDL)
            self._db.execute(
                "INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
            version = self._db.execute("SELECT v FROM meta WHERE k = 'schema_version'").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise RuntimeError(f"VLM response cache {self.path}: cannot open ({exc})") from exc
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"VLM response cache {self.path}: schema version {version}, this vlmrel writes {SCHEMA_VERSION}; "
                "point vlm.cache_path elsewhere"
            )

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # -- chat responses ------------------------------------------------------------------
    def get(self, key: str) -> CachedResponse | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: list[str]) -> dict[str, CachedResponse]:
        """The rows of those of ``keys`` present, by key (one query per 500 keys)."""
        out: dict[str, CachedResponse] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._db.execute(
                "SELECT key, status, text, parsed, failure_kind, error, latency_s, endpoint, attempts "
                f"FROM responses WHERE key IN ({marks})",
                chunk,
            ):
                parsed = json.loads(row[3]) if row[3] is not None else None
                out[row[0]] = CachedResponse(
                    row[0], row[1], row[2], parsed, row[4], row[5], row[6], row[7], row[8]
                )
        return out

    def put(
        self,
        key: str,
        *,
        status: str,
        text: str | None,
        parsed: Any,
        failure_kind: str | None,
        error: str | None,
        latency_s: float | None,
        endpoint: str | None,
        backend: str,
        model: str,
        attempts: int,
    ) -> None:
        """Insert or replace one response and commit it at once (autocommit)."""
        self._db.execute(
            "INSERT OR REPLACE INTO responses (key, status, text, parsed, failure_kind, error, latency_s, "
            "endpoint, backend, model, attempts, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                status,
                text,
                None if parsed is None else json.dumps(parsed, sort_keys=True),
                failure_kind,
                error,
                latency_s,
                endpoint,
                backend,
                model,
                attempts,
                time.time(),
            ),
        )

    def count(self, status: str | None = None) -> int:
        if status is None:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])
        return int(
            self._db.execute("SELECT COUNT(*) FROM responses WHERE status = ?", (status,)).fetchone()[0]
        )

    # -- embeddings ----------------------------------------------------------------------
    def get_embeddings(self, keys: list[str]) -> dict[str, Any]:
        """Cached vectors (float32 arrays) for those of ``keys`` present."""
        import numpy as np

        out: dict[str, Any] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, dim, blob in self._db.execute(
                f"SELECT key, dim, vector FROM embeddings WHERE key IN ({marks})", chunk
            ):
                vec = np.frombuffer(blob, dtype="<f4")
                if vec.size == dim:
                    out[key] = vec.astype(np.float32)
        return out

    def put_embedding(self, key: str, vector: Any, *, backend: str, model: str) -> None:
        import numpy as np

        vec = np.asarray(vector, dtype="<f4").ravel()
        self._db.execute(
            "INSERT OR REPLACE INTO embeddings (key, backend, model, dim, vector, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key, backend, model, int(vec.size), vec.tobytes(), time.time()),
        )
