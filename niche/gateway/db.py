"""The gateway's own SQLite file (keys, daily usage, url answers): WAL, short transactions,
one connection shared by the gateway's threads under a lock.

The file is marked as the gateway's (SQLite's `PRAGMA application_id`, as the validator
marks its state file): a new file gets the mark, a gateway file from before the mark (the
gateway's tables, application_id 0) is adopted, and any other SQLite file (a validator's
state, a miner's states, a chain file given as --gateway.db by mistake) is refused in one
line before anything is written to it."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from niche.errors import ConfigError
from niche.sqlite_files import (
    GATEWAY_DB_ID,
    connect_read_only,
    describe,
    identity,
    immediate_transaction,
    open_shared,
)

APPLICATION_ID = GATEWAY_DB_ID

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
_TABLES = frozenset({"keys", "usage", "images"})
_KEY_COLUMNS = ["id", "name", "hash", "created", "revoked", "per_minute", "per_day"]


def _check_file(path: Path) -> None:
    """Refuse (ConfigError, one line) an existing SQLite file that is not a gateway
    database; read-only, writes nothing. A missing or empty file, a gateway database and
    one written before the application_id mark pass."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    app_id, tables = identity(path)
    if app_id == APPLICATION_ID:
        return
    if app_id == 0 and not tables:
        return  # an empty database: made ours on open
    if app_id == 0 and "keys" in tables and tables <= _TABLES and _key_columns(path) == \
            _KEY_COLUMNS:
        return  # written by a release before the mark: adopted on open
    raise ConfigError(f"--gateway.db {path} is {describe(app_id, tables)}, not a gateway "
                      "database: nothing was written to it; pass the --gateway.db the gateway "
                      "uses (default ~/.niche/gateway/gateway.sqlite)")


def _key_columns(path: Path) -> list[str]:
    conn = connect_read_only(path, timeout=10.0)
    try:
        return [row[1] for row in conn.execute("PRAGMA table_info(keys)")]
    finally:
        conn.close()


class GatewayDB:
    """`create=False` (read-only key commands: list, revoke) refuses a missing file in one
    line and creates neither it nor its folder."""

    def __init__(self, path: Path | str, *, create: bool = True):
        self.path = Path(path).expanduser()
        self._lock = threading.Lock()
        if not create and not self.path.exists():
            raise ConfigError(f"no gateway database at {self.path}: pass the --gateway.db "
                              "the gateway uses")
        try:
            _check_file(self.path)
            self._conn = open_shared(self.path, _SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise ConfigError(f"gateway database {self.path}: {exc} (check that the folder "
                              "is writable, or pass another --gateway.db)") from exc
        try:
            if int(self._conn.execute("PRAGMA application_id").fetchone()[0]) != \
                    APPLICATION_ID:  # a new file, or one from before the mark: ours now
                self._conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
        except sqlite3.Error as exc:
            self.close()
            raise ConfigError(f"gateway database {self.path}: {exc} (check that the file "
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
