"""Signing by the receiver's clock: a miner refuses a signature whose nonce (the signer's
wall clock) is more than its allowed skew ahead of its own clock (2 s by default) or older
than its freshness window. A validator or gateway whose clock is 3 s off would have every
request refused, and every honest miner scored zero, for a fault of clocks. A refusal as
`stale_request` carries the miner's HTTP `Date`; from it the signer learns that miner's
offset and signs for it by its clock (one retry), and says so once in the log.

Offsets are per receiver: a signature is bound to its receiver, so a miner that lies in its
`Date` only gets its own requests signed at the time it asked for."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from niche.protocol import ErrorResponse

log = logging.getLogger("niche.validator")

MIN_OFFSET = 0.5
"""Seconds a newly seen offset must differ from the one applied to be acted on (a clock 2.01 s
ahead, just past the miner's skew, reads as 0.8-1.8 s through a whole-second `Date`)."""
DATE_LEAD = 1.2
"""Seconds added to a `Date` (whole seconds, truncated) for the clock to sign by."""
RELEARN_AFTER = 60.0
"""Seconds before a miner's offset may be learnt again: a miner flipping its `Date` on every
refusal would otherwise buy a retry and a log line per request."""
MAX_OFFSET = 3600.0
"""Offsets beyond an hour are not believed (a clock that far off needs an operator)."""


class ClockOffsets:
    """Seconds to add to this machine's clock when signing for each receiver hotkey."""

    def __init__(self, clock: Callable[[], int] | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """`clock`: this machine's wall clock in ns (time.time_ns, read at each call)."""
        self._clock = clock or (lambda: time.time_ns())
        self._monotonic = monotonic
        self._offsets: dict[str, float] = {}
        self._learnt_at: dict[str, float] = {}

    def nonce_ns(self, receiver: str) -> int:
        """The nonce for a request to `receiver`: now, by its clock as last learnt."""
        return self._clock() + int(self._offsets.get(receiver, 0.0) * 1e9)

    def learn(self, receiver: str, status: int, body: bytes, date: str | None) -> bool:
        """After a response from `receiver`: True when it refused the request as stale and
        its `Date` shows a clock offset this signer had not applied (a retry signed by
        that clock will pass)."""
        if status != 401 or not date or not _says_stale(body):
            return False
        try:
            # the header truncates to the second: sign 0.2-1.2 s ahead of the miner's clock,
            # inside its allowed skew (2 s), never before its start (not_before)
            theirs = parsedate_to_datetime(date).timestamp() + DATE_LEAD
        except (TypeError, ValueError, OverflowError, IndexError):
            return False
        offset = theirs - self._clock() / 1e9
        old = self._offsets.get(receiver, 0.0)
        if abs(offset) > MAX_OFFSET or abs(offset - old) < MIN_OFFSET:
            return False
        now = self._monotonic()
        last = self._learnt_at.get(receiver)
        if last is not None and now - last < RELEARN_AFTER:
            return False  # learnt a minute ago: a clock does not move like that, a liar does
        self._offsets[receiver] = offset
        self._learnt_at[receiver] = now
        (log.warning if last is None else log.debug)(
            "miner %s refused a signature as stale: its clock is %.1fs %s this machine's; "
            "signing for it by its clock from now on (check NTP, e.g. `timedatectl`, on both "
            "machines)", receiver, abs(offset), "ahead of" if offset > 0 else "behind")
        return True


def _says_stale(body: bytes) -> bool:
    """The miner's error answer names `stale_request` (niche's ErrorResponse)."""
    if len(body) > 4096:
        return False
    error = ErrorResponse.read(body)
    return error is not None and error.reason == "stale_request"
