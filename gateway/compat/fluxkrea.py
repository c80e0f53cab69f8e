"""/compat/fluxkrea: the flux-krea REST API (docs/providers/fluxkrea.md), served by the
gateway.

Code written against `https://api.flux-krea.pro/v1` works with its base URL set to
`<gateway>/compat/fluxkrea/v1` and a gateway key (or client token) as its Bearer key:

    POST /v1/generate         waits for the images, answers the guide's success shape
    POST /v1/generate/async   answers at once; the result is POSTed to `webhook_url`,
                              with the request's `callback_data`

The guide documents no endpoint to read or cancel a job; the gateway's own
`GET /v1/jobs/{id}` (the same key) reads one by its `request_id`.

Each request is an ordinary gateway job (`Gateway.generate`: admission, credits, cache,
idempotency with `Idempotency-Key`, routing with failover); its id is the
`request_id`, and every answer about it carries `X-Gateway-Job-Id`. This module is
plumbing only: what flux-krea's words mean, both ways, is in
`gateway/providers/fluxkrea.py`, beside the adapter that speaks flux-krea upstream.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway import bodies
from gateway.bodies import memoized
from gateway.endpoints import generation_key, route, wait_answering
from gateway.errors import BadUserInput, GatewayError, Unauthenticated
from gateway.origins import page_origin
from gateway.params import GenerationRequest
from gateway.providers import fluxkrea
from gateway.rest import ORJSONResponse
from gateway.service import Gateway

PREFIX = "/compat/fluxkrea"


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """A refusal in flux-krea's shape and status (its table: 400, 401, 403, 429; a 403
    `quota_exceeded` for credits), never a 500."""
    exc = fluxkrea.in_their_names(exc)
    out = {**(headers or {}), **exc.headers}
    retry = exc.extensions.get("retryAfter")
    if retry is not None:
        out["Retry-After"] = str(retry)
    status = fluxkrea.error_status(exc)
    return ORJSONResponse(fluxkrea.error_body(exc), status_code=status, headers=out)


def bearer(request: Request) -> str:
    """The key or client token of `Authorization: Bearer KEY`, flux-krea's only auth."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    raise Unauthenticated("Invalid or missing API key: send Authorization: Bearer <api key>")


def decoded(body: bytes) -> Any:
    try:
        return bodies.loads(body)
    except orjson.JSONDecodeError:
        raise BadUserInput("malformed request: body is not valid JSON") from None


@memoized
def asked(body: bytes, idempotency_key: str | None) -> GenerationRequest:
    """A `POST /v1/generate` as the parameter model (the same object for the same bytes
    and header: `bodies.memoized`)."""
    wanted, _ = fluxkrea.request_from(
        decoded(body), asynchronous=False, idempotency_key=idempotency_key
    )
    return wanted


async def generate(request: Request) -> Response:
    """`POST /v1/generate`: admitted as any job, answered when it ends (at most
    `GATEWAY_SYNC_WAIT_SECONDS`): 200 and the images; 400 when the upstream refused its
    input, 502 `failed` when it failed otherwise (both refunded); 504 when the wait ran
    out (the job goes on)."""
    gateway: Gateway = request.app.state.gateway
    wanted: GenerationRequest | None = None

    async def parse() -> GenerationRequest:
        nonlocal wanted
        wanted = asked(await request.body(), request.headers.get("idempotency-key"))
        return wanted

    try:
        job, principal = await gateway.generate(
            generation_key(bearer, request), parse, page_origin(request.headers), rejoin=True
        )
    except GatewayError as exc:
        return error_response(exc)
    headers = {**principal.rate_headers(), "X-Gateway-Job-Id": job.id}
    job = (await wait_answering(request, gateway, principal, job, wanted)).job
    if job.status == "completed":
        return ORJSONResponse(fluxkrea.success_body(job), headers=headers)
    if job.rejected:
        return ORJSONResponse(fluxkrea.rejected_body(job), status_code=400, headers=headers)
    if job.ended:
        return ORJSONResponse(fluxkrea.failure_body(job), status_code=502, headers=headers)
    waited = gateway.settings.sync_wait_seconds
    body = {
        "status": job.status,
        "request_id": job.id,
        "message": f"the images were not ready within {waited:g} s; the job goes on: "
        f"the gateway's GET /v1/jobs/{job.id} (at its root, not under {PREFIX}) reads it",
    }
    return ORJSONResponse(body, status_code=504, headers=headers)


async def generate_async(request: Request) -> Response:
    """`POST /v1/generate/async`: 202 at once; the job's end is POSTed to `webhook_url`
    in the guide's webhook shape, with `callback_data`, signed and retried like every
    gateway webhook (and refused, as they are, for a private address)."""
    gateway: Gateway = request.app.state.gateway
    shape: dict[str, Any] = {"protocol": "fluxkrea"}  # the job's webhook_shape

    async def parse() -> GenerationRequest:
        wanted, shape["callback_data"] = fluxkrea.request_from(
            decoded(await request.body()),
            asynchronous=True,
            idempotency_key=request.headers.get("idempotency-key"),
        )
        return wanted

    try:
        job, principal = await gateway.generate(
            generation_key(bearer, request),
            parse,
            page_origin(request.headers),
            webhook_shape=shape,
        )
    except GatewayError as exc:
        return error_response(exc)
    headers = {**principal.rate_headers(), "X-Gateway-Job-Id": job.id}
    return ORJSONResponse(fluxkrea.accepted_body(job), status_code=202, headers=headers)


routes: list[BaseRoute] = [
    route(f"{PREFIX}/v1/generate", generate, ["POST"]),
    route(f"{PREFIX}/v1/generate/async", generate_async, ["POST"]),
]
