"""One process per file: an exclusive, non-blocking flock on a sidecar `<file>.lock`, with
the holder's pid and start time written in it for the refusal's message. The kernel lets go
when the process ends, however it ends. Re-entrant within a process (flock refuses a second
descriptor even in the same process, and a neuron may open its own file twice: a start-up
check, then the service)."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from pathlib import Path

_HELD: dict[Path, list[int]] = {}
"""Lock file -> [descriptor, holders in this process]."""
_HELD_GUARD = threading.Lock()


class LockHeld(Exception):
    """Another process holds the lock; `holder` says who (pid, start time)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def lock_path(path: Path) -> Path:
    """The sidecar file held locked by the one process using `path`, beside the file the
    path resolves to (a symlink to a state file must not name a lock of its own)."""
    real = Path(path).expanduser().resolve()
    return real.with_name(real.name + ".lock")


def holder(lock: Path) -> str:
    """Who holds `lock`, as its file says ("pid N, started T: command")."""
    try:
        info = json.loads(lock.read_text() or "{}")
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        command = f": {info['command']}" if info.get("command") else ""
        return f"pid {int(info['pid'])}, started {started}{command}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "pid not written yet"


def acquire(path: Path) -> Path:
    """Hold `path`'s lock for this process (once more if it already does); the key for
    `release`. LockHeld when another process holds it; OSError when the lock file cannot be
    created (the caller says what to do)."""
    lock = lock_path(path)
    key = lock.resolve()
    with _HELD_GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return key
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(holder(lock)) from None
        with contextlib.suppress(OSError):  # who holds it is for the message only
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "started": time.time(),
                                     "command": " ".join(sys.argv)[:200]}).encode())
        _HELD[key] = [fd, 1]
    return key


def release(key: Path) -> None:
    """One holder fewer; the last lets the lock go."""
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # closing the descriptor lets the lock go
