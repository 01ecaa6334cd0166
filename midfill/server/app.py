"""The HTTP app: protocol routers on one engine, with auth, body limits, metrics and errors that
always come back in the calling protocol's own error schema."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from midfill.engine.scheduler import Engine, EngineUnavailable
from midfill.errors import MidfillError
from midfill.server import llamacpp, openai, refact, ui
from midfill.server.bridge import ClientGone
from midfill.server.guards import ApiKeyCheck, HeadAsGet, HostCheck
from midfill.server.lenient import NameIgnoredFields
from midfill.server.metrics import Metrics
from midfill.server.state import ServerSettings, ServerState
from midfill.tokenizer import Tokenizer

log = logging.getLogger("midfill.server")
RETRY_AFTER_S = 1

LLAMACPP_PATHS = ("/infill", "/completion", "/health", "/v1/health")
REFACT_PATHS = ("/refact-caps", "/coding_assistant_caps.json", "/v1/code-completion", "/tokenizer/", "/stats/")


def error_schema(path: str) -> Callable[[int, str], dict]:
    """The error body format of the protocol a path belongs to."""
    if path.startswith(LLAMACPP_PATHS):
        return llamacpp.error_body
    if path.startswith(REFACT_PATHS):
        return refact.error_body
    return openai.error_body


def error_response(request_path: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_schema(request_path)(status, message), status_code=status, headers=headers)


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def describe_validation_error(exc: RequestValidationError) -> str:
    """One line naming the first problem: the field and what is wrong with it."""
    errors = exc.errors()
    first = errors[0]
    # pydantic adds the union member it tried ("str", "list[int]") to the location; drop those
    path = [str(p) for p in first.get("loc", ()) if p != "body"]
    path = [p for p in path if p.split("[")[0] not in TYPE_TAGS and not p.startswith("function-")]
    where = ".".join(path)
    kind = first.get("type")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}; see the API reference for the fields this endpoint takes"
    if not where and kind in ("missing", "model_attributes_type", "dict_type"):
        return "the body must be a JSON object (and sent with Content-Type: application/json)"
    if sum(1 for e in errors if [str(p) for p in e.get("loc", ())][: len(path) + 1] == ["body", *path]) > 1:
        return f"{where}: {type(first.get('input')).__name__} is not an accepted type here"
    return f"{where or 'body'}: {first.get('msg')}"


class BodyLimit:
    """Refuse bodies over a size limit with 413, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(scope["path"], 413, f"the body is over the limit of {self.max_bytes} bytes")
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"the body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


class CountRequests:
    """Count requests by route template and status, and time them as the client sees it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            label = route.path if route is not None else "unmatched"
            self.metrics.requests.labels(label, str(status)).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)


def create_app(engine: Engine, tok: Tokenizer, settings: ServerSettings) -> FastAPI:
    """The app; it starts the engine thread on startup and stops it on shutdown."""
    metrics = Metrics()
    metrics.queue_depth.set_function(lambda: engine.queue_depth)
    metrics.active.set_function(lambda: len(engine.active))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            cancelled = engine.stop()
            log.info("stopped; %d unfinished requests cancelled", cancelled)

    app = FastAPI(title="midfill", lifespan=lifespan)
    app.state.midfill = ServerState(engine, tok, metrics, settings)
    for router in (openai.router, refact.router, llamacpp.router, ui.router):
        app.include_router(router)
    app.mount("/ui", StaticFiles(directory=ui.STATIC), name="ui")

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, 400, describe_validation_error(exc))

    @app.exception_handler(MidfillError)
    async def user_error(request: Request, exc: MidfillError):
        return error_response(request.url.path, 400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if isinstance(exc.__cause__, StarletteHTTPException):  # older FastAPI wraps errors from receive()
            exc = exc.__cause__
        message = str(exc.detail)
        if exc.status_code == 400 and isinstance(exc.__cause__, (UnicodeDecodeError, ValueError)):
            message = f"the body could not be read as UTF-8 JSON ({exc.__cause__.__class__.__name__})"
        return error_response(request.url.path, exc.status_code, message, getattr(exc, "headers", None))

    @app.exception_handler(EngineUnavailable)
    async def engine_unavailable(request: Request, exc: EngineUnavailable):
        message = f"the server is busy ({exc}); retry in {RETRY_AFTER_S}s"
        return error_response(request.url.path, 503, message, {"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return error_response(request.url.path, 499, "the client closed the request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")

    # the last added runs first: count everything, then Host, HEAD, key, size, and only then a route
    app.add_middleware(NameIgnoredFields)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyCheck, key=settings.api_key, respond=error_response)
    app.add_middleware(HeadAsGet)
    app.add_middleware(HostCheck, allowed=frozenset({settings.host, *settings.allowed_hosts}), respond=error_response)
    app.add_middleware(CountRequests, metrics=metrics)
    return app
