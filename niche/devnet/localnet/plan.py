"""Prepare a local subnet: tiny checkpoints, a chain file, wallets with stake, free ports.

The result is a `LocalnetPlan`: the exact `niche ...` command of every process. `niche
localnet` runs it under its own supervisor; configs/pm2/localnet.config.js runs the same
plan under pm2 (it calls `niche localnet prepare --json`).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from niche.devnet.localnet.cheat_names import CHEATS
from niche.devnet.localnet.supervisor import free_port
from niche.errors import ConfigError

DEFAULT_NETUID = 1
MINER_STAKE = 10.0
VALIDATOR_STAKE = 1000.0


@dataclass
class ProcessPlan:
    name: str
    role: str  # "miner" | "validator" | "gateway"
    hotkey_name: str
    hotkey: str
    args: list[str]  # after `niche`
    model: str | None = None
    port: int | None = None
    cheat: str | None = None
    state_path: str | None = None
    log_path: str | None = None


@dataclass
class LocalnetPlan:
    workdir: str
    chain_path: str
    netuid: int
    wallet_path: str
    model_root: str
    rounds: int | None
    processes: list[ProcessPlan] = field(default_factory=list)
    gateway_url: str | None = None
    gateway_key: str | None = None
    """A ready API key of the gateway (a local, throw-away subnet: printed and kept here)."""
    dashboard_url: str | None = None
    """validator1's subnet dashboard (niche/validator/dashboard.py) on 127.0.0.1."""

    def role(self, role: str) -> list[ProcessPlan]:
        return [p for p in self.processes if p.role == role]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _chain_and_wallet_args(plan_chain: str, netuid: int, wallet_path: Path, name: str,
                           hotkey: str) -> list[str]:
    return [
        "--netuid", str(netuid),
        "--subtensor.network", "localnet", "--localnet.path", plan_chain,
        "--wallet.name", name, "--wallet.hotkey", hotkey, "--wallet.path", str(wallet_path),
    ]


LOCALNET_UIDS = 64
"""The local subnet's uids (LocalChain.create_subnet's max_uids): miners and validators."""


def check_arguments(*, miners: int, validators: int, models: Sequence[str],
                    cheats: Sequence[str], rounds: int | None, audit_fraction: float) -> None:
    """ConfigError (exit 2) for a localnet that cannot run as asked, before anything is
    created on disk or a child is started."""
    from niche.models.spec import available_models

    if miners < 1 or validators < 1:
        raise ConfigError("localnet needs at least one miner and one validator")
    if miners + validators > LOCALNET_UIDS:
        raise ConfigError(f"--miners {miners} and --validators {validators} need "
                          f"{miners + validators} uids; the local subnet has {LOCALNET_UIDS}: "
                          f"run at most {LOCALNET_UIDS - validators} miners")
    unknown = sorted(set(models) - set(available_models()))
    if unknown:
        raise ConfigError(f"--models: unknown {unknown}; known: {available_models()}")
    bad = sorted(set(cheats) - set(CHEATS))
    if bad:
        raise ConfigError(f"--cheat: unknown {bad}; choose from {list(CHEATS)}")
    if len(cheats) > miners:  # each cheat takes one miner: an extra one would be dropped
        raise ConfigError(f"--cheat given {len(cheats)} times for {miners} miner(s): each "
                          f"cheat makes one miner dishonest; pass --miners {len(cheats)} or "
                          f"more (--miners {len(cheats) + 1} keeps an honest miner1)")
    if rounds is not None and rounds < 1:
        raise ConfigError(f"--rounds must be at least 1, not {rounds} (leave it out to run "
                          "until Ctrl-C)")
    if not 0.0 <= audit_fraction <= 1.0:
        raise ConfigError(f"--audit-fraction must be in [0, 1] (the share of answers the "
                          f"validator audits), not {audit_fraction}")


