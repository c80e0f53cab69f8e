"""The GraphQL endpoint: Strawberry's ASGI view with the contract's HTTP behaviour.

- The context authenticates lazily and puts X-RateLimit-* on the response.
- Errors always carry `extensions.code`; unexpected ones are masked by `MaskErrors`.
- When every field failed with a coded error, the HTTP status is that code's (429 adds
  Retry-After); parse and validation failures are 400 BAD_USER_INPUT.
- Malformed bodies get a JSON error, not Strawberry's plain text.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
from cross_web import HTTPException
from graphql import GraphQLFormattedError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLHTTPResponse
from strawberry.types import ExecutionResult

from gateway.errors import STATUS_BY_CODE, GatewayError
from schema.context import Context
from schema.prepared import Prepared

_PLAIN_BODY = frozenset({"query", "variables", "operationName"})


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"data": None, "errors": [{"message": message, "extensions": {"code": code}}]}


class GraphQLView(GraphQL[Context, None]):
    def __init__(self, schema: Any, prepared: Prepared | None = None) -> None:
        self.prepared = prepared
        super().__init__(
            schema,
            graphql_ide="graphiql",
            keep_alive=True,
            keep_alive_interval=15,
            connection_init_wait_timeout=timedelta(seconds=10),
            max_subscriptions_per_connection=10,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = None
            if self.prepared is not None and scope["method"] == "POST":
                response = await self._run_prepared(request, self.prepared)
            if response is None:
                response = await self.run(request)
        except (HTTPException, StarletteHTTPException) as exc:
            status = exc.status_code
            message = str(getattr(exc, "reason", None) or getattr(exc, "detail", ""))
            response = JSONResponse(error_body("BAD_USER_INPUT", message), status_code=status)
        except GatewayError as exc:  # raised while building the context
            response = JSONResponse(error_body(exc.code, exc.message), status_code=exc.status)
        finally:
            # The context refers to the request, whose scope refers to the context: a
            # cycle that would keep each request's objects alive until the collector ran.
            scope.get("state", {}).pop("graphql_context", None)
        await response(scope, receive, send)

    async def _run_prepared(self, request: Request, prepared: Prepared) -> Response | None:
        """A prepared document's answer, built as `run` builds it; None for anything
        else (the body is kept: `run` reads it again)."""
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            return None
        try:
            data = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return None
        if type(data) is not dict or not data.keys() <= _PLAIN_BODY:
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
        result = await prepared.execute(query, operation_name, variables or {}, context)
        if result is None:
            return None
        return self.create_response(await self.process_result(request, result), sub_response)

    def decode_json(self, data: str | bytes) -> object:
        return orjson.loads(data)  # its errors are json.JSONDecodeErrors: a 400 as before

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
                if "code" not in ext:
                    # Uncoded: the request's own (parse, validation, variables), unless it
                    # arose while resolving (masked ones already say INTERNAL_SERVER_ERROR).
                    ext["code"] = "INTERNAL_SERVER_ERROR" if error.path else "BAD_USER_INPUT"
                formatted["extensions"] = ext
                errors.append(formatted)
            body["errors"] = errors  # type: ignore[typeddict-item]
            self._set_status(request, result, errors)
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
