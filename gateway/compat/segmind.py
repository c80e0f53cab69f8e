"""/compat/segmind: Segmind's serverless API (docs/providers/segmind.md), served by
the gateway.

Code written against Segmind, the `segmind` Python SDK included
(`SegmindClient(api_key=KEY, base_url="http://HOST:PORT/compat/segmind/v1")`), works with
its base URL and key changed:

- `POST /v1/{model}`: synchronous; answers the image's bytes once the job ends.
- `POST /v2/{model}`: asynchronous; answers `request_id`, `status_url`, `response_url`.
- `GET /v2/requests/{id}/status`: `QUEUED`, `PROCESSING`, `COMPLETED` or `FAILED`.
- `GET /v2/requests/{id}`: the result, `output` being the gateway's stored copies.

Auth is Segmind's `x-api-key` header (a gateway key or a client token); a key sent as
`Authorization: Bearer` is refused, as Segmind refuses it. Every request is an ordinary
gateway job (`Gateway.generate`: admission, credits, cache, idempotency via
`Idempotency-Key`, routing with failover), whose id is Segmind's `request_id` and is
sent as `X-Gateway-Job-Id`. Segmind's request body becomes our `GenerationRequest` in
`gateway.providers.segmind.request_from`, beside the backend that speaks the same
protocol upstream and from the same tables. Errors take Segmind's shape,
`{"error": "message"}`, and statuses: 400 bad input, 401 key, 403 a client token's
rule, 404 unknown model or request, 406 credits, 422 a FAILED request, 429 a limit
(with `Retry-After`), 502 nothing to run it on, 504 a synchronous wait that ran out.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route

from gateway.artifacts import StorageUnavailable
from gateway.auth import Principal
from gateway.bodies import json_object, memoized
from gateway.config import BACKENDS
from gateway.endpoints import generation_key, route, wait_answering
from gateway.errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
)
from gateway.formats import FORMATS
from gateway.jobs.model import Job
from gateway.origins import page_origin
from gateway.params import GenerationRequest, with_idempotency_header
from gateway.providers.segmind import STATES, request_from
from gateway.rest import ORJSONResponse
from gateway.service import Gateway

PREFIX = "/compat/segmind"
#: Segmind's model slugs -> the gateway's services. The gateway's own service and backend
#: names (`flux-krea`, `flux-dev`, `local`, `segmind`, ...) are models here too.
MODELS: dict[str, str] = {"flux-krea-dev": "flux-krea"}
#: the job's status -> Segmind's state (Segmind has no cancelled state: FAILED)
STATE_OF: dict[str, str] = {ours: theirs for theirs, ours in STATES.items()}
STATE_OF["cancelled"] = "FAILED"
#: the statuses Segmind gives our errors where they differ from the gateway's own
STATUS_OF: dict[str, int] = {
    "INSUFFICIENT_CREDITS": 406,  # Segmind's "Insufficient Credits"
    "SERVICE_UNAVAILABLE": 502,  # Segmind's "Bad Gateway: service temporarily unavailable"
}


# -- errors ------------------------------------------------------------------------------


class ModelNotFound(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(f"Model {model} not found", field="model")


class RequestNotFound(NotFound):
    def __init__(self, request_id: str) -> None:
        super().__init__(f"Request {request_id} not found")


class RequestFailed(GatewayError):
    """A FAILED request, served as Segmind serves one: 422, the body carrying the detail."""

    code, status = "FAILED", 422


class WaitRanOut(GatewayError):
    code, status = "TIMEOUT", 504


class ImageGone(GatewayError):
    code, status = "PROVIDER_ERROR", 502


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """A `GatewayError` as Segmind answers one: `{"error": message}` (the gateway's `code`
    and details beside it), with Segmind's status for it."""
    extra = {k: v for k, v in exc.extensions.items() if k != "code"}
    out = {**(headers or {}), **exc.headers}  # the refusal's own describe it best
    out.pop("WWW-Authenticate", None)  # Bearer, which this route refuses: x-api-key it is
    if "retryAfter" in extra:
        out["Retry-After"] = str(extra["retryAfter"])
    body = {"error": exc.message, "code": exc.code, **extra}
    return ORJSONResponse(body, status_code=STATUS_OF.get(exc.code, exc.status), headers=out)


# -- helpers -----------------------------------------------------------------------------


def _key(request: Request) -> str:
    """Segmind's `x-api-key`; Segmind takes no bearer token, and neither does this route."""
    key = request.headers.get("x-api-key", "").strip()
    if key:
        return key
    if request.headers.get("authorization"):
        raise Unauthenticated(
            "Unauthorized: send the API key in the x-api-key header "
            "(an Authorization header is not accepted here)"
        )
    raise Unauthenticated("Missing x-api-key in header")


