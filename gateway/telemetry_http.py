"""The request's id, its log line and its span (docs/api.md#logs-and-traces): one ASGI
middleware, outermost, in the cheap style of `gateway/metrics_http.py`.

Every HTTP answer, errors included, carries `X-Request-Id`: the client's when it sent a
sane one (at most 128 of `[A-Za-z0-9._-]`), else a new one. While the request runs,
`request_id` is bound in structlog's context, and when it ends one JSON line is logged:
`request` with the method, the route's template (never the path or its query, which
may hold a client token), the status, the duration, and the `account` and `job_id`
noted on the way (`gateway.telemetry.note`). With tracing on, the request is a server
span (continuing a client's `traceparent`) named after its route.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics, telemetry
from gateway.errors import GatewayError, InternalError

HEADER = b"x-request-id"


class RequestTelemetry:
    def __init__(self, app: ASGIApp, refuse: Callable[[str, GatewayError], Response]) -> None:
        """`refuse`: an error as a response in the shape of the path's API (the 500 of
        an exception nothing inside answered, so that it carries the id too)."""
        self.app = app
        self.refuse = refuse
        # Bound now, as logging is configured when the app is built: structlog's lazy
        # proxy would build a new logger at every call (~4 µs a request).
        self.log = structlog.get_logger("gateway.http").bind()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value
        rid = telemetry.request_id(given)
        echo = (HEADER, rid.encode())
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = True
                message["headers"] = [*message.get("headers", ()), echo]
            await send(message)

        fields, opened = telemetry.open_request(rid)
        try:
            if telemetry.ENABLED:
                await self._traced(scope, receive, send_id, fields)
            else:
                await self.app(scope, receive, send_id)
        except Exception:
            if not answered:  # answered here, with the id; the server logs the error
                error = self.refuse(scope["path"], InternalError("internal server error"))
                await error(scope, receive, send_id)
            raise
        finally:
            route = scope.get("route")
            self.log.info(
                "request",
                **fields,
                method=scope["method"],
                route=metrics.UNMATCHED if route is None else route.path,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            telemetry.close_request(opened)

    async def _traced(self, scope: Scope, receive: Receive, send: Send, fields: dict) -> None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope["headers"]
            if name in (b"traceparent", b"tracestate")
        }
        method = scope["method"]
        status = 500

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
