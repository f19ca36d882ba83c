"""Start-up of the long-running neurons (miner, validator)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator


def raise_open_file_limit() -> tuple[int, int] | None:
    """The soft limit on open files up to the hard one: a node holds a socket per peer (a
    validator asks up to 64 miners at once, audits beside, a gateway serves 1024), and
    Linux's default soft limit of 1024 ran a validator out mid-round. Returns (before,
    after), None where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, wanted


def check_distinct_ports(*ports: tuple[str, int | None]) -> None:
    """ConfigError when two of (flag, port) name the same port: each is free on its own, so
    the process itself would find the second busy, after minutes of loading."""
    from niche.errors import ConfigError

    seen: dict[int, str] = {}
    for flag, port in ports:
        if not port:
            continue
        if port in seen:
            raise ConfigError(f"{flag} {port} is the same port as {seen[port]}: give each its "
                              "own")
        seen[port] = flag


def run_exiting_cleanly_on_sigterm(body: Callable[[argparse.Namespace], int],
                                   args: argparse.Namespace, logger: str) -> int:
    """SIGTERM while starting (loading models can take minutes) is a clean exit 0 too; the
    running neuron installs its own handlers, which finish the work in hand. The open-file
    limit is raised first (`raise_open_file_limit`)."""
    limits = raise_open_file_limit()
    if limits is not None and limits[1] != limits[0]:
        logging.getLogger(logger).debug("open files: soft limit %d -> %d", *limits)
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
