"""Shared HTTP plumbing for upstream adapters: the client, retries, backoff and errors,
and `HTTPBackend`, what every HTTP backend does the same way.

The policy is the product's, hence by hand: a request the upstream may already have
accepted (a submit answered with 5xx, or cut off after it was sent) is never re-sent,
since that could pay for the job twice.

The client is a thin owner of an `aiohttp.ClientSession`: a worker polls thousands of
jobs a second, and aiohttp costs far less CPU per call than httpx at that rate (`python
-m bench upstream` measures it; BENCHMARKS.md). Answers are read whole into `Answer`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import orjson
import structlog
from yarl import URL

from gateway import metrics, telemetry
from gateway.errors import (
    BadUserInput,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from gateway.providers.base import ImageParams, Output
from gateway.urlguard import ADDRESSES_TRIED, DEFAULT_PORTS, Network, check_url, pinned

log = structlog.get_logger("gateway.upstream")
T = TypeVar("T")
R = TypeVar("R")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream's answer, read whole."""

    status_code: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    content: bytes
    url: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.status_code < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return orjson.loads(self.content)


#: The most an upstream's answer may hold: four images inline (Segmind's `data:` URLs) at
#: the largest size any backend draws fit; a host that sends more (a gigabyte of
#: anything) is refused while reading, before it can take the worker's memory.
ANSWER_MAX = 64 * 1024 * 1024


class AnswerTooLarge(ProviderUnavailable):
    pass


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    """The answer's body, at most ANSWER_MAX bytes (aiohttp reads no more than a
    Content-Length says, unless the body is compressed: it inflates it; else it is
    counted as it comes)."""
    length = response.content_length
    if length is not None:
        if length > ANSWER_MAX:
            raise AnswerTooLarge(f"an answer of {length} bytes, over {ANSWER_MAX}")
        if response.headers.get("Content-Encoding", "identity").lower() == "identity":
            return await response.read()
    chunks, size = [], 0
    async for chunk in response.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > ANSWER_MAX:
            raise AnswerTooLarge(f"an answer over {ANSWER_MAX} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class UpstreamClient:
    """The HTTP client every backend gets (tests point backends at emulators with it).

    Redirects are not followed; `timeout` bounds a whole call (connect, send, answer).
    The session is opened on first use, inside the running event loop.
    """

    def __init__(
        self, timeout: float, *, max_connections: int = 512, allow: Sequence[Network] = ()
    ) -> None:
        """`allow`: the networks exempt from the URL guard (GATEWAY_URL_ALLOW_CIDRS), for
        the outputs an upstream names on hosts other than its own (`download`)."""
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.allow = list(allow)
        self.max_connections = max_connections
        self._timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeout,
                skip_auto_headers=("User-Agent",),
                # An upstream's cookies are nobody's business here (and cost every call).
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def request(
        self,
        method: str,
        url: str | URL,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        timeout: float | None = None,
        connect_timeout: float | None = None,
        server_hostname: str | None = None,
    ) -> Answer:
        """One call, no retry. Raises aiohttp's errors (`request()` below sorts them).
        `connect_timeout`: the part of `timeout` connecting may take (aiohttp's
        ConnectionTimeoutError past it). `server_hostname`: the name TLS checks, when
        `url` names an address (`pinned`)."""
        kwargs: dict[str, Any] = {"headers": headers, "allow_redirects": False}
        if server_hostname is not None:
            kwargs["server_hostname"] = server_hostname
        if json is not None:
            kwargs["data"] = orjson.dumps(json)
            kwargs["headers"] = {**(headers or {}), "Content-Type": "application/json"}
        if timeout is None:
            timeout = self.timeout.total
        if timeout != self.timeout.total or connect_timeout is not None:
            limits = (timeout, connect_timeout)
            kwargs["timeout"] = self._timeouts.get(limits) or self._timeouts.setdefault(
                limits, aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
            )
        async with self._open().request(method, url, **kwargs) as response:
            content = await _read_bounded(response)
            return Answer(response.status, response.headers, content, str(url))  # no redirects

    async def get(self, url: str, **kwargs: Any) -> Answer:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> Answer:
        return await self.request("POST", url, **kwargs)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()


def retry_after_seconds(response: Answer) -> float | None:
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


def error_for(response: Answer, upstream: str) -> ProviderError:
    """Translate an unsuccessful upstream answer into our error tree."""
    status = response.status_code
    detail = _detail(response)
    message = f"{upstream} answered {status}"
    error: ProviderError
    if status in (400, 422):  # the user's input: what the upstream said of it is theirs
        error = ProviderRejected(message + (f": {detail}" if detail else ""))
    else:
        # Not the user's doing (401/403: our credentials, 402/406: our credits, 404,
        # 429, 5xx): what the upstream said goes to the operator's log, not into the
        # job's error or the public `providers` reason (docs/api.md#failover).
        if detail:
            log.warning("upstream error", upstream=upstream, status=status, detail=detail)
        if status == 429:
            error = ProviderRateLimited(message, retry_after=retry_after_seconds(response))
        else:
            error = ProviderUnavailable(message)
    error.answer = response  # adapters read their upstream's own meaning of a status
    return error


def _detail(response: Answer) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])[:200]
    return ""


