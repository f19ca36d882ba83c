"""API keys: only their sha256 is stored (a key is 32 random bytes, so a plain hash cannot
be brute-forced); each key has a per-minute rate and a daily image quota.

The rate is a token bucket in memory (a restart refills it, which costs nothing); the
daily quota is counted in SQLite per UTC day, so it survives restarts."""
from __future__ import annotations

import contextlib
import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from niche.errors import InvalidRequest
from niche.gateway.db import GatewayDB
from niche.gateway.errors import AUTHENTICATION, INSUFFICIENT_QUOTA, RATE_LIMIT, GatewayError

KEY_PREFIX = "nk-"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    created: float
    revoked: float | None
    per_minute: int
    per_day: int


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _day(now: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def _to_midnight(now: float) -> float:
    """Seconds until the next 00:00 UTC, when daily quotas reset."""
    return 86400.0 - now % 86400.0


def _span(seconds: float) -> str:
    """OpenAI's reset format: "6m0s", "1h2m3s", "0.5s"."""
    if seconds < 60:
        return (f"{seconds:.2f}".rstrip("0").rstrip(".") or "0") + "s" if seconds < 1 \
            else f"{int(seconds)}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    return (f"{hours}h" if hours else "") + f"{rest // 60}m{rest % 60}s"


@dataclass(frozen=True)
class Quota:
    """Where a key stands: its request bucket and today's images, as `x-ratelimit-*`
    headers (OpenAI's names for requests; `-images` for the daily quota)."""

    per_minute: int
    requests_left: int
    requests_reset: float
    """Seconds until the bucket is full again."""
    per_day: int
    used_today: int
    images_reset: float
    """Seconds until 00:00 UTC."""

    @property
    def images_left(self) -> int:
        return max(0, self.per_day - self.used_today)

    def headers(self) -> dict[str, str]:
        return {"x-ratelimit-limit-requests": str(self.per_minute),
                "x-ratelimit-remaining-requests": str(self.requests_left),
                "x-ratelimit-reset-requests": _span(self.requests_reset),
                "x-ratelimit-limit-images": str(self.per_day),
                "x-ratelimit-remaining-images": str(self.images_left),
                "x-ratelimit-reset-images": _span(self.images_reset)}


@dataclass(frozen=True)
class Charge:
    """Images taken from one day's quota: the key's standing after, and the day (UTC) they
    count against, where a refund must go even after midnight."""

    quota: Quota
    day: str


class KeyStore:
    def __init__(self, db: GatewayDB, clock: Callable[[], float] = time.time):
        self.db = db
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, at)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ admin
    def create(self, name: str, per_minute: int = 60, per_day: int = 1000) -> tuple[str, ApiKey]:
        """A new key: the secret is returned once and never stored."""
        if not name.strip() or len(name) > 64 or not name.isprintable():
            raise InvalidRequest("1 to 64 printable characters, not only blanks (no newline "
                                 "or control characters)", field="name")
        if per_minute < 1 or per_day < 1:
            raise InvalidRequest("rate and quota must be >= 1", field="per_minute")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(secrets.token_hex(4), name, self._clock(), None, per_minute, per_day)
        with self.db.tx() as c:
            c.execute("INSERT INTO keys VALUES (?, ?, ?, ?, NULL, ?, ?)",
                      (key.id, name, _hash(secret), key.created, per_minute, per_day))
        return secret, key

    def list(self) -> list[ApiKey]:
        return [ApiKey(*row) for row in self.db.read(
            "SELECT id, name, created, revoked, per_minute, per_day FROM keys ORDER BY created")]

    def revoke(self, key_id: str) -> bool:
        with self.db.tx() as c:
            changed = c.execute("UPDATE keys SET revoked=? WHERE id=? AND revoked IS NULL",
                                (self._clock(), key_id)).rowcount
        return bool(changed)

    def used_today(self, key_id: str) -> int:
        rows = self.db.read("SELECT images FROM usage WHERE key_id=? AND day=?",
                            (key_id, _day(self._clock())))
        return int(rows[0][0]) if rows else 0

    # ------------------------------------------------------------------ requests
    def authenticate(self, authorization: str | None) -> ApiKey:
        """The key behind an `Authorization: Bearer ...` header, or a 401."""
        if not authorization:
            raise GatewayError(401, "missing API key: send 'Authorization: Bearer <key>' "
                                    "(create one with `niche gateway keys create`)",
                               type=AUTHENTICATION, code="missing_api_key")
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret.startswith(KEY_PREFIX) or len(secret) > 128:
            raise GatewayError(401, "invalid API key format: expected 'Bearer nk-...'",
                               type=AUTHENTICATION, code="invalid_api_key")
        rows = self.db.read("SELECT id, name, created, revoked, per_minute, per_day FROM keys "
                            "WHERE hash=?", (_hash(secret),))
        if not rows:
            raise GatewayError(401, "incorrect API key", type=AUTHENTICATION,
                               code="invalid_api_key")
        key = ApiKey(*rows[0])
        if key.revoked is not None:
            raise GatewayError(401, f"API key {key.id} was revoked", type=AUTHENTICATION,
                               code="invalid_api_key")
        return key

    def _tokens(self, key: ApiKey, now: float) -> float:
        tokens, at = self._buckets.get(key.id, (float(key.per_minute), now))
        return min(float(key.per_minute), tokens + (now - at) * key.per_minute / 60.0)

    def _quota(self, key: ApiKey, tokens: float, used: int, now: float) -> Quota:
        refill = (key.per_minute - tokens) * 60.0 / key.per_minute
        return Quota(key.per_minute, max(0, int(tokens)), max(0.0, refill), key.per_day,
                     used, _to_midnight(now))

    def quota(self, key: ApiKey) -> Quota:
        """The key's standing now, charging nothing."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
        return self._quota(key, tokens, self.used_today(key.id), now)

    def take_request(self, key: ApiKey) -> None:
        """Take one request from the key's bucket, or 429 (with Retry-After and the
        `x-ratelimit-*` headers). Taken before the body is read or any image decoded, so a
        key out of requests cannot keep the gateway decoding uploads."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < 1.0:
                wait = (1.0 - tokens) * 60.0 / key.per_minute
                self._buckets[key.id] = (tokens, now)
                headers = self._quota(key, tokens, self.used_today(key.id), now).headers()
                raise GatewayError(429, f"rate limit of {key.per_minute} requests per minute "
                                        f"reached; retry in {wait:.1f}s", type=RATE_LIMIT,
                                   code="rate_limit_exceeded",
                                   headers={"Retry-After": str(max(1, math.ceil(wait))),
                                            **headers})
            self._buckets[key.id] = (tokens - 1.0, now)

    def charge_images(self, key: ApiKey, images: int) -> Charge:
        """Take `images` from today's quota, or 429. Charged up front (so parallel requests
        cannot overrun it); what was not delivered is given back with `refund`, to the day
        it was charged to."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
        if images > key.per_day:  # no wait makes it fit: say so, with no Retry-After
            raise GatewayError(
                429, f"asked for {images} images, more than this key's whole daily quota of "
                     f"{key.per_day}; ask for at most {key.per_day} per request (or use a "
                     "key with a larger quota)", type=INSUFFICIENT_QUOTA,
                code="insufficient_quota", param="n")
        day = _day(now)
        with self.db.tx() as c:
            row = c.execute("SELECT images FROM usage WHERE key_id=? AND day=?",
                            (key.id, day)).fetchone()
            used = int(row[0]) if row else 0
            if used + images > key.per_day:
                quota = self._quota(key, tokens, used, now)
                left = quota.images_left
                wait = quota.images_reset
                raise GatewayError(
                    429, f"asked for {images} image{'s' if images != 1 else ''}, {left} left "
                         f"of the daily quota of {key.per_day} ({used} used today); it resets "
                         f"at 00:00 UTC, in {_span(wait)}", type=INSUFFICIENT_QUOTA,
                    code="insufficient_quota",
                    headers={"Retry-After": str(max(1, math.ceil(wait))), **quota.headers()})
            c.execute("INSERT INTO usage VALUES (?, ?, ?) ON CONFLICT (key_id, day) "
                      "DO UPDATE SET images = images + excluded.images", (key.id, day, images))
        return Charge(self._quota(key, tokens, used + images, now), day)

    def refund(self, key: ApiKey, images: int, *, request: bool = False,
               day: str | None = None) -> None:
        """Give back `images` of the quota of `day` (the day they were charged to; None:
        today) and, with `request`, the request `take_request` took from the key's bucket
        (a refusal the caller did not cause costs it nothing)."""
        if request:
            now = self._clock()
            with self._lock:
                tokens = min(float(key.per_minute), self._tokens(key, now) + 1.0)
                self._buckets[key.id] = (tokens, now)
        if images <= 0:
            return
        with self.db.tx() as c:
            c.execute("UPDATE usage SET images = MAX(0, images - ?) WHERE key_id=? AND day=?",
                      (images, key.id, day or _day(self._clock())))


class InFlight:
    """Requests each key has open right now, capped: a key holder cannot take every one of
    the server's connection slots (slow uploads, long generations) and lock others out.
    Used from the event loop only, so a plain dict suffices."""

    def __init__(self, per_key: int):
        self.per_key = per_key
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, key: ApiKey) -> Iterator[None]:
        """One slot of `key` for the duration, or a 429 when all of them are taken."""
        held = self._open.get(key.id, 0)
        if held >= self.per_key:
            raise GatewayError(
                429, f"API key {key.id} already has {held} requests in flight, the most this "
                     "gateway allows per key; wait for one to finish (or cancel stalled "
                     "uploads) and retry", type=RATE_LIMIT, code="too_many_concurrent_requests",
                headers={"Retry-After": "1"})
        self._open[key.id] = held + 1
        try:
            yield
        finally:
            left = self._open[key.id] - 1
            if left:
                self._open[key.id] = left
            else:
                del self._open[key.id]
