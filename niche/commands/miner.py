"""`niche miner`: serve models to validators over signed HTTP (flags in bittensor's dotted
convention). Everything heavy is imported inside `run`, so `niche --help` stays fast."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import math
from pathlib import Path

DEFAULT_PORT = 8091
DEFAULT_STATES = ("~/.niche/miner/<network>/netuid<N>/<hotkey>/states.sqlite; on localnet "
                  "miner-states/ beside the chain file")


def add_miner_args(parser: argparse.ArgumentParser) -> None:
    from niche.commands.chain_args import add_chain_args, add_wallet_args

    add_chain_args(parser, netuid_required=True)
    add_wallet_args(parser)
    axon = parser.add_argument_group("axon")
    axon.add_argument("--axon.ip", dest="axon_ip", default="0.0.0.0",
                      help="interface to listen on (default 0.0.0.0)")
    axon.add_argument("--axon.port", dest="axon_port", type=int, default=DEFAULT_PORT,
                      help=f"port to listen on (default {DEFAULT_PORT})")
    axon.add_argument("--axon.external_ip", dest="axon_external_ip", default=None,
                      help="IP published on chain (required when --axon.ip is 0.0.0.0/::)")
    m = parser.add_argument_group("models")
    m.add_argument("--model", "--models", dest="models", nargs="+", default=["flux-schnell"],
                   help="model(s) to serve (default flux-schnell)")
    from niche.commands.engine_args import add_backend_args, add_engine_args

    add_engine_args(m)
    add_backend_args(parser)
    b = parser.add_argument_group("blacklist")
    b.add_argument("--blacklist.min_stake", dest="min_stake", type=float, default=0.0,
                   help="refuse callers with less stake (default 0)")
    b.add_argument("--blacklist.allow_hotkeys", dest="allow_hotkeys", nargs="*", default=[],
                   metavar="SS58", help="hotkeys always served (skip registration/permit/"
                                        "stake checks)")
    b.add_argument("--blacklist.allow_non_validators", dest="allow_non_validators",
                   action="store_true", help="serve registered callers without a validator "
                                             "permit (development only)")
    lim = parser.add_argument_group("limits")
    lim.add_argument("--limits.requests_per_minute", dest="requests_per_minute", type=float,
                     default=60.0, help="per-hotkey token bucket, advertised in /v1/info "
                                        "(default 60; 0 disables)")
    lim.add_argument("--limits.stake_proportional", dest="stake_proportional",
                     action="store_true", help="scale every per-caller limit with stake: "
                     "requests_per_minute is shared among validators by stake (10x the stake, "
                     "10x the rate) and one address may hold its stake share of "
                     "max_inflight open (never fewer than max_inflight_per_ip)")
    lim.add_argument("--limits.max_inflight", dest="max_inflight", type=int, default=48,
                     help="generate requests held at once, from every caller (default 48); "
                          "more get 503 before their body is read")
    lim.add_argument("--limits.max_inflight_per_ip", dest="max_inflight_per_ip", type=int,
                     default=8, help="of those, held at once from one address (default 8; "
                                     "0: no bound)")
    lim.add_argument("--limits.max_connections_per_ip", dest="max_connections_per_ip",
                     type=int, default=64, help="open connections from one address (an IPv6 "
                     "peer: its /64); more are closed at once (default 64; 0: no bound)")
    lim.add_argument("--limits.states_per_minute", dest="states_per_minute", type=float,
                     default=240.0, help="per-hotkey token bucket for /v1/states, apart from "
                     "generate's (default 240; 0 disables)")
    lim.add_argument("--queue.max_size", dest="queue_max_size", type=int, default=16,
                     help="requests waiting for the GPU before 503 (default 16)")
    lim.add_argument("--metagraph.refresh", dest="metagraph_refresh", type=positive_seconds,
                     default=60.0, help="seconds between metagraph refreshes (default 60)")
    st = parser.add_argument_group("states (kept for the validators' audits)")
    st.add_argument("--states.path", dest="states_path", type=Path, default=None,
                    metavar="FILE", help="SQLite file that keeps recent answers' sampler "
                    "states, so a restart between an answer and its audit loses none "
                    f"(default {DEFAULT_STATES})")
    st.add_argument("--states.memory_only", dest="states_memory_only", action="store_true",
                    help="keep states in memory only (a restart loses them: the validator "
                         "counts those audits as unavailable, which earns nothing)")
    st.add_argument("--states.max_mb", dest="states_max_mb", type=float, default=512.0,
                    help="MiB of states kept in memory; oldest go first (default 512)")
    st.add_argument("--states.disk_mb", dest="states_disk_mb", type=_disk_mb, default=None,
                    metavar="MIB|auto",
                    help="MiB of states kept on disk (--states.path), oldest dropped first; "
                         "'auto' (default): every answer for the ttl while the disk keeps "
                         "10%% of its size (at least 4 GiB) free. A 28-step FLUX.1-dev "
                         "answer at 1024x1024 is 28 MiB: a fixed cap holds ttl x answers a "
                         "minute / 60 x 28 MiB (the log says when states go early)")
    st.add_argument("--states.ttl", dest="states_ttl", type=float, default=600.0,
                    help="seconds an answer's states stay fetchable (default 600)")
    parser.add_argument("--keep-running-when-deregistered", dest="keep_running_deregistered",
                        action="store_true",
                        help="keep serving after the hotkey lost its uid (default: stop with "
                             "exit code 3, which pm2 does not restart)")
    parser.add_argument("--localnet.cheat", dest="localnet_cheat", default=None,
                        metavar="CHEAT", help="localnet demo only: answer with a cheaper/wrong "
                                              "computation (see `niche localnet --help`) so "
                                              "the validator can be watched catching it")
    from niche.commands.metrics_args import add_metrics_args

    add_metrics_args(parser)
    from niche.commands.logging_args import add_logging_args

    add_logging_args(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "miner", help="run a miner",
        description="Serve image generation to validators: signed requests only, "
                    "blacklist by registration/permit/stake, stake-priority queue.")
    add_miner_args(parser)
    parser.set_defaults(func=run)


def setup_logging(args: argparse.Namespace) -> None:
    from niche.commands.logging_args import setup_logging_from_args

    setup_logging_from_args(args, "niche-miner")


def positive_seconds(text: str) -> float:
    """argparse type: seconds > 0 (0 would read the metagraph in a tight loop)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _ss58s(values, flag: str) -> tuple[str, ...]:
    """Each value an SS58 address (a typo would allow no one and say nothing)."""
    from bittensor.sp_core import ss58_decode

    from niche.errors import ConfigError

    for value in values:
        try:
            ss58_decode(value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{flag}: {value!r} is not an SS58 hotkey address ({exc})"
                              ) from None
    return tuple(values)