def json_body(response: Answer, upstream: str) -> Any:
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError as exc:
        raise ProviderUnavailable(f"{upstream} sent malformed JSON") from exc


async def request(
    client: UpstreamClient,
    method: str,
    url: str | URL,
    *,
    upstream: str,
    idempotent: bool,
    attempts: int = 3,
    timeout: float | None = None,
    max_wait: float = 10.0,
    tally: metrics.UpstreamTally | None = None,
    alternates: Sequence[URL] = (),
    **kwargs: Any,
) -> Answer:
    """Send a request with bounded retries; return a 2xx response or raise ProviderError.

    Retried: connection failures before sending and 429 always (the upstream did not
    take the request); timeouts and 5xx only when `idempotent`. `tally`: the backend's
    metrics, each attempt counted by its outcome. `alternates`: `url` at its host's
    other checked addresses (`pinned`), tried in turn within each attempt
    (`first_reachable`).
    """
    if timeout is not None:
        kwargs["timeout"] = timeout
    targets = [url, *alternates]
    total = timeout or client.timeout.total
    if alternates and total:  # one that never answers leaves the others time to connect
        kwargs["connect_timeout"] = total / len(targets)

    async def send(target: str | URL) -> Answer:
        if telemetry.ENABLED:
            return await traced(client, method, target, upstream, kwargs)
        return await client.request(method, target, **kwargs)

    def unreachable(target: str | URL, exc: Exception) -> None:
        if tally:
            tally.connection_error.inc()
        log.info("upstream address unreachable", upstream=upstream, error=str(exc))

    for attempt in range(attempts):
        last = attempt == attempts - 1
        try:
            response = await first_reachable(targets, send, unreachable)
        except aiohttp.ClientConnectorError as exc:  # never connected: nothing was sent
            if tally:
                tally.connection_error.inc()
            if last:
                # Named, not described: the job's `error` reaches its owner, and the
                # upstream's address is the operator's (the log has it).
                log.info("upstream unreachable", upstream=upstream, error=str(exc))
                raise ProviderUnavailable(f"{upstream} unreachable") from exc
            await asyncio.sleep(backoff(attempt))
            continue
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors too
            if tally:
                tally.timeout.inc()
            if last or not idempotent:
                raise ProviderTimeout(f"{upstream} timed out") from exc
            await asyncio.sleep(backoff(attempt))
            continue
        except aiohttp.ClientError as exc:  # cut after sending, or a broken answer
            if tally:
                tally.connection_error.inc()
            if last or not idempotent:
                log.info("upstream connection failed", upstream=upstream, error=str(exc))
                raise ProviderUnavailable(
                    f"{upstream} connection failed ({type(exc).__name__})"
                ) from exc
            await asyncio.sleep(backoff(attempt))
            continue
        if tally:
            tally.answered(response.status_code)
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


#: What aiohttp raises for a connection never made (refused, unreachable, or silent past
#: `sock_connect`): nothing was sent, so another address of the host may be tried.
NEVER_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


async def first_reachable(
    targets: Sequence[T],
    send: Callable[[T], Awaitable[R]],
    unreachable: Callable[[T, Exception], None],
) -> R:
    """`send` to the first of `targets` (a URL's host's checked addresses, in the order
    its name gave them), and to the next while one cannot be connected to, `unreachable`
    told of each passed over; the last one's failure is raised. Upstream calls and
    webhook deliveries alike."""
    for n, target in enumerate(targets, 1):
        try:
            return await send(target)
        except NEVER_CONNECTED as exc:
            if n == len(targets):
                raise
            unreachable(target, exc)
    raise AssertionError("unreachable")  # pragma: no cover: targets is never empty


async def traced(
    client: UpstreamClient, method: str, url: str | URL, upstream: str, kwargs: dict[str, Any]
) -> Answer:
    """One call in a client span, its `traceparent` sent upstream (tracing on). The span
    names the upstream and its host, never the URL (a signed download URL's query is a
    credential)."""
    attributes = {
        "http.request.method": method,
        "server.address": urllib.parse.urlsplit(str(url)).hostname or "",
        "gateway.upstream": upstream,
    }
    with telemetry.span(f"{upstream} {method}", kind="client", attributes=attributes) as span:
        headers = dict(kwargs.get("headers") or {})
        telemetry.inject(headers)
        response = await client.request(method, url, **{**kwargs, "headers": headers})
        if span is not None:
            span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code >= 400:
            telemetry.failed(f"HTTP {response.status_code}", span)
        return response


