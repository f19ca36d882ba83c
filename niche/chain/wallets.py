"""Load and create bittensor wallets with errors an operator can act on.

Neurons run unattended (pm2, CI): a password prompt there would hang or crash, so an
encrypted key in a non-interactive run is refused up front with a message saying
what to do instead.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from niche.chain.base import ChainError

DEFAULT_WALLET_PATH = "~/.bittensor/wallets"


def _is_interactive() -> bool:
    return sys.stdin is not None and sys.stdin.isatty()


def _password_in_env(keyfile) -> bool:
    """bittensor keeps saved key passwords in the process environment (BT_PW_...)."""
    from bittensor.sp_core import get_password_from_environment

    try:
        return bool(get_password_from_environment(keyfile.env_var_name()))
    except Exception:  # noqa: BLE001 - an unreadable value is as good as none
        return False


def _check_key(keyfile, what: str, wallet_desc: str, create_hint: str,
               interactive: bool) -> None:
    if not keyfile.exists_on_device():
        raise ChainError(f"{what} of {wallet_desc} is missing ({keyfile.path}): {create_hint}")
    if os.path.isdir(keyfile.path):
        raise ChainError(f"{what} {keyfile.path} is a folder, not a key file: {create_hint}")
    if not keyfile.is_readable():
        raise ChainError(f"{what} file {keyfile.path} is not readable by this user: fix its "
                         "permissions")
    try:
        encrypted = keyfile.is_encrypted()
    except OSError as exc:
        raise ChainError(f"{what} file {keyfile.path} cannot be read ({exc.strerror or exc}): "
                         f"{create_hint}") from None
    if encrypted and not interactive and not _password_in_env(keyfile):
        raise ChainError(
            f"{what} {keyfile.path} is password-protected and this run is non-interactive: use "
            f"an unencrypted {what} (regenerate it without a password, e.g. `btcli wallet "
            f"regen-hotkey`, or create a new one), or run interactively"
        )


def load_wallet(
    name: str = "default",
    hotkey: str = "default",
    path: str | Path = DEFAULT_WALLET_PATH,
    *,
    need_coldkey: bool = False,
    interactive: bool | None = None,
):
    """A `bt.Wallet` whose hotkey (and coldkey public key) are readable now.

    `need_coldkey=True` also requires the private coldkey (e.g. to pay a burned
    registration on a real network). `interactive=None` means "stdin is a terminal".
    Raises ChainError naming the missing or locked file and how to fix it.
    """
    import bittensor as bt

    interactive = _is_interactive() if interactive is None else interactive
    path = str(Path(path).expanduser())
    try:
        wallet = bt.Wallet(name=name, hotkey=hotkey, path=path)
    except ValueError as exc:
        raise ChainError(f"invalid wallet name {name!r}/{hotkey!r}: {exc}") from exc
    desc = f"wallet {name!r} (hotkey {hotkey!r}, path {path})"
    create = (
        f"create it with `niche chain wallet-create --wallet.name {name} --wallet.hotkey "
        f"{hotkey} --wallet.path {path}` (localnet) or `btcli wallet create`"
    )
    _check_key(wallet.coldkeypub_file, "coldkeypub.txt", desc, create, interactive)
    _check_key(wallet.hotkey_file, "hotkey", desc, create, interactive)
    if need_coldkey:
        _check_key(wallet.coldkey_file, "coldkey", desc, create, interactive)
    try:
        wallet.hotkey  # noqa: B018 - decrypt/parse now, not mid-run
        wallet.coldkeypub  # noqa: B018
        if need_coldkey:
            wallet.coldkey  # noqa: B018
    except Exception as exc:
        raise ChainError(f"cannot open the keys of {desc}: {exc}") from exc
    return wallet


def create_wallet(
    name: str,
    hotkey: str = "default",
    path: str | Path = DEFAULT_WALLET_PATH,
):
    """Create an unencrypted coldkey and hotkey offline (localnet, tests); keeps existing keys.

    Unencrypted keys suit a local network only: on a real network make the coldkey
    with btcli and a password.
    """
    import bittensor as bt

    path = str(Path(path).expanduser())
    try:
        wallet = bt.Wallet(name=name, hotkey=hotkey, path=path)
        if not wallet.coldkeypub_file.exists_on_device():
            wallet.create_new_coldkey(use_password=False, suppress=True, overwrite=False)
        if not wallet.hotkey_file.exists_on_device():
            wallet.create_new_hotkey(use_password=False, suppress=True, overwrite=False)
    except (OSError, ValueError) as exc:
        raise ChainError(f"cannot create wallet {name!r}/{hotkey!r} under {path}: {exc}") from exc
    return load_wallet(name, hotkey, path, interactive=False)