def prepare(
    workdir: Path,
    *,
    miners: int = 3,
    validators: int = 1,
    models: Sequence[str] = ("flux-schnell", "kolors"),
    cheats: Sequence[str] = (),
    rounds: int | None = 2,
    netuid: int = DEFAULT_NETUID,
    model_root: Path | None = None,
    fresh: bool = True,
    block_time: float = 1.0,
    sample_size: int | None = None,
    audit_fraction: float = 1.0,
    round_interval: float = 2.0,
    gateway: bool = True,
    miner1_args: Sequence[str] = (),
) -> LocalnetPlan:
    """Create (or, with fresh=False, reuse) everything a local subnet needs under workdir.
    `miner1_args` are extra `niche miner` flags for miner1 (an engine backend, say)."""
    from niche.chain.local import LocalChain
    from niche.chain.wallets import create_wallet
    from niche.devnet.tiny import ensure_tiny_models

    check_arguments(miners=miners, validators=validators, models=models, cheats=cheats,
                    rounds=rounds, audit_fraction=audit_fraction)

    workdir = Path(workdir).expanduser().resolve()
    if fresh and workdir.exists():
        for child in ("chain.sqlite", "chain.sqlite-wal", "chain.sqlite-shm", "state", "logs",
                      "gateway"):
            target = workdir / child
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    workdir.mkdir(parents=True, exist_ok=True)
    root = Path(model_root) if model_root else ensure_tiny_models()
    chain_path = workdir / "chain.sqlite"
    wallet_path = workdir / "wallets"

    chain = LocalChain(chain_path, create=True, block_time=block_time)
    try:
        chain.create_subnet(netuid, tempo=10, weights_rate_limit=1, exist_ok=True,
                            max_validators=max(1, validators),
                            min_validator_stake=VALIDATOR_STAKE / 2)
        plan = LocalnetPlan(str(workdir), str(chain_path), netuid, str(wallet_path), str(root),
                            rounds)
        plan_dashboard: str | None = None
        allow: list[str] = []
        queue = workdir / "gateway" / "organic.sqlite"
        for index in range(validators):
            name = f"validator{index + 1}"
            wallet = create_wallet("localnet", name, wallet_path)
            chain.register(netuid, wallet, stake=VALIDATOR_STAKE)
            allow.append(wallet.hotkey.ss58_address)
            state = workdir / "state" / f"{name}.sqlite"
            args = ["validator", *_chain_and_wallet_args(str(chain_path), netuid, wallet_path,
                                                          "localnet", name),
                    "--models", *models, "--model-path", str(root),
                    "--neuron.state_path", str(state),
                    "--neuron.epoch_length", "1",
                    "--neuron.audit_fraction", str(audit_fraction),
                    "--neuron.round_interval", str(round_interval),
                    "--neuron.seed", str(1000 + index)]
            if sample_size:
                args += ["--neuron.sample_size", str(sample_size)]
            if gateway and index == 0:
                args += ["--neuron.organic_queue", str(queue)]
            if index == 0:
                dashboard_port = free_port()
                plan_dashboard = f"http://127.0.0.1:{dashboard_port}/"
                args += ["--dashboard.port", str(dashboard_port)]
            if rounds:
                args += ["--neuron.rounds", str(rounds)]
            plan.processes.append(ProcessPlan(name, "validator", name, wallet.hotkey.ss58_address,
                                              args, state_path=str(state),
                                              log_path=str(workdir / "logs" / f"{name}.log")))
        plan.dashboard_url = plan_dashboard
        cheat_list = list(cheats)
        for index in range(miners):
            name = f"miner{index + 1}"
            model = models[index % len(models)]
            # Cheaters take the last slots so miner1.. stay honest references.
            cheat = cheat_list[index - (miners - len(cheat_list))] \
                if index >= miners - len(cheat_list) else None
            wallet = create_wallet("localnet", name, wallet_path)
            chain.register(netuid, wallet, stake=MINER_STAKE)
            port = free_port()
            args = ["miner", *_chain_and_wallet_args(str(chain_path), netuid, wallet_path,
                                                      "localnet", name),
                    "--axon.ip", "127.0.0.1", "--axon.port", str(port),
                    "--model", model, "--model-path", str(root),
                    "--states.path", str(workdir / "state" / f"{name}-states.sqlite"),
                    "--blacklist.allow_hotkeys", *allow]
            if cheat:
                args += ["--localnet.cheat", cheat]
            if index == 0:
                args += list(miner1_args)
            plan.processes.append(ProcessPlan(name, "miner", name, wallet.hotkey.ss58_address,
                                              args, model=model, port=port, cheat=cheat,
                                              log_path=str(workdir / "logs" / f"{name}.log")))
        if gateway:
            _add_gateway(plan, workdir, models, queue)
    finally:
        chain.close()
    (workdir / "plan.json").write_text(plan.to_json())
    return plan


def _add_gateway(plan: LocalnetPlan, workdir: Path, models: Sequence[str], queue: Path) -> None:
    """The OpenAI-compatible gateway beside validator1 (its hotkey, its scores, its audit
    queue), and one API key for the person running the localnet."""
    from niche.gateway.db import GatewayDB
    from niche.gateway.keys import KeyStore

    validator = plan.role("validator")[0]
    db_path = workdir / "gateway" / "gateway.sqlite"
    db = GatewayDB(db_path)
    try:
        plan.gateway_key, _ = KeyStore(db).create("localnet", per_minute=600, per_day=100000)
    finally:
        db.close()
    port = free_port()
    plan.gateway_url = f"http://127.0.0.1:{port}"
    args = ["gateway", "serve", *_chain_and_wallet_args(plan.chain_path, plan.netuid,
                                                         Path(plan.wallet_path), "localnet",
                                                         validator.hotkey_name),
            "--gateway.port", str(port), "--gateway.db", str(db_path),
            "--gateway.organic_queue", str(queue),
            "--gateway.validator_state", str(validator.state_path),
            "--gateway.refresh_interval", "5", "--gateway.audit_fraction", "1",
            "--models", *models, "--model-path", plan.model_root]
    plan.processes.append(ProcessPlan("gateway", "gateway", validator.hotkey_name,
                                      validator.hotkey, args, port=port,
                                      log_path=str(workdir / "logs" / "gateway.log")))
