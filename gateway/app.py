"""build_app(settings): the Starlette application, its routes and its lifespan.

The composition root of the served gateway, with `gateway/runtime.py`: the only module
of `gateway/` that imports the GraphQL layer (`schema/`), which sits on top of the
domain (`tests/unit/test_layers.py` checks the direction).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import (
    compat,
    endpoints,
    metrics,
    metrics_http,
    openai_api,
    pages,
    rest,
    telemetry_http,
)
from gateway.artifacts import CACHE_CONTROL, NAME, StorageUnavailable
from gateway.client_deadlines import ClientDeadlines
from gateway.config import Settings
from gateway.cors import CORS
from gateway.errors import (
    BadUserInput,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
)
from gateway.formats import format_named
from gateway.runtime import running_worker, runtime
from schema import build_schema, prepared
from schema.view import GraphQLView, error_body

log = structlog.get_logger("gateway")

DEMO_CREDITS = 100_000


class Guard:
    """Inside CORS, so that what it answers carries CORS's headers: a request body over
    `limit` bytes refused with 413 PAYLOAD_TOO_LARGE, and a bug answered as a 500 in the
    path's API shape (nothing of it said), logged with its traceback and the request's
    id, so the request line counts it and a page can read it and its X-Request-Id
    (Starlette's own 500 is written outside every middleware, CORS's included).

    Hand-written because no middleware in Starlette limits a body; it checks
    Content-Length and counts a body without one (chunked) as it streams. One layer for
    both: each layer is a call and a wrapper of `send` on every request.
    """

    def __init__(self, app: ASGIApp, limit: int, unread: frozenset[str] = frozenset()) -> None:
        """`unread`: paths whose handlers answer without reading the body (any size)."""
        self.app = app
        self.limit = limit
        self.unread = unread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in self.unread:
            length = None
            for name, value in scope["headers"]:
                if name == b"content-length":
                    length = value
            if length is None:  # chunked: counted as it streams
                receive = self._limited(receive)
            elif not length.isdigit() or int(length) > self.limit:
                await self._refuse(scope, receive, send)
                return
            # else the server reads no more than Content-Length: nothing to count
        sent = Sent(send)
        try:
            await self.app(scope, receive, sent)
        except _TooLarge:
            if not sent.started:
                await self._refuse(scope, receive, send)
        except ClientDisconnect:
            raise  # not a bug: the client left mid-body (`RequestTelemetry` notes it)
        except Exception:
            if sent.started:  # the answer is under way: nothing left to say it with
                raise
            log.exception("unexpected error")
            error = error_response(scope["path"], InternalError("internal server error"))
            await error(scope, receive, send)

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        return limited_receive

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"request body over {self.limit} bytes")
        await error_response(scope["path"], error)(scope, receive, send)


class _TooLarge(Exception):
    pass


class Sent:
    """`send`, noting whether the answer has started (after which no error can be said)."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


#: REST's own paths under /v1, by their first segment: every other path there is OpenAI's
#: (`speaks_openai`), so that code written for OpenAI's API calling a route the gateway
#: does not offer (chat completions, say) reads the refusal in OpenAI's shape
REST_V1 = frozenset(r.path.split("/")[2] for r in rest.routes if r.path.startswith("/v1/"))


def speaks_openai(path: str) -> bool:
    return path.startswith("/v1/") and path.split("/", 3)[2] not in REST_V1


#: the error shape of each API whose paths start so (the first that matches); REST's else
SHAPES: tuple[tuple[str, Callable[[GatewayError], Response]], ...] = (
    (compat.krea.PREFIX + "/", compat.krea.error_response),
    (compat.segmind.PREFIX + "/", compat.segmind.error_response),
    (compat.fluxkrea.PREFIX + "/", compat.fluxkrea.error_response),
)


def error_response(path: str, exc: GatewayError) -> Response:
    """An error raised outside a handler (routing, a middleware, a bug), in the shape of
    the API the path belongs to: GraphQL's under /graphql, OpenAI's and each provider's
    under theirs, REST's everywhere else."""
    if path.startswith("/graphql"):
        body = error_body(exc.code, exc.message)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)
    if speaks_openai(path):
        return openai_api.error_response(exc)
    for prefix, shaped in SHAPES:
        if path.startswith(prefix):
            return shaped(exc)
    return rest.error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed) as JSON."""
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404 and speaks_openai(request.url.path):
        error = openai_api.not_offered(request.method, request.url.path)
    elif exc.status_code == 404:
        error = NotFound(f"no route {request.url.path}")
    elif exc.status_code == 405:
        error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
    else:
        error = BadUserInput(str(exc.detail))
        error.status = exc.status_code
    error.headers = dict(exc.headers or {})  # 405's Allow
    return error_response(request.url.path, error)


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback by the server; the client learns nothing of it."""
    return error_response(request.url.path, InternalError("internal server error"))


