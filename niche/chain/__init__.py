"""Chain access behind one interface: the bittensor SDK for real networks, SQLite for localnet."""
from niche.chain.base import (
    Chain,
    ChainError,
    Endpoint,
    Metagraph,
    Neuron,
    RateLimitedError,
    UncertainWriteError,
    WeightsResult,
)
from niche.chain.factory import NETWORK_CHOICES, connect

__all__ = [
    "Chain",
    "ChainError",
    "Endpoint",
    "Metagraph",
    "Neuron",
    "RateLimitedError",
    "UncertainWriteError",
    "WeightsResult",
    "NETWORK_CHOICES",
    "connect",
]
