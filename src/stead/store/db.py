"""Local state in SQLite: node state, epoch, applied sequence, events.

WAL mode with ``synchronous=FULL``: a value set here survives a crash or power loss once
``set`` returns, which is what the applied mark and the epoch need (the applier's replay
argument depends on it). Calls are serialised by a lock so that worker threads may use it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

_MIGRATIONS = [
    """
    CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        level TEXT NOT NULL,
        kind TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL DEFAULT '{}'
    );
    """,
]

MAX_EVENTS = 10_000


class StateStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            self._db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set(self, key: str, value: Any) -> None:
        self.set_many({key: value})

    def set_many(self, values: dict[str, Any]) -> None:
        """Set several values in one durable transaction."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT INTO state(key, value) VALUES(?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                    [(k, json.dumps(v)) for k, v in values.items()],
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def event(self, kind: str, message: str, *, level: str = "info", **data: Any) -> int:
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events(at, level, kind, message, data) VALUES(?, ?, ?, ?, ?)",
                (time.time(), level, kind, message, json.dumps(data, default=str)),
            )
            event_id = int(cursor.lastrowid or 0)
            if event_id % 1000 == 0:
                self._db.execute("DELETE FROM events WHERE id <= ?", (event_id - MAX_EVENTS,))
        return event_id

    def events(self, *, after: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, at, level, kind, message, data FROM events WHERE id > ? "
                "ORDER BY id DESC LIMIT ?",
                (after, limit),
            ).fetchall()
        return [
            {"id": r[0], "at": r[1], "level": r[2], "kind": r[3], "message": r[4]}
            | {"data": json.loads(r[5])}
            for r in reversed(rows)
        ]
