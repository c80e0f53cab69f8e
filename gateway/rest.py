"""REST: `POST /v1/text_to_image`, `GET /v1/jobs/{id}`, cancel, health (docs/api.md#rest).

The same `Gateway` methods as GraphQL; errors as `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.auth import Principal, api_key_from
from gateway.errors import BadUserInput, GatewayError, NotFound, ServiceUnavailable
from gateway.params import GenerationRequest, from_image_input
from gateway.service import Gateway, store_errors


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    extra = {k: v for k, v in exc.extensions.items() if k != "code"}
    headers = {**exc.headers, **(headers or {})}
    if "retryAfter" in extra:
        headers["Retry-After"] = str(extra["retryAfter"])
    body = {"error": {"code": exc.code, "message": exc.message, **extra}}
    return ORJSONResponse(body, status_code=exc.status, headers=headers)


Handler = Callable[[Request, Gateway, Principal], Awaitable[tuple[int, Any, Principal]]]


def endpoint(handler: Handler, *, read: bool) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, run, answer JSON with the rate-limit headers; map errors once."""

    async def run(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        headers: dict[str, str] = {}
        try:
            principal = await gateway.authenticate(api_key_from(request.headers), read=read)
            headers = principal.rate_headers()
            status, body, principal = await handler(request, gateway, principal)
            headers = principal.rate_headers()
        except GatewayError as exc:
            return error_response(exc, headers)
        return ORJSONResponse(body, status_code=status, headers=headers)

    return run


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise BadUserInput("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadUserInput("the body must be a JSON object")
    return body


async def text_to_image(request: Request) -> Response:
    """Key check and admission in one round trip (see `Gateway.generate`)."""
    gateway: Gateway = request.app.state.gateway

    async def parse() -> GenerationRequest:
        return from_image_input(await _json(request))

    try:
        job, principal = await gateway.generate(api_key_from(request.headers), parse)
    except GatewayError as exc:
        return error_response(exc)
    return ORJSONResponse(job.public(), status_code=202, headers=principal.rate_headers())


async def get_job(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    job = await gateway.job(principal, request.path_params["job_id"])
    if job is None:
        raise NotFound("no such job")
    return 200, job.public(), principal


async def cancel_job(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    job = await gateway.cancel(principal, request.path_params["job_id"])
    return 200, job.public(), principal


async def job_events(request: Request) -> Response:
    """The job's updates as Server-Sent Events: current state first, then each change."""
    gateway: Gateway = request.app.state.gateway
    try:
        principal = await gateway.authenticate(api_key_from(request.headers), read=True)
        job_id = request.path_params["job_id"]
        if await gateway.job(principal, job_id) is None:
            raise NotFound("no such job")
    except GatewayError as exc:
        return error_response(exc)

    async def stream() -> AsyncIterator[bytes]:
        try:
            with store_errors("the job store went away; reconnect to follow the job"):
                async for job in gateway.follow(principal, job_id):
                    yield b"event: update\ndata: " + orjson.dumps(job.public()) + b"\n\n"
        except ServiceUnavailable as exc:
            # The status line is gone: say why in the stream, and when to reconnect.
            body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
            yield b"retry: %d\nevent: error\ndata: %b\n\n" % (exc.retry_after * 1000, body)

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **principal.rate_headers(),
        },
    )


async def upstream_callback(request: Request) -> Response:
    """An upstream reports a job to the URL we gave it (flux-krea's async webhook)."""
    gateway: Gateway = request.app.state.gateway
    try:
        body = await _json(request)
        # Redis away: 503 with Retry-After, so the upstream sends it again later.
        with store_errors("the gateway cannot take callbacks right now; send it again"):
            delivered = await gateway.inbox.deliver(request.path_params["token"], body)
        if not delivered:
            raise NotFound("unknown callback")
    except GatewayError as exc:
        return error_response(exc)
    return ORJSONResponse({"status": "received"})


async def healthz(request: Request) -> Response:
    return ORJSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    checks = await gateway.ready()
    ok = all(checks.values())
    return ORJSONResponse(
        {"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503
    )


routes = [
    Route("/v1/text_to_image", text_to_image, methods=["POST"]),
    Route("/v1/jobs/{job_id}", endpoint(get_job, read=True), methods=["GET"]),
    Route("/v1/jobs/{job_id}/cancel", endpoint(cancel_job, read=False), methods=["POST"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/v1/callbacks/{backend}/{token}", upstream_callback, methods=["POST"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
