"""The subnet dashboard: one page, served on a local port, showing what a validator's state
file knows about the subnet's miners (models, verified rate, latency distribution, score,
weight, the last failures with their reasons) and its round history, refreshed live.

It reads the SQLite state read-only (its own connection, `mode=ro`), so it never takes a
write lock from the validator and serves the same page whether the validator runs in this
process (`niche validator --dashboard.port`) or not (`niche validator dashboard`). It binds
127.0.0.1 unless told otherwise: hotkeys and scores are public, but the page is an
operator's view, not a service.
"""
from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from niche.errors import ConfigError
from niche.local_server import DEFAULT_HOST, LocalServer, binding
from niche.sqlite_files import connect_read_only

log = logging.getLogger("niche.dashboard")

WINDOW_ROUNDS = 100
"""Rounds of history the per-miner figures are computed over."""
ROUND_ROWS = 50
FAILURES_PER_MINER = 5
LATENCY_SAMPLES = 40


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending, non-empty sequence."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def latency_summary(latencies: Sequence[float]) -> dict[str, Any] | None:
    """min / p10 / median / p90 / max of a miner's valid answers (None: none yet)."""
    if not latencies:
        return None
    ordered = sorted(latencies)
    return {"n": len(ordered), "min": round(ordered[0], 4),
            "p10": round(_percentile(ordered, 0.1), 4),
            "p50": round(_percentile(ordered, 0.5), 4),
            "p90": round(_percentile(ordered, 0.9), 4), "max": round(ordered[-1], 4)}


