"""build_app(settings): the Starlette application, its routes and its lifespan."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import orjson
import structlog
from starlette.applications import Starlette
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import rest
from gateway.config import Settings
from gateway.runtime import running_worker, runtime
from schema import build_schema, prepared
from schema.view import GraphQLView

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
                await self._refuse(scope, send)
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
                await self._refuse(scope, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        message = f"request body over {self.limit} bytes"
        if scope["path"].startswith("/graphql"):
            body = {"data": None,
                    "errors": [{"message": message, "extensions": {"code": "PAYLOAD_TOO_LARGE"}}]}
        else:
            body = {"error": {"code": "PAYLOAD_TOO_LARGE", "message": message}}
        raw = orjson.dumps(body)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(raw)).encode())]})
        await send({"type": "http.response.body", "body": raw})


class _TooLarge(Exception):
    pass


def build_app(settings: Settings, clock: Callable[[], float] = time.time) -> Starlette:
    settings.storage_dir.mkdir(parents=True, exist_ok=True)
    schema = build_schema()
    view = GraphQLView(schema, prepared(schema))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime(settings, clock) as rt:
            app.state.gateway = rt.gateway
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
        Mount("/outputs", StaticFiles(directory=settings.storage_dir), name="outputs"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app
