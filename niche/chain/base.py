"""The one interface both chains implement. Miners and validators only ever see this."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from niche.errors import NicheError


class ChainError(NicheError, RuntimeError):
    """A chain operation failed in a way the operator can act on; the message says how.

    A NicheError, so the CLI prints it on one line without a traceback."""


DEREGISTERED_EXIT_CODE = 3
"""Exit status of a neuron that stops because its hotkey is not (or no longer) registered,
or a validator without a validator permit: a restart cannot help, so pm2's
`stop_exit_codes` include it."""


class NotRegisteredError(ChainError):
    """The hotkey holds no uid (or no validator permit) on the subnet: exit code 3."""

    exit_code = DEREGISTERED_EXIT_CODE


class RateLimitedError(ChainError):
    """The chain refused a write because the same one was made too recently (subtensor's
    `ServingRateLimitExceeded`, `SettingWeightsTooFast`): not a failure, retry later."""

    def __init__(self, message: str, *, retry_in_blocks: int | None = None):
        super().__init__(message)
        self.retry_in_blocks = retry_in_blocks


class UncertainWriteError(ChainError):
    """The connection dropped while a write was in flight: it may or may not be on chain.
    Callers read the chain to find out before submitting it again."""


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{self.port}"


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    coldkey: str
    stake: float
    validator_permit: bool
    endpoint: Endpoint | None
    last_update: int
    incentive: float = 0.0
    emission: float = 0.0
    """Per tempo, in the subnet's units (the local chain reports 0)."""
    trust: float = 0.0
    """In [0, 1] (the local chain reports 0)."""


@dataclass(frozen=True)
class Metagraph:
    netuid: int
    block: int
    neurons: tuple[Neuron, ...] = field(default_factory=tuple)

    def by_hotkey(self, hotkey: str) -> Neuron | None:
        return next((n for n in self.neurons if n.hotkey == hotkey), None)

    def require(self, hotkey: str, role: str) -> Neuron:
        """The neuron of `hotkey`, or a ChainError telling the `role` (miner, validator)'s
        operator how to register: the one start-up check both neurons make."""
        neuron = self.by_hotkey(hotkey)
        if neuron is None:
            raise NotRegisteredError(
                f"{role} hotkey {hotkey} is not registered on subnet {self.netuid}: register "
                "it first (`niche chain register ...` on localnet, `btcli subnets register` "
                "on a real network)")
        return neuron

    def by_uid(self, uid: int) -> Neuron | None:
        return next((n for n in self.neurons if n.uid == uid), None)

    def stake_share(self, hotkey: str, missing: float) -> float:
        """`hotkey`'s share of the permitted validators' stake, as a miner sharing its rate
        by stake computes it (1 when no validator holds stake; `missing` when `hotkey` is
        not on the subnet)."""
        permitted = sum(n.stake for n in self.neurons if n.validator_permit)
        neuron = self.by_hotkey(hotkey)
        if neuron is None:
            return missing
        return neuron.stake / permitted if permitted > 0 else 1.0

    @property
    def total_stake(self) -> float:
        return sum(n.stake for n in self.neurons)


@dataclass(frozen=True)
class WeightsResult:
    success: bool
    message: str
    block: int


class Chain(ABC):
    """A subnet's view of the chain. Implementations raise ChainError with actionable text."""

    network: str

    @abstractmethod
    def metagraph(self, netuid: int) -> Metagraph: ...

    @abstractmethod
    def current_block(self) -> int: ...

    @abstractmethod
    def tempo(self, netuid: int) -> int: ...

    @abstractmethod
    def subnet_exists(self, netuid: int) -> bool: ...

    @abstractmethod
    def weights_rate_limit(self, netuid: int) -> int:
        """Blocks that must pass between two set_weights calls of the same hotkey."""

    @abstractmethod
    def serve(self, netuid: int, wallet, ip: str, port: int) -> None:
        """Publish this hotkey's endpoint so validators can reach it. Raises
        RateLimitedError inside the serving rate limit, UncertainWriteError when the
        connection dropped mid-write."""

    def endpoint_of(self, netuid: int, hotkey: str) -> Endpoint | None:
        """The endpoint `hotkey` has published on `netuid` (None: none or not registered)."""
        neuron = self.metagraph(netuid).by_hotkey(hotkey)
        return neuron.endpoint if neuron is not None else None

    @abstractmethod
    def set_weights(
        self,
        netuid: int,
        wallet,
        uids: Sequence[int],
        weights: Sequence[float],
        version_key: int,
    ) -> WeightsResult: ...

    @abstractmethod
    def register(self, netuid: int, wallet, stake: float = 0.0) -> int:
        """Register the wallet's hotkey; returns its uid (already registered: its uid)."""

    def close(self) -> None:  # noqa: B027 - optional: most chains hold nothing to release
        """Release connections; the default has none."""
