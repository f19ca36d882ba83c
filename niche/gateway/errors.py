"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` and the
status code an OpenAI client maps to its own exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx APIStatusError)."""
from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
RATE_LIMIT = "rate_limit_error"
INSUFFICIENT_QUOTA = "insufficient_quota"
SERVER_ERROR = "server_error"


class GatewayError(Exception):
    """A refusal with an OpenAI-shaped body; raised anywhere, rendered by one handler."""

    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value"
                ) -> GatewayError:
    return GatewayError(400, message, param=param, code=code)


MAX_SHOWN_NAME = 64
"""Characters of a client's field name repeated in a message or `param`."""


def shown_name(name: str) -> str:
    """A field name the client chose, safe to repeat: control and other unprintable
    characters escaped (one line), cut to MAX_SHOWN_NAME with an ellipsis."""
    escaped = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                      for ch in name)
    return escaped if len(escaped) <= MAX_SHOWN_NAME else escaped[:MAX_SHOWN_NAME] + "…"


def unknown_parameter(name: str) -> GatewayError:
    """400 for a field the API does not take, naming it safely."""
    shown = shown_name(name)
    return bad_request(f"{shown}: unknown parameter", shown, code="invalid_parameter")


class ClientGone(Exception):
    """The client closed its connection before its request body arrived: nothing to answer
    and nothing wrong on our side (logged as one 499 line, not a 500)."""


CLIENT_CLOSED = 499
"""nginx's status for a request the client abandoned; only the access log ever sees it."""


async def gateway_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """404 / 405 from routing, in the same shape, with routing's headers (a 405's Allow)."""
    assert isinstance(exc, StarletteHTTPException)
    kind = INVALID_REQUEST if exc.status_code < 500 else SERVER_ERROR
    message = ("not found: " + request.url.path if exc.status_code == 404
               else str(exc.detail))
    return JSONResponse(GatewayError(exc.status_code, message, type=kind).body(),
                        status_code=exc.status_code, headers=dict(exc.headers or {}))


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """Nobody reads this answer; it only gives the access log its status."""
    return Response(status_code=CLIENT_CLOSED)
