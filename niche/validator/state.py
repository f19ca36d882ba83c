"""The validator's memory in one SQLite file: scores, exclusions, per-uid history with
reasons, recent answer fingerprints and the last weights.

Each round is written in ONE transaction (WAL journal) and then checkpointed into the main
file, so a validator killed at any moment restarts from the last complete round, and the
file alone (without its -wal) holds every saved round; a read-only, full or corrupt file is
reported in one actionable line and the existing content is never half-overwritten.

One writer per file: the writer holds an exclusive flock on `<state>.lock` while it is open
(two validators on one file would each rewrite the scores and exclusions, un-excluding the
other's cheats). Readers (`read_only=True`, the dashboard, the gateway) take no lock and
write nothing.
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import sqlite3
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from niche import file_lock
from niche.errors import ConfigError, NicheError, one_line
from niche.file_lock import lock_path
from niche.sqlite_files import VALIDATOR_STATE_ID, connect_read_only
from niche.validator.scoring import Outcome, ScoreBook, ScoringConfig, UidScore

log = logging.getLogger("niche.validator")

SCHEMA_VERSION = 1
DEFAULT_ROOT = Path("~/.niche/validator")
LEGACY_DEFAULT_PATH = Path("~/.niche/validator/state.sqlite")
"""The default before state files were keyed by network, netuid and hotkey."""
APPLICATION_ID = VALIDATOR_STATE_ID  # marks the file as ours
KEEP_WEIGHT_ROWS = 1000
"""Weight settings kept (about two weeks at one every 20 minutes)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS uids (
    uid INTEGER PRIMARY KEY, hotkey TEXT NOT NULL, score REAL NOT NULL, model TEXT);
