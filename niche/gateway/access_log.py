"""One log line per request, refusals and errors included: method, path, status, the key's
id, latency and the miners that answered, e.g.
`POST /v1/images/generations 200 key=3f2a9c1d 0.412s miners=1,2`.

A plain ASGI wrapper (not a BaseHTTPMiddleware), so a streamed answer is timed to its last
byte and an unhandled exception is logged as the 500 the server sends. A stream that ended
early says so: `200 (stream error 504)` (a warning; a refusal such as 429 is at info, as
its plain answer is) or `200 (stream abandoned, 1 of 4 images sent)` when the client hung
up."""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("niche.gateway.access")


class AccessLog:
    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        state = scope.setdefault("state", {})
        status = 500

        async def capture(message: dict) -> None:
            nonlocal status
            if message.get("type") == "http.response.start":
                status = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            extra, abandoned = state.get("stream_error"), state.get("stream_abandoned")
            shown = f"{status} (stream error {extra})" if extra \
                else f"{status} (stream abandoned, {abandoned})" if abandoned else str(status)
            # a failure of ours or the miners' warns; a refusal, even mid-stream (a saturated
            # subnet's 429), is a normal answer to the caller
            level = logging.WARNING if max(status, extra or 0) >= 500 else logging.INFO
            log.log(level, "%s %s %s key=%s %.3fs miners=%s", scope.get("method", "-"),
                    scope.get("path", "-"), shown, state.get("key_id", "-"),
                    time.monotonic() - started, state.get("miners", "-"))
