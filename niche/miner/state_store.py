"""The sampler states of recent answers, kept until the validator that asked fetches the
ones it audits. Bounded twice: by age (a validator fetches within its round) and by bytes
(oldest answers go first), so a flood of requests cannot grow the miner's memory.

With a `path`, every answer's states are also written to a SQLite file (same age and byte
caps, pruned on every write) by a writer thread, a few milliseconds after the answer (off
the answer's path: a 4 MiB FLUX answer takes ~30 ms to write on a busy 2-core box, which a
validator would otherwise measure as latency), so a miner that is restarted (a `pm2
restart`, an upgrade, a crash, even SIGKILL) between an answer and its audit still serves
its states: a restart is a fault of availability, never taken for a cheat. A clean stop
writes what is queued before it exits."""
from __future__ import annotations

import json
import logging
import math
import queue
import shutil
import sqlite3
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from niche import file_lock
from niche.errors import ConfigError
from niche.file_lock import lock_path
from niche.sqlite_files import corrupt, move_aside
from niche.states import RawState, state_bytes

log = logging.getLogger("niche.miner")


@dataclass(frozen=True)
class _Kept:
    expires: float
    states: tuple[RawState, ...]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.states)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS states (
    hotkey TEXT NOT NULL, request_id TEXT NOT NULL, expires REAL NOT NULL,
    size INTEGER NOT NULL, lengths TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (hotkey, request_id))
