"""deliver(): signed webhook POSTs with retries, off the job path (docs/api.md#webhooks).

An ended job with a `webhookUrl` is put on a Redis schedule by `finish.lua` in the same
step that ends it. Deliverers claim due entries with a lease (`claim.lua`), so a slow
receiver never holds a job worker and a deliverer that dies loses nothing. Every attempt
is logged for the key's owner; non-2xx answers and timeouts are retried on a schedule
(first retry within 10 s); redirects are not followed.

Signatures: `X-Doitong-Signature: sha256=HEX` (HMAC-SHA256 of the raw body keyed with the
secret string as printed) and the Standard Webhooks headers via `standardwebhooks`.
The URL is checked again at delivery and the request goes to the addresses that check
resolved, the next when one cannot be connected to (DNS rebinding cannot swap them for
a private one in between), with the Host header, TLS server name and certificate check
of the URL's host (`pinned`). Deliveries share one aiohttp session (`session`): no
cookies kept, no proxy from the environment.

The body is the gateway's own (`payload`), unless the job was asked for in a provider's
protocol (`Job.webhook_shape`, set by `/compat/<provider>`): then it is that provider's
callback, written by the module that speaks the provider (`SHAPES`). Delivery, retries,
signatures and the URL guard are the same for every shape.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import random
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import structlog
from standardwebhooks.webhooks import Webhook

from gateway import metrics, telemetry
from gateway.config import Settings
from gateway.errors import BadUserInput, ServiceUnavailable
from gateway.jobs.model import Job, iso
from gateway.jobs.store import JobStore
from gateway.providers import fluxkrea, krea
from gateway.providers.http import first_reachable
from gateway.store import keys
from gateway.store.redis import Scripts, decoded
from gateway.timeouts import set_within
from gateway.urlguard import ADDRESSES_TRIED, Address, Lookups, check_url, pinned

log = structlog.get_logger("gateway.webhooks")


#: a webhook shape's protocol -> the body its receiver expects, from the job and the shape
SHAPES: dict[str, Callable[[Job, dict[str, Any]], dict[str, Any]]] = {
    "krea": lambda job, shape: krea.job_view(job),  # Krea's job object (X-Webhook-URL)
    "fluxkrea": lambda job, shape: fluxkrea.callback_body(job, shape.get("callback_data")),
}


def payload(job: Job) -> bytes:
    shape = job.webhook_shape
    if shape and shape.get("protocol") in SHAPES:
        return orjson.dumps(SHAPES[shape["protocol"]](job, shape))
    meta = job.metadata or {}
    return orjson.dumps(
        {
            "id": job.id,
            "status": job.status,
            "url": job.urls[0] if job.urls else None,
            "urls": job.urls,  # every image of a job of several
            "service": job.provider,
            "createdAt": iso(job.created_at),
            "completedAt": iso(job.completed_at),
            "metadata": {
                "duration": meta.get("duration"),
                "width": meta.get("width", job.width),
                "height": meta.get("height", job.height),
            },
            "error": job.error,
        }
    )


def signed_headers(
    secret: str, msg_id: str, body: bytes, now: float, before: str = ""
) -> dict[str, str]:
    """The headers of a delivery signed with `secret`; `before`, a secret it replaced not
    long ago, signs the Standard Webhooks signature too (its list of signatures, any of
    which a receiver's library accepts), so a receiver still holding it verifies."""
    doitong = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    stamp = datetime.fromtimestamp(now, tz=UTC)
    text = body.decode()
    signatures = [Webhook(s).sign(msg_id, stamp, text) for s in (secret, before) if s]
    return {
        "Content-Type": "application/json",
        "User-Agent": "image-gateway-webhooks",
        "X-Doitong-Signature": f"sha256={doitong}",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now)),
        "webhook-signature": " ".join(signatures),
    }


#: the deliverers' connection pool: connections at most (all receivers together), and
#: seconds an idle kept-alive connection is kept
POOL_SIZE = 100
KEEPALIVE = 5.0


