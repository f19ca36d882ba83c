"""`niche chain ...`: make a localnet subnet, register hotkeys, read the metagraph, make wallets."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from niche.chain.base import ChainError


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chain", help="chain tools: localnet subnets, registration, metagraph, wallets",
        description="Chain tools. Real networks go through the bittensor SDK; "
        "`--subtensor.network localnet --localnet.path FILE` uses the embedded chain.",
    )
    sub = parser.add_subparsers(dest="chain_command", metavar="ACTION", required=True)
    from niche.commands.chain_args import add_chain_args, add_wallet_args

    p = sub.add_parser("create-subnet", help="create a subnet in a localnet chain file "
                       "(creates the file if missing)")
    p.add_argument("--localnet.path", dest="localnet_path", type=Path, required=True,
                   metavar="FILE")
    p.add_argument("--netuid", type=int, default=None, help="default: next free netuid")
    p.add_argument("--tempo", type=int, default=20, help="blocks per epoch (default 20)")
    p.add_argument("--weights-rate-limit", type=int, default=5,
                   help="blocks between two weight sets of one hotkey (default 5)")
    p.add_argument("--max-uids", type=int, default=64,
                   help="uids on the subnet; a registration on a full subnet replaces the "
                        "non-immune neuron with the lowest incentive (default 64)")
    p.add_argument("--immunity-period", type=int, default=50,
                   help="blocks a new registration cannot be replaced (default 50)")
    p.add_argument("--serving-rate-limit", type=int, default=0,
                   help="blocks between two endpoint serves of one hotkey, as subtensor's "
                        "ServingRateLimit (default 0: none; finney uses 50)")
    p.add_argument("--max-validators", type=int, default=8,
                   help="validator permits go to the top K hotkeys by stake (default 8)")
    p.add_argument("--min-validator-stake", type=float, default=1.0)
    p.add_argument("--block-time", type=float, default=None,
                   help="seconds per block, for a new chain file only (default 1)")
    p.add_argument("--exist-ok", action="store_true", help="no error if the netuid exists")
    p.set_defaults(func=_create_subnet)

    p = sub.add_parser("register", help="register a hotkey on a subnet")
    add_chain_args(p, netuid_required=True)
    add_wallet_args(p)
    p.add_argument("--stake", type=float, default=0.0, help="localnet only: stake to grant")
    p.add_argument("--yes", action="store_true",
                   help="real networks: confirm the burned registration (spends TAO)")
    p.set_defaults(func=_register)

    p = sub.add_parser("metagraph", help="print a subnet's neurons")
    add_chain_args(p, netuid_required=True)
    p.add_argument("--hotkey", default=None, metavar="SS58",
                   help="only this hotkey's row (a miner's own uid, stake, incentive, "
                        "emission, trust) instead of the whole subnet")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_metagraph)

    p = sub.add_parser("wallet-create", help="create an unencrypted coldkey+hotkey offline "
                       "(for localnet; keeps existing keys)")
    add_wallet_args(p)
    p.set_defaults(func=_wallet_create)


def _create_subnet(args: argparse.Namespace) -> int:
    from niche.chain.local import DEFAULT_BLOCK_TIME, LocalChain

    chain = LocalChain(args.localnet_path, create=True,
                       block_time=args.block_time or DEFAULT_BLOCK_TIME)
    try:
        if args.block_time and abs(chain.block_time - args.block_time) > 1e-9:
            print(f"note: {args.localnet_path} already exists with block time "
                  f"{chain.block_time}s; --block-time ignored")
        netuid = chain.create_subnet(
            args.netuid, tempo=args.tempo, weights_rate_limit=args.weights_rate_limit,
            max_uids=args.max_uids, immunity_period=args.immunity_period,
            max_validators=args.max_validators, min_validator_stake=args.min_validator_stake,
            serving_rate_limit=args.serving_rate_limit, exist_ok=args.exist_ok,
        )
        p = chain.subnet(netuid)
    finally:
        chain.close()
    print(f"subnet {netuid} in {args.localnet_path}: tempo {p.tempo}, weights rate limit "
          f"{p.weights_rate_limit}, max uids {p.max_uids}, validator permits top "
          f"{p.max_validators} with stake >= {p.min_validator_stake}, serving rate limit "
          f"{p.serving_rate_limit}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from niche.commands.chain_args import chain_from_args, wallet_from_args

    local = args.subtensor_network == "localnet"
    chain = chain_from_args(args)
    try:
        wallet = wallet_from_args(args, need_coldkey=not local)
        hotkey = wallet.hotkey.ss58_address
        if not chain.subnet_exists(args.netuid):
            raise ChainError(f"subnet {args.netuid} does not exist on {args.subtensor_network}: "
                             "check --netuid")
        if not local:
            existing = chain.uid_of(args.netuid, hotkey)
            if existing is not None:
                print(f"{hotkey} is already registered as uid {existing} on subnet {args.netuid}")
                return 0
            cost = chain.burn_cost(args.netuid)
            print(f"would burn-register hotkey {hotkey} (wallet {args.wallet_name}/"
                  f"{args.wallet_hotkey}) on subnet {args.netuid} of {args.subtensor_network}, "
                  f"paying about {cost:.6f} TAO from coldkey {wallet.coldkeypub.ss58_address}")
            if not args.yes:
                raise ChainError("nothing done: re-run with --yes to register (this spends TAO)")
        uid = chain.register(args.netuid, wallet, stake=args.stake)
    finally:
        chain.close()
    where = args.localnet_path if local else args.subtensor_network
    print(f"registered {hotkey} as uid {uid} on subnet {args.netuid} ({where})")
    return 0


def _metagraph(args: argparse.Namespace) -> int:
    from niche.commands.chain_args import chain_from_args

    chain = chain_from_args(args)
    try:
        mg = chain.metagraph(args.netuid)
    finally:
        chain.close()
    neurons = list(mg.neurons)
    if args.hotkey is not None:
        neurons = [n for n in neurons if n.hotkey == args.hotkey]
        if not neurons:
            raise ChainError(f"hotkey {args.hotkey} is not registered on subnet {args.netuid} "
                             f"of {args.subtensor_network} (block {mg.block})")
    if args.json:
        print(json.dumps({
            "netuid": mg.netuid, "block": mg.block, "network": args.subtensor_network,
            "neurons": [
                {"uid": n.uid, "hotkey": n.hotkey, "coldkey": n.coldkey, "stake": n.stake,
                 "validator_permit": n.validator_permit,
                 "endpoint": n.endpoint.url if n.endpoint else None,
                 "incentive": n.incentive, "emission": n.emission, "trust": n.trust,
                 "last_update": n.last_update}
                for n in neurons
            ],
        }, indent=2))
        return 0
    print(f"subnet {mg.netuid} on {args.subtensor_network} at block {mg.block}: "
          f"{len(mg.neurons)} neurons, total stake {mg.total_stake:.3f}")
    header = ("UID", "HOTKEY", "STAKE", "VPERMIT", "ENDPOINT", "INCENTIVE", "EMISSION", "TRUST",
              "UPDATED")
    rows = [
        (str(n.uid), n.hotkey if args.hotkey else f"{n.hotkey[:6]}..{n.hotkey[-4:]}",
         f"{n.stake:.3f}", "yes" if n.validator_permit else "no",
         f"{n.endpoint.ip}:{n.endpoint.port}" if n.endpoint else "-",
         f"{n.incentive:.4f}", f"{n.emission:.6f}", f"{n.trust:.4f}", str(n.last_update))
        for n in neurons
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip())
    return 0


def _wallet_create(args: argparse.Namespace) -> int:
    from niche.chain.wallets import create_wallet

    wallet = create_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path)
    where = Path(args.wallet_path).expanduser()
    print(f"wallet {args.wallet_name}/{args.wallet_hotkey} in {where}:"
          f" coldkey {wallet.coldkeypub.ss58_address}, hotkey {wallet.hotkey.ss58_address}"
          " (unencrypted: for localnet only)")
    return 0
