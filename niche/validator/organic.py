"""Organic answers waiting for an audit: the one SQLite queue between gateway and validator.

The gateway (niche/gateway) serves users' requests through miners and writes a sampled share
of the answers here: the request as sent, the miner's signed answer (image and states
commitment) and where the miner was. The validator's round claims the pending ones that are
young enough for the miner to still hold their states, audits them with the same `Auditor`
as its own challenges, and writes each verdict back. A failed organic audit zeroes the
miner's score and excludes it, exactly like a failed challenge: a miner cannot be honest on
challenges and cheap on users. Users never wait: the audit happens rounds later.

Two processes write one file: WAL journal, short transactions, a busy timeout.

Each row names the hotkey that signed the request (`signer`: the gateway runs on its
validator's wallet) and the chance the gateway queued it (`draw`): a validator claims only
its own rows (a miner keeps states per caller, so another hotkey's fetch finds none and would
charge an honest miner), and a dodged organic audit costs 1/draw times a dodged challenge's
(the gateway samples a tenth of the answers; a miner must not dodge the rest for free).
"""
from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from niche.errors import InvalidRequest, NicheError
from niche.imaging import (
    ANSWER_FORMATS,
    ImageLimits,
    b64_to_bytes,
    bytes_to_image,
    decode_image,
    to_b64,
)
from niche.protocol import GenerateRequest, GenerateResponse
from niche.sqlite_files import (
    ORGANIC_QUEUE_ID,
    corrupt,
    describe,
    identity,
    immediate_transaction,
    is_sqlite,
    move_aside,
    open_shared,
)
from niche.validator.challenges import Challenge
from niche.validator.client import MinerTarget, QueryResult, QueryStatus

log = logging.getLogger("niche.validator")

PENDING, CLAIMED, PASSED, FAILED, SKIPPED = "pending", "claimed", "passed", "failed", "skipped"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS organic (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL, url TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL,
    latency REAL, status TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    similarity REAL, audited REAL);
CREATE INDEX IF NOT EXISTS organic_status ON organic (status, created);
"""
_ADDED_COLUMNS = {"signer": "TEXT NOT NULL DEFAULT ''", "draw": "REAL NOT NULL DEFAULT 1.0",
                  "claimed": "REAL"}
"""Columns a queue file written by an older release lacks (added on open)."""

STALE_CLAIM_SECONDS = 1800.0
"""A row claimed this long ago by a validator that never wrote its verdict (it crashed or was
killed mid-round) is let go as skipped: the miner's states are gone by then (600 s), and the
row's images must not stay forever."""


class QueueError(NicheError):
    """The queue file cannot be used (the message says which and why)."""


@dataclass(frozen=True)
class OrganicItem:
    """One claimed organic answer, in the shapes the Auditor takes."""

    id: int
    challenge: Challenge
    result: QueryResult
    target: MinerTarget
    draw: float = 1.0
    """The chance the gateway queued this answer: a dodge of its audit costs 1/draw times
    a dodged challenge's, and a passed one counts for 1/draw answers served."""


MIN_DRAW = 0.01
"""The smallest draw a row is believed to have (a row's own value is the gateway's word,
and the penalty and the credit both scale with 1/draw)."""

VERDICTS_KEPT_SECONDS = 7 * 24 * 3600.0
"""Audited rows are deleted after this (each claim); their images are dropped at once."""
_DROP_IMAGES = ("request = CASE WHEN json_valid(request) THEN json_remove(request, '$.image') "
                "ELSE '' END, response = CASE WHEN json_valid(response) THEN "
                "json_set(response, '$.image', '') ELSE '' END")
"""A verdict row keeps the request and answer without their images (a 1024x1024 answer and
a conditioning image are ~6 MiB of base64; the audit was their only use): ~1 KB a row."""


