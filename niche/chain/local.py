"""An embedded chain in one SQLite file: the localnet and the tests run against it.

Why SQLite: no subtensor node can run here, yet miners, validators and the CLI live in
separate processes and must see one shared state. SQLite in WAL mode with a busy
timeout lets several processes read and write the same file safely; every write runs
in a `BEGIN IMMEDIATE` transaction so two writers queue instead of deadlocking.

What it models (the parts of subtensor a subnet touches): subnets with tempo, weights
rate limit, max uids and immunity period; hotkeys registered with their coldkey and
stake; validator permits (top-K by stake above a minimum); served endpoints with the
serving rate limit (`ServingRateLimitExceeded` on subtensor); weights
with history, version key and rate limit; a block clock driven by wall time; and
incentive computed from the weights with a simplified Yuma consensus (see
`yuma_incentive`). Calls that act for a hotkey are signed by the wallet's hotkey and
the signature is verified, so only the key's holder can act for it.
"""
from __future__ import annotations

import ipaddress
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from niche.chain.base import (
    Chain,
    ChainError,
    Endpoint,
    Metagraph,
    Neuron,
    RateLimitedError,
    WeightsResult,
)

SCHEMA_VERSION = 2
"""2: subnets have a serving rate limit, neurons remember the block they last served."""
DEFAULT_BLOCK_TIME = 1.0  # seconds per block on localnet; the real chain uses 12
BUSY_TIMEOUT_MS = 15_000
KAPPA = 0.5  # share of validator stake that must support a weight for it to count

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS subnets (
    netuid INTEGER PRIMARY KEY,
    tempo INTEGER NOT NULL,
    weights_rate_limit INTEGER NOT NULL,
    max_uids INTEGER NOT NULL,
    immunity_period INTEGER NOT NULL,
    max_validators INTEGER NOT NULL,
    min_validator_stake REAL NOT NULL,
    weights_version INTEGER NOT NULL,
    created_block INTEGER NOT NULL,
    serving_rate_limit INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS neurons (
    netuid INTEGER NOT NULL REFERENCES subnets(netuid),
    uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    coldkey TEXT NOT NULL,
    stake REAL NOT NULL,
    ip TEXT,
    port INTEGER,
    registered_block INTEGER NOT NULL,
    last_update INTEGER NOT NULL,
    last_weights_block INTEGER,
    last_served_block INTEGER,
    PRIMARY KEY (netuid, uid),
    UNIQUE (netuid, hotkey)
);
CREATE TABLE IF NOT EXISTS weight_sets (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    netuid INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    hotkey TEXT NOT NULL,
    block INTEGER NOT NULL,
    version_key INTEGER NOT NULL,
    uids TEXT NOT NULL,
    weights TEXT NOT NULL,
    signature TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS weight_sets_by_uid ON weight_sets (netuid, uid, id);
"""

_RECREATE = (
    "move it away and create a fresh one with "
    "`niche chain create-subnet --localnet.path {path}`"
)


@dataclass(frozen=True)
class SubnetParams:
    netuid: int
    tempo: int
    weights_rate_limit: int
    max_uids: int
    immunity_period: int
    max_validators: int
    min_validator_stake: float
    weights_version: int
    created_block: int
    serving_rate_limit: int = 0


def _hotkey_address(wallet) -> str:
    try:
        return wallet.hotkey.ss58_address
    except Exception as exc:  # missing or locked keyfile
        raise ChainError(f"cannot read the hotkey of wallet {wallet!r}: {exc}") from exc


def _coldkey_address(wallet) -> str:
    try:
        return wallet.coldkeypub.ss58_address
    except Exception as exc:
        raise ChainError(f"cannot read the coldkey of wallet {wallet!r}: {exc}") from exc


def _signed(wallet, action: str, netuid: int, payload: object) -> tuple[str, str]:
    """Sign `payload` with the wallet's hotkey and verify it: proof the caller holds the key.

    Returns (hotkey ss58, signature hex). The message names the action and the subnet so
    a signature cannot be replayed for another call.
    """
    from bittensor.keyfiles import Keypair

    hotkey = _hotkey_address(wallet)
    message = json.dumps([action, netuid, hotkey, payload], sort_keys=True).encode()
    try:
        signature = wallet.hotkey.sign(message)
        valid = Keypair(ss58_address=hotkey).verify(message, signature)
    except Exception as exc:
        raise ChainError(f"{action}: could not sign with the hotkey of {wallet!r}: {exc}") from exc
    if not valid:
        raise ChainError(f"{action}: the signature does not match hotkey {hotkey}")
    return hotkey, bytes(signature).hex()


def yuma_incentive(
    stakes: Sequence[float], weights: Sequence[Sequence[float]], kappa: float = KAPPA
) -> list[float]:
    """Incentive per miner from validator weight rows (a simplified Yuma consensus).

    `stakes[v]` is validator v's stake, `weights[v][j]` its normalised weight on uid j.
    For each uid the consensus weight is the stake-weighted median: the largest value
    that validators holding at least `kappa` of the stake give it or more. Each
    validator's weight is clipped to that consensus (one generous validator cannot
    lift a miner alone), the clipped weights are summed by stake, and the result is
    normalised to sum to 1. All zeros when nobody set weights.
    """
    total_stake = sum(stakes)
    n = len(weights[0]) if weights else 0
    if total_stake <= 0 or n == 0:
        return [0.0] * n
    share = [s / total_stake for s in stakes]
    ranks = []
    for j in range(n):
        column = sorted(((row[j], s) for row, s in zip(weights, share, strict=False)), reverse=True)
        consensus, support = 0.0, 0.0
        for value, s in column:
            support += s
            if support >= kappa - 1e-12:
                consensus = value
                break
        ranks.append(sum(s * min(row[j], consensus)
                         for row, s in zip(weights, share, strict=False)))
    total = sum(ranks)
    return [r / total for r in ranks] if total > 0 else [0.0] * n


class LocalChain(Chain):
    """The chain interface over one SQLite file (see module docstring)."""

    network = "localnet"

    def __init__(
        self,
        path: Path | str,
        *,
        create: bool = False,
        block_time: float = DEFAULT_BLOCK_TIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Open the chain file at `path` (`create=True` makes it if missing).

        `block_time` (seconds per block) only applies when the file is created; it is
        then stored in the file so every process sees the same clock. `clock` returns
        wall time in seconds (tests pass a controllable one).
        """
        self.path = Path(path).expanduser()
        self._clock = clock
        self._lock = threading.RLock()
        self._pid = os.getpid()  # SQLite connections must not be used across fork()
        if not self.path.exists() and not create:
            raise ChainError(
                f"no localnet chain file at {self.path}: create one with "
                f"`niche chain create-subnet --localnet.path {self.path}`"
            )
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(self.path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise ChainError(f"cannot open the chain file {self.path}: {exc}") from exc
        try:
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._open(create, block_time)
        except BaseException as exc:
            self._db.close()  # a refused file must not keep a connection (and its lock) open
            if isinstance(exc, sqlite3.DatabaseError):
                raise ChainError(
                    f"{self.path} is not a readable niche chain file ({exc}): "
                    + _RECREATE.format(path=self.path)
                ) from exc
            raise

    # -- file and clock ------------------------------------------------------------

    def _open(self, create: bool, block_time: float) -> None:
        db = self._db
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            if tables or not create:
                raise ChainError(
                    f"{self.path} is not a niche chain file: " + _RECREATE.format(path=self.path)
                )
            if not (block_time > 0 and math.isfinite(block_time)):
                raise ChainError(f"block_time must be positive seconds, got {block_time}")
            db.execute("PRAGMA journal_mode = WAL")
            with self._write():
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                for key, value in (
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("genesis_time", repr(self._clock())),
                    ("block_time", repr(float(block_time))),
                ):
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, value))
        meta = dict(db.execute("SELECT key, value FROM meta"))
        version = meta.get("schema_version")
        if version != str(SCHEMA_VERSION):
            raise ChainError(
                f"{self.path} has chain schema version {version}, this niche reads version "
                f"{SCHEMA_VERSION}: " + _RECREATE.format(path=self.path)
            )
        try:
            self._genesis = float(meta["genesis_time"])
            self.block_time = float(meta["block_time"])
        except (KeyError, ValueError) as exc:
            raise ChainError(
                f"{self.path} has a damaged meta table: " + _RECREATE.format(path=self.path)
            ) from exc

    @contextmanager
    def _sqlite_errors(self):
        """A locked or failing file is a chain error (callers retry those), not a crash.

        A connection inherited through fork() shares the parent's file locks, and SQLite can
        then lose writes; such a use is refused before it touches the file."""
        if os.getpid() != self._pid:
            raise ChainError(
                f"this LocalChain for {self.path} was opened in process {self._pid} and "
                f"inherited by fork(): open a new LocalChain in process {os.getpid()}"
            )
        try:
            yield
        except sqlite3.OperationalError as exc:
            raise ChainError(f"local chain {self.path} unavailable: {exc}") from exc

    class _Tx:
        def __init__(self, chain: LocalChain):
            self.chain = chain

        def __enter__(self):
            self.chain._lock.acquire()
            try:
                with self.chain._sqlite_errors():
                    self.chain._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.chain._lock.release()
                raise
            return self.chain._db

        def __exit__(self, exc_type, exc, tb):
            try:
                with self.chain._sqlite_errors():
                    try:
                        self.chain._db.execute("ROLLBACK" if exc_type else "COMMIT")
                    except sqlite3.OperationalError:
                        if self.chain._db.in_transaction:
                            self.chain._db.execute("ROLLBACK")
                        raise
            finally:
                self.chain._lock.release()
            return False

    def _write(self) -> LocalChain._Tx:
        """A write transaction: takes SQLite's write lock up front so writers queue."""
        return LocalChain._Tx(self)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock, self._sqlite_errors():
            cur = self._db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row, strict=False)) for row in cur.fetchall()]

    def current_block(self) -> int:
        return max(0, int((self._clock() - self._genesis) / self.block_time))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- subnets -------------------------------------------------------------------

    def create_subnet(
        self,
        netuid: int | None = None,
        *,
        tempo: int = 20,
        weights_rate_limit: int = 5,
        max_uids: int = 64,
        immunity_period: int = 50,
        max_validators: int = 8,
        min_validator_stake: float = 1.0,
        weights_version: int = 0,
        serving_rate_limit: int = 0,
        exist_ok: bool = False,
    ) -> int:
        """Create a subnet (next free netuid >= 1 when `netuid` is None); returns its netuid."""
        for name, value, low in (
            ("tempo", tempo, 1), ("weights_rate_limit", weights_rate_limit, 0),
            ("max_uids", max_uids, 1), ("immunity_period", immunity_period, 0),
            ("max_validators", max_validators, 1), ("weights_version", weights_version, 0),
            ("serving_rate_limit", serving_rate_limit, 0),
        ):
            if int(value) != value or value < low:
                raise ChainError(f"{name} must be an integer >= {low}, got {value}")
        if not (min_validator_stake >= 0 and math.isfinite(min_validator_stake)):
            raise ChainError(f"min_validator_stake must be >= 0, got {min_validator_stake}")
        if netuid is not None and not 0 <= netuid < 65536:
            raise ChainError(f"netuid must be in 0..65535, got {netuid}")
        with self._write() as db:
            if netuid is None:
                row = db.execute("SELECT COALESCE(MAX(netuid), 0) + 1 FROM subnets").fetchone()
                netuid = int(row[0])
            elif db.execute("SELECT 1 FROM subnets WHERE netuid=?", (netuid,)).fetchone():
                if exist_ok:
                    return netuid
                raise ChainError(f"subnet {netuid} already exists in {self.path}")
            db.execute(
                "INSERT INTO subnets VALUES (?,?,?,?,?,?,?,?,?,?)",
                (netuid, tempo, weights_rate_limit, max_uids, immunity_period, max_validators,
                 float(min_validator_stake), weights_version, self.current_block(),
                 serving_rate_limit),
            )
        return netuid

    def subnet(self, netuid: int) -> SubnetParams:
        rows = self._rows("SELECT * FROM subnets WHERE netuid=?", (netuid,))
        if not rows:
            known = [r["netuid"] for r in self._rows("SELECT netuid FROM subnets ORDER BY netuid")]
            raise ChainError(
                f"subnet {netuid} does not exist on localnet {self.path} (subnets: "
                f"{known or 'none'}): create it with `niche chain create-subnet "
                f"--localnet.path {self.path} --netuid {netuid}`"
            )
        return SubnetParams(**rows[0])

    def subnets(self) -> list[int]:
        return [r["netuid"] for r in self._rows("SELECT netuid FROM subnets ORDER BY netuid")]

    def subnet_exists(self, netuid: int) -> bool:
        return bool(self._rows("SELECT 1 AS x FROM subnets WHERE netuid=?", (netuid,)))

    def tempo(self, netuid: int) -> int:
        return self.subnet(netuid).tempo

    def weights_rate_limit(self, netuid: int) -> int:
        return self.subnet(netuid).weights_rate_limit

    # -- neurons -------------------------------------------------------------------

    def register(self, netuid: int, wallet, stake: float = 0.0) -> int:
        """Register the wallet's hotkey under its coldkey; returns the uid.

        Localnet has no TAO: `stake` is granted directly (a faucet). An already
        registered hotkey keeps its uid; a positive `stake` then replaces its stake.
        A full subnet replaces the non-immune neuron with the lowest incentive
        (validator-permit holders last, since they would earn dividends).
        """
        if not (stake >= 0 and math.isfinite(stake)):
            raise ChainError(f"stake must be a non-negative number, got {stake}")
        params = self.subnet(netuid)
        coldkey = _coldkey_address(wallet)
        hotkey, _ = _signed(wallet, "register", netuid, {"coldkey": coldkey, "stake": stake})
        block = self.current_block()
        incentive = self._incentive_by_uid(netuid, block)
        with self._write() as db:
            owner = db.execute(
                "SELECT coldkey FROM neurons WHERE hotkey=? LIMIT 1", (hotkey,)
            ).fetchone()
            if owner and owner[0] != coldkey:
                raise ChainError(
                    f"hotkey {hotkey} is already owned by coldkey {owner[0]}, not {coldkey}"
                )
            row = db.execute(
                "SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (netuid, hotkey)
            ).fetchone()
            if row:
                if stake > 0:
                    db.execute(
                        "UPDATE neurons SET stake=? WHERE netuid=? AND uid=?",
                        (float(stake), netuid, row[0]),
                    )
                return int(row[0])
            taken = db.execute(
                "SELECT uid, registered_block FROM neurons WHERE netuid=? ORDER BY uid", (netuid,)
            ).fetchall()
            used = {u for u, _ in taken}
            free = next((u for u in range(params.max_uids) if u not in used), None)
            if free is None:
                # Real chain: lowest emission goes. Here validators earn no incentive,
                # so permit holders (they would earn dividends) go last.
                permits = self._permits(db, params)
                prunable = [
                    (u in permits, incentive.get(u, 0.0), reg, u) for u, reg in taken
                    if block - reg >= params.immunity_period
                ]
                if not prunable:
                    raise ChainError(
                        f"subnet {netuid} is full ({params.max_uids} uids) and every neuron is "
                        f"still immune: retry in a few blocks"
                    )
                free = min(prunable)[3]
                db.execute("DELETE FROM neurons WHERE netuid=? AND uid=?", (netuid, free))
            db.execute(
                "INSERT INTO neurons (netuid, uid, hotkey, coldkey, stake, registered_block, "
                "last_update) VALUES (?,?,?,?,?,?,?)",
                (netuid, free, hotkey, coldkey, float(stake), block, block),
            )
            return int(free)

    def set_stake(self, netuid: int, hotkey: str, stake: float) -> None:
        """Localnet admin: set a registered hotkey's stake (no TAO exists here)."""
        if not (stake >= 0 and math.isfinite(stake)):
            raise ChainError(f"stake must be a non-negative number, got {stake}")
        with self._write() as db:
            cur = db.execute(
                "UPDATE neurons SET stake=? WHERE netuid=? AND hotkey=?", (stake, netuid, hotkey)
            )
            if cur.rowcount == 0:
                raise ChainError(f"hotkey {hotkey} is not registered on subnet {netuid}")

    def _uid_of(self, db, netuid: int, hotkey: str) -> int:
        row = db.execute(
            "SELECT uid FROM neurons WHERE netuid=? AND hotkey=?", (netuid, hotkey)
        ).fetchone()
        if row is None:
            raise ChainError(
                f"hotkey {hotkey} is not registered on subnet {netuid}: register it with "
                f"`niche chain register --subtensor.network localnet --localnet.path "
                f"{self.path} --netuid {netuid} --wallet.name ... --wallet.hotkey ...`"
            )
        return int(row[0])

    def serve(self, netuid: int, wallet, ip: str, port: int) -> None:
        """Publish the endpoint. Like subtensor, every serve (even of the same endpoint)
        counts against the subnet's serving rate limit: a second one within
        `serving_rate_limit` blocks raises RateLimitedError and changes nothing."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError as exc:
            raise ChainError(f"serve: {ip!r} is not an IP address") from exc
        if not 0 < int(port) < 65536:
            raise ChainError(f"serve: port must be in 1..65535, got {port}")
        params = self.subnet(netuid)
        hotkey, _ = _signed(wallet, "serve", netuid, {"ip": str(address), "port": int(port)})
        block = self.current_block()
        with self._write() as db:
            uid = self._uid_of(db, netuid, hotkey)
            (last,) = db.execute(
                "SELECT last_served_block FROM neurons WHERE netuid=? AND uid=?", (netuid, uid)
            ).fetchone()
            if last is not None and block - last < params.serving_rate_limit:
                wait = params.serving_rate_limit - (block - last)
                raise RateLimitedError(
                    f"serve: ServingRateLimitExceeded: served {block - last} blocks ago, the "
                    f"limit is {params.serving_rate_limit} blocks; retry in {wait} blocks",
                    retry_in_blocks=wait)
            db.execute(
                "UPDATE neurons SET ip=?, port=?, last_served_block=? WHERE netuid=? AND uid=?",
                (str(address), int(port), block, netuid, uid),
            )

    def set_weights(
        self,
        netuid: int,
        wallet,
        uids: Sequence[int],
        weights: Sequence[float],
        version_key: int,
    ) -> WeightsResult:
        """Record a validator's weights.

        Raises ChainError for wiring mistakes (unknown subnet, unregistered hotkey,
        malformed vectors); returns success=False for what the real chain would reject
        in routine operation (rate limit, no validator permit, old version key).
        """
        params = self.subnet(netuid)
        uids = [int(u) for u in uids]
        values = [float(w) for w in weights]
        if len(uids) != len(values):
            raise ChainError(f"set_weights: {len(uids)} uids but {len(values)} weights")
        if len(set(uids)) != len(uids):
            raise ChainError("set_weights: duplicate uids")
        if any(not math.isfinite(w) or w < 0 for w in values):
            raise ChainError("set_weights: weights must be finite and non-negative")
        total = sum(values)
        if total <= 0:
            raise ChainError("set_weights: all weights are zero")
        normalised = [w / total for w in values]
        hotkey, signature = _signed(
            wallet, "set_weights", netuid,
            {"uids": uids, "weights": normalised, "version_key": int(version_key)},
        )
        block = self.current_block()
        with self._write() as db:
            uid = self._uid_of(db, netuid, hotkey)
            existing = {
                r[0] for r in db.execute("SELECT uid FROM neurons WHERE netuid=?", (netuid,))
            }
            unknown = sorted(set(uids) - existing)
            if unknown:
                raise ChainError(f"set_weights: uids {unknown} are not on subnet {netuid}")
            if int(version_key) < params.weights_version:
                return WeightsResult(
                    False, f"version_key {version_key} is older than the subnet's required "
                    f"{params.weights_version}: update niche", block,
                )
            permits = self._permits(db, params)
            if uid not in permits and uids != [uid]:
                return WeightsResult(
                    False, f"uid {uid} has no validator permit on subnet {netuid} (top "
                    f"{params.max_validators} by stake, at least {params.min_validator_stake})",
                    block,
                )
            (last,) = db.execute(
                "SELECT last_weights_block FROM neurons WHERE netuid=? AND uid=?", (netuid, uid)
            ).fetchone()
            if last is not None and block - last < params.weights_rate_limit:
                wait = params.weights_rate_limit - (block - last)
                return WeightsResult(
                    False, f"rate limited: weights set {block - last} blocks ago, the limit is "
                    f"{params.weights_rate_limit} blocks; retry in {wait} blocks", block,
                )
            db.execute(
                "INSERT INTO weight_sets (netuid, uid, hotkey, block, version_key, uids, "
                "weights, signature) VALUES (?,?,?,?,?,?,?,?)",
                (netuid, uid, hotkey, block, int(version_key), json.dumps(uids),
                 json.dumps(normalised), signature),
            )
            db.execute(
                "UPDATE neurons SET last_weights_block=?, last_update=? WHERE netuid=? AND uid=?",
                (block, block, netuid, uid),
            )
        return WeightsResult(True, f"weights set for {len(uids)} uids at block {block}", block)

    def weights_history(self, netuid: int, hotkey: str | None = None) -> list[dict]:
        """Every recorded weight set on `netuid` (optionally one hotkey's), oldest first."""
        sql = "SELECT * FROM weight_sets WHERE netuid=?" + (" AND hotkey=?" if hotkey else "")
        rows = self._rows(sql + " ORDER BY id", (netuid, hotkey) if hotkey else (netuid,))
        for r in rows:
            r["uids"], r["weights"] = json.loads(r["uids"]), json.loads(r["weights"])
        return rows

    # -- consensus -----------------------------------------------------------------

    def _permits(self, db, params: SubnetParams) -> set[int]:
        rows = db.execute(
            "SELECT uid FROM neurons WHERE netuid=? AND stake>=? AND stake>0 "
            "ORDER BY stake DESC, uid ASC LIMIT ?",
            (params.netuid, params.min_validator_stake, params.max_validators),
        ).fetchall()
        return {int(r[0]) for r in rows}

    def _incentive_by_uid(self, netuid: int, block: int) -> dict[int, float]:
        params = self.subnet(netuid)
        with self._lock, self._sqlite_errors():
            return self._incentive(self._db, params, block)

    def _incentive(self, db, params: SubnetParams, block: int) -> dict[int, float]:
        neurons = db.execute(
            "SELECT uid, hotkey, stake, registered_block FROM neurons WHERE netuid=? ORDER BY uid",
            (params.netuid,),
        ).fetchall()
        if not neurons:
            return {}
        index = {uid: i for i, (uid, _, _, _) in enumerate(neurons)}
        registered = {uid: reg for uid, _, _, reg in neurons}
        permits = self._permits(db, params)
        stakes, rows = [], []
        for uid, hotkey, stake, _ in neurons:
            if uid not in permits:
                continue
            latest = db.execute(
                "SELECT block, uids, weights FROM weight_sets "
                "WHERE netuid=? AND uid=? AND hotkey=? "
                "ORDER BY id DESC LIMIT 1",
                (params.netuid, uid, hotkey),
            ).fetchone()
            if latest is None:
                continue
            set_block, targets, values = latest[0], json.loads(latest[1]), json.loads(latest[2])
            row = [0.0] * len(neurons)
            for target, value in zip(targets, values, strict=False):
                # Weights set before a uid changed hands do not count for its new owner.
                if target in index and registered[target] <= set_block:
                    row[index[target]] = value
            total = sum(row)
            if total > 0:
                stakes.append(stake)
                rows.append([v / total for v in row])
        incentive = yuma_incentive(stakes, rows)
        return {uid: (incentive[i] if incentive else 0.0) for uid, i in index.items()}

    def metagraph(self, netuid: int) -> Metagraph:
        params = self.subnet(netuid)
        block = self.current_block()
        with self._lock, self._sqlite_errors():
            self._db.execute("BEGIN")  # one consistent snapshot for all reads below
            try:
                permits = self._permits(self._db, params)
                incentive = self._incentive(self._db, params, block)
                rows = self._db.execute(
                    "SELECT uid, hotkey, coldkey, stake, ip, port, last_update FROM neurons "
                    "WHERE netuid=? ORDER BY uid",
                    (netuid,),
                ).fetchall()
            finally:
                self._db.execute("COMMIT")
        neurons = tuple(
            Neuron(
                uid=uid, hotkey=hotkey, coldkey=coldkey, stake=float(stake),
                validator_permit=uid in permits,
                endpoint=Endpoint(ip, int(port)) if ip and port else None,
                last_update=int(last_update), incentive=incentive.get(uid, 0.0),
            )
            for uid, hotkey, coldkey, stake, ip, port, last_update in rows
        )
        return Metagraph(netuid=netuid, block=block, neurons=neurons)
