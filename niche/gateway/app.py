"""The gateway's HTTP face: the OpenAI Images API (generations, edits, variations, streamed
or not), the models, url answers, the playground page and health. Prometheus metrics are
not here: `niche gateway serve --metrics.port` serves them on a local port."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from niche.errors import one_line
from niche.gateway.access_log import AccessLog
from niche.gateway.errors import (
    CLIENT_CLOSED,
    ClientGone,
    GatewayError,
    bad_request,
    client_gone_handler,
    gateway_error_handler,
    http_error_handler,
    shown_name,
)
from niche.gateway.forms import MAX_IMAGE_BYTES, MB, form_fields, one_image, read_form
from niche.gateway.keys import ApiKey, InFlight
from niche.gateway.router import CAPACITY_HEADERS, cancel_all
from niche.gateway.schemas import ImagesRequest, ModelCard, ModelList
from niche.gateway.service import Gateway, GatewayConfig, Job
from niche.imaging import sniff_format
from niche.protocol import PipelineKind
from niche.transport import BodyTooLarge, read_capped, within

PLAYGROUND = Path(__file__).parent / "static" / "index.html"
VARIATION_PROMPT = "a variation of the image"
MEDIA_TYPES = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}
T = TypeVar("T")


def api_key(request: Request) -> ApiKey:
    """The caller's key (a dependency: a 401 before the body is read)."""
    key = request.app.state.gateway.keys.authenticate(request.headers.get("authorization"))
    request.state.key_id = key.id
    request.state.key = key  # error answers carry its quota headers too
    return key


def optional_key(request: Request) -> ApiKey | None:
    """The models are public; a key, when sent, must be valid (and gets its quota headers)."""
    if not request.headers.get("authorization"):
        return None
    return api_key(request)


async def key_slot(request: Request, key: Annotated[ApiKey, Depends(api_key)]
                   ) -> AsyncIterator[ApiKey]:
    """The caller's key, holding one of its in-flight slots until the answer is sent (a
    stream's last byte included), with one request taken from its per-minute bucket before
    the body is read (an upload, a decode, a refusal of it all count); or a 429 when the key
    has too many open or no request left."""
    with request.app.state.inflight.hold(key):
        request.app.state.gateway.keys.take_request(key)
        yield key


Key = Annotated[ApiKey, Depends(key_slot, scope="request")]
MaybeKey = Annotated["ApiKey | None", Depends(optional_key)]