class OrganicQueue:
    """Open (creating if needed) the queue at `path`. Safe to share between threads: they
    share one connection, whose transactions a lock keeps apart (one thread's BEGIN inside
    another's transaction, or its ROLLBACK undoing the other's insert, would drop answers)."""

    def __init__(self, path: Path | str, *, signer: str, draw: float = 1.0,
                 clock: Callable[[], float] = time.time, max_pending: int = 2000):
        """`signer`: the hotkey whose rows these are (the gateway's wallet writes them, its
        validator claims them); `draw`: the share of answers the gateway queues."""
        if not signer:
            raise QueueError("organic audit queue: no signer hotkey given")
        if not 0.0 < draw <= 1.0:
            raise QueueError(f"organic audit queue: draw {draw!r} is not in (0, 1]")
        self.path = Path(path).expanduser()
        self.signer, self.draw = signer, float(draw)
        self._clock = clock
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._conn, self._file = self._open()

    def _open(self) -> tuple[sqlite3.Connection, tuple[int, int]]:
        """A connection to the queue file and the file's (device, inode); a corrupt queue is
        moved aside (`<name>.corrupt-<time>`) and a fresh one started. Another file at the
        path is refused before anything is written or moved (`check_queue_file`)."""
        check_queue_file(self.path)
        try:
            try:
                conn = _connect(self.path)
            except sqlite3.DatabaseError as exc:
                if not corrupt(exc):  # a corrupt queue is moved aside, never fatal: it
                    raise  # holds answers waiting for an audit, worth less than either side
                aside = move_aside(self.path)
                log.warning("organic audit queue %s is not a usable database (%s): moved to %s, "
                            "starting an empty queue (its unaudited answers are not audited)",
                            self.path, exc, aside)
                conn = _connect(self.path)
            stat = self.path.stat()
        except (sqlite3.Error, OSError) as exc:
            raise QueueError(f"organic audit queue {self.path}: {exc}") from exc
        return conn, (stat.st_dev, stat.st_ino)

    def _reopen_if_replaced(self) -> None:
        """The file deleted or replaced under us (an operator cleaning up, the other process
        moving a corrupt one aside): writes would go to a file nobody reads. Reopen."""
        try:
            stat = self.path.stat()
            current = (stat.st_dev, stat.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._file:
            return
        log.warning("organic audit queue %s was %s while open: reopening it", self.path,
                    "deleted" if current is None else "replaced")
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        self._conn, self._file = self._open()

    # ------------------------------------------------------------------ gateway side
    def submit(self, target: MinerTarget, request: GenerateRequest, answer: GenerateResponse,
               latency: float | None, image: bytes | None = None) -> bool:
        """Queue one answer for audit; False (nothing written) when the queue is full, so a
        validator that stopped auditing cannot make the gateway's disk grow. `image`: the
        answer's image bytes when it came as a binary body (its `image` field is empty)."""
        if image is not None and not answer.image:
            answer = answer.model_copy(update={"image": to_b64(image)})
        with self._tx() as c:
            pending = c.execute("SELECT COUNT(*) FROM organic WHERE status=?",
                                (PENDING,)).fetchone()[0]
            if pending >= self.max_pending:
                return False
            c.execute("INSERT INTO organic (created, uid, hotkey, url, request, response, "
                      "latency, status, signer, draw) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (self._clock(), target.uid, target.hotkey, target.url or "",
                       request.model_dump_json(exclude_none=True), answer.model_dump_json(),
                       latency, PENDING, self.signer, self.draw))
        return True

    def counts(self) -> dict[str, int]:
        """Rows by status (for the gateway's metrics)."""
        with self._lock:
            rows = self._conn.execute("SELECT status, COUNT(*) FROM organic GROUP BY status"
                                      ).fetchall()
        return {str(status): int(n) for status, n in rows}

    # ------------------------------------------------------------------ validator side
    def claim(self, limit: int, max_age: float) -> list[OrganicItem]:
        """Up to `limit` of this signer's pending answers younger than `max_age` seconds,
        oldest first, marked claimed; older pending ones are skipped (their states are gone
        from the miner's store, and no miner may pay for the validator being late), and so
        are claims a stopped validator left (`STALE_CLAIM_SECONDS`) and rows an older
        release queued without a signer (whose hotkey asked is unknown)."""
        now = self._clock()
        with self._tx() as c:
            _let_go(c, now, "too old to audit", "status=? AND created < ?",
                    (PENDING, now - max_age))
            _let_go(c, now, "claimed by a validator that stopped before its verdict",
                    "status=? AND COALESCE(claimed, created) < ?",
                    (CLAIMED, now - STALE_CLAIM_SECONDS))
            unsigned = _let_go(c, now, "queued by an older gateway: signer unknown",
                               "status=? AND signer=''", (PENDING,))
            _delete_verdicts(c, now - VERDICTS_KEPT_SECONDS)
            rows = c.execute("SELECT id, uid, hotkey, url, request, response, latency, draw, "
                             "created "
                             "FROM organic WHERE status=? AND signer=? ORDER BY id LIMIT ?",
                             (PENDING, self.signer, max(0, limit))).fetchall()
            c.executemany("UPDATE organic SET status=?, claimed=? WHERE id=?",
                          [(CLAIMED, now, r[0]) for r in rows])
        if unsigned:
            log.warning("organic queue %s: %d answer(s) queued by a gateway older than this "
                        "validator (no signer) let go unaudited: upgrade the gateway",
                        self.path, unsigned)
        items = []
        for row in rows:
            item = _item(*row)
            if isinstance(item, str):
                self.record(int(row[0]), None, item)
            else:
                items.append(item)
        return items

    def record(self, item_id: int, passed: bool | None, reason: str = "",
               similarity: float | None = None) -> None:
        """The verdict on one claimed answer (None: not audited, `reason` says why)."""
        self.record_many([(item_id, passed, reason, similarity)])

    def record_many(self, verdicts: Sequence[tuple[int, bool | None, str, float | None]]
                    ) -> None:
        """Verdicts (id, passed, reason, similarity) on claimed answers, in one transaction."""
        now = self._clock()
        with self._tx() as c:
            c.executemany(f"UPDATE organic SET status=?, reason=?, similarity=?, audited=?, "
                          f"{_DROP_IMAGES} WHERE id=?",
                          [(SKIPPED if passed is None else PASSED if passed else FAILED,
                            reason[:300], similarity, now, item_id)
                           for item_id, passed, reason, similarity in verdicts])

    def prune(self, keep_seconds: float = VERDICTS_KEPT_SECONDS) -> None:
        """Forget audited rows older than `keep_seconds`."""
        with self._tx() as c:
            _delete_verdicts(c, self._clock() - keep_seconds)

    @contextlib.contextmanager
    def _tx(self):
        try:
            with self._lock:
                self._reopen_if_replaced()
                with immediate_transaction(self._conn) as conn:
                    yield conn
        except sqlite3.Error as exc:
            raise QueueError(f"organic audit queue {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()


def check_queue_file(path: Path | str) -> None:
    """QueueError (one line) when `path` holds something other than an organic audit queue:
    a mistyped --gateway.organic_queue or --neuron.organic_queue once wrote the queue's table
    into a validator's state file or the chain file, and moved a hotkey file given there
    aside as "corrupt". Read-only. A missing or empty file, a queue (marked, or from before
    the mark) and a queue whose pages are damaged (moved aside on open) pass."""
    path = Path(path).expanduser()
    if not path.is_file() or path.stat().st_size == 0:
        return
    if not is_sqlite(path):
        raise QueueError(f"organic audit queue {path} is not a SQLite file: nothing was "
                         "written to it or moved; pass the queue's own path (the gateway's "
                         "--gateway.organic_queue, the validator's --neuron.organic_queue)")
    try:
        app_id, tables = identity(path)
    except sqlite3.DatabaseError:
        return  # a damaged queue: _open moves it aside
    if app_id == ORGANIC_QUEUE_ID or (app_id == 0 and tables <= {"organic"}):
        return
    raise QueueError(f"organic audit queue {path} is {describe(app_id, tables)}: nothing "
                     "was written to it; pass the queue's own path (the gateway's "
                     "--gateway.organic_queue, the validator's --neuron.organic_queue)")


def _connect(path: Path) -> sqlite3.Connection:
    """The shared connection, the schema of this release in place, the file marked."""
    conn = open_shared(path, _SCHEMA)
    try:
        _add_missing_columns(conn)
        if int(conn.execute("PRAGMA application_id").fetchone()[0]) != ORGANIC_QUEUE_ID:
            conn.execute(f"PRAGMA application_id={ORGANIC_QUEUE_ID}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a queue file of an older release up to this schema (the gateway or the
    validator, whichever opens it first; the other finds the columns there)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(organic)")}
    for name, kind in _ADDED_COLUMNS.items():
        if name not in have:
            try:
                conn.execute(f"ALTER TABLE organic ADD COLUMN {name} {kind}")
            except sqlite3.OperationalError as exc:  # the other process added it first
                if "duplicate column" not in str(exc):
                    raise


def _let_go(conn: sqlite3.Connection, now: float, reason: str, where: str,
            args: tuple[object, ...]) -> int:
    """Rows matching `where` skipped unaudited for `reason`, their images dropped; how many."""
    return conn.execute(f"UPDATE organic SET status=?, reason=?, audited=?, {_DROP_IMAGES} "
                        f"WHERE {where}", (SKIPPED, reason, now, *args)).rowcount


def _delete_verdicts(conn: sqlite3.Connection, created_before: float) -> None:
    """Rows that have their verdict (neither waiting nor claimed), older than that."""
    conn.execute("DELETE FROM organic WHERE status NOT IN (?, ?) AND created < ?",
                 (PENDING, CLAIMED, created_before))


def _item(item_id: int, uid: int, hotkey: str, url: str, request_json: str,
          response_json: str, latency: float | None, draw: float, created: float | None
          ) -> OrganicItem | str:
    """The Auditor's view of a queued row, or why the row cannot be audited."""
    try:
        request = GenerateRequest.model_validate_json(request_json)
        answer = GenerateResponse.model_validate_json(response_json)
    except ValidationError as exc:
        return f"unreadable queue row: {exc.errors()[0].get('msg', '')}"[:300]
    limits = ImageLimits(max_side=8192, max_pixels=8192 * 8192, formats=ANSWER_FORMATS)
    try:
        data = b64_to_bytes(answer.image, field="image", limits=limits)
        image = bytes_to_image(data, field="image", limits=limits)
        conditioning = decode_image(request.image, field="image") if request.image else None
    except InvalidRequest as exc:
        return f"unreadable image in queue row: {exc}"[:300]
    challenge = Challenge(uid=uid, hotkey=hotkey, request_id=request.request_id,
                          params=request.params, timeout=request.timeout, image=conditioning,
                          image_b64=request.image)
    result = QueryResult(uid, hotkey, QueryStatus.OK, latency=latency,
                         request_id=request.request_id, response=answer, image=image,
                         image_bytes=data, answered_at=created)  # queued as it arrived
    return OrganicItem(int(item_id), challenge, result, MinerTarget(uid, hotkey, url or None),
                       draw=min(1.0, max(float(draw), MIN_DRAW)))