def session(settings: Settings, tls: ssl.SSLContext | None = None) -> aiohttp.ClientSession:
    """The deliverers' client: a keep-alive pool (`POOL_SIZE`, `KEEPALIVE`; each attempt's
    time limit is `Webhooks.deliver`'s).

    No cookie is kept (one client's receiver never sees another's), no proxy or netrc is
    read from the environment (the request goes to the checked addresses, or nowhere), and
    answers are not decompressed (their bodies are read only to be thrown away). `tls`
    replaces the system's trusted certificates (tests); certificates are always verified.
    """
    connector = aiohttp.TCPConnector(
        limit=max(POOL_SIZE, settings.webhook_concurrency),  # none waits for a connection
        limit_per_host=0,
        keepalive_timeout=KEEPALIVE,
        ssl=tls if tls is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )


#: the attempts a job's delivery log keeps (`webhookDeliveries`): the latest
LOG_KEPT = 100
#: an answer's body read after its status, at most (bytes, seconds): the status says
#: whether it was delivered (Standard Webhooks); a longer or slower body is not waited
#: for, its connection closed instead of kept
DRAIN_BYTES, DRAIN_SECONDS = 1024 * 1024, 1.0
#: seconds a delivery waits when its account has all its attempts under way already
ACCOUNT_WAIT = 1.0


