"""--logging.trace and --logging.logging_dir as in bittensor; bittensor's transport and the
websockets library below WARNING only when tracing."""
from __future__ import annotations

import logging

import pytest

from niche.cli import build_parser
from niche.logging_setup import TRANSPORT_LOGGERS, setup_logging


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name in TRANSPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


@pytest.mark.parametrize("command", [["miner", "--netuid", "1"], ["validator", "--netuid", "1"]])
def test_flags_parse_as_in_bittensor(command, tmp_path):
    args = build_parser().parse_args([*command, "--logging.trace", "--logging.logging_dir",
                                      str(tmp_path)])
    assert args.trace is True and args.logging_dir == tmp_path and args.debug is False
    plain = build_parser().parse_args(command)
    assert plain.trace is False and plain.logging_dir is None


def test_logging_dir_gets_the_lines_and_transport_is_quiet(tmp_path, restore_logging):
    log_file = setup_logging(logging_dir=tmp_path / "logs", process="niche-miner")
    setup_logging(logging_dir=tmp_path / "logs", process="niche-miner")  # twice: one handler
    assert log_file == tmp_path / "logs" / "niche-miner.log"
    logging.getLogger("niche.miner").info("serving on port %d", 8091)
    logging.getLogger("bittensor.transport.raw_websocket").info("frame >>> 0x1234")
    logging.getLogger("bittensor.transport").warning("reconnecting")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = log_file.read_text()
    assert text.count("niche.miner: serving on port 8091") == 1
    assert "frame >>>" not in text and "WARNING bittensor.transport: reconnecting" in text


def test_trace_lets_the_transport_through(tmp_path, restore_logging):
    log_file = setup_logging(trace=True, logging_dir=tmp_path, process="niche-validator")
    logging.getLogger("bittensor.transport.raw_websocket").debug("frame <<< 0xbeef")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "DEBUG bittensor.transport.raw_websocket: frame <<< 0xbeef" in log_file.read_text()
