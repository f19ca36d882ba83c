"""The gateway's connection limits, below the app: what one address may hold, and refusals
made there in OpenAI's error shape (a client's SDK and the playground parse them)."""
from __future__ import annotations

import json
import os

from niche.gateway.errors import INVALID_REQUEST, SERVER_ERROR
from niche.miner.server import ConnectionLimits, peer_key

DEFAULT_TRUSTED_PROXIES = "127.0.0.1"
"""uvicorn's own default for FORWARDED_ALLOW_IPS."""


def trusted_proxies(setting: str | None = None) -> frozenset[str]:
    """The literal addresses of FORWARDED_ALLOW_IPS (uvicorn trusts their X-Forwarded-For),
    as `peer_key` counts them, with ::1 beside 127.0.0.1. "*" and networks are not exempt:
    a cap per address is what keeps a public gateway without a proxy answering."""
    raw = os.environ.get("FORWARDED_ALLOW_IPS", DEFAULT_TRUSTED_PROXIES) \
        if setting is None else setting
    hosts = {host.strip() for host in raw.split(",")} - {"", "*"}
    if "127.0.0.1" in hosts:
        hosts.add("::1")
    keys = {peer_key((host, 0)) for host in hosts if "/" not in host}
    return frozenset(key for key in keys if key is not None)


def refusal_body(status: int, reason: str, detail: str) -> bytes:
    kind = SERVER_ERROR if status >= 500 else INVALID_REQUEST
    return json.dumps({"error": {"message": detail, "type": kind, "param": None,
                                 "code": reason}}).encode()


def gateway_limits(per_peer: int) -> ConnectionLimits:
    """`per_peer` connections per address (0: no bound) but for trusted proxies; JSON
    refusals of an over-long head (431) or a full server (503)."""
    return ConnectionLimits(per_peer=per_peer, exempt=trusted_proxies(), json_overload=True,
                            error_body=refusal_body)
