"""Shared HTTP plumbing for upstream adapters: retries, backoff and error translation.

Hand-written because the policy is the product's: a request the upstream may already
have accepted (a submit answered with 5xx, or cut off mid-flight) is never re-sent,
since that could pay for the job twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from typing import Any

import aiohttp
import httpx
import orjson
from httpx_aiohttp import AiohttpTransport

from gateway.errors import (
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class UpstreamTransport(AiohttpTransport):
    """httpx-aiohttp's transport, with its connection errors told apart.

    It maps every aiohttp connection error to `httpx.ConnectTimeout`. Which one it was
    decides a retry here: a connection that was never made (`ConnectError`) may be
    retried even for a submit, one cut after the request went out (`ReadError`) never.
    """

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            return await super().handle_async_request(request)
        except httpx.ConnectTimeout as exc:
            cause = exc.__cause__
            if isinstance(cause, aiohttp.ClientConnectorError):
                raise httpx.ConnectError(str(exc), request=request) from cause
            if isinstance(cause, aiohttp.ClientConnectionError) and not isinstance(
                cause, aiohttp.ServerTimeoutError
            ):
                raise httpx.ReadError(str(exc), request=request) from cause
            raise


def upstream_client(timeout: float) -> httpx.AsyncClient:
    """The client every backend gets: the httpx API over aiohttp's transport (a fifth of
    httpcore's CPU per call at 64 in flight: BENCHMARKS.md)."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
    return httpx.AsyncClient(
        transport=UpstreamTransport(limits=limits), timeout=timeout, follow_redirects=False
    )


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Parse `Retry-After` (seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff(attempt: int, base: float = 0.5, cap: float = 8.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**attempt))


def error_for(response: httpx.Response, upstream: str) -> ProviderError:
    """Translate an unsuccessful upstream answer into our error tree."""
    status = response.status_code
    detail = _detail(response)
    message = f"{upstream} answered {status}" + (f": {detail}" if detail else "")
    if status == 429:
        return ProviderRateLimited(message, retry_after=retry_after_seconds(response))
    if status in (400, 422):
        return ProviderRejected(message)
    # 401/403 (our credentials), 402/406 (our credits), 404, 5xx: not the user's fault.
    return ProviderUnavailable(message)


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])[:200]
    return ""


def json_body(response: httpx.Response, upstream: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderUnavailable(f"{upstream} sent malformed JSON") from exc


async def request(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    upstream: str,
    idempotent: bool,
    attempts: int = 3,
    timeout: float | None = None,
    max_wait: float = 10.0,
    **kwargs: Any,
) -> httpx.Response:
    """Send a request with bounded retries; return a 2xx response or raise ProviderError.

    Retried: connection failures before sending and 429 always (the upstream did not
    take the request); timeouts and 5xx only when `idempotent`.
    """
    if timeout is not None:
        kwargs["timeout"] = timeout
    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            response = await client.request(method, url, **kwargs)
        except httpx.ConnectError as exc:
            if last:
                raise ProviderUnavailable(f"{upstream} unreachable: {exc}") from exc
            await asyncio.sleep(backoff(attempt))
            continue
        except httpx.TimeoutException as exc:
            if last or not idempotent:
                raise ProviderTimeout(f"{upstream} timed out") from exc
            await asyncio.sleep(backoff(attempt))
            continue
        except httpx.HTTPError as exc:
            if last or not idempotent:
                raise ProviderUnavailable(f"{upstream} connection failed: {exc}") from exc
            await asyncio.sleep(backoff(attempt))
            continue
        if response.is_success:
            return response
        error = error_for(response, upstream)
        retryable = response.status_code == 429 or (
            idempotent and response.status_code in RETRY_STATUSES
        )
        if last or not retryable:
            raise error
        wait = error.retry_after if error.retry_after is not None else backoff(attempt)
        if wait > max_wait:
            raise error  # let routing fail over instead of holding the job
        await asyncio.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


async def download(client: httpx.AsyncClient, url: str, *, upstream: str) -> bytes:
    response = await request(client, "GET", url, upstream=upstream, idempotent=True)
    if not response.content:
        raise ProviderUnavailable(f"{upstream} served an empty image")
    return response.content