class LocalOutputs(StaticFiles):
    """`GET /outputs/NAME` from the storage directory: only the names the gateway makes
    (any other file there is not an output: 404), cached as the bucket's objects are."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        if not NAME.fullmatch(path):
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        response.headers["Cache-Control"] = CACHE_CONTROL
        # The type its name says, from the gateway's own table: the system's (`mimetypes`)
        # may not know .webp (python:3.11-slim has no /etc/mime.types).
        found = format_named(path.rsplit(".", 1)[-1])
        if found is not None and "content-type" in response.headers:
            response.headers["Content-Type"] = found.content_type
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


async def stored_output(request: Request) -> Response:
    """`GET /outputs/NAME` when outputs are in a bucket: a 302 to the object, at a
    presigned URL made now (or the public one). The URLs handed out keep the local
    directory's shape and never expire (gateway/artifacts_s3.py says why)."""
    from gateway.artifacts_s3 import S3ArtifactStore

    store = request.app.state.gateway.artifacts
    assert isinstance(store, S3ArtifactStore)
    try:
        location = await store.location(request.path_params["name"])
    except StorageUnavailable:
        log.exception("cannot send a client to a stored output")
        return error_response(request.url.path, ServiceUnavailable("storage unavailable"))
    if location is None:
        return error_response(request.url.path, NotFound(f"no output {request.url.path}"))
    # Not cached: the presigned URL it names expires.
    return RedirectResponse(location, status_code=302, headers={"Cache-Control": "no-store"})


class App(Starlette):
    """Starlette, but a request for one of the JSON routes (`endpoints.Table`: REST,
    OpenAI's, the provider-compatible ones) goes to its endpoint through the gateway's
    own middleware only, past Starlette's two outer middlewares and its router. Those
    have nothing to do there (each endpoint answers its own errors, `Guard` a bug's;
    the router only searches), and cost the busiest routes measurably (BENCHMARKS.md,
    "Speed, round two, continued")."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = endpoints.Table(self.routes)
        self.direct: ASGIApp | None = None  # built at the first request, as Starlette's

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            routed = self.table.find(scope)
            if routed is not None:
                if self.direct is None:
                    direct: ASGIApp = self._routed
                    for cls, args, options in reversed(self.user_middleware):
                        direct = cls(direct, *args, **options)
                    self.direct = direct
                scope["app"] = self
                scope["router"] = self.router
                scope.update(routed)
                await self.direct(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = scope["endpoint"]
        # Set here, as the router sets it, past the middleware: a request refused before
        # (a body over the limit) is counted and logged as `unmatched` (docs/api.md#metrics).
        scope["route"] = self.table.route_of[endpoint]
        await endpoint(scope, receive, send)


def server_limits(settings: Settings) -> dict[str, Any]:
    """What uvicorn is told beside the app: a WebSocket message may be as large as an
    HTTP body (`max_body_bytes`), not uvicorn's 16 MiB (a frame that size held the loop
    ~0.1 s, and its objects the memory until a rare full collection); a client has
    `client_timeout_seconds` to send a request's headers, and as long again for its body
    (`ClientDeadlines`: httptools, as uvicorn's own, with deadlines)."""
    deadlines = functools.partial(
        ClientDeadlines,
        client_timeout=settings.client_timeout_seconds,
        count=metrics.HTTP.count if settings.metrics_enabled else None,
    )
    return {"ws_max_size": settings.max_body_bytes, "http": deadlines}


def build_app(settings: Settings, clock: Callable[[], float] = time.time) -> Starlette:
    outputs: BaseRoute
    if settings.storage_url:
        outputs = Route("/outputs/{name}", stored_output, methods=["GET"])
    else:
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
        outputs = Mount("/outputs", LocalOutputs(directory=settings.storage_dir), name="outputs")
    schema = build_schema()
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None
    view = GraphQLView(schema, prepared(schema), allowed_origins=settings.allowed_origins)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            runtime(settings, clock) as rt,
            metrics_http.watching(rt.worker, settings) as sampler,
        ):
            app.state.metrics = sampler  # GET /metrics refreshes the Redis gauges with it
            app.state.gateway = rt.gateway
            app.state.persisted = rt.persisted
            if settings.dev and not settings.redis_url:
                made = await rt.gateway.accounts.create("pro", DEMO_CREDITS, name="demo")
                print(f"API key: {made['key']}", flush=True)
                print(f"Webhook secret: {made['webhookSecret']}", flush=True)
            elif settings.dev:  # a Redis keeps every one: a funded key more at each start
                log.warning("dev mode on GATEWAY_REDIS_URL: no demo key made (gateway keys create)")
            if settings.inprocess_workers:
                async with running_worker(rt.worker, settings.shutdown_grace_seconds):
                    yield
            else:
                yield

    routes = [
        Route("/graphql", view, methods=["GET", "POST"]),
        WebSocketRoute("/graphql", view),
        *rest.routes,
        *compat.routes,
        *openai_api.routes,
        *pages.routes,
        *(
            [Route(metrics_http.PATH, metrics_http.MetricsEndpoint(token), methods=["GET"])]
            if settings.metrics_enabled
            else []
        ),
        outputs,
    ]
    middleware = [
        # Outermost: every answer, a refusal of any middleware below, carries the id, and
        # is counted and logged.
        Middleware(
            telemetry_http.RequestTelemetry,
            refuse=error_response,
            count=metrics.HTTP.count if settings.metrics_enabled else None,
            log=settings.access_log,
        ),
        Middleware(CORS, origins=settings.allowed_origins, refuse=error_response),
        # Inside CORS: a 413 or a bug's 500 gets its headers.
        Middleware(Guard, limit=settings.max_body_bytes, unread=openai_api.UNSUPPORTED),
    ]
    app = App(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    # An API answers the path it was given: `/v1/jobs/x/` is no job, not a redirect.
    app.router.redirect_slashes = False
    return app
