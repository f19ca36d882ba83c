"""A staged close for HTTP/1.1 connections (RFC 9112 section 9.6, "Tear-down").

A server that answers before it has read the whole request (a 413 on Content-Length, a 408
on a trickled body, a 400 mid-body) and then closes its socket with the rest of the
request unread makes the kernel send a TCP reset. A client still uploading then gets
"connection reset by peer" on its write and never reads the answer (Python's urllib and
requests do exactly that: measured 10/10 resets instead of the gateway's 413 for a 60 MB
upload), and on a real network the reset can discard the answer's own unsent bytes. So the
server half-closes (its answer and then a FIN go out), keeps reading and discarding what the
client sends until the client closes or `linger` seconds pass, and only then closes.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class StagedCloseTransport:
    """The transport uvicorn's protocol sees: `close()` asks `peer_may_send()` and, when the
    peer may still be sending, half-closes and drains for up to `linger` seconds; every other
    call is the real transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop,
                 peer_may_send: Callable[[], bool], linger: float):
        self._transport = transport
        self._loop = loop
        self._peer_may_send = peer_may_send
        self._linger = linger
        self._timer: asyncio.TimerHandle | None = None
        self.lingering = False
        """Half-closed: what arrives now is read and dropped."""
        self.write = transport.write  # the answer path: no delegation per call
        self.get_extra_info = transport.get_extra_info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        if self._linger <= 0 or not self._transport.can_write_eof() \
                or not self._peer_may_send():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # after the buffered answer: FIN
        self._transport.resume_reading()  # uvicorn may have paused it (flow control)
        self._timer = self._loop.call_later(self._linger, self.close_now)

    def close_now(self) -> None:
        """End a linger (or close at once): close, or abort an answer the peer left unread."""
        self.cancel()
        if self._transport.is_closing():
            return
        if self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()

    def cancel(self) -> None:
        """Stop the linger timer (the connection is gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
