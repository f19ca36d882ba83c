"""Pick the chain implementation from the `--subtensor.network` value."""
from __future__ import annotations

from pathlib import Path

from niche.chain.base import Chain, ChainError
from niche.chain.subtensor import SDK_NETWORKS

NETWORK_CHOICES = ("localnet",) + SDK_NETWORKS


def connect(
    network: str,
    localnet_path: Path | str | None = None,
    *,
    chain_endpoint: str | None = None,
) -> Chain:
    """`localnet` -> LocalChain on `localnet_path` (must exist); finney, test, local,
    archive, devnet or a ws(s):// URL -> SubtensorChain. `chain_endpoint` (a URL)
    overrides the endpoint of an SDK network. Anything else -> ChainError."""
    if network == "localnet":
        if localnet_path is None:
            raise ChainError(
                "--subtensor.network localnet needs --localnet.path FILE (the chain file "
                "made by `niche chain create-subnet` or `niche localnet`)"
            )
        from niche.chain.local import LocalChain

        return LocalChain(localnet_path)
    if network in SDK_NETWORKS or network.startswith(("ws://", "wss://")):
        from niche.chain.subtensor import SubtensorChain

        return SubtensorChain(network, chain_endpoint=chain_endpoint)
    raise ChainError(
        f"unknown network {network!r}: use one of {', '.join(NETWORK_CHOICES)} "
        "or a ws:// / wss:// URL"
    )