def service_for(model: str, gateway: Gateway) -> str:
    """The service (or pinned backend) a Segmind model slug names; 404 when none."""
    if model in MODELS:
        return MODELS[model]
    if model in gateway.router.routes or model in BACKENDS:
        return model
    raise ModelNotFound(model[:100])


def _base(request: Request, gateway: Gateway) -> str:
    """Where clients reach the gateway: its public URL when set, else the request's."""
    return gateway.settings.public_url or str(request.base_url).rstrip("/")


def _request_urls(request: Request, gateway: Gateway, job_id: str) -> dict[str, str]:
    response_url = f"{_base(request, gateway)}{PREFIX}/v2/requests/{job_id}"
    status_url = f"{response_url}/status"
    return {"status_url": status_url, "poll_url": status_url, "response_url": response_url}


def _seconds(later: int | None, earlier: int | None) -> float | None:
    if later is None or earlier is None:
        return None
    return round(max(0, later - earlier) / 1000, 3)


def _metrics(job: Job) -> dict[str, Any]:
    """Segmind's `metrics`: the job's times in seconds, and what it cost (credits)."""
    end = job.completed_at
    started = job.started_at or end  # a cache hit never started: no inference time
    metrics: dict[str, Any] = {
        "inference_time": _seconds(end, started),
        "queue_time": _seconds(started, job.created_at),
        "total_time": _seconds(end, job.created_at),
        "cost": job.credit_cost,
    }
    return {k: v for k, v in metrics.items() if v is not None}


def _state(job: Job) -> str:
    return STATE_OF.get(job.status, "PROCESSING")


def _failure(job: Job) -> str:
    if job.status == "cancelled":
        return job.error or "cancelled"
    return job.error or "the request failed"


def _job_headers(job: Job, principal: Principal) -> dict[str, str]:
    return {**principal.rate_headers(), "X-Gateway-Job-Id": job.id}


async def _parse(request: Request, gateway: Gateway, *, one_image: bool) -> GenerationRequest:
    """The request's body as our one parameter model (refusals before admission)."""
    service = service_for(request.path_params["model"], gateway)
    wanted = asked(await request.body(), service, one_image)
    return with_idempotency_header(wanted, request.headers.get("idempotency-key"))


@memoized
def asked(body: bytes, service: str, one_image: bool) -> GenerationRequest:
    """A body as the parameter model (the same object for the same bytes, service and
    version: `bodies.memoized`)."""
    wanted = request_from(json_object(body), service)
    if one_image:  # v1 answers one image: it makes (and is charged for) one
        wanted = wanted.model_copy(update={"num_images": 1})
    return wanted


# -- routes ------------------------------------------------------------------------------


async def run_sync(request: Request) -> Response:
    """`POST /v1/{model}`: admitted as any job; answered with its first image's bytes
    when it ends (waiting at most `GATEWAY_SYNC_WAIT_SECONDS`)."""
    gateway: Gateway = request.app.state.gateway
    headers: dict[str, str] = {}
    wanted: GenerationRequest | None = None
    try:
        key = generation_key(_key, request)

        async def parse() -> GenerationRequest:
            nonlocal wanted
            wanted = await _parse(request, gateway, one_image=True)
            return wanted

        job, principal = await gateway.generate(
            key, parse, page_origin(request.headers), rejoin=True
        )
        headers = _job_headers(job, principal)
        job = (await wait_answering(request, gateway, principal, job, wanted)).job
        if not job.ended:
            raise WaitRanOut(
                f"Request timed out: the image was not ready within "
                f"{gateway.settings.sync_wait_seconds:g} s; request {job.id} goes on: "
                f"GET {PREFIX}/v2/requests/{job.id}",
                request_id=job.id,
            )
        if job.status != "completed":
            raise RequestFailed(_failure(job), request_id=job.id, status="FAILED")
        try:
            image = await gateway.artifacts.read(job.urls[0]) if job.urls else None
        except StorageUnavailable:
            raise ServiceUnavailable(f"request {job.id}'s image cannot be read now") from None
        if image is None:
            raise ImageGone(f"request {job.id}'s image is no longer stored", request_id=job.id)
    except GatewayError as exc:
        return error_response(exc, headers)
    fmt = FORMATS.get(str(job.params.get("output_format") or "png"), FORMATS["png"])
    seed = job.metadata.get("seed", job.params.get("seed"))
    headers |= {
        # Segmind's v1 accounting headers
        "x-cost": str(job.credit_cost),
        "x-remaining-credits": str(principal.credits),
        "x-generation-time": str(_metrics(job).get("total_time", 0)),
        "x-seed-value": "" if seed is None else str(seed),
        "Content-Location": job.urls[0],
    }
    return Response(image, media_type=fmt.content_type, headers=headers)


