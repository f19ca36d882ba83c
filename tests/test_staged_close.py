"""The staged close under every niche server (miner, gateway): a client still uploading when
the server answers early reads the answer, not a connection reset; the drain is bounded."""
from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from niche.devnet.servers import BackgroundServer
from niche.miner.server import ConnectionLimits

UPLOAD = 40 * 1024 * 1024


def _early_refusal_app() -> FastAPI:
    """Answers before reading the body, as the miner's and the gateway's 413s do."""
    app = FastAPI()

    @app.post("/upload")
    async def upload():
        return JSONResponse({"error": "too big"}, status_code=413,
                            headers={"Connection": "close"})

    @app.post("/read")
    async def read(request: Request):
        return {"size": len(await request.body())}

    return app


@pytest.fixture
def server(request):
    limits = getattr(request, "param", None)
    with BackgroundServer(_early_refusal_app(), limits=limits) as srv:
        srv.connections = srv.server.server_state.connections
        yield srv


def _post(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _open_upload(srv, length: int = UPLOAD) -> socket.socket:
    sock = socket.create_connection((srv.ip, srv.port))
    sock.sendall(f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
                 .encode() + b"a" * 1000)
    return sock


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    got = b""
    while b"too big" not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def _wait_until(condition, timeout: float) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_client_that_writes_its_whole_body_first_reads_the_early_answer(server):
    """urllib (like requests) writes the whole body before it reads: a reset under its
    upload was 'Connection reset by peer' instead of the 413."""
    assert [_post(server.url + "/upload", b"a" * UPLOAD) for _ in range(3)] == [413] * 3


def test_bytes_sent_after_the_answer_are_drained_not_reset(server):
    with _open_upload(server) as sock:
        assert _read_answer(sock).startswith(b"HTTP/1.1 413")
        sock.sendall(b"b" * 100_000)  # still uploading: the server half-closed, reads on
        time.sleep(0.3)
        sock.settimeout(5)
        assert sock.recv(65536) == b""  # its FIN, not a reset
    _wait_until(lambda: not server.connections, timeout=5)


@pytest.mark.parametrize("server", [ConnectionLimits(linger=0.5)], indirect=True)
def test_the_drain_ends_after_linger_seconds_for_a_client_that_never_stops(server):
    with _open_upload(server) as sock:
        _read_answer(sock)
        sock.settimeout(0.05)
        started = time.monotonic()
        with pytest.raises(OSError):  # reset (or a broken pipe) once the linger is over
            while time.monotonic() - started < 5:
                sock.sendall(b"b" * 1000)
                time.sleep(0.02)
        assert 0.3 < time.monotonic() - started < 3
    assert not server.connections


def test_a_client_that_closes_ends_the_drain_at_once(server):
    sock = _open_upload(server)
    _read_answer(sock)
    sock.close()
    assert _wait_until(lambda: not server.connections, timeout=5) < 1.0


def test_a_complete_request_closes_without_a_drain(server):
    """Nothing more can come: an ordinary Connection: close answer closes at once."""
    with socket.create_connection((server.ip, server.port)) as sock:
        sock.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Content-Length: 3\r\n\r\nabc")
        sock.settimeout(5)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert b'{"size":3}' in got
    assert _wait_until(lambda: not server.connections, timeout=5) < 1.0


@pytest.mark.parametrize("server", [ConnectionLimits(linger=0)], indirect=True)
def test_without_the_staged_close_the_upload_is_reset(server):
    """The control: linger=0 closes at once, and the same client gets a reset."""
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        for _ in range(3):
            _post(server.url + "/upload", b"a" * UPLOAD)