class Webhooks:
    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        scripts: Scripts,
        store: JobStore,
        client: aiohttp.ClientSession,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        lookups: Lookups,
    ) -> None:
        """`lookups`: the process's one set (`urlguard.Lookups`: a second would double
        the lookups the process allows at once)."""
        self.redis = redis
        self.scripts = scripts
        self.store = store
        self.client = client
        self.settings = settings
        self.timeout = aiohttp.ClientTimeout(total=settings.webhook_timeout)
        self.clock = clock
        self.delays = settings.webhook_retry_delays
        self.slots = asyncio.Semaphore(settings.webhook_concurrency)
        # A URL's name answered at admission may go silent by its delivery.
        self.lookups = lookups
        self.inflight: set[asyncio.Task[bool]] = set()
        self.busy: collections.Counter[str] = collections.Counter()  # attempts by account

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def lease_ms(self) -> int:
        """How long a claimed delivery is held (claim.lua): its name lookup and its POST
        (with its answer's drain) are each bounded by the timeout, so no other process
        sends it meanwhile."""
        return int((2 * self.settings.webhook_timeout + DRAIN_SECONDS + 5) * 1000)

    async def run(self, stop: asyncio.Event, period: float = 0.25) -> None:
        trouble = telemetry.Streak("webhook dispatch")
        while not stop.is_set():
            try:
                await self.dispatch()
                trouble.ok()
            except Exception as exc:
                trouble.failed(exc)
            # Failing (Redis away): tried again less and less often, up to every 5 s.
            wait = min(period * 2 ** min(trouble.failures, 8), 5.0)
            await set_within(stop, wait)
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=self.settings.webhook_timeout)

    async def dispatch(self) -> None:
        free = self.settings.webhook_concurrency - len(self.inflight)
        if free <= 0:
            return
        lease = self.lease_ms()
        for shard in range(self.settings.redis_shards):
            due = (
                await self.scripts.claim(
                    schedule=keys.webhooks(shard),
                    now_ms=self.now_ms(),
                    lease_ms=lease,
                    count=free,
                    client=self.redis,
                )
            ).due
            for job_key in due:
                task = asyncio.create_task(self.deliver(job_key))
                self.inflight.add(task)
                task.add_done_callback(self.inflight.discard)
            free -= len(due)
            if free <= 0:
                return

    async def deliver(self, job_key: str) -> bool:
        """One attempt; schedules the next one or ends the delivery. True on success."""
        schedule = keys.webhooks(keys.shard_of_key(job_key))
        job = await self.store.get_by_key(job_key)
        if job is None:  # a cache hit's record lives only as long as its cache entry
            return await self._expired(schedule, job_key)
        if not job.webhook_url:
            await self.redis.zrem(schedule, job_key)
            return False
        if self.busy[job.account] >= self.settings.webhook_account_concurrency:
            # The account's receivers hold its share of this process's attempts already
            # (one that never answers holds each for the whole timeout): put off, no
            # attempt spent, so that other accounts' webhooks do not wait behind them.
            await self._put_off(schedule, job_key, ACCOUNT_WAIT)
            return False
        self.busy[job.account] += 1
        try:
            return await self._deliver(job, job_key, schedule)
        finally:
            self.busy[job.account] -= 1
            if not self.busy[job.account]:
                del self.busy[job.account]

    async def _put_off(self, schedule: str, job_key: str, seconds: float) -> None:
        """The delivery due again in `seconds` (its lease let go); no attempt counted."""
        await self.redis.zadd(schedule, {job_key: self.now_ms() + int(seconds * 1000)})

    async def _deliver(self, job: Job, job_key: str, schedule: str) -> bool:
        assert job.webhook_url is not None
        telemetry.note(job_id=job.id, account=job.account)  # this delivery's task only
        started = self.now_ms()
        addresses: list[Address] = []
        error: str | None = None
        try:
            addresses = await check_url(  # bounded: half the time for a place, half to look
                job.webhook_url,
                self.settings.allow_cidrs,
                lookups=self.lookups,
                owner=job.account,
                wait=self.settings.webhook_timeout / 2,
            )
        except ServiceUnavailable as exc:
            # The process's own bound on lookups (no place free, or the account's names
            # resting), not the receiver's doing: put off, no attempt spent.
            wait_s = exc.retry_after or 5
            await self._put_off(schedule, job_key, wait_s)
            log.info("webhook put off: no name lookup for it now", retry_after=wait_s)
            return False
        except BadUserInput as exc:  # the name did not resolve, or no longer may be used
            error = exc.message
        counted = await self.store.scripts.patch(
            job=job_key, fields={}, count="webhook_attempts", client=self.redis
        )
        if not counted.found:  # expired since it was read
            return await self._expired(schedule, job_key)
        attempt = counted.counted
        secret, before, until = (
            decoded(v or "")
            for v in await self.redis.hmget(
                keys.account(job.account),
                ["webhook_secret", "webhook_secret_before", "webhook_secret_before_until"],
            )
        )
        if not until or int(until) <= self.now_ms():  # its day beside the new one is over
            before = ""
        body = payload(job)
        headers = signed_headers(secret, f"msg_{job.id}", body, self.clock(), before)
        status: int | None = None
        if error is None:
            status, error = await self._attempt(
                job, job.webhook_url, attempt, addresses, body, headers
            )
        ok = error is None
        record = {
            "attempt": attempt,
            "at": iso(started),
            "statusCode": status,
            "error": error,
            "success": ok,
            "durationMs": self.now_ms() - started,
        }
        log_key = keys.webhook_log(job.account, job.id)
        retention = int(self.settings.retention_days * 86400)
        final = ok or attempt > len(self.delays)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(log_key, orjson.dumps(record))
            pipe.ltrim(log_key, -LOG_KEPT, -1)
            pipe.expire(log_key, retention)
            if final:
                pipe.zrem(schedule, job_key)
            else:
                delay = self.delays[attempt - 1] * random.uniform(0.8, 1.0)
                pipe.zadd(schedule, {job_key: self.now_ms() + int(delay * 1000)})
            await pipe.execute()
        outcome = "delivered" if ok else "failed" if final else "retrying"
        await self.store.scripts.patch(
            job=job_key, fields={"webhook_status": outcome}, client=self.redis
        )
        metrics.WEBHOOK[outcome].inc()
        log.info("webhook attempt", attempt=attempt, status=status, outcome=outcome)
        return ok

    async def _expired(self, schedule: str, job_key: str) -> bool:
        """A delivery whose job's record expired first: it ends undelivered."""
        account, job_id = keys.job_parts(job_key)
        log.warning(
            "webhook dropped: the job's record expired before it was delivered",
            account=account,
            job_id=job_id,
        )
        metrics.WEBHOOK["failed"].inc()
        await self.redis.zrem(schedule, job_key)
        return False

    async def _attempt(
        self,
        job: Job,
        url: str,
        attempt: int,
        addresses: list[Address],
        body: bytes,
        headers: dict[str, str],
    ) -> tuple[int | None, str | None]:
        """POST to `url`'s checked addresses: the status, and the error if it failed."""
        attributes = {"gateway.job_id": job.id, "gateway.webhook.attempt": attempt}
        status: int | None = None
        try:
            async with self.slots:
                # The job's trace (the request that made it) goes on; the receiver is
                # sent no traceparent: it is the client's, not part of the gateway.
                with telemetry.span(
                    "webhook", parent=job.trace, kind="client", attributes=attributes
                ) as span:
                    # aiohttp's own limit is the timeout; this one lets an answer whose
                    # status came last minute be drained (`_drain`) rather than cut.
                    async with asyncio.timeout(self.settings.webhook_timeout + DRAIN_SECONDS):
                        status = await self._post(url, addresses, body, headers)
                    if span is not None:
                        span.set_attribute("http.response.status_code", status)
                    if not 200 <= status < 300:
                        telemetry.failed(f"HTTP {status}", span)
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            return status, "timed out"
        except aiohttp.ClientError as exc:
            return status, f"connection failed: {type(exc).__name__}"
        return status, None if 200 <= status < 300 else f"HTTP {status}"

    async def _post(
        self, url: str, addresses: list[Address], body: bytes, headers: dict[str, str]
    ) -> int:
        """POST to the checked addresses (the first `ADDRESSES_TRIED`) in the order the
        name gave them: one that cannot be connected to (refused, unreachable, silent
        past its share of the time), to which nothing was sent, passes the attempt to the
        next, as a browser or curl would. The status of the first answer."""
        addresses = addresses[:ADDRESSES_TRIED]
        timeout = self.timeout
        if len(addresses) > 1:
            timeout = aiohttp.ClientTimeout(
                total=timeout.total, sock_connect=self.settings.webhook_timeout / len(addresses)
            )

        async def post(address: Address) -> int:
            target, host, server_name = pinned(url, address)
            async with self.client.post(
                target,
                data=body,
                headers={**headers, **host},
                server_hostname=server_name,
                allow_redirects=False,
                timeout=timeout,
            ) as response:
                await self._drain(response)
            return response.status

        def unreachable(address: Address, exc: Exception) -> None:
            log.info("webhook address unreachable", address=str(address), error=str(exc))

        return await first_reachable(addresses, post, unreachable)

    @staticmethod
    async def _drain(response: aiohttp.ClientResponse) -> None:
        """Read the answer's body to its end, keeping nothing, so that the connection goes
        back to the pool; one past `DRAIN_BYTES` or `DRAIN_SECONDS` is closed instead:
        its status is already the attempt's outcome."""
        read = 0
        try:
            async with asyncio.timeout(DRAIN_SECONDS):
                while chunk := await response.content.readany():
                    read += len(chunk)
                    if read > DRAIN_BYTES:
                        response.close()
                        return
        except (TimeoutError, aiohttp.ClientError):  # slow, or cut: delivered all the same
            response.close()

    async def attempts(self, account: str, job_id: str) -> list[dict[str, Any]]:
        rows = await self.redis.lrange(keys.webhook_log(account, job_id), 0, -1)
        return [orjson.loads(r) for r in rows]

    async def resend(self, job: Job) -> None:
        """Deliver an ended job's webhook again, now (resend.lua): a retry waiting its
        turn is brought forward, a delivery that had ended starts a new round; an
        attempt under way is left to run (started again beside itself, a resend each
        second made four attempts a second, and a log of millions)."""
        if not job.webhook_url:
            raise BadUserInput("this job has no webhookUrl", field="id")
        if not job.ended:
            raise BadUserInput("the job has not ended yet", field="id")
        shard = keys.shard_of(job.account)
        await self.scripts.resend(
            schedule=keys.webhooks(shard),
            lease_ms=self.lease_ms(),
            job=keys.job(job.account, job.id),
            now_ms=self.now_ms(),
            client=self.redis,
        )
