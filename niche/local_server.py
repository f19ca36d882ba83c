"""HTTP endpoints a node serves beside its axon (metrics, the validator's dashboard): a port
check whose failures are one-line configuration errors, raised before anything slow starts,
and the handle of a server running in a daemon thread."""
from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from niche.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"


@dataclass
class LocalServer:
    """A running endpoint: http://host:port`path`."""

    server: Any
    thread: Any
    host: str
    port: int
    path: str = "/"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@contextlib.contextmanager
def binding(host: str, port: int, flag: str, failure: str) -> Iterator[None]:
    """Bind host:port for `flag` inside: a port out of range, busy or unusable is a
    ConfigError of one line (`failure` starts the line for errors other than a busy port)."""
    if not 0 <= port < 65536:
        raise ConfigError(f"{flag} must be in 0..65535, got {port}")
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{flag} {port} on {host} is already in use: pick another "
                              "port") from None
        raise ConfigError(f"{failure} {host}:{port}: {exc.strerror or exc}") from None


def check_port_free(host: str, port: int, flag: str) -> None:
    """Bind host:port once (as the server will, SO_REUSEADDR) and release it: a busy or
    unusable port is a one-line ConfigError now, not after minutes of model loading."""
    with binding(host, port, flag, f"{flag}: cannot bind"):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