def config_from_args(args: argparse.Namespace):
    from niche.errors import ConfigError
    from niche.miner.service import MinerConfig

    if not 0 < args.axon_port < 65536:
        raise ConfigError(f"--axon.port must be in 1..65535, got {args.axon_port}")
    for flag, value in (("--axon.ip", args.axon_ip),
                        ("--axon.external_ip", args.axon_external_ip)):
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(f"{flag}: {value!r} is not an IP address") from None
    if args.axon_external_ip is None and ipaddress.ip_address(args.axon_ip).is_unspecified:
        raise ConfigError("--axon.ip is a wildcard address: pass --axon.external_ip with the "
                          "IP validators should use")
    if args.engine_replicas < 1:
        raise ConfigError("--engine.replicas must be >= 1")
    if args.engine_backend == "local" and (args.engine_replicas != 1 or args.ray_address):
        raise ConfigError("--engine.replicas and --ray.address need --engine.backend ray")
    if args.queue_max_size < 0:
        raise ConfigError("--queue.max_size must be >= 0")
    if args.requests_per_minute < 0:
        raise ConfigError("--limits.requests_per_minute must be >= 0")
    if args.max_inflight < 1 or args.max_inflight_per_ip < 0:
        raise ConfigError("--limits.max_inflight must be >= 1 and "
                          "--limits.max_inflight_per_ip >= 0")
    if args.max_connections_per_ip < 0 or args.states_per_minute < 0:
        raise ConfigError("--limits.max_connections_per_ip and --limits.states_per_minute "
                          "must be >= 0")
    if args.states_max_mb <= 0 or args.states_ttl <= 0:
        raise ConfigError("--states.max_mb and --states.ttl must be > 0")
    if args.localnet_cheat is not None:
        from niche.devnet.localnet.cheat_names import CHEATS

        if args.subtensor_network != "localnet":
            raise ConfigError("--localnet.cheat only runs on --subtensor.network localnet")
        if args.localnet_cheat not in CHEATS:
            raise ConfigError(f"--localnet.cheat: choose from {', '.join(CHEATS)}")
    return MinerConfig(
        netuid=args.netuid, min_stake=args.min_stake,
        allow_hotkeys=_ss58s(args.allow_hotkeys or (), "--blacklist.allow_hotkeys"),
        allow_non_validators=args.allow_non_validators,
        requests_per_minute=args.requests_per_minute,
        stake_proportional_rate=args.stake_proportional,
        max_inflight=args.max_inflight, max_inflight_per_ip=args.max_inflight_per_ip,
        max_connections_per_ip=args.max_connections_per_ip,
        states_requests_per_minute=args.states_per_minute,
        max_queue=args.queue_max_size, metagraph_refresh=args.metagraph_refresh,
        keep_running_when_deregistered=args.keep_running_deregistered,
        states_max_bytes=int(args.states_max_mb * 1024 * 1024), states_ttl=args.states_ttl,
        states_disk_max_bytes=(None if args.states_disk_mb is None
                               else int(args.states_disk_mb * 1024 * 1024)),
    )


