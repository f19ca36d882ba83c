"""Start-up of the long-running neurons (miner, validator)."""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable


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
