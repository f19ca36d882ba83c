"""One logging set-up for the long-running processes (miner, validator): timestamped lines
that say what happened, without the per-request chatter of HTTP and model libraries.

Progress bars stay on here (downloads and the minutes of model loading show progress on
stderr, which pm2 logs); the one-shot commands (`niche generate`, `verify`) keep their
one-JSON-line contract with niche.models.quiet instead."""
from __future__ import annotations

import logging

NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "PIL", "asyncio")


def setup_logging(debug: bool = False, *, progress: bool = True) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debug:
        from niche.models.quiet import quiet_libraries

        quiet_libraries(progress=progress)
