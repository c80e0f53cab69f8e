"""REST: `POST /v1/text_to_image`, `GET /v1/jobs/{id}`, cancel, events, client tokens,
health (docs/api.md#rest).

The same `Gateway` methods as GraphQL; errors as `{"error": {"code", "message", ...}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.auth import TOKEN_PREFIX, Principal, api_key_from
from gateway.bodies import json_object, memoized
from gateway.endpoints import route, wait_answering
from gateway.errors import (
    BadUserInput,
    GatewayError,
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
)
from gateway.jobs.model import iso
from gateway.origins import page_origin
from gateway.params import GenerationRequest, from_image_input, with_idempotency_header
from gateway.service import Gateway, page_size, store_errors
from gateway.tokens import MINTING, spec

T = TypeVar("T")


class ORJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    extra = {k: v for k, v in exc.extensions.items() if k != "code"}
    headers = {**(headers or {}), **exc.headers}  # the refusal's own describe it best
    if "retryAfter" in extra:
        headers["Retry-After"] = str(extra["retryAfter"])
    body = {"error": {"code": exc.code, "message": exc.message, **extra}}
    return ORJSONResponse(body, status_code=exc.status, headers=headers)


Handler = Callable[[Request, Gateway, Principal], Awaitable[tuple[int, Any, Principal]]]


def endpoint(handler: Handler, *, read: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate, run, answer JSON with the rate-limit headers; map errors once.
    `read`: the request counts against the read limit."""

    async def run(request: Request) -> Response:
        gateway: Gateway = request.app.state.gateway
        headers: dict[str, str] = {}
        try:
            principal = await gateway.authenticate(
                api_key_from(request.headers), read=read, origin=page_origin(request.headers)
            )
            headers = principal.rate_headers()
            status, body, principal = await handler(request, gateway, principal)
            headers = principal.rate_headers()
        except GatewayError as exc:
            return error_response(exc, headers)
        return ORJSONResponse(body, status_code=status, headers=headers)

    return run


async def read_json(request: Request) -> dict[str, Any]:
    return json_object(await request.body())


@memoized
def flat_request(body: bytes) -> GenerationRequest:
    """A `POST /v1/text_to_image` body as the parameter model (the same object for the
    same bytes: `bodies.memoized`)."""
    return from_image_input(json_object(body))


PREFER_WAIT_MAX = 60.0


def prefer_wait(header: str | None) -> float | None:
    """Seconds asked for by `Prefer: wait[=N]` (RFC 7240; N at most 60, bare `wait` is
    60); None without one. A preference it cannot read is ignored, as the RFC says."""
    if not header:
        return None
    for preference in header.split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        if not value:
            return PREFER_WAIT_MAX
        try:
            seconds = float(value.strip().strip('"'))
        except ValueError:
            return None
        if seconds != seconds or seconds < 0:  # NaN, negative
            return None
        return min(seconds, PREFER_WAIT_MAX)
    return None


async def text_to_image(request: Request) -> Response:
    """Key check and admission in one round trip (see `Gateway.generate`); with `Prefer:
    wait`, the answer waits for the job's end (200) or the time asked for (202)."""
    gateway: Gateway = request.app.state.gateway
    wanted: GenerationRequest | None = None

    async def parse() -> GenerationRequest:
        nonlocal wanted
        wanted = with_idempotency_header(
            flat_request(await request.body()), request.headers.get("idempotency-key")
        )
        return wanted

    # Several `Prefer` fields are one list (RFC 7240 §2).
    wait = prefer_wait(",".join(request.headers.getlist("prefer")))
    try:
        job, principal = await gateway.generate(
            api_key_from(request.headers),
            parse,
            page_origin(request.headers),
            rejoin=wait is not None,
        )
        if wait is not None:
            waited = await wait_answering(
                request, gateway, principal, job, wanted, wait, answered_with_id=True
            )
            job = waited.job
    except GatewayError as exc:
        return error_response(exc)
    headers = principal.rate_headers()
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait:g}"
    if not job.ended:  # RFC 9110 §15.3.3: a 202 points to where its outcome will be
        # (under GATEWAY_PUBLIC_URL when set: a proxy in front may add a path prefix)
        headers["Location"] = f"{gateway.settings.public_url or ''}/v1/jobs/{job.id}"
    return ORJSONResponse(job.public(), status_code=200 if job.ended else 202, headers=headers)