async def submit(request: Request) -> Response:
    """`POST /v2/{model}`: admitted as any job; answers its id and where to poll it."""
    gateway: Gateway = request.app.state.gateway
    try:
        key = generation_key(_key, request)

        async def parse() -> GenerationRequest:
            return await _parse(request, gateway, one_image=False)

        job, principal = await gateway.generate(key, parse, page_origin(request.headers))
    except GatewayError as exc:
        return error_response(exc)
    body = {
        "request_id": job.id,
        "status": _state(job),
        **_request_urls(request, gateway, job.id),
    }
    return ORJSONResponse(body, headers=_job_headers(job, principal))


async def _polled(request: Request) -> tuple[Job, Principal]:
    """The caller's job named in the path (a client token's: one made with it)."""
    gateway: Gateway = request.app.state.gateway
    request_id = request.path_params["request_id"]
    principal, job = await gateway.poll(_key(request), request_id, page_origin(request.headers))
    if job is None:
        exc = RequestNotFound(request_id[:100])
        exc.headers = principal.rate_headers()
        raise exc
    return job, principal


async def status(request: Request) -> Response:
    """`GET /v2/requests/{id}/status`: the state; a FAILED one is a 422 with its error."""
    try:
        job, principal = await _polled(request)
    except GatewayError as exc:
        return error_response(exc)
    body: dict[str, Any] = {"request_id": job.id, "status": _state(job)}
    if job.ended:
        body["metrics"] = _metrics(job)
    code = 200
    if body["status"] == "FAILED":
        body["error"] = _failure(job)
        code = 422
    return ORJSONResponse(body, status_code=code, headers=_job_headers(job, principal))


async def result(request: Request) -> Response:
    """`GET /v2/requests/{id}`: the final body once COMPLETED (`output`: the stored image
    URL, or a list of them for several; `images`: each with its media type), the state
    alone before, a 422 with the error when FAILED."""
    gateway: Gateway = request.app.state.gateway
    try:
        job, principal = await _polled(request)
    except GatewayError as exc:
        return error_response(exc)
    state = _state(job)
    body: dict[str, Any] = {"request_id": job.id, "status": state}
    code = 200
    if job.ended:
        body["metrics"] = _metrics(job)
    if state == "FAILED":
        body["error"] = _failure(job)
        code = 422
    elif state == "COMPLETED":
        fmt = FORMATS.get(str(job.params.get("output_format") or "png"), FORMATS["png"])
        body["output"] = job.urls[0] if len(job.urls) == 1 else list(job.urls)
        body["images"] = [
            {"url": url, "content_type": fmt.content_type, "file_name": url.rsplit("/", 1)[-1]}
            for url in job.urls
        ]
        body["seed"] = job.metadata.get("seed", job.params.get("seed"))
        body["prompt"] = job.params.get("prompt")
        body["width"], body["height"] = job.width, job.height
        body["status_url"] = _request_urls(request, gateway, job.id)["status_url"]
    return ORJSONResponse(body, status_code=code, headers=_job_headers(job, principal))


_ROUTES: list[Route] = [
    route(f"{PREFIX}/v1/{{model}}", run_sync, ["POST"]),
    route(f"{PREFIX}/v2/requests/{{request_id}}/status", status, ["GET"]),
    route(f"{PREFIX}/v2/requests/{{request_id}}", result, ["GET"]),
    route(f"{PREFIX}/v2/{{model}}", submit, ["POST"]),
    # The SDK's base URL without its `/v1`: its synchronous calls land here.
    route(f"{PREFIX}/{{model}}", run_sync, ["POST"]),
]


async def not_found(request: Request) -> Response:
    """Any other path under the prefix, in Segmind's shape: 405 for a known path with
    another method, else 404."""
    for declared in _ROUTES:
        match, _ = declared.matches(request.scope)
        if match is Match.PARTIAL:
            error = MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            return error_response(error, {"Allow": ", ".join(sorted(declared.methods or ()))})
    return error_response(NotFound(f"Model or endpoint not found: {request.url.path}"))


routes: list[BaseRoute] = [*_ROUTES, Route(f"{PREFIX}/{{path:path}}", not_found, methods=None)]
