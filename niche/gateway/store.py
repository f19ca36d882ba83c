"""`response_format: url` answers: the PNG kept in the gateway's database under an
unguessable token until it expires (then 404), served at /v1/files/<token>.png."""
from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from niche.gateway.db import GatewayDB


class ImageStore:
    """Kept until `ttl` passes, and within `max_bytes` in all: at 100 images a minute a
    1024x1024 PNG each, an hour is ~13 GiB, so past the cap the oldest go first (their
    links then answer 404, as an expired one does)."""

    def __init__(self, db: GatewayDB, ttl: float = 3600.0, max_bytes: int = 2 << 30,
                 clock: Callable[[], float] = time.time):
        self.db = db
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._clock = clock

    def put(self, png: bytes) -> str:
        token = secrets.token_urlsafe(24)
        now = self._clock()
        with self.db.tx() as c:
            c.execute("DELETE FROM images WHERE expires <= ?", (now,))
            c.execute("INSERT INTO images VALUES (?, ?, ?)", (token, now + self.ttl, png))
            # the newest first, until the cap: what is past it goes (this one always stays)
            c.execute("DELETE FROM images WHERE token IN (SELECT token FROM (SELECT token, "
                      "SUM(length(png)) OVER (ORDER BY expires DESC, rowid DESC) AS kept "
                      "FROM images) WHERE kept > ? AND token != ?)", (self.max_bytes, token))
        return token

    def get(self, token: str) -> bytes | None:
        entry = self.entry(token)
        return entry[0] if entry is not None else None

    def entry(self, token: str) -> tuple[bytes, float] | None:
        """The image and when it expires (wall-clock seconds), while it is kept."""
        rows = self.db.read("SELECT png, expires FROM images WHERE token=? AND expires > ?",
                            (token, self._clock()))
        return (bytes(rows[0][0]), float(rows[0][1])) if rows else None
