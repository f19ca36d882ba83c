"""Errors a user can act on. The CLI prints their message on one line, no traceback."""
from __future__ import annotations

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` with every control character escaped (a newline becomes the two characters
    backslash-n): peer-supplied text in a reason or a log line cannot start a forged line."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLineReason:
    """Dataclass mixin: whatever is assigned to `reason` (often a peer's words) is stored
    on one line."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "reason" and isinstance(value, str):
            value = one_line(value)
        super().__setattr__(name, value)


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

    reason = "replicas_unavailable"
    """The 503's reason a miner answers with."""


class ModelsLoading(EngineUnavailable):
    """The miner's models are still loading (after a start or restart)."""

    reason = "loading"
