"""/compat/krea: Krea's job API (docs/providers/krea.md), served by the gateway.

Code written against `https://api.krea.ai` works with its base URL set to
`<gateway>/compat/krea` and a gateway key (or client token) as its Bearer token:

    POST   /generate/image/{model}   a new job (`X-Webhook-URL`: its callback)
    GET    /jobs/{id}                the job as it is now
    DELETE /jobs/{id}                cancel it (refunded, as `cancelJob`)

Each request is an ordinary gateway job (`Gateway.generate`: admission, credits, cache,
idempotency with `Idempotency-Key`, routing with failover); its id is the Krea job id,
and every answer about it carries `X-Gateway-Job-Id`. This module is plumbing only:
what Krea's words mean, both ways, is in `gateway/providers/krea.py`, beside the
adapter that speaks Krea upstream.
"""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from gateway import bodies
from gateway.bodies import memoized
from gateway.endpoints import generation_key, route
from gateway.errors import BadUserInput, GatewayError, NotFound, Unauthenticated
from gateway.jobs.model import Job
from gateway.origins import page_origin
from gateway.params import GenerationRequest
from gateway.providers import krea
from gateway.rest import ORJSONResponse
from gateway.service import Gateway

PREFIX = "/compat/krea"


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """A refusal in Krea's shape, with the status our error has (never a 500 for a
    refusal: 400, 401, 402, 403, 404, 429 with Retry-After, 503)."""
    exc = krea.in_their_names(exc)
    out = {**(headers or {}), **exc.headers}
    retry = exc.extensions.get("retryAfter")
    if retry is not None:
        out["Retry-After"] = str(retry)
    return ORJSONResponse(krea.error_body(exc), status_code=exc.status, headers=out)


def bearer(request: Request) -> str:
    """The key or client token of `Authorization: Bearer KEY`, Krea's only auth."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    raise Unauthenticated("Missing API token: send Authorization: Bearer <token>")


@memoized
def asked(
    body: bytes, model: str, webhook_url: str | None, idempotency_key: str | None
) -> GenerationRequest:
    """A `POST /generate/image/{model}` as the parameter model (the same object for the
    same bytes and headers: `bodies.memoized`)."""
    try:
        data = bodies.loads(body)
    except orjson.JSONDecodeError:
        raise BadUserInput("body is not valid JSON") from None
    return krea.request_from(model, data, webhook_url=webhook_url, idempotency_key=idempotency_key)


def answer(job: Job, headers: dict[str, str], *, pending: bool = False) -> Response:
    view = krea.job_view(job, pending=pending)
    return ORJSONResponse(view, headers={**headers, "X-Gateway-Job-Id": job.id})


async def generate(request: Request) -> Response:
    """`POST /generate/image/{model}`: Krea's job object for a new gateway job."""
    gateway: Gateway = request.app.state.gateway
    webhook = request.headers.get(krea.WEBHOOK_HEADER)

    async def parse() -> GenerationRequest:
        return asked(
            await request.body(),
            request.path_params["model"],
            webhook,
            request.headers.get("idempotency-key"),
        )

    try:
        job, principal = await gateway.generate(
            generation_key(bearer, request),
            parse,
            page_origin(request.headers),
            webhook_shape={"protocol": "krea"},
        )
    except GatewayError as exc:
        return error_response(exc)
    return answer(job, principal.rate_headers(), pending=True)


async def get_job(request: Request) -> Response:
    """`GET /jobs/{id}`: one of the caller's jobs, as Krea's job object."""
    return await _on_job(request, cancel=False)


async def delete_job(request: Request) -> Response:
    """`DELETE /jobs/{id}`: cancel the job (refunded in full); an ended job is answered
    as it is."""
    return await _on_job(request, cancel=True)


async def _on_job(request: Request, *, cancel: bool) -> Response:
    gateway: Gateway = request.app.state.gateway
    headers: dict[str, str] = {}
    job_id = krea.job_id_of(request.path_params["job_id"])
    origin = page_origin(request.headers)
    try:
        if cancel:
            principal = await gateway.authenticate(bearer(request), origin=origin)
            headers = principal.rate_headers()
            job = await gateway.cancel(principal, job_id)
        else:
            principal, found = await gateway.poll(bearer(request), job_id, origin)
            headers = principal.rate_headers()
            if found is None:
                raise NotFound("Job not found")
            job = found
    except NotFound:
        return error_response(NotFound("Job not found"), headers)
    except GatewayError as exc:
        return error_response(exc, headers)
    return answer(job, headers)


routes: list[BaseRoute] = [
    route(f"{PREFIX}/generate/image/{{model:path}}", generate, ["POST"]),
    route(f"{PREFIX}/jobs/{{job_id}}", get_job, ["GET"]),
    route(f"{PREFIX}/jobs/{{job_id}}", delete_job, ["DELETE"]),
]
