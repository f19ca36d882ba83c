"""The chain interface over the bittensor 11 SDK (`bt.Subtensor`), for finney/test/local.

Every SDK read goes through `_call`: transport failures (node down, socket closed,
timeouts) are retried with bounded exponential backoff, then reported as one
ChainError naming the endpoint; on-chain rejections are not retried. Writes are
never resubmitted blindly: the SDK's own `retries` (transaction-pool rejections such as
a nonce race, one block apart) are used, a connection lost mid-write is an
UncertainWriteError that the caller resolves by reading the chain (serve: the axon;
weights: the hotkey's last-update block), and a rate-limit rejection is a
RateLimitedError ("retry later"). Weight setting
uses the SDK's `SetWeights` intent, which reads the subnet's commit-reveal setting
and submits either plaintext weights or a timelocked commit that the chain reveals
itself; we report which path was taken.

No subtensor node can run in this project's test environment: the tests inject a
fake of the SDK object through `sdk=` (see docs/chain.md).
"""
from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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

T = TypeVar("T")

SDK_NETWORKS = ("finney", "test", "local", "archive", "devnet")


def _transient_errors() -> tuple[type[BaseException], ...]:
    import bittensor as bt

    return (bt.RpcConnectionError, bt.ConnectionNotReady, ConnectionError, TimeoutError, OSError)


def _tao(value: Any) -> float:
    return float(getattr(value, "tao", value) or 0.0)


def _rate_limited(result: Any) -> bool:
    """A failed ExtrinsicResult the chain refused for a rate limit."""
    from bittensor.result import ErrorCode

    error = getattr(result, "error", None)
    if error is not None and getattr(error, "code", None) == ErrorCode.RATE_LIMITED:
        return True
    return "ratelimit" in (result.message or "").lower().replace(" ", "").replace("_", "")


def parse_axon(axon: str | None) -> Endpoint | None:
    """`ip:port` or `[v6]:port` from the SDK metagraph -> Endpoint (None when not served)."""
    if not axon:
        return None
    host, _, port = axon.rpartition(":")
    host = host.strip("[]")
    try:
        if int(ipaddress.ip_address(host)) == 0 or not 0 < int(port) < 65536:
            return None
    except ValueError:
        return None
    return Endpoint(host, int(port))


