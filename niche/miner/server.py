"""The miner's HTTP face (our "axon"): FastAPI app + uvicorn, policy in MinerService.

Endpoints:
  POST /v1/generate  signed (btauth/1), GenerateRequest -> GenerateResponse | ErrorResponse
  GET  /v1/info      unsigned: what this miner serves (public by nature, cheap, no GPU)
  GET  /healthz      unsigned liveness: {"ok": true, "busy": ..., "queue": ...}
  (Prometheus metrics are on their own port, `--metrics.port`, 127.0.0.1 by default:
   niche/metrics_server.py; the public axon port does not serve them)
  GET  /openapi.json the one schema of the wire format

The generate handler reads the raw body itself (capped, 413) because the signature covers
the exact bytes; FastAPI never parses it before authentication.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from niche import __version__
from niche.auth import AuthFailure
from niche.errors import EngineUnavailable, NicheError
from niche.miner.direct_routes import DirectRoutes
from niche.miner.limits import FetchSlots, PeerSlots, Refusal, add_count
from niche.miner.service import MinerService, short
from niche.miner.staged_close import StagedCloseTransport
from niche.protocol import (
    GENERATE_PATH,
    INFO_PATH,
    STATES_PATH,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    InfoResponse,
    StatesRequest,
    StatesResponse,
)
from niche.transport import BodyTooLarge, read_capped, within
from niche.wire import (
    ANSWER_IMAGE_FORMATS,
    ANSWER_MEDIA_TYPE,
    BINARY_SINCE,
    STATES_MEDIA_TYPE,
    accepts,
    requested_image_format,
)

log = logging.getLogger("niche.miner")

BODY_CUT = "the client disconnected before its request body arrived"
"""A caller gone mid-upload (a validator past its timeout, a dropped link): its own doing,
answered into the void as 499, one log line, never a 500 with a traceback."""

STATES_BODY_BYTES = 4096
"""A StatesRequest is a request id and at most 8 indices."""
INLINE_PARSE_BYTES = 64 * 1024
"""Generate bodies up to this size (every text-to-image request) are parsed on the event
loop: a sub-millisecond parse, where a worker-thread round trip costs milliseconds on a busy
box (bench/overhead.py (a))."""



def _error(status: int, reason: str, detail: str = "", field: str | None = None
           ) -> JSONResponse:
    body = ErrorResponse(reason=reason, detail=detail, field=field)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status)


def _disconnected(receive: Receive) -> Callable[[], Awaitable[None]]:
    """What returns once the peer is gone (awaited after the request body was read: uvicorn's
    receive then waits until the connection closes or the response is complete)."""
    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
    return gone


class ReleasedWhenSent(Response):
    """A response that calls `release` once its bytes have left or its peer is gone, so a
    states slot covers the answer's memory until then (a send that stalls is cut by the
    connection's send deadline). uvicorn returns from a send as soon as the bytes are in the
    transport's buffer and waits for it to drain only before the next send: the empty last
    part is that wait."""

    def __init__(self, content: bytes, media_type: str, release: Callable[[], None]):
        super().__init__(content, media_type=media_type)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._release()


def binary_image_format(accept: str, version: int) -> str | None:
    """The image format of a binary answer for a protocol-4+ request whose Accept names the
    answer media type (RGB-ZSTD when it asks for it, else PNG); None: answer JSON (what
    protocol 2-3 validators read)."""
    if version < BINARY_SINCE:
        return None
    return requested_image_format(accept, writable=ANSWER_IMAGE_FORMATS)


def header_map(request: Request) -> dict[str, str]:
    """The request's headers as one plain dict (names lower-case, the first of a repeated
    name kept, as Starlette's `Headers.get` does, except Accept, whose repeated fields are one
    list: RFC 9110), built once: the checks below read it ~10 times, and each Starlette lookup
    decodes every header again."""
    headers: dict[str, str] = {}
    for name, value in request.scope["headers"]:
        key = name.decode("latin-1").lower()
        if key not in headers:
            headers[key] = value.decode("latin-1")
        elif key == "accept":
            headers[key] += ", " + value.decode("latin-1")
    return headers


def _request_target(request: Request) -> str:
    raw = request.scope.get("raw_path") or request.url.path.encode()
    target = raw.decode("latin-1")
    query = request.scope.get("query_string") or b""
    return f"{target}?{query.decode('latin-1')}" if query else target


def create_app(service: MinerService, *, refresh_metagraph: bool = True) -> FastAPI:
    """The miner app for `service`. `refresh_metagraph` starts the background refresh task
    (when the service has a chain)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = None
        if refresh_metagraph and service.chain is not None:
            task = asyncio.create_task(service.refresh_loop())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    app = FastAPI(title="niche miner", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.state.service = service
    metrics = service.metrics
    config = service.config
    inflight = [0]  # generate requests between admission and answer (event-loop only)
    peer_slots = PeerSlots(config.max_inflight_per_ip, scaled=config.stake_proportional_rate)
    fetch_slots = FetchSlots(config.states_inflight_per_caller, config.states_inflight)
    error_responses: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in
                       (400, 401, 403, 408, 413, 422, 429, 500, 503)}

    @app.post(
        GENERATE_PATH, response_model=GenerateResponse,
        responses={**error_responses, 200: {"content": {ANSWER_MEDIA_TYPE: {}}, "description":
                   "protocol 4+ with Accept: " + ANSWER_MEDIA_TYPE + ": a binary answer "
                   "(niche/wire.py), its image RGB-ZSTD when the Accept listing says "
                   "`image=rgb-zstd`, else PNG; otherwise GenerateResponse as JSON"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}},
    )
    async def generate(request: Request):
        started = time.monotonic()
        caller, status, reason = "-", 500, "internal_error"
        admitted = proven = False
        peer = request.client.host if request.client else "-"
        try:
            headers = header_map(request)
            service.precheck(headers)
            if inflight[0] >= config.max_inflight:
                raise Refusal(503, "busy", f"{inflight[0]} requests in flight; retry later")
            peer_slots.enter(peer)  # the claimed hotkey is unproven: the base cap only
            inflight[0] += 1
            admitted = True
            try:
                body = await within(
                    read_capped(request.stream(), config.max_body_bytes,
                                headers.get("content-length")),
                    config.body_timeout)
            except BodyTooLarge as exc:
                raise Refusal(413, "body_too_large", str(exc)) from None
            except asyncio.TimeoutError:
                raise Refusal(408, "body_timeout", f"body not received within "
                              f"{config.body_timeout:g}s") from None
            except ClientDisconnect:
                raise Refusal(499, "client_gone", BODY_CUT) from None
            caller_key, neuron = service.authenticate(
                headers, body, method=request.method, path=_request_target(request))
            caller = short(caller_key)
            proven = True
            peer_slots.prove(peer, service.inflight_cap(caller_key))
            service.rate_check(caller_key, neuron)
            if len(body) <= INLINE_PARSE_BYTES:  # a thread hop costs more than the parse
                parsed = service.parse(body)
            else:  # up to ~24 MB of JSON (a conditioning image): off the event loop
                parsed = await asyncio.to_thread(service.parse, body)
            image_format = binary_image_format(headers.get("accept", ""),
                                               parsed.protocol_version)
            answer = await service.generate(parsed, neuron, caller_key,
                                            image_format=image_format or "png",
                                            gone=_disconnected(request.receive))
            status, reason = 200, "ok"
            if image_format is not None:
                return Response(answer.binary_body(), media_type=ANSWER_MEDIA_TYPE)
            body = await asyncio.to_thread(answer.json_body)  # base64 of up to ~18 MB
            return Response(body, media_type="application/json")
        except (Refusal, AuthFailure) as exc:
            status, reason = exc.status, exc.reason
            if exc.status >= 500:
                log.warning("request from %s failed: %s", caller, exc)
            return _error(exc.status, exc.reason, exc.detail, getattr(exc, "field", None))
        except Exception as exc:  # never let a request take the miner down
            log.exception("unexpected error serving %s", caller)
            return _error(500, "internal_error", type(exc).__name__)
        finally:
            if admitted:
                inflight[0] -= 1
                peer_slots.leave(peer, proven=proven)
            metrics.requests.labels(str(status)).inc()
            if status != 200:
                metrics.refusals.labels(reason).inc()
            log.info("generate caller=%s status=%d%s %.2fs", caller, status,
                     f" {reason}" if status != 200 else "", time.monotonic() - started)

    @app.post(
        STATES_PATH, response_model=StatesResponse,
        responses={**error_responses, 200: {"content": {STATES_MEDIA_TYPE: {}}, "description":
                   "protocol 4+ with Accept: " + STATES_MEDIA_TYPE + ": the raw float32 "
                   "states (niche/wire.py); otherwise StatesResponse as JSON"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/StatesRequest"}}}}},
    )
    async def states(request: Request):
        """The committed sampler states of one of the caller's earlier answers (audits),
        within the caller's states budget and in-flight share (FetchSlots)."""
        caller, status, reason = "-", 500, "internal_error"
        release: Callable[[], None] | None = None
        try:
            headers = header_map(request)
            service.precheck(headers)
            try:
                body = await within(
                    read_capped(request.stream(), STATES_BODY_BYTES,
                                headers.get("content-length")),
                    config.body_timeout)
            except BodyTooLarge as exc:
                raise Refusal(413, "body_too_large", str(exc)) from None
            except asyncio.TimeoutError:
                raise Refusal(408, "body_timeout", "body not received in time") from None
            except ClientDisconnect:
                raise Refusal(499, "client_gone", BODY_CUT) from None
            caller_key, _ = service.authenticate(
                headers, body, method=request.method, path=_request_target(request))
            caller = short(caller_key)
            service.states_rate_check(caller_key)
            release = fetch_slots.take(caller_key)
            binary = accepts(headers.get("accept", ""), STATES_MEDIA_TYPE)
            answer = await asyncio.to_thread(service.fetch_states, body, caller_key,
                                             binary=binary)
            status, reason = 200, "ok"
            if isinstance(answer, bytes):
                sent = ReleasedWhenSent(answer, STATES_MEDIA_TYPE, release)
            else:
                sent = ReleasedWhenSent(answer.model_dump_json().encode(), "application/json",
                                        release)
            release = None  # the response releases it once sent
            return sent
        except (Refusal, AuthFailure) as exc:
            status, reason = exc.status, exc.reason
            return _error(exc.status, exc.reason, exc.detail, getattr(exc, "field", None))
        except Exception as exc:  # never let a request take the miner down
            log.exception("unexpected error serving states to %s", caller)
            return _error(500, "internal_error", type(exc).__name__)
        finally:
            if release is not None:
                release()
            metrics.state_fetches.labels(str(status)).inc()
            log.info("states caller=%s status=%d%s", caller, status,
                     f" {reason}" if status != 200 else "")

    @app.get(INFO_PATH, response_model=InfoResponse)
    async def info():
        try:
            answer = await asyncio.to_thread(service.info)  # the replicas' states: Ray's RPC
        except EngineUnavailable as exc:  # models still loading (miner.loading)
            return _error(503, exc.reason, str(exc))
        return JSONResponse(answer.model_dump(mode="json"))

    @app.get("/healthz", responses={503: {"description": "not ok: deregistered, no replica "
                                          "up, or a generation stuck far past its timeout"}})
    async def healthz():
        ok, reason = service.health
        body: dict[str, Any] = {"ok": ok, "busy": service.gate.busy,
                                "queue": service.gate.depth, "hotkey": service.hotkey}
        replicas = await asyncio.to_thread(service.replica_stats)
        if replicas is not None:
            body["replicas"] = replicas
            if ok and replicas["up"] == 0:
                ok, reason = False, "no engine replica is up"
        body["ok"] = ok
        if ok:
            return body
        return JSONResponse({**body, "reason": reason}, status_code=503)

    app.add_middleware(DirectRoutes, routes={("POST", GENERATE_PATH): generate,
                                             ("POST", STATES_PATH): states})
    default_openapi = app.openapi

    def openapi():
        if app.openapi_schema:
            return app.openapi_schema
        schema = default_openapi()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for body in (GenerateRequest, StatesRequest):
            request_schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in request_schema.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[body.__name__] = request_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ----------------------------------------------------------------------------- running
def bind_socket(ip: str, port: int, *, port_flag: str = "--axon.port") -> socket.socket:
    """A listening socket on ip:port, or a one-line NicheError (port in use, bad address).

    Made with proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose
    socket says so, and without it a response's body (written after its head) waits for the
    peer's delayed ACK, ~40 ms per small response on a kept-alive connection. `port_flag`
    is the flag the busy-port advice names (the gateway's is --gateway.port)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((ip, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise NicheError(f"port {port} on {ip} is already in use: stop the other process "
                             f"or pick another {port_flag}") from None
        raise NicheError(f"cannot listen on {ip}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may hold, enforced in uvicorn's protocol (below the app)."""

    header_timeout: float = 15.0
    """Seconds for each request's headers (also the idle limit between requests)."""
    total: int = 1024
    """Open connections in all (uvicorn's limit_concurrency)."""
    per_peer: int = 0
    """Open connections from one peer address (peer_key); 0: no bound."""
    send_timeout: float = 0.0
    """Seconds an answer may sit unread in the send buffer; 0: no bound."""
    json_overload: bool = False
    """Answer a request over `total` with a one-line JSON 503 (`error_body`) instead of
    uvicorn's plain-text 503."""
    max_head_bytes: int = 64 * 1024
    """Bytes a request head (request line and headers) may take: a longer one gets a 431 and
    the connection closes. httptools has no bound of its own, and uvicorn keeps every header
    in memory: a peer sending one endless header grew a process by 185 MB and slowed every
    other request 100-fold until the header deadline. Signed requests take ~1.5 KiB."""
    linger: float = 5.0
    """Seconds a connection closed while its request body is still arriving (a 408, 413 or
    400 sent before the whole body) half-closes and drains before it closes: closing at once
    resets the connection and a client still uploading never reads the answer
    (staged_close). 0: close at once."""
    exempt: frozenset[str] = frozenset()
    """Peer addresses `per_peer` does not count: trusted reverse proxies, whose one address
    carries every user (the proxy bounds its own clients)."""
    error_body: Callable[[int, str, str], bytes] | None = None
    """(status, reason, detail) -> the JSON body of a refusal made below the app (431, 503);
    None: niche's ErrorResponse (the miner's)."""

    def body(self, status: int, reason: str, detail: str) -> bytes:
        if self.error_body is not None:
            return self.error_body(status, reason, detail)
        return ErrorResponse(reason=reason, detail=detail).model_dump_json(
            exclude_none=True).encode()


def connection_limits(config: Any) -> ConnectionLimits:
    """The miner's connection limits from its MinerConfig; another app (None) gets the header
    deadline and uvicorn's own limit only."""
    if config is None:
        return ConnectionLimits()
    return ConnectionLimits(header_timeout=config.header_timeout, total=config.max_connections,
                            per_peer=config.max_connections_per_ip,
                            send_timeout=config.send_timeout, json_overload=True)


def peer_key(peername: Any) -> str | None:
    """The address a per-peer connection cap counts: the host, or an IPv6 host's /64 (one
    site's allocation, which a single machine can fill with addresses)."""
    if not peername or not isinstance(peername, tuple):
        return None
    host = str(peername[0])
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return host


OVERLOADED = ("busy", "too many open connections; retry later")
HEAD_TOO_LARGE = "request_header_fields_too_large"


async def _overloaded(send: Send, body: bytes) -> None:
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _raw_refusal(status: int, phrase: str, body: bytes) -> bytes:
    """A whole HTTP/1.1 response, written straight to the socket (no request to answer)."""
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _with_header_deadline(base: type, limits: ConnectionLimits) -> type:
    """uvicorn's HTTP protocol `base` plus, per connection:
    - a deadline for each request's headers: without it a peer that never finishes its
      headers holds a connection (and a limit_concurrency slot) for ever;
    - a cap on connections per peer address (`limits.per_peer`): one more is closed at once,
      so one host cannot hold the `limits.total` that every caller shares (1024 idle
      connections from one address made every validator get 503);
    - a send deadline: an answer left unread (no progress) for `limits.send_timeout` drops
      the connection, freeing the answer's memory;
    - with `limits.json_overload`, a request over `limits.total` gets a one-line JSON 503;
    - a cap on each request head's bytes (`limits.max_head_bytes`): a longer head gets a
      JSON 431 and the connection closes;
    - a staged close (`limits.linger`) when a connection closes while its request body is
      still arriving, so that the client reads the answer instead of a reset.
    `base` reports a complete request head through `_head_received` (see the two
    subclasses below). One class per server: `_peers` is that server's count."""
    overloaded = limits.body(503, *OVERLOADED)
    head_too_large = _raw_refusal(431, "Request Header Fields Too Large", limits.body(
        431, HEAD_TOO_LARGE, f"request line and headers over {limits.max_head_bytes} bytes"))

    class Protocol(base):
        _peers: dict[str, int] = {}
        _peer: str | None = None
        _refused = False
        _deadline = None
        _stall = None
        _stall_size = 0
        _head_bytes = 0
        _awaiting_headers = True
        """No complete request head since the connection opened or the last response."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if limits.json_overload:
                self._app = self.app  # type: ignore[has-type]
                self.app = self._guarded
                self.limit_concurrency = None  # checked in _guarded instead

        async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
            # this request's task is already in self.tasks, its connection in connections
            if len(self.connections) > limits.total or len(self.tasks) > limits.total:
                await _overloaded(send, overloaded)
            else:
                await self._app(scope, receive, send)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._awaiting_headers = True
            self._head_bytes = 0
            self._deadline = self.loop.call_later(limits.header_timeout, self._headers_overdue)

        def _head_received(self) -> None:
            self._awaiting_headers = False

        def data_received(self, data: bytes) -> None:
            if self._refused or self.transport.is_closing():
                return
            super().data_received(data)
            # counted after parsing: a chunk that completes the head may carry a body too
            if self._awaiting_headers and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > limits.max_head_bytes:
                    log.debug("request head from %s over %d bytes: refused", self._peer,
                              limits.max_head_bytes)
                    self.transport.write(head_too_large)
                    self.transport.close()

        def _headers_overdue(self) -> None:
            self._deadline = None
            idle = self.cycle is None or self.cycle.response_complete
            if idle and self._awaiting_headers and not self.transport.is_closing():
                self.transport.close_now()  # no answer to protect: no staged close

        def _peer_may_send(self) -> bool:
            """Whether the request's body is still arriving (closing now would reset the
            connection under the client's upload). A refused head (431, 400) is not drained:
            a head over the cap is broken or hostile, and reading on would serve its sender."""
            return (not self._awaiting_headers and self.cycle is not None
                    and self.cycle.more_body)

        def connection_made(self, transport) -> None:
            peer = peer_key(transport.get_extra_info("peername"))
            if limits.per_peer and peer is not None and peer not in limits.exempt \
                    and self._peers.get(peer, 0) >= limits.per_peer:
                self._refused = True  # never seen by uvicorn: no slot, no task
                log.debug("connection from %s refused: %d open", peer, limits.per_peer)
                transport.close()
                return
            if peer is not None:
                self._peer = peer
                add_count(self._peers, peer, 1)
            super().connection_made(StagedCloseTransport(transport, self.loop,
                                                         self._peer_may_send, limits.linger))
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def pause_writing(self) -> None:
            super().pause_writing()
            if limits.send_timeout and self._stall is None:
                self._watch_send()

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None

        def _watch_send(self) -> None:
            self._stall_size = self.transport.get_write_buffer_size()
            self._stall = self.loop.call_later(limits.send_timeout, self._send_overdue)

        def _send_overdue(self) -> None:
            self._stall = None
            if self.transport.is_closing():
                return
            if self.transport.get_write_buffer_size() < self._stall_size:
                self._watch_send()  # the peer reads, slowly: give it another period
            else:
                self.transport.abort()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            for timer in (self._deadline, self._stall):
                if timer is not None:
                    timer.cancel()
            if isinstance(self.transport, StagedCloseTransport):
                self.transport.cancel()
            if self._peer is not None:
                add_count(self._peers, self._peer, -1)
                self._peer = None
            super().connection_lost(exc)

    return Protocol


def _h11_with_header_deadline(limits: ConnectionLimits) -> type:
    """h11 (pure Python): a request head is complete once h11 leaves IDLE for it."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(_with_header_deadline(H11Protocol, limits)):  # type: ignore[misc]
        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._head_received()

    return Protocol


def _httptools_with_header_deadline(limits: ConnectionLimits) -> type:
    """httptools (llhttp, C): parses a request in ~1/3 of h11's time, ~0.9 ms of a tiny
    answer's path (bench/overhead.py (a)); it calls on_headers_complete per request head."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class Protocol(_with_header_deadline(HttpToolsProtocol, limits)):  # type: ignore[misc]
        def on_headers_complete(self) -> None:
            self._head_received()
            super().on_headers_complete()

    return Protocol


def http_protocol(limits: ConnectionLimits):
    """uvicorn's fastest HTTP/1.1 protocol here (httptools, else h11), with the connection
    limits above."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - httptools is a dependency
        return _h11_with_header_deadline(limits)
    return _httptools_with_header_deadline(limits)


def uvicorn_server(app: FastAPI, *, proxy_headers: bool | None = None,
                   limits: ConnectionLimits | None = None):
    """uvicorn for `app` under `limits` (None: from the miner's config when `app` is the
    miner's, else the defaults).

    `proxy_headers`: trust X-Forwarded-For/-Proto from 127.0.0.1 (uvicorn's default). None:
    off for the miner, whose per-address caps must count the real peer (through a local
    tunnel or port-forward the header would let each request pick its address), on for
    other apps (the gateway names its public address behind its TLS proxy)."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # serve() owns the signals: exit 0 after a clean stop
            yield

    service = getattr(app.state, "service", None)
    limits = limits or connection_limits(getattr(service, "config", None))
    if proxy_headers is None:
        proxy_headers = service is None
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30, limit_concurrency=limits.total,
                            proxy_headers=proxy_headers, http=http_protocol(limits))
    return _Server(config)


@contextlib.contextmanager
def stop_on_signals(server, logger: logging.Logger | None = None) -> Iterator[None]:
    """SIGTERM/SIGINT: finish in-flight requests and stop; a second SIGINT forces it. The
    stop is logged on `logger` (default: the miner's)."""
    say = logger or log
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(sig, _frame) -> None:
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True
        say.info("%s received: stopping", signal.Signals(sig).name)
        server.should_exit = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve(service: MinerService, ip: str, port: int, *, external_ip: str | None = None,
          sock: socket.socket | None = None) -> int:
    """Bind (unless `sock` is bound already: the one the loading miner served), publish the
    endpoint on chain, then serve until SIGINT/SIGTERM (exit code 0) or a deregistration
    (service.exit_code, DEREGISTERED_EXIT_CODE). Returns the code."""
    sock = sock if sock is not None else bind_socket(ip, port)
    actual_port = sock.getsockname()[1]
    public_ip = external_ip or ip
    try:
        service.announce(public_ip, actual_port)
        server = uvicorn_server(create_app(service))
        service.request_stop = lambda: setattr(server, "should_exit", True)
        log.info("miner %s listening on %s:%d (published %s:%d)", service.hotkey, ip,
                 actual_port, public_ip, actual_port)
        with stop_on_signals(server):
            server.run(sockets=[sock])
    finally:
        sock.close()
        service.close()
        log.info("miner stopped (exit code %d)", service.exit_code)
    return service.exit_code
