"""The gateway's own SQLite file (keys, daily usage, url answers): WAL, short transactions,
one connection shared by the gateway's threads under a lock."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from niche.errors import ConfigError
from niche.sqlite_files import immediate_transaction, open_shared

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created REAL NOT NULL,
    revoked REAL, per_minute INTEGER NOT NULL, per_day INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, day TEXT NOT NULL, images INTEGER NOT NULL,
    PRIMARY KEY (key_id, day));
CREATE TABLE IF NOT EXISTS images (
    token TEXT PRIMARY KEY, expires REAL NOT NULL, png BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS images_expires ON images (expires);
"""


class GatewayDB:
    def __init__(self, path: Path | str):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        try:
            self._conn = open_shared(self.path, _SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"gateway database {self.path}: {exc} (check that the folder "
                              "is writable, or pass another --gateway.db)") from exc

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, immediate_transaction(self._conn) as conn:
            yield conn

    def read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
