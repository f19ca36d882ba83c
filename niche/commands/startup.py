"""Start-up of the long-running neurons (miner, validator)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator


def run_exiting_cleanly_on_sigterm(body: Callable[[argparse.Namespace], int],
                                   args: argparse.Namespace, logger: str) -> int:
    """SIGTERM while starting (loading models can take minutes) is a clean exit 0 too; the
    running neuron installs its own handlers, which finish the work in hand."""
    if threading.current_thread() is not threading.main_thread():
        return body(args)

    def stop_while_starting(signum, _frame) -> None:
        logging.getLogger(logger).info("%s received while starting: exiting",
                                       signal.Signals(signum).name)
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop_while_starting)
    try:
        return body(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def configuration_errors() -> Iterator[None]:
    """Whatever a NicheError says inside is the operator's configuration (a wallet, a chain
    file, a port, a model): exit code 2, which pm2 does not restart (restarting cannot fix
    it), with the error's one line. A hotkey without a uid keeps its own code (3)."""
    from niche.chain.base import NotRegisteredError
    from niche.errors import ConfigError, NicheError

    try:
        yield
    except (ConfigError, NotRegisteredError):
        raise
    except NicheError as exc:
        raise ConfigError(str(exc)) from None


def open_chain(args: argparse.Namespace, netuid: int):
    """The chain of the chain flags, with its subnet checked. A missing or unreadable chain
    file, an unknown network or a subnet that does not exist are configuration errors (exit
    2); a subtensor that cannot be reached stays exit 1, which pm2 retries."""
    from niche.chain.subtensor import SDK_NETWORKS
    from niche.commands.chain_args import chain_from_args
    from niche.errors import ConfigError

    network = args.subtensor_network
    remote = network in SDK_NETWORKS or network.startswith(("ws://", "wss://"))
    if remote:
        chain = chain_from_args(args)
    else:
        with configuration_errors():
            chain = chain_from_args(args)
    try:
        if not chain.subnet_exists(netuid):
            raise ConfigError(f"subnet {netuid} does not exist on {chain.network}: check "
                              "--netuid")
    except BaseException:
        chain.close()
        raise
    return chain