"""


_COLUMNS = ["hotkey", "request_id", "expires", "size", "lengths", "data"]


class _Unusable(Exception):
    """The states file is not a states store this version can use (a corrupt file, another
    schema): a cache, so it is moved aside rather than refusing to start."""


def _check_tables(db: sqlite3.Connection, path: Path) -> None:
    """A SQLite file with other tables is someone's database given as --states.path by
    mistake: refused, never moved aside or written to."""
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
              if not row[0].startswith("sqlite_")}
    if tables - {"states"}:
        raise ConfigError(f"--states.path {path} is another SQLite database (tables: "
                          f"{', '.join(sorted(tables))}), not a states store: pick another "
                          "file or pass --states.memory_only")


class EarlyDrops:
    """Answers whose states went for space before their ttl: counted, and said in one log
    line at most every `every` seconds. An audit that asks for them finds them gone
    (`unavailable` to the validator), so the operator must give the store more bytes: at
    production sizes (28 MiB a FLUX.1-dev answer) the cap, not the ttl, decides how long
    states stay once several GPUs answer behind one hotkey."""

    def __init__(self, ttl: float, every: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl, self.every, self._clock = ttl, every, clock
        self.count = 0
        self._said = -math.inf

    def dropped(self, age: float, flag: str, cap: int, advice: str = "raise it") -> None:
        if age >= self.ttl:
            return
        self.count += 1
        now = self._clock()
        if now - self._said >= self.every:
            self._said = now
            log.warning("states of an answer %.0fs old dropped for space, before the %.0fs "
                        "ttl (%d so far): %s (%d MiB) holds less than the ttl at this rate; "
                        "%s, or audits will find states gone", max(0.0, age), self.ttl,
                        self.count, flag, max(0, cap) // (1024 * 1024), advice)


class StatesLock:
    """An exclusive, non-blocking flock on `<states file>.lock` (with the holder's pid and
    start time in it) for as long as it is held: two miners on one hotkey would both serve
    and share one states file. Re-entrant within a process; the kernel lets go when the
    process ends, however it ends."""

    def __init__(self, path: Path):
        self.path = Path(path).expanduser()
        try:
            key = file_lock.acquire(self.path)
        except file_lock.LockHeld as held:
            raise ConfigError(
                f"states store {self.path} is in use by another miner ({held.holder}): one "
                "miner per hotkey; stop it, or give this one its own --wallet.hotkey / "
                "--states.path") from None
        except OSError as exc:
            raise ConfigError(f"--states.path {self.path}: cannot create its lock file "
                              f"{lock_path(self.path)} ({exc.strerror}); make the folder "
                              "writable by this user, pick another file or pass "
                              "--states.memory_only") from None
        self._finalizer = weakref.finalize(self, file_lock.release, key)

    def release(self) -> None:
        """Let go (once; later calls do nothing)."""
        self._finalizer()


WAL_KEEP_BYTES = 64 * 1024 * 1024
AUTO_RESERVE_MIN = 4 * 1024 * 1024 * 1024
AUTO_RESERVE_MAX = 32 * 1024 * 1024 * 1024
"""The reserve is 10 % of the disk within these: a 2 TB disk 93 % used still has 140 GB for
states (10 % alone would keep nothing: every answer's states deleted as written)."""


def _total_and_free(folder: Path) -> tuple[int, int]:
    usage = shutil.disk_usage(folder)
    return usage.total, usage.free


class DiskStates:
    """The on-disk half: one row per answer, expiry on the wall clock (it outlives the
    process), oldest rows deleted first when over the cap. `put` queues the write for
    a writer thread (at most `backlog` answers wait; more block the caller); `flush` waits
    for the queue. Thread-safe.

    The cap: `max_bytes`, or with `max_bytes=None` (`--states.disk_mb auto`, the default)
    every answer for the whole ttl as long as the disk keeps `auto_reserve` free. How many
    bytes the ttl needs is answers a minute x bytes an answer, which a miner with more GPUs
    behind one hotkey cannot be asked to work out (a fixed 8 GiB held ~29 FLUX.1-dev answers
    a minute), while the ttl already bounds what is kept, and the GPUs bound how fast it
    comes.

    A file that is not a usable store (corrupt, another schema) is moved aside at start:
    it is a cache, and refusing to start would lose every audit instead of a few. The file
    is locked (`StatesLock`, taken before anything is read or moved aside) from open to
    close: a second miner on the same file is refused in one line."""

    def __init__(self, path: Path, max_bytes: int | None, ttl: float,
                 clock: Callable[[], float] = time.time, *,
                 disk_usage: Callable[[Path], tuple[int, int]] | None = None):
        self.path = Path(path).expanduser()
        self.max_bytes, self.ttl, self._clock = max_bytes, ttl, clock
        self._disk_usage = disk_usage or _total_and_free
        self.early = EarlyDrops(ttl)
        self._lock = threading.Lock()
        self._open()
        self._queue: queue.Queue[tuple[str, str, tuple[RawState, ...]] | None] = queue.Queue(
            maxsize=64)
        self._writer = threading.Thread(target=self._write_loop, name="niche-states-writer",
                                        daemon=True)
        self._writer.start()

    def _open(self) -> None:
        """Open the file. One that is not a usable states store (garbage, a malformed image,
        another schema) is a disposable cache: moved aside, and the miner starts with an
        empty one. What moving cannot fix (permissions, a folder, a lock) is a
        ConfigError."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--states.path {self.path}: cannot open the states store "
                              f"({exc}); make it writable by this user, pick another file "
                              "or pass --states.memory_only") from None
        # the lock before anything is read or moved aside: one miner never moves (or
        # writes) a file another one is using
        self._held = StatesLock(self.path)
        try:
            try:
                self._connect()
            except _Unusable as exc:
                self._move_aside(str(exc))
                self._connect()
        except (OSError, sqlite3.Error, _Unusable) as exc:
            self._held.release()
            raise ConfigError(f"--states.path {self.path}: cannot open the states store "
                              f"({exc}); make it writable by this user, pick another file "
                              "or pass --states.memory_only") from None
        except BaseException:
            self._held.release()
            raise

    def _connect(self) -> None:
        """Open, set up, read the file's totals and prune it; _Unusable when it is not a
        states store this version can use."""
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=10.0,
                             check_same_thread=False)
        try:
            _check_tables(db, self.path)  # before anything is written to the file
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # survives a killed process
            # the log shrinks back after a checkpoint: a 28 MiB answer goes through it
            db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
            db.execute(_SCHEMA)
            columns = [row[1] for row in db.execute("PRAGMA table_info(states)")]
            if columns != _COLUMNS:
                raise _Unusable(f"its states table has columns {', '.join(columns)}, not "
                                f"{', '.join(_COLUMNS)}")
            self._page = int(db.execute("PRAGMA page_size").fetchone()[0])
            self._bytes = int(db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM states").fetchone()[0])
            with self._lock:
                self._db = db
                self._prune()
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.DatabaseError) and corrupt(exc):
                raise _Unusable(str(exc)) from exc
            raise

    def _move_aside(self, why: str) -> None:
        """The unusable file out of the way (sqlite_files.move_aside); one WARNING says so."""
        aside = move_aside(self.path)
        log.warning("states store %s is unusable (%s): moved aside to %s, starting with an "
                    "empty one (audits of answers from before find no states)", self.path,
                    why, aside)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def put(self, hotkey: str, request_id: str, states: Sequence[RawState]) -> None:
        """Queue the answer's states for the writer thread."""
        if (self.max_bytes is None or sum(len(s) for s in states) <= self.max_bytes) \
                and self._writer.is_alive():
            self._queue.put((hotkey, request_id, tuple(states)))

    def flush(self) -> None:
        """Wait until every queued answer is on disk."""
        self._queue.join()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:  # never lose the writer: the next answers still get written
                log.exception("writing states to %s failed", self.path)
            finally:
                self._queue.task_done()

    def _write(self, hotkey: str, request_id: str, states: tuple[RawState, ...]) -> None:
        size = sum(len(s) for s in states)
        with self._lock:
            try:
                old = self._db.execute("SELECT size FROM states WHERE hotkey=? AND "
                                       "request_id=?", (hotkey, request_id)).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?, ?, ?)",
                    (hotkey, request_id, self._clock() + self.ttl, size,
                     json.dumps([len(s) for s in states]), b"".join(states)))
                self._bytes += size - (int(old[0]) if old else 0)
                self._prune()
            except sqlite3.Error as exc:  # a full disk: the answer still goes out
                log.warning("states of %s not written to %s: %s", request_id, self.path, exc)

    def get(self, hotkey: str, request_id: str) -> tuple[bytes, ...] | None:
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT expires, lengths, data FROM states WHERE hotkey=? AND "
                    "request_id=?", (hotkey, request_id)).fetchone()
            except sqlite3.Error as exc:
                log.warning("states store %s unreadable: %s", self.path, exc)
                return None
        if row is None or row[0] <= self._clock():
            return None
        data, out, at = bytes(row[2]), [], 0
        for length in json.loads(row[1]):
            out.append(data[at:at + length])
            at += length
        return tuple(out)

    def _prune(self) -> None:
        """Expired rows, then the oldest until under the byte cap (lock held)."""
        gone = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM states WHERE expires <= ?",
                                (self._clock(),)).fetchone()[0]
        if gone:
            self._db.execute("DELETE FROM states WHERE expires <= ?", (self._clock(),))
            self._bytes -= int(gone)
        cap = self.cap()
        if self._bytes <= cap:
            return
        flag, advice = self._cap_advice()
        while self._bytes > cap:
            row = self._db.execute("SELECT rowid, size, expires FROM states ORDER BY rowid "
                                   "LIMIT 1").fetchone()
            if row is None:
                self._bytes = 0
                break
            self._db.execute("DELETE FROM states WHERE rowid=?", (row[0],))
            self._bytes -= int(row[1])
            self.early.dropped(self.ttl - (float(row[2]) - self._clock()), flag, cap, advice)

    def _cap_advice(self) -> tuple[str, str]:
        """(what sets the cap, what to do) for the log line of states dropped early."""
        if self.max_bytes is not None:
            return "--states.disk_mb", "raise it"
        return (f"--states.disk_mb auto (the disk under {self.path.parent} keeps "
                f"{self.auto_reserve() // 2**20} MiB free)",
                "free disk space or point --states.path at a bigger disk")

    def describe(self) -> str:
        """One line for the start-up log: where, and how many bytes it may hold now."""
        with self._lock:
            cap = self.cap()
        held = f"{self._bytes // 2**20} MiB held"
        if self.max_bytes is not None:
            return f"{self.path} (cap {cap // 2**20} MiB, {held})"
        return (f"{self.path} (cap auto: {max(0, cap) // 2**20} MiB now, the disk keeping "
                f"{self.auto_reserve() // 2**20} MiB free; {held})")

    def auto_reserve(self) -> int:
        """What `--states.disk_mb auto` leaves free: 10 % of the disk, at least 4 GiB (logs,
        model downloads and the rest of the box need it more than an old answer's states),
        at most 32 GiB."""
        total, _ = self._disk_usage(self.path.parent)
        return min(AUTO_RESERVE_MAX, max(AUTO_RESERVE_MIN, total // 10))

    def problem(self, answer_bytes: int = 28 * 2**20) -> str | None:
        """Why the auto cap cannot keep even one answer of `answer_bytes` (a 28-step
        FLUX.1-dev answer at 1024x1024 by default), in one line with the fix; None if it
        can, or when the operator set the cap. Said at the miner's start: every audit of an
        answer whose states are gone is charged as a dodge."""
        if self.max_bytes is not None:  # the operator's own size, for the answers it serves
            return None
        with self._lock:
            cap = self.cap()
        if cap >= answer_bytes:
            return None
        return (f"the disk under {self.path.parent} has {max(0, cap) // 2**20} MiB for states "
                f"beyond the {self.auto_reserve() // 2**20} MiB it keeps free: audits will find "
                "states gone; free disk space, point --states.path at a bigger disk or set "
                "--states.disk_mb")

    def cap(self) -> int:
        """Bytes of states this store may hold now. In auto mode: what it holds, plus the
        file's free pages, plus the disk's free space, less the reserve; deleting rows moves
        their bytes to free pages, so the cap stays put while rows go (lock held)."""
        if self.max_bytes is not None:
            return self.max_bytes
        _, free = self._disk_usage(self.path.parent)
        pages = int(self._db.execute("PRAGMA freelist_count").fetchone()[0])
        return self._bytes + pages * self._page + free - self.auto_reserve()

    def close(self) -> None:
        """Write what is queued, then close the file."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(timeout=30)
        with self._lock:
            self._db.close()
        self._held.release()


class StateStore:
    """(caller hotkey, request_id) -> raw float32 states x_1..x_N of that answer; in memory,
    and on disk too when given a `path` (`disk_max_bytes`: its cap; None: `DiskStates`'s
    auto cap)."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024, ttl: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, *, path: Path | None = None,
                 disk_max_bytes: int | None = None):
        self.max_bytes = max_bytes
        self.ttl = ttl
        self._clock = clock
        self._kept: OrderedDict[tuple[str, str], _Kept] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.early = EarlyDrops(ttl)
        self.disk = DiskStates(path, disk_max_bytes, ttl) if path is not None else None
        """Keeps what memory evicts too: at production sizes memory holds minutes, not the
        ttl (a 28-step FLUX.1-dev answer at 1024x1024 is 28 MiB of states)."""

    @property
    def bytes_held(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, hotkey: str, request_id: str, states: Sequence[torch.Tensor]) -> None:
        self.put_raw(hotkey, request_id, [state_bytes(s) for s in states])

    def put_raw(self, hotkey: str, request_id: str, raw: Sequence[RawState]) -> None:
        """`put` of states already as their raw bytes or views (`states_bytes`: the answer
        hashed them); views are kept as they are, so the store must own their tensors."""
        kept = _Kept(self._clock() + self.ttl, tuple(raw))
        if kept.size > self.max_bytes:
            return  # larger than the whole budget: nothing to keep (the fetch says so)
        if self.disk is not None:  # written a few ms later, off the answer's path
            self.disk.put(hotkey, request_id, kept.states)
        with self._lock:
            key = (hotkey, request_id)
            old = self._kept.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._kept[key] = kept
            self._bytes += kept.size
            self._evict()

    def get(self, hotkey: str, request_id: str) -> tuple[RawState, ...] | None:
        """The states of that caller's answer, or None (never made, expired or evicted)."""
        with self._lock:
            self._evict()
            kept = self._kept.get((hotkey, request_id))
        if kept is not None:
            return kept.states
        return self.disk.get(hotkey, request_id) if self.disk is not None else None

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def _evict(self) -> None:
        now = self._clock()
        while self._kept:
            key, kept = next(iter(self._kept.items()))
            if kept.expires > now and self._bytes <= self.max_bytes:
                break
            del self._kept[key]
            self._bytes -= kept.size
            if kept.expires > now and self.disk is None:  # the only copy, gone early
                self.early.dropped(self.ttl - (kept.expires - now), "--states.max_mb",
                                   self.max_bytes)
