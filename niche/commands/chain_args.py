"""Chain and wallet flags in bittensor's dotted convention, shared by every command.

Dest names are plain identifiers (`wallet_name`, `subtensor_network`, `localnet_path`)
so code reads `args.wallet_name`, not `getattr(args, "wallet.name")`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from niche.chain.wallets import DEFAULT_WALLET_PATH


def add_chain_args(
    parser: argparse.ArgumentParser,
    *,
    netuid_required: bool = False,
    default_netuid: int | None = None,
    default_network: str = "finney",
) -> None:
    """--netuid, --subtensor.network, --subtensor.chain_endpoint, --localnet.path."""
    group = parser.add_argument_group("chain")
    group.add_argument("--netuid", dest="netuid", type=int, required=netuid_required,
                       default=default_netuid, help="subnet id")
    group.add_argument(
        "--subtensor.network", dest="subtensor_network", default=default_network,
        metavar="NET",
        help="finney | test | local | archive | devnet | ws(s)://URL | localnet "
        f"(default {default_network})",
    )
    group.add_argument("--subtensor.chain_endpoint", dest="subtensor_chain_endpoint",
                       default=None, metavar="URL",
                       help="ws(s):// endpoint overriding the network's default")
    group.add_argument("--localnet.path", dest="localnet_path", type=Path, default=None,
                       metavar="FILE", help="chain file for --subtensor.network localnet")


def add_wallet_args(parser: argparse.ArgumentParser) -> None:
    """--wallet.name, --wallet.hotkey, --wallet.path."""
    group = parser.add_argument_group("wallet")
    group.add_argument("--wallet.name", dest="wallet_name", default="default", metavar="NAME",
                       help="coldkey wallet name (default: default)")
    group.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default",
                       metavar="NAME", help="hotkey name (default: default)")
    group.add_argument("--wallet.path", dest="wallet_path", default=DEFAULT_WALLET_PATH,
                       metavar="DIR", help=f"wallets folder (default {DEFAULT_WALLET_PATH})")


def chain_from_args(args: argparse.Namespace):
    """The Chain selected by add_chain_args' flags."""
    from niche.chain.factory import connect

    return connect(args.subtensor_network, args.localnet_path,
                   chain_endpoint=args.subtensor_chain_endpoint)


def wallet_from_args(args: argparse.Namespace, *, need_coldkey: bool = False):
    """The bt.Wallet selected by add_wallet_args' flags, checked readable (see load_wallet)."""
    from niche.chain.wallets import load_wallet

    return load_wallet(args.wallet_name, args.wallet_hotkey, args.wallet_path,
                       need_coldkey=need_coldkey)
