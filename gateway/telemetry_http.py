"""The request's id, its log line, its metrics and its span (docs/api.md#logs-and-traces,
docs/api.md#metrics): one ASGI middleware, outermost, so that a refusal of any
middleware inside carries the id and is counted and logged too.

Every HTTP answer, errors included, carries `X-Request-Id`: the client's when it sent a
sane one (at most 128 of `[A-Za-z0-9._-]`), else a new one. While the request runs,
`request_id` is bound in structlog's context. When it ends, it is counted and timed
(`count`, when metrics are on) and one JSON line is logged (unless `GATEWAY_ACCESS_LOG`
is off): `request` with the method, the route's template (never the path or its query,
which may hold a client token), the status, the duration, and the `account` and
`job_id` noted on the way (`gateway.telemetry.note`); a client that left before its
body was read is status 499. With tracing on, the request is a
server span (continuing a client's `traceparent`) named after its route.

A WebSocket connection gets an id the same way: echoed on its handshake's answer, bound
while the connection lasts, and one line when it ends (`method` `WEBSOCKET`, status 101,
or 403 when refused at the handshake, its duration the connection's); it is not counted
as an HTTP request.

One wrapper of `send` and one clock reading at each end serve all three; the line is
rendered here in one step (the fields and order of the structlog chain `gateway serve`
configures, `gateway/cli.py`) and handed to the logger that chain writes to.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Callable

import orjson
import structlog
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics, telemetry
from gateway.errors import GatewayError, InternalError

HEADER = b"x-request-id"

#: counts one answered request: (route template, status, seconds)
Count = Callable[[str, int, float], None]


class Lines:
    """The request lines, written together once per turn of the event loop: those of
    every request that ended in one turn in one write (a line each would be a system
    call each). They go to the logger structlog's configured factory makes (`gateway
    serve`: bytes to stdout, `gateway/cli.py`), as text if it takes text."""

    def __init__(self) -> None:
        self.logger = structlog.get_config()["logger_factory"]()
        self.text = not isinstance(self.logger, structlog.BytesLogger)
        self.pending: list[bytes] = []

    def add(self, line: bytes) -> None:
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(line)

    def flush(self) -> None:
        lines = b"\n".join(self.pending)
        self.pending.clear()
        self.logger.msg(lines.decode() if self.text else lines)


class RequestTelemetry:
    def __init__(
        self,
        app: ASGIApp,
        refuse: Callable[[str, GatewayError], Response],
        count: Count | None = None,
        log: bool = True,
    ) -> None:
        """`refuse`: an error as a response in the shape of the path's API (the 500 of
        an exception nothing inside answered, so that it carries the id too); `count`:
        what counts each request (None: metrics off); `log`: one line per request."""
        self.app = app
        self.refuse = refuse
        self.count = count
        # Made now, as logging is configured before the app is built.
        self.lines = Lines() if log else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        http = kind == "http"
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value
        rid = telemetry.request_id(given)
        echo = (HEADER, rid.encode())
        started = time.perf_counter()
        status = 500  # raised before answering: the server answers 500
        answered = False

        async def send_id(message: Message) -> None:
            nonlocal status, answered
            sent = message["type"]
            if sent == "http.response.start" or sent == "websocket.accept":
                status = message.get("status", 101)  # a WebSocket's handshake: 101
                answered = True
                message["headers"] = [*message.get("headers", ()), echo]
            elif sent == "websocket.close" and not answered:
                status, answered = 403, True  # refused at its handshake
            await send(message)

        fields, opened = telemetry.open_request(rid)
        try:
            if telemetry.ENABLED and http:
                await self._traced(scope, receive, send_id, fields)
            else:
                await self.app(scope, receive, send_id)
        except ClientDisconnect:
            # The client closed the connection before its body was read: nobody to
            # answer, nothing broken. Logged and counted as nginx does, 499.
            status = 499
        except Exception:
            if http and not answered:  # answered here, with the id; the server logs it
                error = self.refuse(scope["path"], InternalError("internal server error"))
                await error(scope, receive, send_id)
            raise
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            template = metrics.UNMATCHED if route is None else route.path
            if self.count is not None and http:  # a WebSocket's time is the connection's
                self.count(template, status, seconds)
            if self.lines is not None:
                fields["method"] = scope["method"] if http else "WEBSOCKET"
                fields["route"] = template
                fields["status"] = status
                fields["duration_ms"] = round(seconds * 1000, 3)
                fields["event"] = "request"
                fields["level"] = "info"
                fields["timestamp"] = datetime.datetime.now(datetime.UTC)
                self.lines.add(orjson.dumps(fields, option=orjson.OPT_UTC_Z))
            telemetry.close_request(opened)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, fields: dict) -> None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        method = scope["method"]
        status = 500
        left = False

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with telemetry.span(
            f"{method}",
            context=telemetry.extract(carrier),
            kind="server",
            attributes={"http.request.method": method, "gateway.request_id": fields["request_id"]},
        ) as span:
            assert span is not None
            try:
                await self.app(scope, receive, send_status)
            except ClientDisconnect:  # the client left: no failure of the server's span
                status, left = 499, True
            finally:
                route = scope.get("route")
                template = metrics.UNMATCHED if route is None else route.path
                span.update_name(f"{method} {template}")
                span.set_attribute("http.route", template)
                span.set_attribute("http.response.status_code", status)
                for name in ("account", "job_id"):
                    if name in fields:
                        span.set_attribute(f"gateway.{name}", fields[name])
                if status >= 500:
                    telemetry.failed(f"HTTP {status}", span)
        if left:  # raised past the span, which would have taken it for an error
            raise ClientDisconnect()
