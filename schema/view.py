"""The GraphQL endpoint: Strawberry's ASGI view with the HTTP behaviour of docs/api.md#graphql.

- The context authenticates lazily and puts X-RateLimit-* on the response.
- Errors always carry `extensions.code`; unexpected ones are masked by `MaskErrors`.
- When every field failed with a coded error, the HTTP status is that code's (429 adds
  Retry-After); parse and validation failures are 400 BAD_USER_INPUT.
- Malformed bodies get a JSON error, not Strawberry's plain text.
- Automatic persisted queries (`schema/persisted.py`): a hash alone runs its stored
  document, on the prepared path like its text would; queries over GET too.
- GET answers say how a cache between client and gateway (a CDN) may keep them
  (`cache_headers`).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

import orjson
import structlog
from cross_web import AsyncHTTPRequestAdapter, HTTPException, StarletteRequestAdapter
from graphql import GraphQLFormattedError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse, GraphQLRequestData
from strawberry.http.async_base_view import AsyncWebSocketAdapter
from strawberry.http.base import BaseRequestProtocol
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import BaseGraphQLWSHandler
from strawberry.types import ExecutionResult

from gateway import bodies, pages
from gateway.auth import api_key_from
from gateway.errors import STATUS_BY_CODE, BadUserInput, GatewayError, MethodNotAllowed
from gateway.origins import page_origin
from gateway.store.persisted import PersistedQueries
from gateway.store.redis import store_trouble
from schema import error_code, persisted
from schema.context import OPERATION, Context, Lookup
from schema.prepared import Prepared

log = structlog.get_logger("gateway")

_PLAIN_BODY = frozenset({"query", "variables", "operationName"})
# The members of a request the prepared path takes: the plain ones, and `extensions`
# holding only members that change nothing it does: a persisted query (resolved first)
# and the name and version Apollo Client 4 sends with every request. Any other member (a
# schema extension could read it) takes Strawberry's path.
_PREPARED_BODY = _PLAIN_BODY | {"extensions"}
_PREPARED_EXTENSIONS = frozenset({"persistedQuery", "clientLibrary"})
# In the request's scope state: the request as read here, its stored document in
# `query` (a hash sent alone), for Strawberry's path to run instead of reading it again.
RESOLVED = "graphql_request"

# Headers of GET answers (docs/api.md#persisted-queries): what a shared cache keys on,
# and how long one may keep an anonymous answer without errors (e.g. `providers`).
VARY = "Authorization, X-API-Key"
PUBLIC_MAX_AGE = 10


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"data": None, "errors": [{"message": message, "extensions": {"code": code}}]}


class RequestAdapter(StarletteRequestAdapter):
    """Strawberry's view of a request, which keeps the request (for `RESOLVED`)."""

    def __init__(self, request: Request) -> None:
        super().__init__(request)
        self.request = request


def resolved(request: AsyncHTTPRequestAdapter | BaseRequestProtocol) -> dict[str, Any] | None:
    if not isinstance(request, RequestAdapter):
        return None
    data: dict[str, Any] | None = request.request.scope.get("state", {}).get(RESOLVED)
    return data


async def json_body(request: Request) -> dict[str, Any] | None:
    """A POST's JSON object; None for anything else (Strawberry's path reports it), but
    a JSON value that is neither an object nor a (batch's) list, which it fails on."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != "application/json":
        return None
    try:
        data = bodies.loads(await request.body())
    except orjson.JSONDecodeError:
        return None
    if type(data) is dict:
        return data
    if type(data) is not list:
        raise BadUserInput('the body must be a JSON object: {"query": ..., "variables": ...}')
    return None


def query_params(request: Request) -> dict[str, Any] | None:
    """A GET's request: `query`, `operationName`, and `variables` and `extensions` as
    JSON (malformed: BAD_USER_INPUT). None without `query` or `extensions`: the GraphiQL
    page for a browser, else Strawberry's refusal."""
    raw: bytes = request.scope["query_string"]
    members = _members(raw) if len(raw) > CACHED_QUERY_STRING else _cached_members(raw)
    if members is None:
        return None
    data: dict[str, Any] = {}
    for name, value in zip(_GET_MEMBERS, members, strict=True):
        if value is None or (not value and name in _JSON_MEMBERS):
            continue
        if name in _JSON_MEMBERS:
            try:
                data[name] = bodies.loads(value)
            except orjson.JSONDecodeError:
                raise BadUserInput(f"`{name}` is not valid JSON", field=name) from None
        else:
            data[name] = value
    return data


_GET_MEMBERS = ("query", "operationName", "variables", "extensions")
_JSON_MEMBERS = frozenset({"variables", "extensions"})