class SubtensorChain(Chain):
    """`Chain` backed by a real subtensor node through the bittensor SDK."""

    def __init__(
        self,
        network: str = "finney",
        *,
        chain_endpoint: str | None = None,
        sdk: Any = None,
        retries: int = 3,
        write_retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`network`: finney, test, local, archive, devnet or a ws(s):// URL;
        `chain_endpoint` overrides the URL. `sdk`: an object with `bt.Subtensor`'s
        surface (tests inject a fake). Reads are tried `retries + 1` times; writes pass
        `write_retries` to the SDK's `execute(..., retries=)`."""
        target = chain_endpoint or network
        if not (target in SDK_NETWORKS or target.startswith(("ws://", "wss://"))):
            raise ChainError(
                f"unknown subtensor network {target!r}: use one of {', '.join(SDK_NETWORKS)}, "
                "a ws:// or wss:// URL, or localnet"
            )
        self.network = network
        self.endpoint = target
        self.retries = max(0, int(retries))
        self.write_retries = max(0, int(write_retries))
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        if sdk is None:
            import bittensor as bt

            sdk = bt.Subtensor(target)
        self._sdk = sdk

    # -- plumbing --------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        import bittensor as bt

        transient = _transient_errors()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except ChainError:
                raise
            except bt.ChainError as exc:
                raise ChainError(f"{what} rejected by the chain: {exc}. {exc.remediation}") from exc
            except transient as exc:
                if attempt == self.retries:
                    raise ChainError(
                        f"cannot reach subtensor at {self.endpoint} ({what}) after "
                        f"{self.retries + 1} attempts: {exc}. Check that the node is up and "
                        "--subtensor.network / --subtensor.chain_endpoint"
                    ) from exc
                self._sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
            except bt.BittensorError as exc:
                raise ChainError(f"{what} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _require_subnet(self, netuid: int) -> None:
        if not self.subnet_exists(netuid):
            raise ChainError(
                f"subnet {netuid} does not exist on {self.network}: check --netuid"
            )

    # -- reads -----------------------------------------------------------------------

    def current_block(self) -> int:
        return int(self._call("read the current block", lambda: self._sdk.block))

    def subnet_exists(self, netuid: int) -> bool:
        import bittensor as bt

        item = bt.storage.SubtensorModule.NetworksAdded
        return bool(self._call(f"check subnet {netuid}", lambda: self._sdk.query(item, [netuid])))

    def tempo(self, netuid: int) -> int:
        self._require_subnet(netuid)
        info = self._call(f"read subnet {netuid}", lambda: self._sdk.subnets.info(netuid))
        return int(info.tempo)

    def weights_rate_limit(self, netuid: int) -> int:
        self._require_subnet(netuid)
        return int(self._call(
            f"read weights_rate_limit of subnet {netuid}",
            lambda: self._sdk.hyperparameters.weights_rate_limit(netuid),
        ))

    def commit_reveal_enabled(self, netuid: int) -> bool:
        return bool(self._call(
            f"read commit_reveal_enabled of subnet {netuid}",
            lambda: self._sdk.subnets.commit_reveal_enabled(netuid),
        ))

    def metagraph(self, netuid: int) -> Metagraph:
        mg = self._call(
            f"read the metagraph of subnet {netuid}",
            lambda: self._sdk.subnets.metagraph(netuid, commitments=False),
        )
        if mg is None:
            raise ChainError(f"subnet {netuid} does not exist on {self.network}: check --netuid")
        neurons = tuple(
            Neuron(
                uid=int(n.uid), hotkey=n.hotkey, coldkey=n.coldkey,
                stake=_tao(n.total_stake), validator_permit=bool(n.validator_permit),
                endpoint=parse_axon(n.axon), last_update=int(n.last_update),
                incentive=float(n.incentive),
                emission=_tao(getattr(n, "emission", 0.0)), trust=float(getattr(n, "trust", 0.0)),
            )
            for n in mg.neurons
        )
        return Metagraph(netuid=netuid, block=int(mg.block), neurons=neurons)

    def uid_of(self, netuid: int, hotkey: str) -> int | None:
        uid = self._call(
            f"look up hotkey {hotkey} on subnet {netuid}",
            lambda: self._sdk.neurons.uid(hotkey, netuid),
        )
        return None if uid is None else int(uid)

    def burn_cost(self, netuid: int) -> float:
        return _tao(self._call(f"read the burn of subnet {netuid}",
                               lambda: self._sdk.subnets.burn(netuid)))

    # -- writes ----------------------------------------------------------------------

    def _submit(self, what: str, intent: Any, wallet: Any) -> Any:
        """One write through the SDK (its own retries for pool rejections, waiting for
        inclusion). Rate limits -> RateLimitedError; a lost connection ->
        UncertainWriteError (it may have landed; never resubmitted here)."""
        import bittensor as bt
        from bittensor.result import ErrorCode

        try:
            return self._sdk.execute(intent, wallet, retries=self.write_retries,
                                     wait_for_inclusion=True, wait_for_finalization=False)
        except bt.ChainError as exc:
            if exc.code == ErrorCode.RATE_LIMITED:
                raise RateLimitedError(f"{what}: {exc}") from exc
            raise
        except _transient_errors() as exc:
            raise UncertainWriteError(
                f"{what}: connection to {self.endpoint} lost while the write was in flight "
                f"({exc}); it may have landed") from exc

    def _execute(self, what: str, intent: Any, wallet: Any) -> Any:
        result = self._call(what, lambda: self._submit(what, intent, wallet))
        if not result.success:
            error = getattr(result, "error", None)
            if _rate_limited(result):
                raise RateLimitedError(f"{what}: {result.message or error}")
            hint = f" {error.remediation}" if error is not None else ""
            raise ChainError(f"{what} failed on chain: {result.message or error}.{hint}")
        return result

    def serve(self, netuid: int, wallet, ip: str, port: int) -> None:
        import bittensor as bt

        self._execute(
            f"serve {ip}:{port} on subnet {netuid}",
            bt.ServeAxon(netuid=netuid, ip=ip, port=int(port)), wallet,
        )

    def set_weights(
        self,
        netuid: int,
        wallet,
        uids: Sequence[int],
        weights: Sequence[float],
        version_key: int,
    ) -> WeightsResult:
        """Submit through the SDK's SetWeights (it clips, quantises and commits when the
        subnet runs commit-reveal). Rate limit and permit rejections come back as
        success=False; transport failures raise ChainError."""
        import bittensor as bt
        from bittensor.result import ErrorCode

        self._require_subnet(netuid)
        commit_reveal = self.commit_reveal_enabled(netuid)
        intent = bt.SetWeights(
            netuid=netuid, uids=[int(u) for u in uids], weights=[float(w) for w in weights],
            version_key=int(version_key),
        )

        hotkey = wallet.hotkey.ss58_address
        what = f"set weights on subnet {netuid}"

        def submit():
            try:
                return self._submit(what, intent, wallet)
            except RateLimitedError as exc:
                return exc
            except bt.ChainError as exc:
                if exc.code == ErrorCode.NOT_REGISTERED:
                    raise ChainError(
                        f"the wallet's hotkey is not registered on subnet {netuid}: register "
                        "it first (`niche chain register`)"
                    ) from exc
                return exc

        before = self.current_block()
        try:
            outcome = self._call(what, submit)
        except UncertainWriteError as exc:
            if self._weights_landed(netuid, hotkey, before):
                return WeightsResult(True, f"weights confirmed on chain (last update at or "
                                           f"after block {before}) after: {exc}",
                                     self.current_block())
            outcome = self._call(what, submit)  # not on chain: one more submission
        if isinstance(outcome, Exception):
            return WeightsResult(False, str(outcome), self.current_block())
        block = self.current_block()
        if not outcome.success:
            return WeightsResult(False, outcome.message or str(outcome.error), block)
        if commit_reveal:
            reveal = (outcome.data or {}).get("reveal_round")
            return WeightsResult(
                True, f"weights committed (commit-reveal); the chain reveals them at drand "
                f"round {reveal}", block,
            )
        return WeightsResult(True, outcome.message or "weights set", block)

    def _weights_landed(self, netuid: int, hotkey: str, since_block: int) -> bool:
        """Did a weights write of `hotkey` land at or after `since_block`? (its neuron's
        last-update block moves whenever its weights are set or committed)."""
        neuron = self.metagraph(netuid).by_hotkey(hotkey)
        return neuron is not None and neuron.last_update >= since_block

    def register(self, netuid: int, wallet, stake: float = 0.0) -> int:
        """Burned registration (pays the subnet's burn from the coldkey); returns the uid."""
        import bittensor as bt

        if stake:
            raise ChainError(
                "--stake only applies to localnet; on a real network stake with "
                "`btcli stake add`"
            )
        self._require_subnet(netuid)
        hotkey = wallet.hotkey.ss58_address
        uid = self.uid_of(netuid, hotkey)
        if uid is not None:
            return uid
        self._execute(f"burned register on subnet {netuid}",
                      bt.BurnedRegister(netuid=netuid), wallet)
        uid = self.uid_of(netuid, hotkey)
        if uid is None:
            raise ChainError(
                f"registration on subnet {netuid} was accepted but hotkey {hotkey} has no uid "
                "yet: check again in a block (`niche chain metagraph`)"
            )
        return uid

    def close(self) -> None:
        close = getattr(self._sdk, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):  # best-effort teardown
                close()