def create_app(gateway: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    # no redirect_slashes: a 307 to "/v1/images/generations" built from the Host header
    # (always http) would answer a trailing slash without a body; a JSON 404 says it
    app = FastAPI(title="niche gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, redirect_slashes=False)
    def quota_headers(key: ApiKey | None) -> dict[str, str]:
        return gateway.keys.quota(key).headers() if key is not None else {}

    async def keyed_error(request: Request, exc: Exception) -> Response:
        """OpenAI's error body; an answer to a request with a valid key carries the key's
        standing (`x-ratelimit-*`), as every other answer does: the key's, whatever else the
        error carries (the subnet's capacity is `x-niche-capacity-*`)."""
        assert isinstance(exc, GatewayError)
        exc.headers = {**exc.headers, **quota_headers(getattr(request.state, "key", None))}
        return await gateway_error_handler(request, exc)

    app.add_exception_handler(GatewayError, keyed_error)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(ClientGone, client_gone_handler)
    if gateway.config.cors_origins:
        # any request header: the openai SDKs send x-stainless-* (arch, os, runtime, retry
        # count, timeout...) and add more over time; the origin list and the bearer key
        # (no cookies) are what guard the API
        app.add_middleware(CORSMiddleware, allow_origins=list(gateway.config.cors_origins),
                           allow_methods=["GET", "HEAD", "POST"], allow_headers=["*"],
                           expose_headers=["x-niche-seeds", "x-niche-miners", "Retry-After",
                                           *EXPOSED_QUOTA_HEADERS, *CAPACITY_HEADERS],
                           max_age=600)
    app.add_middleware(AccessLog)
    app.state.gateway = gateway
    app.state.inflight = InFlight(gateway.config.max_inflight_per_key)

    async def images(request: Request, key: ApiKey, fields: dict, event: str) -> Response:
        model = "-"
        try:
            body = _parse(fields)
            model = body.model if body.model in gateway.catalog.specs else "-"
            if body.stream and body.response_format == "url":
                raise bad_request("response_format: a stream sends b64_json images; drop "
                                  "response_format=url", "response_format")
            job = await gateway.prepare(key, body)
            if body.stream:
                gateway.metrics.requests.labels(model, "200").inc()
                return StreamingResponse(
                    _stream(gateway, job, event, str(request.base_url), request),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                             "x-niche-seeds": ",".join(str(s) for s in job.seeds),
                             **job.quota.headers()})
            with gateway.billing(job) as bill:
                answer, headers = await _unless_gone(
                    request, gateway.generate(job, str(request.base_url)))
                bill.sent = len(answer.data)
        except GatewayError as exc:
            gateway.metrics.requests.labels(model, str(exc.status)).inc()
            raise
        except ClientGone:
            gateway.metrics.requests.labels(model, str(CLIENT_CLOSED)).inc()
            raise
        request.state.miners = headers.get("x-niche-miners", "-")
        gateway.metrics.requests.labels(model, "200").inc()
        return JSONResponse(answer.model_dump(exclude_none=True), headers=headers)

    @app.post("/v1/images/generations")
    async def generations(request: Request, key: Key) -> Response:
        raw = await _body(request, gateway.config)
        try:
            fields = json.loads(raw, parse_int=_json_int, parse_constant=_json_constant)
        except (ValueError, RecursionError):
            fields = None
        if not isinstance(fields, dict):
            raise bad_request("the body must be a JSON object with at least 'model' and "
                              "'prompt' (OpenAI images API)", code="invalid_body")
        return await images(request, key, fields, "image_generation")

    @app.post("/v1/images/edits")
    async def edits(request: Request, key: Key) -> Response:
        """An image and a prompt: the image guides a new one through the pipeline that
        `pipeline` names (default controlnet-canny; `input_fidelity: low` means ip-adapter)."""
        form = await read_form(request.headers.get("content-type"),
                               await _body(request, gateway.config))
        fields = form_fields(form)
        fields["image"] = one_image(form)
        if "pipeline" not in fields:
            fields["pipeline"] = (PipelineKind.IP_ADAPTER.value
                                  if fields.get("input_fidelity") == "low"
                                  else PipelineKind.CONTROLNET_CANNY.value)
        return await images(request, key, fields, "image_edit")

    @app.post("/v1/images/variations")
    async def variations(request: Request, key: Key) -> Response:
        """Images like the uploaded one: IP-Adapter, with an optional `prompt`."""
        form = await read_form(request.headers.get("content-type"),
                               await _body(request, gateway.config))
        fields = form_fields(form)
        fields["image"] = one_image(form)
        fields.setdefault("pipeline", PipelineKind.IP_ADAPTER.value)
        fields.setdefault("prompt", VARIATION_PROMPT)
        return await images(request, key, fields, "image_edit")

    def card(name: str) -> ModelCard:
        spec = gateway.catalog.specs[name]
        return ModelCard(id=name, created=0, miners=gateway.directory.counts().get(name, 0),
                         sizes=gateway.catalog.sizes_text(spec),
                         pipelines=[p.value for p in spec.pipelines])

    @app.get("/v1/models")
    async def models(key: MaybeKey) -> JSONResponse:
        counts = gateway.directory.counts()
        listing = ModelList(data=[card(name) for name in sorted(gateway.catalog.specs)
                                  if counts.get(name)])
        return JSONResponse(listing.model_dump(), headers=quota_headers(key))

    @app.get("/v1/models/{name}")
    async def model(name: str, key: MaybeKey) -> JSONResponse:
        if name not in gateway.catalog.specs:
            raise GatewayError(404, f"unknown model '{one_line(name[:64])}'; this gateway "
                                    "serves: "
                                    f"{', '.join(sorted(gateway.catalog.specs))}",
                               param="model", code="model_not_found")
        return JSONResponse(card(name).model_dump(), headers=quota_headers(key))

    @app.api_route("/v1/files/{name}", methods=["GET", "HEAD"])
    async def files(name: str) -> Response:
        """A `url` answer, only under the name it was given (`<token>.<its format>`)."""
        token, _, ext = name.partition(".")
        entry = gateway.images.entry(token) if len(token) <= 64 else None
        if entry is None or ext != _format(entry[0]):
            raise GatewayError(404, "no such image (url answers expire after "
                                    f"{gateway.config.url_ttl / 60:.0f} minutes)",
                               code="not_found")
        data, expires = entry
        return Response(data, media_type=MEDIA_TYPES[ext], headers={
            "X-Content-Type-Options": "nosniff",
            "Cache-Control": f"private, max-age={max(0, int(expires - time.time()))}"})

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text())

    @app.get("/healthz")
    async def healthz() -> dict:
        refreshed = gateway.directory.refreshed_at
        return {"ok": True, "miners": gateway.directory.counts(),
                "refreshed_seconds_ago": None if refreshed is None
                else round(time.monotonic() - refreshed, 1),
                "last_error": gateway.directory.last_error}

    return app


EXPOSED_QUOTA_HEADERS = [f"x-ratelimit-{what}-{unit}" for what in ("limit", "remaining", "reset")
                         for unit in ("requests", "images")]


def _format(data: bytes) -> str:
    """The format of an image the gateway itself wrote (png, webp or jpeg)."""
    return (sniff_format(data) or "PNG").lower()


