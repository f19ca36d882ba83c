"""Servers for tests and local tools: a FastAPI app under uvicorn in a daemon thread on
127.0.0.1, with the miner's own socket binding and header deadline."""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from fastapi import FastAPI

from niche.miner.server import ConnectionLimits, bind_socket, uvicorn_server


class BackgroundServer:
    """Run an app with uvicorn in a daemon thread on 127.0.0.1 (tests, localnet tools)."""

    def __init__(self, app: FastAPI, ip: str = "127.0.0.1", port: int = 0,
                 limits: ConnectionLimits | None = None):
        self.sock = bind_socket(ip, port)
        self.ip = ip
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn_server(app, limits=limits)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"

    def start(self, timeout: float = 20.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("miner server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def running(app: FastAPI) -> Iterator[BackgroundServer]:
    with BackgroundServer(app) as server:
        yield server
