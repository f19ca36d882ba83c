"""One logging set-up for the long-running processes (miner, validator): timestamped lines
that say what happened, without the per-request chatter of HTTP and model libraries.

Flags as in bittensor: `--logging.debug` (our DEBUG lines), `--logging.trace` (everything,
bittensor's transport and websocket frames included), `--logging.logging_dir DIR` (also
write DIR/<process>.log, rotated at 10 MB, 5 kept). Without --logging.trace bittensor's
transport and the websockets library log WARNING and above only.

Progress bars (downloads, the minutes of model loading) show only when stderr is a terminal,
where they redraw one line: in a pipe or under pm2 every redraw would be a log line of its
own, so there the neurons log "loading ..." lines instead. The one-shot commands (`niche
generate`, `verify`) keep their one-JSON-line contract with niche.models.quiet instead.

Under pm2 (configs/pm2/common.js sets NICHE_LOG_TIME=0 beside pm2's own `time: true`) the
console lines carry no timestamp of ours: pm2 stamps every line, tracebacks included, and one
timestamp per line is enough. The --logging.logging_dir file keeps its own."""
from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "PIL", "asyncio")
TRANSPORT_LOGGERS = ("bittensor.transport", "websockets")
"""Per-frame and per-RPC lines: below WARNING only with --logging.trace."""
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"
UNSTAMPED = "%(levelname)s %(name)s: %(message)s"
"""The console format when something else stamps each line (pm2: NICHE_LOG_TIME=0)."""
LOG_FILE_BYTES = 10 * 1024 * 1024
LOG_FILE_COUNT = 5


def _log_file_handler(folder: Path, log_file: Path) -> logging.Handler:
    """The rotating handler of --logging.logging_dir; a folder that cannot be made or
    written is a configuration error (exit 2, one line), not a traceback."""
    from niche.errors import ConfigError

    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--logging.logging_dir {folder} is a file, not a folder: pass a "
                          "folder (created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return logging.handlers.RotatingFileHandler(
            log_file, maxBytes=LOG_FILE_BYTES, backupCount=LOG_FILE_COUNT, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--logging.logging_dir {folder}: cannot write "
                          f"{exc.filename or log_file} ({exc.strerror or exc}): pass a "
                          "writable folder") from None


def setup_logging(debug: bool = False, *, trace: bool = False, logging_dir: Path | None = None,
                  process: str = "niche", progress: bool = True) -> Path | None:
    """Configure the root logger; returns the log file when `logging_dir` is given."""
    level = logging.DEBUG if (debug or trace) else logging.INFO
    stamped = os.environ.get("NICHE_LOG_TIME", "1").strip().lower() not in ("0", "false", "no")
    logging.basicConfig(level=level, format=FORMAT if stamped else UNSTAMPED, datefmt=DATEFMT)
    logging.getLogger().setLevel(level)
    log_file = None
    if logging_dir is not None:
        folder = Path(logging_dir).expanduser()
        log_file = folder / f"{process}.log"
        handler = _log_file_handler(folder, log_file)
        root = logging.getLogger()
        for old in [h for h in root.handlers if isinstance(h, logging.FileHandler)
                    and Path(h.baseFilename) == log_file.resolve()]:
            root.removeHandler(old)  # set up twice in one process: one file handler
            old.close()
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logging.getLogger().addHandler(handler)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.DEBUG if trace else logging.WARNING)
    for transport in TRANSPORT_LOGGERS:
        logging.getLogger(transport).setLevel(logging.DEBUG if trace else logging.WARNING)
    if not (debug or trace):
        from niche.models.quiet import quiet_libraries

        quiet_libraries(progress=progress)
    return log_file
