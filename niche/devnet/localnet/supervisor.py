"""Start, watch and stop the child processes of a local subnet.

Children run in their own process group so a stop reaches everything they spawned, and on
Linux they also receive SIGTERM if localnet itself dies, so nothing is ever orphaned.

Stopping goes by stage, highest first, each stage waited for before the next: the validators
and the gateway (stage 1) finish their round and their requests while the miners they
query (stage 0) still answer, so a Ctrl-C never turns into audits against dead miners.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1


_STOPS = (signal.SIGINT, signal.SIGTERM)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # the fork happened inside stop_signals_deferred: the child must not keep them blocked
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOPS)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while a child is forked and registered, then deliver them.

    An interrupt raised inside Popen after the fork (while it waits for the exec) would leave a
    running child that the supervisor never learnt about, so nothing would stop it.

    The signals are blocked in this thread (and taken with sigtimedwait afterwards), so one
    aimed at it is delivered here, synchronously, however busy the process is; Python's own
    handlers run whenever the main thread next checks, which under load can be after this
    block has ended. Placeholder handlers catch a signal that reaches another thread.
    """
    stops = _STOPS
    if (threading.current_thread() is not threading.main_thread()
            or any(signal.getsignal(s) is None for s in stops)):
        yield  # handlers only from the main thread, and only ones Python can restore
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in stops}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        for signum in sorted(signal.sigpending() & set(stops)):
            if signal.sigtimedwait([signum], 0) is not None:
                caught.append(signum)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            first = signal.Signals(caught[0])
            _deliver(first, previous[first])


def _deliver(signum: int, handler: Any) -> None:
    """Run the real handler of a held signal now, in this frame. Re-raising it instead
    (raise_signal) leaves Python to run the handler at its next check, which may fall inside
    a finalizer that the garbage collector happens to run, where a KeyboardInterrupt is
    printed and dropped: the Ctrl-C would be lost."""
    if callable(handler):  # default_int_handler raises KeyboardInterrupt here
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action (the process ends)
    # SIG_IGN: it was ignored before, it stays ignored


LOWEST_PICKED_PORT = 10000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out for port-0 binds and outgoing connections."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now, picked at random below the kernel's ephemeral range.

    A process of the plan binds its port seconds later (pm2, imports, model loads). A port the
    OS picked (bind to port 0) is back in the ephemeral pool by then, and any outgoing
    connection or port-0 listener on the box may take it first: `niche localnet` under a
    busy test run lost a miner that way ("port ... already in use"). Below that range only an
    explicit bind can take it."""
    low, _ = ephemeral_ports()
    candidates = range(LOWEST_PICKED_PORT, low)
    if len(candidates) >= 1000:
        pick = random.SystemRandom()
        for _ in range(100):
            port = pick.choice(candidates)
            if _bindable(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))
    except OSError:
        return ""


@dataclass
class Child:
    """One process of the local subnet; its output goes to `log_path`."""

    name: str
    argv: Sequence[str]
    log_path: Path
    expected_to_exit: bool = False
    env: dict[str, str] | None = None
    stage: int = 0
    """Stop order: the highest stage stops first (and is waited for) before the next."""
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                list(self.argv),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
                env=self.env,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def signal_group(self, sig: int, even_if_exited: bool = False) -> None:
        if self.process and (even_if_exited or self.process.poll() is None):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, sig)


class ChildFailed(RuntimeError):
    def __init__(self, child: Child, code: int):
        self.child, self.code = child, code
        super().__init__(
            f"{child.name} exited with code {code}; last lines of {child.log_path}:\n"
            f"{tail(child.log_path)}"
        )


class Supervisor:
    """Owns the children: start in order, watch for deaths, stop all on any exit path."""

    def __init__(self, stop_timeout: float = 15.0):
        self.children: list[Child] = []
        self.stop_timeout = stop_timeout

    def start(self, child: Child) -> Child:
        with stop_signals_deferred():
            child.start()
            self.children.append(child)
        return child

    def check(self) -> None:
        """Raise ChildFailed for the first child that died when it should not have."""
        for child in self.children:
            code = child.poll()
            if code is None:
                continue
            if not child.expected_to_exit or code != 0:
                raise ChildFailed(child, code)

    def running(self, only_expected_to_exit: bool = False) -> list[Child]:
        return [
            c
            for c in self.children
            if c.poll() is None and (c.expected_to_exit or not only_expected_to_exit)
        ]

    def stop_all(self) -> None:
        """Stage by stage, highest first: SIGTERM its process groups, wait up to
        `stop_timeout`, SIGKILL what is left; then the next stage."""
        for stage in sorted({c.stage for c in self.children}, reverse=True):
            group = [c for c in reversed(self.children) if c.stage == stage]
            for child in group:
                child.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + self.stop_timeout
            for child in group:
                if child.process is None:
                    continue
                try:
                    child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.signal_group(signal.SIGKILL)
                    child.process.wait(timeout=5)
        # Grandchildren in a group whose leader already exited.
        for child in self.children:
            child.signal_group(signal.SIGKILL, even_if_exited=True)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