CREATE TABLE IF NOT EXISTS exclusions (hotkey TEXT PRIMARY KEY, until_round INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL, model TEXT, status TEXT NOT NULL, reason TEXT NOT NULL,
    latency REAL, reward REAL NOT NULL, audited INTEGER NOT NULL, audit_passed INTEGER,
    similarity REAL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_uid ON history (uid, round);
CREATE TABLE IF NOT EXISTS answers (
    sha256 TEXT NOT NULL, phash INTEGER NOT NULL, uid INTEGER NOT NULL, round INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS answers_sha ON answers (sha256);
CREATE INDEX IF NOT EXISTS answers_round ON answers (round);
CREATE TABLE IF NOT EXISTS weights (
    id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, block INTEGER NOT NULL,
    uids TEXT NOT NULL, weights TEXT NOT NULL, success INTEGER NOT NULL, message TEXT NOT NULL,
    ts REAL NOT NULL);
"""


def default_state_path(network: str, netuid: int, hotkey: str,
                       root: Path = DEFAULT_ROOT) -> Path:
    """~/.niche/validator/<network>/netuid<N>/<hotkey>/state.sqlite (a ws:// URL as network
    is made a folder name), so two validators or two subnets never share a file."""
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", network).strip("_") or "network"
    return root / folder / f"netuid{int(netuid)}" / hotkey / "state.sqlite"


def find_state_file(root: Path = DEFAULT_ROOT) -> Path:
    """The one state file under the default root (`niche validator status` with no --state):
    several validators on one box must say which."""
    base = root.expanduser()
    found = sorted(base.glob("*/netuid*/*/state.sqlite"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no validator state file under {base}; give --state PATH "
                          "(the validator's --neuron.state_path)")
    listing = ", ".join(str(p) for p in found[:5])
    raise ConfigError(f"{len(found)} validator state files under {base} ({listing}); "
                      "give --state PATH")


def legacy_state_notice(path: Path, legacy: Path = LEGACY_DEFAULT_PATH) -> str | None:
    """One line about a state file left at the old default path when the new default one
    is not there yet: it is not continued silently (it may be another subnet's)."""
    old, new = legacy.expanduser(), path.expanduser()
    if old == new or not old.exists() or new.exists():
        return None
    return (f"a validator state file from before state files were keyed by network, netuid "
            f"and hotkey is at {old}; it is NOT used. If it is this validator's (same network, "
            f"netuid and hotkey), move it: mkdir -p {new.parent} && mv {old} {new}")


def other_network_notice(path: Path, netuid: int, hotkey: str,
                         root: Path = DEFAULT_ROOT) -> str | None:
    """One line when a new default state file has a sibling with rounds for the same netuid
    and hotkey under another network folder: `finney` and its wss:// URL (or `local` and
    ws://127.0.0.1:9944) are different folders, and a validator moved to its own node would
    otherwise restart from round 0 without a word. Never switches by itself."""
    base, mine = root.expanduser(), path.expanduser()
    if len(mine.parents) < 4 or mine.parents[3] != base:
        return None  # an explicit --neuron.state_path elsewhere: the operator chose it
    pattern = f"*/netuid{int(netuid)}/{glob.escape(hotkey)}/state.sqlite"
    found = [(rounds_on_file(other), other) for other in sorted(base.glob(pattern))
             if other != mine]
    found = [(rounds, other) for rounds, other in found if rounds]
    if not found:
        return None
    rounds, other = max(found, key=lambda pair: pair[0] or 0)
    return (f"found {other} (round {rounds}) for this netuid and hotkey under network "
            f"{other.parts[-4]}: pass --neuron.state_path {other} to keep its scores")


def rounds_on_file(path: Path) -> int | None:
    """Rounds completed in a state file, read without a lock (None: unreadable)."""
    try:
        with ValidatorState(path, read_only=True) as state:
            return state.round_index
    except (NicheError, sqlite3.Error, ValueError):
        return None


class StateError(NicheError):
    """The state file cannot be used; the message says what to do."""


MIN_FREE_BYTES = 16 * 1024 * 1024
"""Free space a validator starts with beside its state file: a round of 64 miners writes
~50 KB; on a full disk each pm2 restart would load the models again before the first
save failed."""


def require_free_space(path: Path | str, minimum: int = MIN_FREE_BYTES) -> None:
    """StateError unless the filesystem holding `path` has `minimum` bytes free for it."""
    folder = Path(path).expanduser().parent
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no such folder yet (created on open), or no statvfs
        return
    free = stats.f_bavail * stats.f_frsize
    if free < minimum:
        raise StateError(f"validator state {path}: only {free // 1024} KiB free on its disk "
                         f"(the disk is full or nearly; {minimum // (1024 * 1024)} MiB "
                         "needed): free space there, or pass another --neuron.state_path")


@dataclass(frozen=True)
class Answer:
    """Fingerprint of one accepted image, kept to catch replays of earlier answers."""

    sha256: str
    phash: int
    uid: int
    round: int


@dataclass(frozen=True)
class WeightsRecord:
    round: int
    block: int
    weights: dict[int, float]
    success: bool
    message: str


@dataclass(frozen=True)
class RoundRow:
    """One history line: what one uid got in one round, and why."""

    round: int
    uid: int
    hotkey: str
    model: str | None
    status: str
    reason: str
    latency: float | None
    reward: float
    audited: bool
    audit_passed: bool | None
    similarity: float | None


def _explain(exc: sqlite3.Error, path: Path, doing: str) -> StateError:
    text = str(exc).lower()
    if "readonly" in text or "read-only" in text:
        hint = "the file or its folder is read-only; fix permissions or pass another " \
               "--neuron.state_path"
    elif "disk is full" in text or "disk i/o" in text:
        hint = "the disk is full or failing; free space: the file still holds every round " \
               "saved before"
    elif "not a database" in text or "malformed" in text or "corrupt" in text:
        hint = "the file is not a valid niche state database; move it aside to start fresh"
    elif "locked" in text or "busy" in text:
        hint = "another process holds the file; run one validator per state file"
    elif "unable to open" in text:
        hint = "cannot open the file; check that its folder exists and is writable"
    else:
        hint = "sqlite error"
    return StateError(f"validator state {path}: {doing} failed: {one_line(str(exc))[:300]} "
                      f"({hint})")  # SQLite's text may span lines (a damaged schema's)


def _take_writer_lock(path: Path) -> Path:
    """Hold `<path>.lock` for this process (niche/file_lock.py), or refuse in one line
    naming the holder."""
    try:
        return file_lock.acquire(path)
    except file_lock.LockHeld as held:
        raise ConfigError(f"validator state {path} is in use by another process "
                          f"({held.holder}): one validator per state file; stop it or pass "
                          "another --neuron.state_path") from None
    except OSError as exc:
        raise StateError(f"validator state {path}: cannot create its lock file "
                         f"{lock_path(path)}: {exc.strerror}; pass another "
                         "--neuron.state_path") from exc


class ValidatorState:
    """Open (creating if needed) and check a state file. One writer per file, enforced by
    a lock (see the module's docstring); `read_only=True` reads beside a running writer
    (or on a read-only file) and creates, locks and writes nothing."""

    def __init__(self, path: Path | str, *, read_only: bool = False):
        self.path = Path(path).expanduser()
        self.read_only = read_only
        self._unlock: weakref.finalize | None = None
        if not read_only:
            self._check_access()
            key = _take_writer_lock(self.path)
            self._unlock = weakref.finalize(self, file_lock.release, key)
        try:
            self._conn = (connect_read_only(self.path) if read_only else
                          sqlite3.connect(str(self.path), isolation_level=None, timeout=5.0))
        except sqlite3.Error as exc:
            self._let_go()
            raise _explain(exc, self.path, "open") from exc
        try:
            self._init()
        except sqlite3.Error as exc:
            self.close()
            raise _explain(exc, self.path, "open") from exc
        except StateError:
            self.close()
            raise

    def _check_access(self) -> None:
        folder = self.path.parent
        if not folder.exists():
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StateError(f"validator state {self.path}: cannot create folder "
                                 f"{folder}: {exc.strerror}") from exc
        if self.path.exists() and not os.access(self.path, os.W_OK):
            raise StateError(f"validator state {self.path}: the file is read-only; fix its "
                             "permissions or pass another --neuron.state_path")
        if not os.access(folder, os.W_OK):
            raise StateError(f"validator state {self.path}: folder {folder} is read-only "
                             "(SQLite needs to write its journal there); pass another "
                             "--neuron.state_path")

    def _init(self) -> None:
        c = self._conn
        # Reading the header first turns "not a database" into a clear error before any write.
        app_id = c.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if tables and app_id != APPLICATION_ID:
            raise StateError(f"validator state {self.path}: the file is an SQLite database "
                             "but not a niche validator state; move it aside or pass another "
                             "--neuron.state_path")
        check = str(c.execute("PRAGMA quick_check").fetchone()[0])
        if check != "ok":  # SQLite's report spans lines: joined into one
            found = "; ".join(line.strip() for line in check.splitlines() if line.strip())
            raise StateError(f"validator state {self.path}: integrity check failed "
                             f"({one_line(found)[:300]}); move the file aside to start fresh")
        if self.read_only:
            if not tables:
                raise StateError(f"validator state {self.path}: no validator has written it "
                                 "yet")
            self._check_version()
            return
        c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=FULL")
        c.execute("PRAGMA foreign_keys=ON")
        if not tables:
            c.execute("BEGIN IMMEDIATE")
            try:
                for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    c.execute(stmt)
                c.execute(f"PRAGMA application_id={APPLICATION_ID}")
                c.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                c.execute("INSERT INTO meta VALUES ('round', '0')")
                c.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
        self._check_version()

    def _check_version(self) -> None:
        version = int(self._meta("schema_version") or "0")
        if version > SCHEMA_VERSION:
            raise StateError(f"validator state {self.path}: schema version {version} was written "
                             f"by a newer niche (this one reads {SCHEMA_VERSION}); upgrade niche")
        if version < 1:
            raise StateError(f"validator state {self.path}: no schema version; move it aside")

    def bind(self, network: str, netuid: int, hotkey: str) -> None:
        """Tie the file to one network, subnet and hotkey: the first validator to open it
        records them (a file from before this check is adopted), any other is refused, so
        netuid 2 never continues netuid 1's rounds."""
        wanted = {"network": network, "netuid": str(netuid), "hotkey": hotkey}
        stored = {key: self._meta(key) for key in wanted}
        if all(value is None for value in stored.values()):
            try:
                with_tx(self._conn, lambda c: c.executemany(
                    "INSERT INTO meta VALUES (?, ?)", list(wanted.items())))
            except sqlite3.Error as exc:
                raise _explain(exc, self.path, "recording the network, netuid and hotkey") \
                    from exc
            return
        if stored != wanted:
            raise StateError(
                f"validator state {self.path} belongs to network {stored['network']}, netuid "
                f"{stored['netuid']}, hotkey {stored['hotkey']}, not network {network}, netuid "
                f"{netuid}, hotkey {hotkey}: pass that validator's own --neuron.state_path (or "
                "leave it out: the default path is per network, netuid and hotkey)")

    def record_round_interval(self, seconds: float) -> None:
        """The validator's configured seconds between round starts, for its gateway: until
        two rounds are on file it is the only rate the gateway can leave the challenges."""
        try:
            with_tx(self._conn, lambda c: c.execute(
                "INSERT OR REPLACE INTO meta VALUES ('round_interval', ?)", (repr(seconds),)))
        except sqlite3.Error as exc:
            raise _explain(exc, self.path, "recording the round interval") from exc

    @property
    def identity(self) -> tuple[str, int, str] | None:
        """(network, netuid, hotkey) the file belongs to (None: not bound yet)."""
        network, netuid, hotkey = (self._meta(k) for k in ("network", "netuid", "hotkey"))
        if network is None or netuid is None or hotkey is None:
            return None
        return network, int(netuid), hotkey

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------------ reading
    @property
    def schema_version(self) -> int:
        return int(self._meta("schema_version") or "0")

    @property
    def round_index(self) -> int:
        """Rounds completed and persisted so far (the next round has this index)."""
        return int(self._meta("round") or "0")

    def load_book(self, cfg: ScoringConfig) -> ScoreBook:
        try:
            book = ScoreBook(cfg=cfg)
            for uid, hotkey, score, model in self._conn.execute(
                    "SELECT uid, hotkey, score, model FROM uids"):
                book.uids[int(uid)] = UidScore(hotkey=hotkey, score=float(score), model=model)
            for hotkey, until in self._conn.execute("SELECT hotkey, until_round FROM exclusions"):
                book.excluded_until[hotkey] = int(until)
            return book
        except sqlite3.Error as exc:
            raise _explain(exc, self.path, "reading scores") from exc

    def load_scored_on(self, book: ScoreBook) -> dict[int, tuple[str, ...]]:
        """The models each miner was scored on when the last round was saved, for the uids
        still held by the same hotkey in `book` (empty for a state without them)."""
        row = self._conn.execute("SELECT value FROM meta WHERE key='scored_on'").fetchone()
        try:
            saved = json.loads(row[0]) if row else {}
            return {int(uid): tuple(str(m) for m in models)
                    for uid, (hotkey, models) in saved.items()
                    if int(uid) in book.uids and book.uids[int(uid)].hotkey == hotkey}
        except (ValueError, TypeError, AttributeError):  # a damaged value: relearnt in rounds
            log.warning("validator state %s: the models miners are scored on are unreadable; "
                        "relearnt as miners are asked", self.path)
            return {}

    def recent_answers(self, since_round: int) -> list[Answer]:
        rows = self._conn.execute(
            "SELECT sha256, phash, uid, round FROM answers WHERE round >= ?", (since_round,))
        return [Answer(s, int(p) & ((1 << 64) - 1), int(u), int(r)) for s, p, u, r in rows]

    def last_weights(self) -> WeightsRecord | None:
        row = self._conn.execute(
            "SELECT round, block, uids, weights, success, message FROM weights "
            "WHERE success=1 ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None
        uids, weights = json.loads(row[2]), json.loads(row[3])
        return WeightsRecord(int(row[0]), int(row[1]), dict(zip(uids, weights, strict=False)),
                             bool(row[4]), row[5])

    def history(self, uid: int | None = None, limit: int = 100) -> list[RoundRow]:
        sql = ("SELECT round, uid, hotkey, model, status, reason, latency, reward, audited, "
               "audit_passed, similarity FROM history")
        args: tuple = ()
        if uid is not None:
            sql += " WHERE uid=?"
            args = (uid,)
        sql += " ORDER BY id DESC LIMIT ?"
        rows = self._conn.execute(sql, args + (limit,)).fetchall()
        return [RoundRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], bool(r[8]),
                         None if r[9] is None else bool(r[9]), r[10]) for r in rows]

    # ------------------------------------------------------------------ writing
    def save_round(self, round_index: int, book: ScoreBook, outcomes: Sequence[Outcome],
                   rewards: dict[int, float], answers: Iterable[Answer] = (),
                   keep_answer_rounds: int = 1000, keep_history_rounds: int = 10000,
                   scored_on: Mapping[int, Sequence[str]] | None = None) -> None:
        """Persist a finished round atomically; afterwards `round_index` is round_index + 1.
        `scored_on`: the models each miner is scored on (several: its score is split across
        their weight groups), kept so a restarted validator's first weights split alike."""
        now = time.time()
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute("DELETE FROM uids")
                c.executemany("INSERT INTO uids VALUES (?, ?, ?, ?)",
                              [(uid, e.hotkey, e.score, e.model) for uid, e in book.uids.items()])
                c.execute("DELETE FROM exclusions")
                c.executemany("INSERT INTO exclusions VALUES (?, ?)",
                              list(book.excluded_until.items()))
                c.executemany(
                    "INSERT INTO history (round, uid, hotkey, model, status, reason, latency, "
                    "reward, audited, audit_passed, similarity, ts) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [(round_index, o.uid, o.hotkey, o.model, o.status, o.reason, o.latency,
                      float(rewards.get(o.uid, 0.0)), int(o.audited),
                      None if o.audit_passed is None else int(o.audit_passed), o.similarity, now)
                     for o in outcomes])
                c.executemany("INSERT INTO answers VALUES (?, ?, ?, ?)",
                              [(a.sha256, _signed64(a.phash), a.uid, a.round) for a in answers])
                c.execute("DELETE FROM answers WHERE round < ?",
                          (round_index - keep_answer_rounds,))
                c.execute("DELETE FROM history WHERE round < ?",
                          (round_index - keep_history_rounds,))
                c.execute("UPDATE meta SET value=? WHERE key='round'", (str(round_index + 1),))
                if scored_on is not None:
                    c.execute("INSERT OR REPLACE INTO meta VALUES ('scored_on', ?)", (json.dumps(
                        {str(uid): [book.uids[uid].hotkey, list(models)]
                         for uid, models in scored_on.items() if uid in book.uids}),))
                c.execute("COMMIT")
            except BaseException:
                _rollback(c)
                raise
        except sqlite3.Error as exc:
            raise _explain(exc, self.path, f"saving round {round_index}") from exc
        self._checkpoint()

    def _checkpoint(self) -> None:
        """The rounds into the main file now, not at SQLite's 1000-page mark (~150 rounds of
        64 miners): a process killed with -9 leaves the main file complete, so a copy of it
        alone (a backup, a move) or a lost -wal loses no round. The round is committed
        already: a checkpoint that fails (a full disk) is retried after the next one."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:
            log.warning("state file %s: checkpoint failed (%s); the round is saved in its "
                        "-wal beside it, keep the two together", self.path, exc)

    def record_weights(self, round_index: int, block: int, weights: dict[int, float],
                       success: bool, message: str, keep: int = KEEP_WEIGHT_ROWS) -> None:
        """One weight setting; only the last `keep` are kept (and the last that succeeded):
        a validator setting weights every 20 minutes for a year would otherwise keep ~26,000
        rows of every uid's weight, which the dashboard reads on every refresh."""
        def record(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO weights (round, block, uids, weights, success, message, ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (round_index, block, json.dumps(list(weights)), json.dumps(list(weights.values())),
                 int(success), message, time.time()))
            c.execute("DELETE FROM weights WHERE id <= (SELECT MAX(id) FROM weights) - ? AND "
                      "id != COALESCE((SELECT MAX(id) FROM weights WHERE success=1), -1)",
                      (keep,))

        try:
            with_tx(self._conn, record)
        except sqlite3.Error as exc:
            raise _explain(exc, self.path, "recording weights") from exc

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._let_go()

    def _let_go(self) -> None:
        """Release the writer's lock (once; the connection is closed first)."""
        if self._unlock is not None:
            self._unlock()

    def __enter__(self) -> ValidatorState:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def with_tx(conn: sqlite3.Connection, body) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        body(conn)
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open: on a full disk or I/O error SQLite has
    already rolled back, and a second ROLLBACK would raise and hide the real error."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _signed64(value: int) -> int:
    """SQLite integers are signed 64-bit; store a 64-bit hash in that range."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= (1 << 63) else value
