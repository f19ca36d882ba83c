"""Failures that are this validator's, not the miners': they must never be scored.

Two kinds. One request that failed on this machine (its file descriptors, socket buffers or
memory ran out: `local_os_error`) is `validator_error` and that miner is not scored this
round. A round in which every miner asked failed in a way that points here (`round_fault`:
none reachable, none answering in time, all refusing our signatures as stale) is this
machine's network or clock: the round is not scored at all.
"""
from __future__ import annotations

import errno
from collections.abc import Iterable

LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""This machine's resources: out of file descriptors (the process's, the system's), socket
buffers, kernel memory. No peer's address or bytes make a connect or a read fail so (a
peer CAN make it fail with ECONNREFUSED, EHOSTUNREACH, EADDRNOTAVAIL and the like: those stay
the miner's)."""

VALIDATOR_ERROR = "validator_error"
"""The status of an outcome this validator could not produce (its own failure)."""

POINTS_HERE = frozenset({"unreachable", "timeout", VALIDATOR_ERROR})
"""Outcomes that, when every miner of a round has one, say this machine is cut off."""

STALE = "stale_request"
"""A miner's refusal of a request signed too far from its clock."""

MIN_MINERS = 3
"""Fewer miners asked than this: a round where all fail says nothing about the validator."""


def local_os_error(exc: BaseException | None) -> OSError | None:
    """The OSError of this machine's own resources behind `exc` (itself, aiohttp's
    `os_error`, or its cause or context), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "os_error", None)
        for candidate in (exc, inner):
            if isinstance(candidate, OSError) and candidate.errno in LOCAL_ERRNOS:
                return candidate
        exc = exc.__cause__ or exc.__context__
    return None


def describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"{name} on this machine ({exc.strerror or exc})"


def round_fault(outcomes: Iterable[tuple[str, str]]) -> str | None:
    """Why a round's failures are this validator's, or None. `outcomes`: (status, refusal
    reason) of every miner asked this round. All of them unreachable, timed out, failed on
    this machine or refusing our requests as stale: no miner is at fault then, whatever
    each one is (a miner cannot make another fail, so a round of honest miners among them
    is never skipped for a cheater's doing)."""
    seen = list(outcomes)
    if len(seen) < MIN_MINERS:
        return None
    if all(reason == STALE for _, reason in seen):
        return (f"all {len(seen)} miners refused our requests as stale_request: this "
                "machine's clock is off (check NTP: `timedatectl status`)")
    if all(status in POINTS_HERE or reason == STALE for status, reason in seen):
        statuses = ", ".join(sorted({STALE if reason == STALE else status
                                     for status, reason in seen}))
        return (f"all {len(seen)} miners failed ({statuses}): this machine's network, "
                "clock or resources (check its connection, `ulimit -n` and NTP)")
    return None
