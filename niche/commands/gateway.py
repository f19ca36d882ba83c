"""`niche gateway`: the OpenAI-compatible images API in front of the subnet's miners
(`serve`), and its API keys (`keys create|list|revoke`)."""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

DEFAULT_DB = "~/.niche/gateway/gateway.sqlite"
DEFAULT_QUEUE = "~/.niche/gateway/organic.sqlite"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "gateway", help="serve the OpenAI images API through the subnet's miners",
        description="An OpenAI-compatible images API (POST /v1/images/generations, GET "
                    "/v1/models) beside a validator: requests are signed with the validator's "
                    "hotkey and routed to miners by its scores; a sampled share is queued for "
                    "the validator's audit (docs/gateway.md).")
    sub = parser.add_subparsers(dest="gateway_command", metavar="ACTION")
    serve = sub.add_parser("serve", help="run the gateway")
    from niche.commands.chain_args import add_chain_args, add_wallet_args

    add_chain_args(serve)
    add_wallet_args(serve)
    g = serve.add_argument_group("gateway")
    g.add_argument("--gateway.ip", dest="ip", default="127.0.0.1", help="listen address")
    g.add_argument("--gateway.port", dest="port", type=int, default=8000, help="port (8000)")
    _db_arg(g)
    g.add_argument("--gateway.organic_queue", dest="queue", default=DEFAULT_QUEUE,
                   help=f"queue of answers for the validator's audit (default {DEFAULT_QUEUE}; "
                        "give the validator the same --neuron.organic_queue)")
    g.add_argument("--gateway.validator_state", dest="validator_state", type=Path,
                   default=None,
                   help="the validator's --neuron.state_path, read-only: scores, exclusions "
                        "(default: the validator's own default for this network, netuid and "
                        "hotkey, ~/.niche/validator/NETWORK/netuidN/HOTKEY/state.sqlite)")
    g.add_argument("--gateway.audit_fraction", dest="audit_fraction", type=float, default=0.1,
                   help="share of delivered images queued for audit (default 0.1)")
    g.add_argument("--gateway.deadline", dest="deadline", type=float, default=60.0,
                   help="seconds a request may take, retries included, when the client "
                        "sends no 'timeout' (default 60), or twice the model's timeout "
                        "scaled by the request's pixels x steps when that is longer")
    g.add_argument("--gateway.hedge_after", dest="hedge_after", type=float, default=None,
                   help="also ask a second miner when the first has not answered after this "
                        "many seconds (default: per attempt, 3x the time that miner, else the "
                        "model's miners, took for the same work, at least 5 s, at most the "
                        "model's timeout scaled by the work and half the request's deadline)")
    g.add_argument("--gateway.body_timeout", dest="body_timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body; a slower one "
                        "gets 408 (default 30)")
    g.add_argument("--gateway.max_inflight_per_key", dest="max_inflight_per_key", type=int,
                   default=16, help="requests one API key may have open at once; one more "
                   "gets 429 (default 16)")
    g.add_argument("--gateway.max_connections_per_ip", dest="max_connections_per_ip",
                   type=int, default=64,
                   help="open connections one address may hold; one more is closed at once "
                        "(default 64; 0: no bound). Trusted proxies (FORWARDED_ALLOW_IPS, "
                        "default 127.0.0.1) are not counted: their one address carries every "
                        "user")
    g.add_argument("--gateway.refresh_interval", dest="refresh_interval", type=float,
                   default=30.0, help="seconds between metagraph / score refreshes (30)")
    g.add_argument("--gateway.public_url", dest="public_url", default=None,
                   help="base URL of `url` answers (default: the URL a request came to)")
    g.add_argument("--models", nargs="+", default=["flux-schnell", "kolors"],
                   help="models offered (default flux-schnell kolors)")
    g.add_argument("--model-path", type=Path, default=None,
                   help="checkpoint folder whose per-model limits apply (as on the miners)")
    g.add_argument("--gateway.cors_origins", dest="cors_origins", nargs="+", default=[],
                   metavar="ORIGIN",
                   help="browser origins allowed to call the API, e.g. https://app.example "
                        "(CORS; default: none, only same-origin pages such as the playground)")
    from niche.commands.logging_args import add_logging_args
    from niche.commands.metrics_args import add_metrics_args

    add_metrics_args(serve)
    add_logging_args(serve)
    serve.set_defaults(func=run_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    create = keys_sub.add_parser("create", help="create a key (printed once)")
    create.add_argument("--name", required=True, help="who the key is for")
    create.add_argument("--per-minute", type=int, default=60, help="requests per minute (60)")
    create.add_argument("--per-day", type=int, default=1000, help="images per UTC day (1000)")
    create.add_argument("--json", action="store_true", help="print JSON")
    _db_arg(create)
    create.set_defaults(func=run_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (never the secrets)")
    _db_arg(listing)
    listing.set_defaults(func=run_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", help="the id `keys list` shows")
    _db_arg(revoke)
    revoke.set_defaults(func=run_keys_revoke)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    keys.set_defaults(func=lambda args: keys.print_help() or 2)


def _db_arg(group) -> None:
    group.add_argument("--gateway.db", dest="db", default=DEFAULT_DB,
                       help=f"keys, usage and url answers (default {DEFAULT_DB}; `niche "
                            "localnet` uses WORKDIR/gateway/gateway.sqlite and prints it)")


def localnet_keys_line(serve_args: list[str]) -> str:
    """Where a `gateway serve` command line keeps its keys, and the command that adds one
    there: `niche localnet` prints it (a key made in the default --gateway.db would get 401
    from the localnet gateway)."""
    db = serve_args[serve_args.index("--gateway.db") + 1] if "--gateway.db" in serve_args \
        else DEFAULT_DB
    return (f"gateway keys: {db}; another key: niche gateway keys create --name NAME "
            f"--gateway.db {db}")


def _keys(args: argparse.Namespace, create: bool = True):
    """The key store of --gateway.db; `create=False` (list, revoke): a missing file is one
    line, not a new empty database somewhere a typo put it."""
    from niche.gateway.db import GatewayDB
    from niche.gateway.keys import KeyStore

    return KeyStore(GatewayDB(Path(args.db).expanduser(), create=create))


MAX_PER_MINUTE = 1_000_000
MAX_PER_DAY = 1_000_000_000
"""Limits past any subnet's capacity (a larger number is a typo, and SQLite's integers end
at 2**63)."""


def run_keys_create(args: argparse.Namespace) -> int:
    from niche.errors import ConfigError

    for flag, value, most in (("--per-minute", args.per_minute, MAX_PER_MINUTE),
                              ("--per-day", args.per_day, MAX_PER_DAY)):
        if not 1 <= value <= most:  # before the key database is opened (or created)
            raise ConfigError(f"{flag} must be in 1..{most}, not {value}")
    store = _keys(args)
    secret, key = store.create(args.name, args.per_minute, args.per_day)
    db = str(store.db.path)
    if args.json:
        print(json.dumps({"id": key.id, "name": key.name, "key": secret, "db": db}))
    else:
        print(f"created key {key.id} for {key.name} ({key.per_minute}/min, {key.per_day} "
              f"images/day) in {db}; only a gateway serving that file accepts it (`niche "
              f"gateway serve ... --gateway.db {db}`); it is shown only now:\n{secret}")
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    store = _keys(args, create=False)
    print(f"keys in {store.db.path}")
    print(f"{'id':<9} {'name':<20} {'created (UTC)':<20} {'state':<8} {'per min':>7} "
          f"{'per day':>7} {'today':>6}")
    for key in store.list():
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(key.created))
        state = "revoked" if key.revoked else "active"
        print(f"{key.id:<9} {key.name[:20]:<20} {created:<20} {state:<8} {key.per_minute:>7} "
              f"{key.per_day:>7} {store.used_today(key.id):>6}")
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    from niche.errors import InvalidRequest

    if not _keys(args, create=False).revoke(args.key_id):
        raise InvalidRequest(f"no active key {args.key_id!r} (see `niche gateway keys list`)",
                             field="key_id")
    print(f"revoked {args.key_id}")
    return 0


def _check_signer(chain, netuid: int, hotkey: str, log: logging.Logger) -> None:
    """Miners answer only registered hotkeys (with a validator permit, unless a miner allows
    others): a gateway signing with another one would pass its operator's mistake to every
    API user as a 502. Unregistered: exit 3, as the miner and validator; no permit: a
    WARNING (a miner may run --blacklist.allow_non_validators)."""
    from niche.chain.registration import permit_problem

    neuron = chain.metagraph(netuid).require(hotkey, "gateway")
    problem = permit_problem(neuron, netuid)
    if problem is not None:
        log.warning("gateway hotkey %s: %s; miners refuse requests signed without a validator "
                    "permit (403) unless they allow non-validators: sign with your "
                    "validator's hotkey", hotkey, problem)


def run_serve(args: argparse.Namespace) -> int:
    from niche.commands.startup import run_exiting_cleanly_on_sigterm

    return run_exiting_cleanly_on_sigterm(_serve, args, "niche.gateway")


def _validator_state(args: argparse.Namespace, network: str, hotkey: str) -> Path:
    """The state file the validator signing with this hotkey writes by default."""
    from niche.validator.state import default_state_path

    if args.validator_state is not None:
        return Path(args.validator_state).expanduser()
    return default_state_path(network, args.netuid, hotkey).expanduser()


def _check_validator_state(path: Path, network: str, netuid: int, hotkey: str) -> None:
    """The validator state the gateway routes by must be its own validator's (the one
    signing with the same hotkey claims the gateway's organic audit rows): another file, or
    another hotkey's, is one line and exit 2. A missing file is the validator not started
    yet (a WARNING while it is missing, in the directory)."""
    from niche.errors import ConfigError
    from niche.validator.state import ValidatorState

    if not path.exists():
        return
    with ValidatorState(path, read_only=True) as state:
        owner = state.identity
    if owner is not None and owner != (network, netuid, hotkey):
        raise ConfigError(f"--gateway.validator_state {path} belongs to network {owner[0]}, "
                          f"netuid {owner[1]}, hotkey {owner[2]}, not this gateway's "
                          f"({network}, {netuid}, {hotkey}): pass the state file of the "
                          "validator that signs with the gateway's hotkey")


def _serve(args: argparse.Namespace) -> int:
    from niche.commands.chain_args import wallet_from_args
    from niche.commands.logging_args import setup_logging_from_args
    from niche.commands.metrics_args import metrics_server_from_args
    from niche.commands.startup import configuration_errors, open_chain
    from niche.errors import ConfigError
    from niche.gateway.app import create_app
    from niche.gateway.connections import gateway_limits
    from niche.gateway.service import GatewayConfig, build_gateway
    from niche.miner.server import bind_socket, stop_on_signals, uvicorn_server

    setup_logging_from_args(args, "niche-gateway")
    log = logging.getLogger("niche.gateway")
    if args.netuid is None:
        raise ConfigError("--netuid is required")
    if args.hedge_after is not None and args.hedge_after < 0:
        raise ConfigError("--gateway.hedge_after must be >= 0 seconds (leave it out for the "
                          "default, derived from each model's expected time)")
    if args.max_connections_per_ip < 0:
        raise ConfigError("--gateway.max_connections_per_ip must be >= 0 (0: no bound)")
    for origin in args.cors_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"--gateway.cors_origins: {origin!r} is not an origin like "
                              "https://app.example")
    config = GatewayConfig(deadline=args.deadline, audit_fraction=args.audit_fraction,
                           refresh_interval=args.refresh_interval, public_url=args.public_url,
                           cors_origins=tuple(args.cors_origins),
                           body_timeout=args.body_timeout,
                           max_inflight_per_key=args.max_inflight_per_key)
    # as the miner and validator: a missing wallet or hotkey, chain file or subnet, a busy
    # port are the operator's configuration (exit 2, which pm2 does not restart)
    with configuration_errors():
        wallet = wallet_from_args(args)
        from niche.commands.startup import check_distinct_ports

        check_distinct_ports(("--gateway.port", args.port),
                             ("--metrics.port", getattr(args, "metrics_port", None)))
    chain = open_chain(args, args.netuid)
    try:
        _check_signer(chain, args.netuid, wallet.hotkey.ss58_address, log)
        state_path = _validator_state(args, chain.network, wallet.hotkey.ss58_address)
        with configuration_errors():
            _check_validator_state(state_path, chain.network, args.netuid,
                                   wallet.hotkey.ss58_address)
        with configuration_errors():  # a busy port: before the key database is created
            sock = bind_socket(args.ip, args.port, port_flag="--gateway.port")
        metrics = None
        try:
            gateway = build_gateway(
                chain, wallet, args.netuid, models=list(args.models),
                db_path=Path(args.db).expanduser(), queue_path=Path(args.queue).expanduser(),
                validator_state=state_path,
                model_root=args.model_path, config=config, hedge_after=args.hedge_after)
            metrics = metrics_server_from_args(args, gateway.metrics.registry)
            server = uvicorn_server(create_app(gateway),
                                    limits=gateway_limits(args.max_connections_per_ip))
            log.info("gateway listening on http://%s:%d (signing as %s); keys and usage in "
                     "%s (add a key: niche gateway keys create --name NAME --gateway.db %s)",
                     args.ip, sock.getsockname()[1], wallet.hotkey.ss58_address,
                     gateway.keys.db.path, gateway.keys.db.path)
            if args.cors_origins:
                log.info("CORS: browsers may call the API from %s", ", ".join(args.cors_origins))
            with stop_on_signals(server, log):
                server.run(sockets=[sock])
        finally:
            if metrics is not None:
                metrics.close()
            sock.close()
    finally:
        chain.close()
    return 0
