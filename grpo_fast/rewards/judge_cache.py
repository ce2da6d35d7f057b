"""A SQLite store of judge verdicts, so a resumed or repeated run does not pay for the same request twice.

Keys are digests of everything that decides a reply (model, prompt template, question, answer, image hash);
values are the parsed verdicts as short strings. Several processes (data-parallel ranks, concurrent runs) may
share one file: WAL journaling lets readers run beside a writer, and writers wait up to `timeout_s` for the
lock instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping

# SQLite limits the number of `?` parameters per statement (999 before 3.32); stay well under it.
_KEYS_PER_QUERY = 500


def cache_key(*parts: str) -> str:
    """A stable digest of `parts`; JSON-encoding them first keeps ("ab", "c") and ("a", "bc") apart."""
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


class JudgeCache:
    """Verdicts by key in one SQLite file; safe to share between threads and processes."""

    def __init__(self, path: str | os.PathLike[str], timeout_s: float = 60.0) -> None:
        self.path = os.fspath(path)
        folder = os.path.dirname(self.path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        # isolation_level=None: autocommit, so each statement or explicit BEGIN..COMMIT is one transaction.
        self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT NOT NULL)")

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The stored verdicts among `keys` (missing keys are left out)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        with self._lock:
            for start in range(0, len(keys), _KEYS_PER_QUERY):
                chunk = keys[start : start + _KEYS_PER_QUERY]
                marks = ",".join("?" * len(chunk))
                rows = self._conn.execute(f"SELECT key, verdict FROM verdicts WHERE key IN ({marks})", chunk)
                found.update(rows.fetchall())
        return found

    def put_many(self, verdicts: Mapping[str, str]) -> None:
        """Stores `verdicts` in one transaction (a later write of the same key wins)."""
        if not verdicts:
            return
        with self._lock:
            # BEGIN IMMEDIATE takes the write lock up front, so a busy file is waited on here, not mid-write.
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany("INSERT OR REPLACE INTO verdicts VALUES (?, ?)", verdicts.items())
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._conn.close()