def _disk_mb(text: str) -> float | None:
    """--states.disk_mb: 'auto' (None) or MiB > 0."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'auto' nor a number of MiB"
                                         ) from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 'auto' or MiB > 0")
    return value


def states_path_from_args(args: argparse.Namespace, hotkey: str) -> Path | None:
    """Where the answers' states are kept on disk (None: --states.memory_only)."""
    if args.states_memory_only:
        return None
    if args.states_path is not None:
        return Path(args.states_path).expanduser()
    if args.subtensor_network == "localnet" and args.localnet_path is not None:
        # a throw-away local subnet keeps its miners' states beside its chain file
        chain_file = Path(args.localnet_path).expanduser()
        return chain_file.parent / "miner-states" / f"netuid{int(args.netuid)}-{hotkey}.sqlite"
    import re

    network = re.sub(r"[^A-Za-z0-9._-]+", "_", args.subtensor_network).strip("_") or "network"
    return Path("~/.niche/miner").expanduser() / network / f"netuid{int(args.netuid)}" / \
        hotkey / "states.sqlite"


def run(args: argparse.Namespace) -> int:
    from niche.commands.startup import run_exiting_cleanly_on_sigterm

    return run_exiting_cleanly_on_sigterm(_run, args, "niche.miner")


def _run(args: argparse.Namespace) -> int:
    setup_logging(args)
    log = logging.getLogger("niche.miner")
    from niche.commands.chain_args import wallet_from_args
    from niche.commands.startup import configuration_errors, open_chain

    # Configuration first, each error one line and exit 2 (pm2 holds it), before minutes
    # of model loading: flags, wallet and hotkey, chain file and subnet, then (nothing is
    # created on disk before those are known good) the registration and the states file.
    with configuration_errors():
        config = config_from_args(args)
        wallet = wallet_from_args(args)
        config.states_path = states_path_from_args(args, wallet.hotkey.ss58_address)
    chain = open_chain(args, args.netuid)
    # The registration (exit 3), the states file, then the ports and the models (exit 2).
    chain.metagraph(args.netuid).require(wallet.hotkey.ss58_address, "miner")
    with configuration_errors():
        held = _check_states(config, log)
    try:
        return _serve_miner(args, config, wallet, chain, log)
    finally:
        if held is not None:
            held.release()


