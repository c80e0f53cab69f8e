"""The JSON routes' endpoint and request: Starlette's, with less done per request.

Starlette's `request_response` wraps every call of a function endpoint for exception
handlers these routes never need (each answers its own `GatewayError`s; anything else
still reaches the 500 handler), and its `Request` decodes the header list again on each
`headers.get` and reads the body through an async generator. On the generation and
poll paths, the gateway's busiest, those three were ~9 µs of a request's CPU
(BENCHMARKS.md, "What moved REST"). `route` declares a route whose endpoint is an
`Endpoint` (a plain ASGI app, which Starlette's router calls as it is) and whose request
is this module's `Request`; the handlers keep Starlette's `(request) -> Response`.
`Table` finds these routes ahead of Starlette's router (`gateway/app.py` serves them past
it). `wait_answering`: the wait of the routes that answer when a job ends, and what
happens to the job when the client leaves first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import structlog
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.requests import Request as StarletteRequest
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from gateway import metrics
from gateway.errors import GatewayError, Unauthenticated

if TYPE_CHECKING:
    from gateway.auth import Principal
    from gateway.jobs.model import Job
    from gateway.params import GenerationRequest
    from gateway.service import Gateway

log = structlog.get_logger("gateway")


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
_R = TypeVar("_R")  # the route's request, whichever class it is


def generation_key(read: Callable[[_R], str], request: _R) -> str:
    """A provider route's own reader of its key for a generation (its protocol's header,
    its own refusal), the refusal counted as `Gateway.generate` counts every other
    (`gateway_admissions_total`): it comes before that call."""
    try:
        return read(request)
    except Unauthenticated as exc:
        metrics.refused(exc.code)
        raise


#: What a read answers is the caller's own (a job, its status, the models its token
#: may use) or changes by the second: no cache between may keep it, since a shared
#: cache keyed by the URL alone would serve one caller's job, or a 404, to another.
NO_STORE = (b"cache-control", b"no-store")


class Endpoint:
    """`handler` as an ASGI app: its request made here, its response sent; a GET's
    with `NO_STORE` unless the handler said how it may be cached."""

    def __init__(self, handler: Handler, *, read: bool = False) -> None:
        self.handler = handler
        self.read = read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        if self.read and all(name != NO_STORE[0] for name, _ in response.raw_headers):
            response.raw_headers.append(NO_STORE)
        await response(scope, receive, send)


def route(path: str, handler: Handler, methods: Sequence[str]) -> Route:
    endpoint = Endpoint(handler, read="GET" in methods)
    return Route(path, endpoint, methods=list(methods), name=handler.__name__)


class Table:
    """The routes made by `route`, found for a request by its path: a dict lookup for a
    fixed path; for the others, Starlette's own match, tried only for a path that starts
    as one of them does (Starlette's router tries every route of the app in turn). Only
    a full match counts: a path or method it does not serve is the router's to answer
    (404, 405 with Allow)."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.fixed: dict[str, Route] = {}
        self.patterned: list[tuple[str, Route]] = []  # (the path up to its first {, route)
        self.route_of: dict[Endpoint, Route] = {}
        for found in routes:
            if not (isinstance(found, Route) and isinstance(found.app, Endpoint)):
                continue
            self.route_of[found.app] = found
            if found.param_convertors:
                self.patterned.append((found.path.partition("{")[0], found))
            else:
                self.fixed.setdefault(found.path, found)
        self.starts = tuple({start for start, _ in self.patterned})

    def find(self, scope: Scope) -> Scope | None:
        """What the router adds to `scope` before the route runs (`endpoint`, an
        `Endpoint`, and `path_params`); `route_of` its endpoint is the route."""
        path = scope["path"]
        fixed = self.fixed.get(path)
        if fixed is not None:
            candidates = [fixed]
        elif path.startswith(self.starts):
            candidates = [found for start, found in self.patterned if path.startswith(start)]
        else:
            return None
        for candidate in candidates:
            match, child = candidate.matches(scope)
            if match is Match.FULL:
                return child
        return None


async def wait_answering(
    request: StarletteRequest,
    gateway: Gateway,
    principal: Principal,
    job: Job,
    wanted: GenerationRequest | None,
    seconds: float | None = None,
    *,
    answered_with_id: bool = False,
) -> Waited:
    """`gateway.wait` for a job the client waits on the answer for (`Prefer: wait`, the
    synchronous OpenAI and provider routes, each admitting with `rejoin`), until it
    ends, the wait runs out, or the client leaves. A client that left never learnt the
    job's id (its SDK timed out; it may send the request again): the job is left for the
    same request sent again, which joins it (`Gateway.left`), charged once. One it cannot
    claim another way (no idempotency key that names it, no webhook) that no worker has
    started by the time one reaches it is cancelled then, refunded: nobody would see it,
    and nothing was paid upstream for it; until then it keeps its place in the queue for
    the request sent again. Raises `ClientDisconnect` then. A job still running when the
    wait runs out is left for the
    same request sent again too, unless `answered_with_id` (REST's 202: its client has
    the job, and may well mean a second picture by sending the same request): the
    routes answering an error then (504) have clients and wrappers that retry it.
    `wanted`: the request as parsed; `seconds`: at most GATEWAY_SYNC_WAIT_SECONDS, by
    default. Returns the job as it stands, and whether it was so left (`noted`)."""
    if job.ended:  # a cache hit, say: nothing to wait for, nor to watch the client for
        return Waited(job, False)
    if seconds is None:
        seconds = gateway.settings.sync_wait_seconds
    waiting = asyncio.ensure_future(gateway.wait(job, seconds))
    gone = asyncio.ensure_future(disconnect(request.receive))
    try:
        await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: the server is stopping
        gone.cancel()
        waiting.cancel()
        raise
    gone.cancel()
    # With an idempotency key, a repeat names the job itself: nothing to note.
    noting = wanted is not None and not wanted.idempotency_key
    if waiting.done():
        job = waiting.result()
        noting = noting and not job.ended and not answered_with_id
        return Waited(job, noting and await note_left(gateway, principal, job, wanted))
    waiting.cancel()  # it unwinds on its own, letting go of its watch
    # Unless its end is told to a webhook, one not started is for nobody to see: marked.
    if noting:
        await note_left(gateway, principal, job, wanted, mark=not job.webhook_url)
    raise ClientDisconnect()


class Waited(NamedTuple):
    job: Job
    noted: bool  # left for the same request sent again (`Gateway.left`)


async def note_left(
    gateway: Gateway,
    principal: Principal,
    job: Job,
    wanted: GenerationRequest | None,
    *,
    mark: bool = False,
) -> bool:
    """`Gateway.left`; False when the store is away (a repeat is then a new job; one to
    be marked runs on unless its mark was written before the store went)."""
    assert wanted is not None
    try:
        await gateway.left(principal, job, wanted, mark=mark)
    except GatewayError as exc:
        log.warning("a job its client left could not be noted", job_id=job.id, error=exc)
        return False
    return True


async def disconnect(receive: Receive) -> None:
    """Once the client has gone: with the body read, the server's next message is that."""
    while (await receive())["type"] != "http.disconnect":
        pass
