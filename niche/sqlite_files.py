"""One way to open the small SQLite files two processes share (the gateway's keys and url
store, the organic audit queue): WAL so a reader never blocks the writer, autocommit, a busy
timeout, usable from the threads of an async server."""
from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote


def open_shared(path: Path, schema: str) -> sqlite3.Connection:
    """Create the folder and the tables if missing; raises sqlite3.Error or OSError for the
    caller to turn into its own one-line message."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=10.0,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        for stmt in filter(None, (s.strip() for s in schema.split(";"))):
            conn.execute(stmt)
    except sqlite3.Error:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def immediate_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front, so two processes never deadlock upgrading a
    read), COMMIT on success, ROLLBACK on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


SQLITE_HEADER = b"SQLite format 3\x00"

VALIDATOR_STATE_ID = 0x4E494348  # "NICH"
GATEWAY_DB_ID = 0x4E475759  # "NGWY"
ORGANIC_QUEUE_ID = 0x4E515545  # "NQUE"
"""`PRAGMA application_id` marks of niche's SQLite files, so that one given where another
belongs is refused before anything is written to it."""


def is_sqlite(path: Path) -> bool:
    """Whether `path` starts with SQLite's header (read-only; False when unreadable)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def identity(path: Path) -> tuple[int, set[str]]:
    """(application_id, table names) of an existing SQLite file, read-only."""
    conn = connect_read_only(path, timeout=10.0)
    try:
        app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
        tables = {row[0] for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table'")
            if not row[0].startswith("sqlite_")}
    finally:
        conn.close()
    return app_id, tables


def describe(app_id: int, tables: set[str]) -> str:
    """What a SQLite file seems to be, for a refusal that names the file's real use."""
    if app_id == VALIDATOR_STATE_ID:
        return "a niche validator state file (--neuron.state_path)"
    if app_id == GATEWAY_DB_ID:
        return "a niche gateway database (--gateway.db)"
    if app_id == ORGANIC_QUEUE_ID or (app_id == 0 and tables == {"organic"}):
        return "a niche organic audit queue (--gateway.organic_queue)"
    if tables == {"states"}:
        return "a niche miner states store (--states.path)"
    if {"subnets", "neurons"} <= tables:
        return "a niche localnet chain file (--localnet.path)"
    if {"uids", "exclusions", "history"} <= tables:
        return "a niche validator state file (--neuron.state_path)"
    if app_id:
        return f"another application's SQLite database (application_id {app_id:#x})"
    return f"another SQLite database (tables: {', '.join(sorted(tables))})"


def connect_read_only(path: Path | str, timeout: float = 5.0) -> sqlite3.Connection:
    """Another process's SQLite file, read-only (`mode=ro`): never writes, never takes a
    write lock. The path is URI-quoted (a `?`, `#` or `%` in it is part of the name). A WAL
    file closed cleanly in a folder this process cannot write has no -shm to share and
    SQLite refuses it; with no -wal beside it everything is in the main file, so it is read
    as immutable."""
    path = Path(path).expanduser()
    uri = f"file:{quote(str(path))}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=timeout)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError as exc:
        conn.close()
        if "readonly" not in str(exc).lower() or Path(f"{path}-wal").exists():
            raise
    return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None)


_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT ("malformed"), SQLITE_NOTADB ("not a database")
_COMPANIONS = ("-wal", "-shm", "-journal")


def corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite refused the file's contents (not its permissions, a lock or the
    disk): sqlite3 raises a bare DatabaseError for exactly those before Python 3.11."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:
        return type(exc) is sqlite3.DatabaseError
    return code & 0xFF in _CORRUPT_CODES


def move_aside(path: Path) -> Path:
    """Rename a corrupt side file (and its -wal/-shm/-journal) to `<name>.corrupt-<UTC time>`,
    kept for a look rather than deleted, so a fresh one can start; where it went. Another
    process sharing the file may have moved it first: then there is nothing to move."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt-{stamp}-{n}"), n + 1
    with contextlib.suppress(FileNotFoundError):
        path.rename(aside)
    for suffix in _COMPANIONS:
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).rename(aside.with_name(aside.name + suffix))
    return aside
