"""The access log's level says whose failure a request was: a 5xx, or a stream that ended in
a 5xx error event, warns; a refusal is info, whether it came as the answer or mid-stream (a
saturated subnet's 429 is the subnet's normal answer, not an incident to page on)."""
from __future__ import annotations

import asyncio
import logging

import pytest

from niche.gateway.access_log import AccessLog


def _app(status: int, stream_error: int | None):
    async def app(scope, receive, send):
        if stream_error is not None:
            scope["state"]["stream_error"] = stream_error
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    return app


async def _sent(message):
    return None


@pytest.mark.parametrize(("status", "stream_error", "shown", "level"), [
    (200, None, "200", logging.INFO),
    (429, None, "429", logging.INFO),
    (200, 429, "200 (stream error 429)", logging.INFO),
    (200, 504, "200 (stream error 504)", logging.WARNING),
    (502, None, "502", logging.WARNING),
])
def test_the_level_follows_whose_failure_it_was(caplog, status, stream_error, shown, level):
    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations"}
    with caplog.at_level(logging.INFO, logger="niche.gateway.access"):
        asyncio.run(AccessLog(_app(status, stream_error))(scope, None, _sent))
    [record] = caplog.records
    assert f"/v1/images/generations {shown} key=-" in record.getMessage()
    assert record.levelno == level
