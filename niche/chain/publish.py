"""Publishing a miner's endpoint without tripping the chain's serving rate limit.

subtensor rate-limits `serve_axon` (`ServingRateLimitExceeded`), even for an unchanged
endpoint, so a miner restarted by pm2 inside that window must not serve again: it reads
its published endpoint first and skips an unchanged one. A rate-limited serve is
"retry later", never a crash; a serve whose connection dropped is checked on chain
before it is submitted again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from niche.chain.base import Chain, Endpoint, RateLimitedError, UncertainWriteError

log = logging.getLogger("niche.chain")

Status = Literal["unchanged", "served", "rate_limited"]
UNCHANGED: Status = "unchanged"
SERVED: Status = "served"
RATE_LIMITED: Status = "rate_limited"


@dataclass(frozen=True)
class ServeOutcome:
    status: Status
    message: str

    @property
    def published(self) -> bool:
        """True when the chain now shows the wanted endpoint."""
        return self.status != RATE_LIMITED


def publish_endpoint(chain: Chain, netuid: int, wallet, ip: str, port: int) -> ServeOutcome:
    """Make the chain show `ip:port` for the wallet's hotkey with at most the serves needed."""
    hotkey = wallet.hotkey.ss58_address
    wanted = Endpoint(ip, int(port))
    if chain.endpoint_of(netuid, hotkey) == wanted:
        return ServeOutcome(UNCHANGED, f"endpoint {ip}:{port} already served on subnet "
                                       f"{netuid}: not serving it again")
    try:
        try:
            chain.serve(netuid, wallet, ip, port)
        except UncertainWriteError as exc:
            if chain.endpoint_of(netuid, hotkey) == wanted:
                return ServeOutcome(SERVED, f"endpoint {ip}:{port} served on subnet {netuid} "
                                            f"(confirmed on chain after: {exc})")
            log.warning("serve of %s:%d may not have landed (%s); the chain does not show it: "
                        "serving again", ip, port, exc)
            chain.serve(netuid, wallet, ip, port)
    except RateLimitedError as exc:
        return ServeOutcome(RATE_LIMITED, f"endpoint {ip}:{port} not served yet, the chain's "
                                          f"serving rate limit applies ({exc}); retrying later")
    return ServeOutcome(SERVED, f"endpoint {ip}:{port} served on subnet {netuid}")
