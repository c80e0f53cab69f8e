"""build_app(settings): the Starlette application, its routes and its lifespan.

The composition root of the served gateway, with `gateway/runtime.py`: the only module
of `gateway/` that imports the GraphQL layer (`schema/`), which sits on top of the
domain (`tests/unit/test_layers.py` checks the direction).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import compat, openai_api, pages, rest
from gateway.config import Settings
from gateway.cors import CORS
from gateway.errors import (
    BadUserInput,
    GatewayError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from gateway.runtime import running_worker, runtime
from schema import build_schema, prepared
from schema.view import GraphQLView, error_body

log = structlog.get_logger("gateway")

DEMO_CREDITS = 100_000


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413 PAYLOAD_TOO_LARGE.

    Hand-written because no middleware in Starlette does it; it checks Content-Length
    and counts a body without one (chunked) as it streams.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
        if length is not None:
            if not length.isdigit() or int(length) > self.limit:
                await self._refuse(scope, receive, send)
            else:  # the server reads no more than Content-Length: nothing to count
                await self.app(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = PayloadTooLarge(f"request body over {self.limit} bytes")
        await error_response(scope["path"], error)(scope, receive, send)


class _TooLarge(Exception):
    pass


def error_response(path: str, exc: GatewayError) -> Response:
    """An error raised outside a handler (routing, a middleware), in the shape of the
    API the path belongs to: GraphQL's under /graphql, REST's everywhere else."""
    if path.startswith("/graphql"):
        body = error_body(exc.code, exc.message)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)
    return rest.error_response(exc)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, method not allowed) as JSON."""
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
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


def build_app(settings: Settings, clock: Callable[[], float] = time.time) -> Starlette:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    schema = build_schema()
    view = GraphQLView(schema, prepared(schema), allowed_origins=settings.allowed_origins)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime(settings, clock) as rt:
            app.state.gateway = rt.gateway
            app.state.persisted = rt.persisted
            if settings.dev:
                made = await rt.gateway.accounts.create("pro", DEMO_CREDITS, name="demo")
                print(f"API key: {made['key']}", flush=True)
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
        Mount("/outputs", StaticFiles(directory=settings.storage_dir), name="outputs"),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    # An API answers the path it was given: `/v1/jobs/x/` is no job, not a redirect.
    app.router.redirect_slashes = False
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CORS, origins=settings.allowed_origins, refuse=error_response)
    return app
