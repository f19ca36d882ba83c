"""`response_format: url` answers: the PNG kept in the gateway's database under an
unguessable token until it expires (then 404), served at /v1/files/<token>.png."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from niche.gateway.db import GatewayDB


class ImageStore:
    def __init__(self, db: GatewayDB, ttl: float = 3600.0,
                 clock: Callable[[], float] = time.time):
        self.db = db
        self.ttl = ttl
        self._clock = clock

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        now = self._clock()
        with self.db.tx() as c:
            c.execute("DELETE FROM images WHERE expires <= ?", (now,))
            c.execute("INSERT INTO images VALUES (?, ?, ?)", (token, now + self.ttl, png))
        return token

    def get(self, token: str) -> bytes | None:
        rows = self.db.read("SELECT png FROM images WHERE token=? AND expires > ?",
                            (token, self._clock()))
        return bytes(rows[0][0]) if rows else None