async def get_job(request: Request) -> Response:
    """The job, with the key check in the same round trip (`Gateway.poll`)."""
    gateway: Gateway = request.app.state.gateway
    headers: dict[str, str] = {}
    try:
        principal, job = await gateway.poll(
            api_key_from(request.headers),
            request.path_params["job_id"],
            page_origin(request.headers),
        )
        headers = principal.rate_headers()
        if job is None:
            raise NotFound("no such job")
    except GatewayError as exc:
        return error_response(exc, headers)
    return ORJSONResponse(job.public(), headers=headers)


async def list_jobs(request: Request) -> Response:
    """`GET /v1/jobs?first=&after=&status=`: GraphQL's `jobs`, a page of the caller's jobs,
    newest first, in its shape (`nodes`, `pageInfo`)."""
    gateway: Gateway = request.app.state.gateway
    headers: dict[str, str] = {}
    query = request.query_params
    after, status = query.get("after"), query.get("status")
    try:
        first = page_size(_number(query.get("first"), "first"), after, status)
        principal = await gateway.authenticate(
            api_key_from(request.headers), read=True, origin=page_origin(request.headers)
        )
        headers = principal.rate_headers()
        jobs, more, cursor = await gateway.jobs(principal, first, after, status)
    except GatewayError as exc:
        return error_response(exc, headers)
    page = {"hasNextPage": more, "endCursor": cursor}
    return ORJSONResponse({"nodes": [j.public() for j in jobs], "pageInfo": page}, headers=headers)


def _number(value: str | None, name: str) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        raise BadUserInput(f"{name} must be a whole number", field=name) from None


async def me(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    """`GET /v1/me`: GraphQL's `me` (plan, balance, each limit's use), camelCase."""
    data = await gateway.me(principal)
    cache, grant = data["cache"], data["client_token"]
    return (
        200,
        {
            "id": data["id"],
            "name": data["name"],
            "plan": data["plan"],
            "credits": data["credits"],
            "limits": data["limits"],
            "cache": {
                "hits": cache["hits"],
                "misses": cache["misses"],
                "coalesced": cache["coalesced"],
                "creditsSaved": cache["credits_saved"],
            },
            "clientToken": grant.public() if grant else None,
            "webhookSecret": data["webhook_secret"],
        },
        principal,
    )


async def cancel_job(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    job = await gateway.cancel(principal, request.path_params["job_id"])
    return 200, job.public(), principal


#: A stream quiet this long gets a comment line: a job may run for minutes, and proxies
#: close a connection idle for a minute (nginx's `proxy_read_timeout` default: 60 s).
KEEP_ALIVE_SECONDS = 15.0


async def heartbeats(updates: AsyncIterator[T], every: float) -> AsyncIterator[T | None]:
    """`updates`, with a None whenever `every` seconds pass without one. The next item
    is awaited in a task of its own, so a quiet spell does not cancel the iterator."""
    iterator = aiter(updates)
    following: asyncio.Future[T] = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            done, _ = await asyncio.wait((following,), timeout=every)
            if not done:
                yield None
                continue
            try:
                item = following.result()
            except StopAsyncIteration:
                return
            yield item
            following = asyncio.ensure_future(anext(iterator))
    finally:
        if not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await following
        closing = getattr(iterator, "aclose", None)
        if closing is not None:  # its own cleanup now (a watch let go), not at collection
            await closing()


def _events_credential(request: Request) -> str | None:
    """The key or token of an events request: its headers, or, since a page's
    `EventSource` cannot set headers, a client token in `?token=` (never an API key:
    URLs end up in logs and histories)."""
    in_url = request.query_params.get("token")
    if in_url is None:
        return api_key_from(request.headers)
    if not in_url.startswith(TOKEN_PREFIX + "_"):
        raise Unauthenticated(
            "only a client token may be sent in the URL; send an API key in a header"
        )
    return in_url


async def job_events(request: Request) -> Response:
    """The job's updates as Server-Sent Events: current state first, then each change."""
    gateway: Gateway = request.app.state.gateway
    job_id = request.path_params["job_id"]
    origin = page_origin(request.headers)
    headers: dict[str, str] = {}
    try:
        credential = _events_credential(request)
        principal, job = await gateway.poll(credential, job_id, origin)
        headers = principal.rate_headers()
        if job is None:
            raise NotFound("no such job")
    except GatewayError as exc:
        return error_response(exc, headers)
    if job.ended and request.headers.get("last-event-id") == job.status:
        # An EventSource reconnecting after the end it was sent: 204 tells it to stop
        # (it reconnects after any close, and would read the end again and again).
        return Response(status_code=204, headers=principal.rate_headers())

    async def stream() -> AsyncIterator[bytes]:
        try:
            with store_errors("the job store went away; reconnect to follow the job"):
                updates = gateway.follow(principal, job_id, credential, origin)
                async for job in heartbeats(updates, KEEP_ALIVE_SECONDS):
                    if job is None:  # a quiet while: a comment, which EventSource ignores
                        yield b": keep-alive\n\n"
                        continue
                    # Its status as the event's id: what a reconnect sends back.
                    yield b"id: %b\nevent: update\ndata: %b\n\n" % (
                        job.status.encode(),
                        orjson.dumps(job.public()),
                    )
        except GatewayError as exc:
            # The status line is gone: say why in the stream (and, when it is the store's
            # trouble, when to reconnect; a credential revoked or expired is final).
            body = orjson.dumps({"error": {"code": exc.code, "message": exc.message}})
            retry = b""
            if isinstance(exc, ServiceUnavailable) and exc.retry_after is not None:
                retry = b"retry: %d\n" % (exc.retry_after * 1000)
            yield retry + b"event: error\ndata: %b\n\n" % body

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            **principal.rate_headers(),
        },
    )


