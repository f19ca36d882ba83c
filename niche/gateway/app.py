"""The gateway's HTTP face: the OpenAI Images API, the models list, url answers, the
playground page, health and Prometheus metrics."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from niche.gateway.errors import (
    GatewayError,
    bad_request,
    gateway_error_handler,
    http_error_handler,
)
from niche.gateway.keys import ApiKey
from niche.gateway.schemas import ImagesRequest, ModelCard, ModelList
from niche.gateway.service import Gateway
from niche.transport import BodyTooLarge, read_capped

PLAYGROUND = Path(__file__).parent / "static" / "index.html"


def api_key(request: Request) -> ApiKey:
    """The caller's key (a dependency: a 401 before the body is read)."""
    return request.app.state.gateway.keys.authenticate(request.headers.get("authorization"))


Key = Annotated[ApiKey, Depends(api_key)]


def create_app(gateway: Gateway) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="niche gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_exception_handler(GatewayError, gateway_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.state.gateway = gateway

    @app.post("/v1/images/generations")
    async def generations(request: Request, key: Key) -> JSONResponse:
        model = "-"
        try:
            body = await _body(request, gateway.config.max_body_bytes)
            images = _parse(body)
            model = images.model if images.model in gateway.catalog.specs else "-"
            answer, headers = await gateway.generate(key, images, str(request.base_url))
        except GatewayError as exc:
            gateway.metrics.requests.labels(model, str(exc.status)).inc()
            raise
        gateway.metrics.requests.labels(model, "200").inc()
        return JSONResponse(answer.model_dump(exclude_none=True), headers=headers)

    @app.get("/v1/models")
    async def models(key: Key) -> ModelList:
        counts = gateway.directory.counts()
        return ModelList(data=[ModelCard(
            id=name, created=0, miners=counts.get(name, 0),
            sizes=gateway.catalog.sizes_text(spec),
            pipelines=[p.value for p in spec.pipelines])
            for name, spec in sorted(gateway.catalog.specs.items()) if counts.get(name)])

    @app.get("/v1/files/{name}")
    async def files(name: str) -> Response:
        token = name.removesuffix(".png")
        png = gateway.images.get(token) if len(token) <= 64 else None
        if png is None:
            raise GatewayError(404, "no such image (url answers expire after "
                                    f"{gateway.config.url_ttl / 60:.0f} minutes)",
                               code="not_found")
        kind = "image/webp" if png[8:12] == b"WEBP" else "image/png"
        return Response(png, media_type=kind)

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

    @app.get("/metrics")
    async def metrics() -> Response:
        gateway._update_gauges()
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    return app


async def _body(request: Request, cap: int) -> bytes:
    try:
        return await read_capped(request.stream(), cap, request.headers.get("content-length"))
    except BodyTooLarge:
        raise GatewayError(413, f"request body over {cap // (1024 * 1024)} MB; send a "
                                "smaller conditioning image", code="body_too_large") from None


def _parse(body: bytes) -> ImagesRequest:
    try:
        return ImagesRequest.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        loc = [str(p) for p in first.get("loc", ())]
        if first.get("type") in ("json_invalid", "model_type") or not loc:
            raise bad_request("the body must be a JSON object with at least 'model' and "
                              "'prompt' (OpenAI images API)", code="invalid_body") from None
        param = ".".join(loc)
        message = "unknown parameter" if first.get("type") == "extra_forbidden" \
            else str(first.get("msg", "invalid"))
        more = len(errors) - 1
        raise bad_request(f"{param}: {message}" + (f" (+{more} more)" if more > 0 else ""),
                          param, code="invalid_parameter") from None