def _connect(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise ConfigError(f"no validator state at {path}: give --state (the validator's "
                          "--neuron.state_path)")
    return connect_read_only(path, timeout=2.0)


def check_state(path: Path | str) -> None:
    """ConfigError now (one line, exit 2) when `path` is not a validator state this page can
    show, as `niche validator status` refuses it (`status.open_given_state`)."""
    from niche.validator.status import open_given_state

    open_given_state(Path(path)).close()


def first_id(db: sqlite3.Connection, round_index: int) -> int:
    """The first history id of `round_index` or later, by bisection on the primary key:
    rounds are written in order, so ids grow with rounds, and a long-running validator's
    history (up to 10000 rounds of every miner) is never scanned on each poll."""
    lo, hi = db.execute("SELECT MIN(id), MAX(id) FROM history").fetchone()
    if lo is None:
        return 0
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = db.execute("SELECT round FROM history WHERE id >= ? ORDER BY id LIMIT 1",
                         (mid,)).fetchone()
        if row is None or row[0] >= round_index:
            hi = mid
        else:
            lo = mid + 1
    return lo


def snapshot(path: Path | str, *, window: int = WINDOW_ROUNDS,
             round_rows: int = ROUND_ROWS) -> dict[str, Any]:
    """Everything the page shows, as plain data (GET /api/state returns it as JSON)."""
    path = Path(path).expanduser()
    with _connect(path) as db:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        rounds_completed = int(meta.get("round", "0"))
        since = rounds_completed - window
        uids = db.execute("SELECT uid, hotkey, score, model FROM uids ORDER BY uid").fetchall()
        excluded = dict(db.execute("SELECT hotkey, until_round FROM exclusions").fetchall())
        weights_row = db.execute(
            "SELECT round, block, uids, weights, message, ts FROM weights WHERE success=1 "
            "ORDER BY id DESC LIMIT 1").fetchone()
        history = db.execute(
            "SELECT round, uid, hotkey, model, status, reason, latency, audited, audit_passed, "
            "ts FROM history WHERE id >= ? ORDER BY id", (first_id(db, since),)).fetchall()
        rounds = db.execute(
            "SELECT round, MIN(ts), COUNT(*), SUM(status = 'ok'), SUM(audited), "
            "SUM(audited AND audit_passed = 1), SUM(audit_passed = 0), "
            "AVG(CASE WHEN status = 'ok' THEN latency END), SUM(reward) "
            "FROM history WHERE id >= ? GROUP BY round ORDER BY round DESC LIMIT ?",
            (first_id(db, rounds_completed - round_rows), round_rows)).fetchall()
        weight_rounds = dict(db.execute(
            "SELECT round, block FROM weights WHERE success=1").fetchall())
    weights: dict[int, float] = {}
    if weights_row is not None:
        weights = dict(zip(json.loads(weights_row[2]), json.loads(weights_row[3]),
                           strict=False))
    per_uid: dict[int, list[tuple]] = {}
    for row in history:
        per_uid.setdefault(int(row[1]), []).append(row)
    miners = []
    for uid, hotkey, score, model in uids:
        if hotkey == meta.get("hotkey"):
            continue  # the validator itself: not a miner
        rows = [r for r in per_uid.get(int(uid), []) if r[2] == hotkey]
        ok = [r for r in rows if r[4] == "ok" and r[8] != 0]
        audited = [r for r in rows if r[7]]
        verified = [r for r in audited if r[8] == 1]
        latencies = [float(r[6]) for r in ok if r[6] is not None]
        failures = [{"round": r[0], "status": "audit_failed" if r[4] == "ok" else r[4],
                     "reason": r[5] or r[4], "ts": r[9]}
                    for r in rows if r[4] != "ok" or r[8] == 0][-FAILURES_PER_MINER:][::-1]
        models = sorted({r[3] for r in rows if r[3]} | ({model} if model else set()))
        until = excluded.get(hotkey)
        miners.append({
            "uid": int(uid), "hotkey": hotkey, "models": models, "score": round(score, 6),
            "weight": round(weights.get(int(uid), 0.0), 6),
            "queried": len(rows), "answered": len(ok), "audited": len(audited),
            "verified": len(verified),
            "verified_rate": round(len(verified) / len(rows), 4) if rows else None,
            "latency": latency_summary(latencies),
            "latencies": [round(x, 4) for x in latencies[-LATENCY_SAMPLES:]],
            "last_status": rows[-1][4] if rows else None,
            "excluded_until": until if until is not None and until > rounds_completed else None,
            "failures": failures,
        })
    return {
        "state": str(path), "network": meta.get("network"),
        "netuid": int(meta["netuid"]) if meta.get("netuid") else None,
        "hotkey": meta.get("hotkey"), "rounds_completed": rounds_completed,
        "window_rounds": window, "generated_at": time.time(),
        "last_weights": None if weights_row is None else {
            "round": weights_row[0], "block": weights_row[1], "message": weights_row[4],
            "ts": weights_row[5]},
        "miners": miners,
        "rounds": [{"round": r[0], "ts": r[1], "miners": r[2], "answered": int(r[3] or 0),
                    "audited": int(r[4] or 0), "passed": int(r[5] or 0),
                    "failed_audits": int(r[6] or 0),
                    "mean_latency": None if r[7] is None else round(r[7], 4),
                    "rewards": round(float(r[8] or 0.0), 4),
                    "weights_block": weight_rounds.get(r[0])} for r in rounds],
    }


def page() -> bytes:
    return resources.files("niche.validator").joinpath("static/dashboard.html").read_bytes()


def _handler(state_path: Path) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "niche-dashboard"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route = self.path.split("?", 1)[0]
            if route in ("/", "/index.html"):
                self._send(200, page(), "text/html; charset=utf-8")
            elif route == "/api/state":
                try:
                    body, code = snapshot(state_path), 200
                except (ConfigError, sqlite3.Error) as exc:
                    body, code = {"error": str(exc)}, 503
                except Exception as exc:  # a damaged file's odd values: an answer, always
                    log.warning("dashboard: state %s unreadable: %s: %s", state_path,
                                type(exc).__name__, exc)
                    body, code = {"error": f"cannot read the validator state: "
                                           f"{type(exc).__name__}: {exc}"[:300]}, 503
                self._send(code, json.dumps(body).encode(), "application/json")
            elif route == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, kind: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            log.debug("dashboard %s", format % args)

    return Handler


class Dashboard(LocalServer):
    """A running dashboard: http://host:port/ (the page) and /api/state (its data)."""


def start_dashboard(state_path: Path | str, port: int, host: str = DEFAULT_HOST, *,
                    port_flag: str = "--dashboard.port") -> Dashboard:
    """Serve the dashboard of `state_path` in a daemon thread (port 0: any free port); a busy
    port is a one-line configuration error, raised before anything slow starts, naming
    `port_flag` (`niche validator dashboard` passes its own --port)."""
    with binding(host, port, port_flag, "cannot serve the dashboard on"):
        server = ThreadingHTTPServer((host, port), _handler(Path(state_path).expanduser()))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    dashboard = Dashboard(server, thread, host, int(server.server_address[1]))
    log.info("dashboard on %s (state %s)", dashboard.url, state_path)
    return dashboard