async def create_client_token(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    """`POST /v1/client_tokens` {maxCredits, ttlSeconds, origins, services, maxJobs}."""
    principal.require_key(MINTING)  # a token is refused as one, whatever it asks
    body = await read_json(request)
    unknown = body.keys() - TOKEN_FIELDS.keys()
    if unknown:
        raise BadUserInput(f"unknown field {sorted(unknown)[0]!r}", field=sorted(unknown)[0])
    args: dict[str, Any] = {}
    for name, (arg, kind) in TOKEN_FIELDS.items():
        value = body.get(name)
        if value is not None and not _is(value, kind):
            raise BadUserInput(f"{name} has the wrong type", field=name)
        args[arg] = value
    if args["max_credits"] is None:
        raise BadUserInput("maxCredits is required", field="maxCredits")
    minted = await gateway.create_client_token(principal, spec(**args))
    answer = {
        "token": minted.token,
        "expiresAt": iso(minted.expires_ms),
        "maxCredits": minted.max_credits,
    }
    return 201, answer, principal


#: the JSON fields of `POST /v1/client_tokens`: (argument of `tokens.spec`, type)
TOKEN_FIELDS: dict[str, tuple[str, type]] = {
    "maxCredits": ("max_credits", int),
    "ttlSeconds": ("ttl_seconds", int),
    "origins": ("origins", list),
    "services": ("services", list),
    "maxJobs": ("max_jobs", int),
}


def _is(value: Any, kind: type) -> bool:
    if kind is int:
        return type(value) is int
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


async def revoke_client_token(
    request: Request, gateway: Gateway, principal: Principal
) -> tuple[int, Any, Principal]:
    """`POST /v1/client_tokens/revoke` {token}: {"revoked": bool}."""
    token = (await read_json(request)).get("token")
    if not isinstance(token, str):
        raise BadUserInput("token is required", field="token")
    return 200, {"revoked": await gateway.revoke_client_token(principal, token)}, principal


async def upstream_callback(request: Request) -> Response:
    """An upstream reports a job to the URL we gave it (flux-krea's async webhook)."""
    gateway: Gateway = request.app.state.gateway
    try:
        body = await read_json(request)
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
    route("/v1/text_to_image", text_to_image, ["POST"]),
    route("/v1/jobs", list_jobs, ["GET"]),
    route("/v1/me", endpoint(me, read=True), ["GET"]),
    route("/v1/jobs/{job_id}", get_job, ["GET"]),
    route("/v1/jobs/{job_id}/cancel", endpoint(cancel_job), ["POST"]),
    route("/v1/jobs/{job_id}/events", job_events, ["GET"]),
    route("/v1/client_tokens", endpoint(create_client_token), ["POST"]),
    route("/v1/client_tokens/revoke", endpoint(revoke_client_token), ["POST"]),
    route("/v1/callbacks/{backend}/{token}", upstream_callback, ["POST"]),
    route("/healthz", healthz, ["GET"]),
    route("/readyz", readyz, ["GET"]),
]
