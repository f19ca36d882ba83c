"""Errors a user can act on. The CLI prints their message on one line, no traceback."""
from __future__ import annotations


class NicheError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class InvalidRequest(NicheError, ValueError):
    """A request (generation, image, flag) is malformed; `field` names the culprit."""

    exit_code = 2


class ConfigError(NicheError):
    exit_code = 2


class EngineUnavailable(NicheError):
    """No engine replica could serve a call within its deadline (a replica died and none
    took over in time); the miner answers 503 and keeps serving."""