def _members(raw: bytes) -> tuple[str | None, ...] | None:
    """A query string's members, URL-decoded as Starlette decodes them (the last of a
    name wins); None without `query` or `extensions`."""
    params = dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))
    if "query" not in params and "extensions" not in params:
        return None
    return tuple(params.get(name) for name in _GET_MEMBERS)


# A poller sends one URL again and again (a persisted query's hash, a job's id): its
# decoding (most of what a GET costs more than a POST) is kept, by the raw query string;
# bounded, and a long query string is decoded every time. The JSON is decoded anew for
# each request, so no request sees another's decoded members (a prepared document's
# coerced arguments are shared, read-only: `schema/prepared.py`).
_cached_members = functools.lru_cache(maxsize=512)(_members)
CACHED_QUERY_STRING = 2048


def cache_headers(request: Request, response: Response) -> None:
    """A GET's GraphQL answer: varies with the credentials sent; kept by no cache when it
    is an error (or set its own), by the caller's alone when credentials were sent
    (`private`: never a shared cache's; `no-cache`: a poll sees the job as it is now),
    and briefly by any when neither (`public`)."""
    raw = response.raw_headers
    json = cache_control = False
    vary = -1
    for index, (name, value) in enumerate(raw):  # one pass: these are few
        if name == b"content-type":
            json = value.startswith(b"application/json")
        elif name == b"cache-control":
            cache_control = True
        elif name == b"vary":
            vary = index
    if not json:
        return  # the GraphiQL page
    if vary < 0:
        raw.append((b"vary", _VARY))
    else:
        raw[vary] = (b"vary", raw[vary][1] + b", " + _VARY)
    if cache_control:
        return
    if response.status_code != 200:
        raw.append((b"cache-control", b"no-store"))
    elif "authorization" in request.headers or "x-api-key" in request.headers:
        raw.append((b"cache-control", b"private, no-cache"))
    else:
        raw.append((b"cache-control", f"public, max-age={PUBLIC_MAX_AGE}".encode()))


_VARY = VARY.encode()


#: the media type of GraphQL over HTTP (its draft spec), for the clients that accept it
GRAPHQL_RESPONSE = "application/graphql-response+json"


def message_error(message: object, with_id: tuple[str, ...], operation: str) -> str | None:
    """What is wrong with a WebSocket message's shape, for its protocol (`with_id`: the
    types that name an operation; `operation`: the one that starts it, whose payload is
    a request); None when it is well formed. Strawberry's handlers read a malformed one
    into a TypeError: the connection dropped without a close frame, a traceback logged."""
    if type(message) is not dict or not isinstance(message.get("type"), str):
        return "Invalid message: a JSON object with a string type"
    kind = message["type"]
    if kind in with_id and not (isinstance(message.get("id"), str) and message["id"]):
        return f"Invalid message: {kind} needs a string id"
    if kind == operation:
        payload = message.get("payload")
        if not (
            type(payload) is dict
            and isinstance(payload.get("query"), str)
            and isinstance(payload.get("variables"), dict | None)
            and isinstance(payload.get("operationName"), str | None)
            and isinstance(payload.get("extensions"), dict | None)
        ):
            return (
                f"Invalid message: {kind} needs a payload "
                "{query: string, variables?: object, operationName?: string}"
            )
    return None


def with_codes(message: Any, result: str) -> None:
    """Give each formatted error of an outgoing message (`error`, or the protocol's
    `result`: next, data) that has none its code. The schema codes its own
    (`GatewaySchema.process_errors`); what is left is the handlers' own, about the
    request (a full connection's "Subscription limit reached")."""
    if message["type"] == "error":
        errors = message.get("payload")
    elif message["type"] == result:
        errors = message["payload"].get("errors") or []
    else:
        return
    for error in errors if isinstance(errors, list) else [errors]:
        if isinstance(error, dict) and "code" not in (error.get("extensions") or {}):
            error["extensions"] = {**(error.get("extensions") or {}), "code": "BAD_USER_INPUT"}


#: RFC 6455's "Try Again Later": a refusal that passes (a limit, Redis away), which a
#: graphql-ws client retries, as it does 4403
TRY_AGAIN_LATER = 1013
TRANSIENT = frozenset({"RATE_LIMITED", "SERVICE_UNAVAILABLE"})