async def _stream(gateway: Gateway, job: Job, event: str, base_url: str,
                  request: Request) -> AsyncIterator[bytes]:
    """Server-sent events the openai client reads: one `<event>.completed` per image as it
    arrives (with niche's fields), `: ...` comments as progress while miners work, and an
    `error` event (the OpenAI error body) if an image fails; the key pays for the images
    sent only, whatever ends the stream (`Gateway.billing`)."""
    n, miners, ended = len(job.params), [], False
    yield f": niche: {n} image{'s' if n != 1 else ''} asked of the miners\n\n".encode()
    with gateway.billing(job) as bill:
        try:
            async for got in gateway.deliver(job, heartbeat=gateway.config.stream_heartbeat):
                if got is None:
                    yield f": waiting for miners, {bill.sent} of {n} images done\n\n".encode()
                    continue
                index, item = got
                data = await gateway.image_data(item, job.request, base_url)
                miners.append(str(data.miner_uid))
                bill.sent += 1
                payload = {"type": f"{event}.completed", "b64_json": data.b64_json,
                           "created_at": int(time.time()), "size": job.size,
                           "quality": "auto", "background": "opaque",
                           "output_format": job.request.output_format,
                           "usage": job.usage(1).model_dump(), "index": index,
                           **data.model_dump(exclude={"b64_json", "url", "revised_prompt"})}
                yield f"event: {event}.completed\ndata: {json.dumps(payload)}\n\n".encode()
            gateway.finished(job, bill.sent)
            ended = True
        except GatewayError as exc:
            bill.refusal = exc
            request.state.stream_error = exc.status
            yield f"event: error\ndata: {json.dumps(exc.body())}\n\n".encode()
            ended = True
        finally:
            request.state.miners = ",".join(miners) or "-"
            if not ended:  # the client hung up (or the server stopped) mid-stream
                request.state.stream_abandoned = f"{bill.sent} of {n} images sent"


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result while the client still waits for it. A client that hangs up (its
    body was read: the next ASGI message is `http.disconnect`) has `work` cancelled at once,
    so no miner is asked for it any more, and is `ClientGone` (a 499 line, its undelivered
    images refunded), as is one gone by the time the answer is ready: nobody would read it."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all({task, gone})
    if task.cancelled() or await request.is_disconnected():
        raise ClientGone()
    return task.result()


async def _hang_up(request: Request) -> None:
    """Returns when the client closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _body(request: Request, config: GatewayConfig) -> bytes:
    """The whole body, within the size cap and the time the config allows (a 413 or a 408
    that closes the connection); a client that hangs up is `ClientGone`, not a 500."""
    cap = config.max_body_bytes
    try:
        return await within(read_capped(request.stream(), cap,
                                        request.headers.get("content-length")),
                            config.body_timeout)
    except BodyTooLarge:
        raise GatewayError(413, f"request body over {cap // (1024 * 1024)} MB; send a "
                                "smaller conditioning image", code="body_too_large") from None
    except TimeoutError:
        raise GatewayError(408, f"the request body did not arrive within "
                                f"{config.body_timeout:g}s; send it at once (check the "
                                "connection, or send a smaller image)", code="body_timeout",
                           headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise ClientGone() from None


class _BadNumber:
    """A JSON number no field takes (over MAX_INT_DIGITS digits, NaN, Infinity): kept as
    this marker so the request model refuses it under the field's name."""

    def __init__(self, why: str):
        self.why = why


MAX_INT_DIGITS = 64
"""Longer integer literals are refused unparsed (Python's int() of thousands of digits is
refused anyway, and slow before that)."""


def _json_int(text: str) -> int | _BadNumber:
    """json's `parse_int`: a too long literal becomes a marker, not a ValueError that
    would blame the whole body."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return _BadNumber(f"a number of {digits} digits is too long")
    return int(text)


def _json_constant(name: str) -> _BadNumber:
    """json's `parse_constant` (NaN, Infinity, -Infinity): no field takes one."""
    return _BadNumber(f"{name} is not a number this API takes")


def _parse(fields: dict) -> ImagesRequest:
    try:
        return ImagesRequest.model_validate(fields)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [str(p) for p in first.get("loc", ())]
        if first.get("type") == "model_type" or not loc:
            raise bad_request("the body must be a JSON object with at least 'model' and "
                              "'prompt' (OpenAI images API)", code="invalid_body") from None
        param = shown_name(".".join(loc))
        message = _problem(first)
        more = len(errors) - 1
        raise bad_request(f"{param}: {message}" + (f" (+{more} more)" if more > 0 else ""),
                          param, code="invalid_parameter") from None


def _problem(error: Mapping[str, Any]) -> str:
    """One validation error in words, naming no user value (so it stays one line)."""
    if error.get("type") == "extra_forbidden":
        return "unknown parameter"
    if error.get("loc") == ("image",) and error.get("type") == "string_too_long":
        return (f"over {MAX_IMAGE_BYTES * 4 // 3 // MB} MB of base64 (an image file over "
                f"{MAX_IMAGE_BYTES // MB} MB); send a smaller or compressed image")
    if isinstance(error.get("input"), _BadNumber):
        return error["input"].why
    return one_line(str(error.get("msg", "invalid")))