def _check_states(config, log: logging.Logger):
    """Open the states file once (an unwritable file, another miner on it: exit 2) and keep
    its lock (`StatesLock`) until the miner stops: a second miner on the same hotkey is
    refused here, not minutes later after loading its models. None: memory only."""
    if config.states_path is None:
        log.info("answers' states kept %.0fs for the audits, in memory only (%d MiB; "
                 "a restart loses them)", config.states_ttl, config.states_max_bytes // 2**20)
        return None
    from niche.miner.state_store import DiskStates, StatesLock

    disk = DiskStates(config.states_path, config.states_disk_max_bytes, config.states_ttl)
    try:
        log.info("answers' states kept %.0fs for the audits: %s", config.states_ttl,
                 disk.describe())
        problem = disk.problem()
        if problem:
            log.error("states store: %s", problem)
        held = StatesLock(config.states_path)  # this process holds it already
    finally:
        disk.close()
    return held


def _serve_miner(args: argparse.Namespace, config, wallet, chain, log: logging.Logger) -> int:
    from niche.commands.engine_args import (
        model_dirs_from_args,
        model_root_from_args,
        quants_from_args,
    )
    from niche.commands.startup import configuration_errors
    from niche.miner.server import bind_socket
    from niche.models.variants import check_models

    with configuration_errors():
        from niche.commands.engine_args import check_threads
        from niche.commands.startup import check_distinct_ports

        check_distinct_ports(("--axon.port", args.axon_port),
                             ("--metrics.port", getattr(args, "metrics_port", None)))
        check_threads(args)
        from niche.commands.metrics_args import check_metrics_port

        check_metrics_port(args)  # a busy --metrics.port too
        # a quantized variant that does not verify at its model's reference is refused here
        check_models(args.models, model_root_from_args(args), model_dirs_from_args(args),
                     quants_from_args(args))
        sock = bind_socket(args.axon_ip, args.axon_port)  # kept: served while loading too
    try:
        return _load_and_serve(args, config, wallet, chain, sock, log)
    finally:
        sock.close()


def _load_and_serve(args: argparse.Namespace, config, wallet, chain, sock,
                    log: logging.Logger) -> int:
    """Load the models (the answers' states kept on disk served meanwhile on `sock`, so a
    restart between an answer and its audit costs nothing), then serve on `sock`."""
    from niche.commands.engine_args import backend_engine_from_args
    from niche.miner.loading import states_while_loading
    from niche.miner.server import serve
    from niche.miner.service import MinerService
    from niche.models.engine import ImageEngine, resolve_device

    log.info("loading %s on %s (%s backend)", ", ".join(args.models),
             resolve_device(args.device), args.engine_backend)
    with states_while_loading(sock, wallet, config, chain):
        engine: ImageEngine = backend_engine_from_args(args, args.models)
    if args.localnet_cheat:
        from niche.devnet.localnet.cheats import CheatingEngine

        log.warning("localnet cheat %r: answers are NOT what they claim", args.localnet_cheat)
        engine = CheatingEngine(engine, args.localnet_cheat)
    metrics = None
    try:
        service = MinerService(engine, wallet, config, chain=chain)
        service.check_registered()
        from niche.commands.metrics_args import metrics_server_from_args

        metrics = metrics_server_from_args(args, service.metrics.registry)
        from niche.runtime import describe

        log.info("runtime: %s", describe(service.runtime))
        log.info("miner %s (uid %d) serving %s", wallet.hotkey.ss58_address,
                 service.check_registered().uid, ", ".join(args.models))
        return serve(service, args.axon_ip, args.axon_port, external_ip=args.axon_external_ip,
                     sock=sock)
    finally:
        if metrics is not None:
            metrics.close()
        close = getattr(engine, "close", None)  # the Ray backend stops its replicas
        if callable(close):
            close()