async def download(
    client: UpstreamClient,
    url: str,
    *,
    upstream: str,
    home: str,
    tally: metrics.UpstreamTally | None = None,
) -> bytes:
    """An output's bytes. From the upstream's own origin (`home`, its configured base URL)
    as it is; from any other host, which the upstream's answer (or a callback) named, only
    through the URL guard, at the addresses it checked (as a webhook: `pinned`), so that
    no answer can make the gateway fetch from its own network."""
    kwargs: dict[str, Any] = {}
    sent: str | URL = url
    if _origin(url) != _origin(home):
        try:
            async with asyncio.timeout(client.timeout.total):  # the name's lookup too
                addresses = await check_url(url, client.allow, "output URL", OUTPUT_URL_MAX)
        except BadUserInput as exc:
            raise ProviderUnavailable(
                f"{upstream} named an output the gateway will not fetch: {exc.message}"
            ) from None
        except TimeoutError:
            raise ProviderTimeout(f"{upstream}'s output host did not resolve in time") from None
        # The URL objects themselves: as a string, aiohttp would parse it again, resolving
        # `..` and re-escaping, and a signed URL would no longer match its signature.
        pins = [pinned(url, address, OUTPUT_URL_MAX) for address in addresses[:ADDRESSES_TRIED]]
        (sent, host, server_name), others = pins[0], [target for target, _, _ in pins[1:]]
        kwargs = {"headers": host, "server_hostname": server_name, "alternates": others}
    response = await request(
        client, "GET", sent, upstream=upstream, idempotent=True, tally=tally, **kwargs
    )
    if not response.content:
        raise ProviderUnavailable(f"{upstream} served an empty image")
    return response.content


#: an output URL's longest: a presigned one with a session token runs past the 2048
#: characters a webhook URL may have
OUTPUT_URL_MAX = 16 * 1024


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # not a port: no origin of ours
        port = -1
    return parts.scheme.lower(), (parts.hostname or "").rstrip("."), port


class HTTPBackend:
    """What the HTTP backends share: an upstream reached with one credential (whose
    setting enables the backend), its errors named after it, and its outputs downloaded.

    A subclass names itself and its upstream, says which setting holds the credential
    and how a request carries it (`auth`), and maps our parameters to its upstream's.
    """

    #: ours: routes, callback URLs
    name: str
    #: how messages name the upstream
    upstream: str
    #: the setting whose value enables the backend
    credential_setting: str

    def __init__(
        self, client: UpstreamClient, *, base_url: str, credential: str | None, timeout: float
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # The credential as it is sent: one dict for every call, since nothing changes it.
        self._auth = self.auth(credential) if credential else None
        self.tally = metrics.upstream(self.name)  # every call counted by outcome

    def auth(self, credential: str) -> dict[str, str]:
        """The headers that carry the credential."""
        return {"Authorization": f"Bearer {credential}"}

    def serves(self, params: ImageParams) -> bool:
        return True  # each adapter brings a size into its upstream's documented range

    def status(self) -> tuple[bool, str]:
        if self._auth is None:
            return False, f"{self.credential_setting} is not set"
        return True, "ok"

    def headers(self) -> dict[str, str]:
        """The credential's headers; unavailable (nothing is sent) when it is not set."""
        if self._auth is None:
            raise ProviderUnavailable(
                f"{self.upstream} is not configured: {self.credential_setting} is not set"
            )
        return self._auth

    async def send(
        self,
        method: str,
        url: str,
        *,
        idempotent: bool,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Answer:
        """`request()` to this upstream, with its credential (or the given headers). A
        401 or 403 is told to the operator with the setting to check; the job's error
        says only the status (docs/api.md#failover)."""
        try:
            return await request(
                self.client,
                method,
                url,
                upstream=self.upstream,
                idempotent=idempotent,
                timeout=self.timeout,
                headers=self.headers() if headers is None else headers,
                tally=self.tally,
                **kwargs,
            )
        except ProviderError as exc:
            if exc.answer is not None and self.refused_credential(exc.answer):
                log.warning(
                    "upstream refused our credential",
                    upstream=self.upstream,
                    status=exc.answer.status_code,
                    setting=self.credential_setting,
                )
            raise

    def refused_credential(self, answer: Answer) -> bool:
        """Whether this unsuccessful answer says our credential was refused (an adapter
        whose upstream gives 401 or 403 another meaning says so)."""
        return answer.status_code in (401, 403)

    def json_object(self, response: Answer) -> dict[str, Any]:
        """The answer's JSON object; malformed or anything else -> unavailable."""
        body = json_body(response, self.upstream)
        if not isinstance(body, dict):
            raise ProviderUnavailable(
                f"{self.upstream} answered with something other than a JSON object"
            )
        return body

    def callbacks(self, upstream_id: str) -> list[str]:
        return []

    def shown_id(self, upstream_id: str) -> str | None:
        return upstream_id

    async def cancel(self, upstream_id: str) -> None:
        """No-op: none of our upstreams documents a way to cancel a job (see each backend).

        The job runs to its end upstream; the worker simply stops waiting for it.
        """

    async def fetch(self, output: Output) -> bytes:
        """The image's bytes, downloaded now: upstream URLs expire, so the worker keeps
        its own copy."""
        if output.data is not None:
            return output.data
        if not output.url:
            raise ProviderUnavailable(f"{self.upstream} output has neither data nor URL")
        return await download(
            self.client, output.url, upstream=self.upstream, home=self.base_url, tally=self.tally
        )
