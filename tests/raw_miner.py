"""A fake miner on a raw socket for the validator's client tests: it reads each request's
head and answers with whatever bytes a subclass writes (`answer`), then closes."""
from __future__ import annotations

import socket
import threading


class RawMiner:
    def __init__(self) -> None:
        self.requests = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    seen = b""
                    while b"\r\n\r\n" not in seen:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        seen += chunk
                    self.requests += 1
                    self.answer(conn)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
