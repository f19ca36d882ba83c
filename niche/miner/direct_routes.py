"""A short way through the miner app for its signed endpoints.

FastAPI's stack around a route (exception middleware, exit stacks, routing, dependency
solving, the request wrapper) is ~15 % of the miner's event-loop time per generate request
(bench/overhead.py (a); cProfile of the server thread). The signed handlers need none of it:
they take the raw `Request`, catch every exception themselves and always return a
`Response`. This middleware calls those same handler functions directly; FastAPI keeps their
routes, so /openapi.json documents them and every other method or path goes the usual way.
An exception that escapes a handler anyway still meets Starlette's ServerErrorMiddleware
(outside every added middleware): a 500, never a dropped connection.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

Handler = Callable[[Request], Awaitable[Response]]


class DirectRoutes:
    """ASGI middleware: (method, path) in `routes` goes straight to its handler."""

    def __init__(self, app: ASGIApp, routes: Mapping[tuple[str, str], Handler]):
        self.app = app
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                response = await handler(Request(scope, receive, send))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
