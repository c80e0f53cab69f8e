"""The JSON routes' endpoint and request: Starlette's, with less done per request.

Starlette's `request_response` wraps every call of a function endpoint for exception
handlers these routes never need (each answers its own `GatewayError`s; anything else
still reaches the 500 handler), and its `Request` decodes the header list again on each
`headers.get` and reads the body through an async generator. On the generation and
poll paths, the gateway's busiest, those three were ~9 µs of a request's CPU
(BENCHMARKS.md, "What moved REST"). `route` declares a route whose endpoint is an
`Endpoint` (a plain ASGI app, which Starlette's router calls as it is) and whose request
is this module's `Request`; the handlers keep Starlette's `(request) -> Response`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send


class ReadOnce(Headers):
    """Starlette's `Headers` whose `get` is one dict lookup (the first value of a name,
    as Starlette's)."""

    def __init__(self, scope: Scope) -> None:
        super().__init__(scope=scope)
        self._first = {
            name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(self._list)
        }

    def get(self, key: str, default: Any = None) -> Any:
        return self._first.get(key.lower(), default)

    def __getitem__(self, key: str) -> str:
        return self._first[key.lower()]

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._first


class Request(StarletteRequest):
    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = ReadOnce(self.scope)
        return self._headers

    async def body(self) -> bytes:
        """The whole body, read from `receive` at once (Starlette's `stream()` without
        the generator)."""
        if not hasattr(self, "_body"):
            chunks: list[bytes] = []
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._is_disconnected = True
                    raise ClientDisconnect()
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    break
            self._stream_consumed = True
            self._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return self._body


Handler = Callable[[Request], Awaitable[Response]]


class Endpoint:
    """`handler` as an ASGI app: its request made here, its response sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


def route(path: str, handler: Handler, methods: Sequence[str]) -> Route:
    return Route(path, Endpoint(handler), methods=list(methods), name=handler.__name__)