def refusal_close(refusal: GatewayError) -> tuple[int, str]:
    """How a refused `connection_init` closes the socket: the protocol's 4403, or 1013 for
    a refusal that passes (one with a time to retry), with a reason naming the error's
    code (the protocol has no message for it: the close reason is all a page learns),
    in the 123 bytes a close reason may have."""
    retry = refusal.extensions.get("retryAfter")
    said = retry is None or "retry after" in refusal.message
    suffix = "" if said else f" (retry after {retry} s)"
    reason, room = f"{refusal.code}: {refusal.message}", 123 - len(suffix)
    if len(reason.encode()) > room:
        reason = reason.encode()[: room - 3].decode(errors="ignore") + "..."
    passes = refusal.code in TRANSIENT and retry is not None
    return (TRY_AGAIN_LATER if passes else 4403), reason + suffix


class _SaysWhy(AsyncWebSocketAdapter):
    """The handler's socket, closing a refused connection with `refusal_close`: Strawberry
    closes every refusal with 4403 "Forbidden"."""

    def __init__(self, websocket: AsyncWebSocketAdapter, context: Context) -> None:
        super().__init__(websocket.view)
        self._websocket, self._context = websocket, context

    def iter_json(self, *, ignore_parsing_errors: bool = False) -> AsyncGenerator[object, None]:
        return self._websocket.iter_json(ignore_parsing_errors=ignore_parsing_errors)

    async def send_json(self, message: Mapping[str, object]) -> None:
        await self._websocket.send_json(message)

    async def close(self, code: int, reason: str) -> None:
        refusal = self._context.refusal
        if code == 4403 and refusal is not None:
            code, reason = refusal_close(refusal)
        await self._websocket.close(code=code, reason=reason)


class TransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws (graphql-ws, Apollo Client): each operation runs in a task of
    its own, with a key check of its own (`schema/context.py`); a malformed message
    closes the connection with 4400, as the protocol says; a refused `connection_init`
    says why (`refusal_close`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.websocket = _SaysWhy(self.websocket, self.context)

    async def handle_message(self, message: Any) -> None:
        if reason := message_error(message, ("subscribe", "complete"), "subscribe"):
            await self.handle_invalid_message(reason)
            return
        if message["type"] == "connection_init" and message.get("payload", {}) is None:
            # The protocol allows a null payload (graphql-ws sends one when its
            # `connectionParams` gives null); Strawberry closes it 4400, which no client
            # retries: read as none, it is refused for its missing key, 4403.
            message = {"type": "connection_init"}
        await super().handle_message(message)

    async def run_operation(self, operation: Operation[Context, None]) -> None:
        OPERATION.set(Lookup())
        await super().run_operation(operation)

    async def send_message(self, message: Any) -> None:
        with_codes(message, "next")
        await super().send_message(message)


class LegacyWSHandler(BaseGraphQLWSHandler[Context, None]):
    """The older graphql-ws protocol (subscriptions-transport-ws), the same way; its
    connection must be initialised in time too (Strawberry times out only the other
    protocol's), and a malformed message closes it (4400: this protocol has no code)."""

    async def handle(self) -> None:
        timer = asyncio.create_task(self._initialised_in_time())
        try:
            await super().handle()
        finally:
            timer.cancel()

    async def _initialised_in_time(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        if not self.connection_acknowledged:
            await self.websocket.close(code=4408, reason="Connection initialisation timeout")

    async def handle_message(self, message: Any) -> None:
        if reason := message_error(message, ("start", "stop"), "start"):
            await self.websocket.close(code=4400, reason=reason)
            return
        await super().handle_message(message)

    async def handle_async_results(
        self,
        operation_id: str,
        query: str,
        operation_name: str | None,
        variables: dict[str, object] | None,
    ) -> None:
        OPERATION.set(Lookup())
        await super().handle_async_results(operation_id, query, operation_name, variables)

    async def send_message(self, message: Any) -> None:
        with_codes(message, "data")
        await super().send_message(message)


class GraphQLView(GraphQL[Context, None]):
    request_adapter_class = RequestAdapter
    graphql_transport_ws_handler_class = TransportWSHandler
    graphql_ws_handler_class = LegacyWSHandler

    def __init__(
        self,
        schema: Any,
        prepared: Prepared | None = None,
        allowed_origins: tuple[str, ...] = (),
    ) -> None:
        """`allowed_origins`: the pages on other origins that may open a WebSocket
        (Strawberry refuses the others' handshakes; its own origin is always allowed)."""
        self.prepared = prepared
        super().__init__(
            schema,
            allowed_origins=allowed_origins,
            graphql_ide="graphiql",  # served by render_graphql_ide: no page from a CDN
            keep_alive=True,
            keep_alive_interval=15,
            connection_init_wait_timeout=timedelta(seconds=10),
            max_subscriptions_per_connection=100,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self._answer(request)
        except (HTTPException, StarletteHTTPException) as exc:
            status = exc.status_code
            message = str(getattr(exc, "reason", None) or getattr(exc, "detail", ""))
            if status == 405:  # HEAD, which Starlette's route lets through with GET
                body = error_body(MethodNotAllowed.code, message)
                response = JSONResponse(body, status_code=405, headers={"Allow": "GET, POST"})
            else:
                response = JSONResponse(error_body("BAD_USER_INPUT", message), status_code=status)
            await self._rate_headers(request, response)
        except GatewayError as exc:  # the request's own (APQ), or building the context
            body = error_body(exc.code, exc.message)
            body["errors"][0]["extensions"] = dict(exc.extensions)  # `field` too
            response = JSONResponse(body, status_code=exc.status, headers=exc.headers)
            if "retryAfter" in exc.extensions:  # 503: the store is away
                response.headers["Retry-After"] = str(exc.extensions["retryAfter"])
            elif exc.status == 400:  # its input's (a hash not the query's): a good key's
                await self._rate_headers(request, response)
        finally:
            # The context refers to the request, whose scope refers to the context: a
            # cycle that would keep each request's objects alive until the collector ran.
            state = scope.get("state", {})
            state.pop("graphql_context", None)
            state.pop(RESOLVED, None)
        if scope["method"] == "GET":
            cache_headers(request, response)
        json_answer = response.headers.get("content-type", "").startswith("application/json")
        if json_answer and GRAPHQL_RESPONSE in request.headers.get("accept", ""):
            # GraphQL over HTTP's own type, when the client asks for it (Apollo Client 4
            # does): such a client reads the errors of a 4xx answer, their codes
            # included, instead of taking it for a server's failure.
            response.headers["content-type"] = GRAPHQL_RESPONSE
        await response(scope, receive, send)

    async def _answer(self, request: Request) -> Response:
        method = request.scope["method"]
        data = (
            await json_body(request)
            if method == "POST"
            else query_params(request)
            if method == "GET"
            else None
        )
        if data is None:
            return await self.run(request)
        register = None
        sha = persisted.requested(data.get("extensions"))
        if sha is not None:
            store: PersistedQueries = request.app.state.persisted
            query = data.get("query")
            if query is None:
                found = await store.get(sha)
                if found is None:
                    body = error_body(persisted.NOT_FOUND_CODE, persisted.NOT_FOUND_MESSAGE)
                    return JSONResponse(body, headers={"Cache-Control": "no-store"})
                data["query"] = found
                request.scope.setdefault("state", {})[RESOLVED] = data
            elif isinstance(query, str):  # any other type: Strawberry's path reports it
                persisted.check_text(sha, query, store.max_document_bytes)
                register = sha
        response = None
        if self.prepared is not None:
            response = await self._run_prepared(request, data, self.prepared)
        if response is None:
            response = await self.run(request)
        if register is not None and response.status_code == 200:
            await self._register(request, register, data["query"])
        if response.status_code == 400:
            await self._rate_headers(request, response)
        return response

    async def _rate_headers(self, request: Request, response: Response) -> None:
        """A request refused for its own input before any field read its caller (its
        variables' types, say) gets its key's X-RateLimit-* headers all the same, when
        the key is good (docs/api.md#rate-limit-headers): one more round trip, on bad
        requests only; not counted as a read."""
        context: Context | None = request.scope.get("state", {}).get("graphql_context")
        if context is None:  # refused by Strawberry before its context was made
            key = api_key_from(request.headers)
            if not key:
                return
            gateway = request.app.state.gateway
            try:
                principal = await gateway.authenticate(key, origin=page_origin(request.headers))
            except GatewayError:
                return  # the input's error stands
            response.headers.update(principal.rate_headers())
            return
        if context.principal is not None or not context.api_key():
            return
        try:
            await context.caller()
        except GatewayError:
            return  # the input's error stands
        response.headers.update(context.rate_headers)

    async def _register(self, request: Request, sha: str, query: str) -> None:
        """Store a document sent with its hash, once it has run for an authenticated
        caller (a document nobody could run is not kept). A store that fails loses only
        this registration: the answer stands, the client will send the text again."""
        context: Context | None = request.scope.get("state", {}).get("graphql_context")
        if context is None:
            return
        if context.principal is None:  # a document that read no caller (`providers`)
            try:
                await context.caller(read=True)
            except GatewayError:
                return
        store: PersistedQueries = request.app.state.persisted
        try:
            await store.put(sha, query)
        except Exception as exc:
            if not (isinstance(exc, OSError) or store_trouble(exc)):
                raise
            log.warning("persisted query not stored", sha=sha, error=repr(exc))

    async def _run_prepared(
        self, request: Request, data: dict[str, Any], prepared: Prepared
    ) -> Response | None:
        """A prepared document's answer, built as `run` builds it; None for anything
        else (the request is kept: `run` reads it again, or takes it from `RESOLVED`)."""
        if not data.keys() <= _PREPARED_BODY:
            return None
        if "extensions" in data:
            extensions = data["extensions"]
            if type(extensions) is not dict or not extensions.keys() <= _PREPARED_EXTENSIONS:
                return None
        query, variables = data.get("query"), data.get("variables")
        operation_name = data.get("operationName")
        if (
            not isinstance(query, str)
            or not isinstance(variables, dict | None)
            or not isinstance(operation_name, str | None)
        ):
            return None
        sub_response = await self.get_sub_response(request)
        context = await self.get_context(request, response=sub_response)
        get = request.method == "GET"
        result = await prepared.execute(
            query,
            operation_name,
            variables or {},
            context,
            queries_only=get,
            sent=request.scope["query_string"] if get else await request.body(),
        )
        if result is None:
            return None
        return self.create_response(await self.process_result(request, result), sub_response)

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        data = resolved(request)
        if data is None:
            return await super().parse_http_body(request)
        variables, operation_name = data.get("variables"), data.get("operationName")
        if not isinstance(variables, dict | None):
            raise HTTPException(
                400, "The GraphQL operation's `variables` must be an object or null, if provided."
            )
        if not isinstance(operation_name, str | None):
            raise HTTPException(400, "The GraphQL operation's `operationName` must be a string.")
        return GraphQLRequestData(
            query=data["query"],
            variables=variables,
            operation_name=operation_name,
            extensions=data.get("extensions"),
        )

    def should_render_graphql_ide(self, request: BaseRequestProtocol) -> bool:
        # A persisted query's GET has no `query`, and may accept */*: not the page.
        return resolved(request) is None and super().should_render_graphql_ide(request)

    async def render_graphql_ide(self, request: Request) -> Response:
        # Not Strawberry's GraphiQL page, which loads React and GraphiQL from unpkg: the
        # playground's GraphQL console, served from here like all its assets.
        return pages.page(request, tab="console")

    def decode_json(self, data: str | bytes) -> object:
        return bodies.loads(data)  # its errors are json.JSONDecodeErrors: a 400 as before

    def encode_json(self, data: object) -> str:
        # A str, not bytes: subscriptions must go out as text frames.
        return orjson.dumps(data).decode()

    async def get_context(
        self, request: Request | WebSocket, response: Response | WebSocket
    ) -> Context:
        ctx = Context(
            gateway=request.scope["app"].state.gateway, request=request, response=response
        )
        request.scope.setdefault("state", {})["graphql_context"] = ctx
        return ctx

    async def on_ws_connect(self, context: Context) -> None:
        try:
            await context.caller(read=True)
        except GatewayError as exc:
            context.refusal = exc  # graphql-transport-ws closes saying it (`_SaysWhy`)
            raise ConnectionRejectionError({"code": exc.code, "message": exc.message}) from None

    async def process_result(
        self, request: Request, result: ExecutionResult
    ) -> GraphQLHTTPResponse:
        body: GraphQLHTTPResponse = {"data": result.data}
        if result.errors:
            errors = []
            for error in result.errors:
                formatted = error.formatted
                ext = dict(formatted.get("extensions") or {})
                if "code" not in ext:  # one the schema did not see (Strawberry's own)
                    ext["code"] = error_code(error)
                formatted["extensions"] = ext
                errors.append(formatted)
            body["errors"] = errors  # type: ignore[typeddict-item]
            self._set_status(request, result, errors)
            if request.method == "GET":  # an error is kept by no cache (`cache_headers`)
                ctx = request.scope.get("state", {}).get("graphql_context")
                if ctx is not None and isinstance(ctx.response, Response):
                    ctx.response.headers["Cache-Control"] = "no-store"
        if result.extensions:
            body["extensions"] = result.extensions
        return body

    def _set_status(
        self, request: Request, result: ExecutionResult, errors: list[GraphQLFormattedError]
    ) -> None:
        ctx: Context | None = request.scope.get("state", {}).get("graphql_context")
        if ctx is None or not isinstance(ctx.response, Response):
            return
        every_field_failed = not result.data or all(v is None for v in result.data.values())
        if not every_field_failed:
            return
        first = errors[0]["extensions"]
        ctx.response.status_code = STATUS_BY_CODE.get(first["code"], 400)
        if "retryAfter" in first:  # 429, 503
            ctx.response.headers["Retry-After"] = str(first["retryAfter"])
