"""The gateway's operations, one code path for GraphQL and REST.

Resolvers and REST handlers stay thin: they turn their input into a
`GenerationRequest` and call these methods, which raise only `GatewayError`s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
import redis.asyncio as aioredis

from gateway import metrics, pricing, telemetry, usage
from gateway.accounts import Accounts
from gateway.admission import TOKEN_RULES, Admitted, Duplicate, admit, plan_table, utc_day
from gateway.artifacts import ArtifactStore
from gateway.auth import Principal, authenticate, credentials
from gateway.cache import NO_STATS, Cache
from gateway.callbacks import RedisInbox
from gateway.config import Settings
from gateway.errors import BadUserInput, Forbidden, GatewayError, NotFound, ServiceUnavailable
from gateway.events import Events
from gateway.job_watch import JobWatch
from gateway.jobs.model import JOB_ID, TERMINAL, Job
from gateway.jobs.queue import Queue
from gateway.jobs.store import JobStore
from gateway.params import INT_MAX, GenerationRequest
from gateway.routing import Router
from gateway.store import keys
from gateway.store.redis import Scripts, store_trouble
from gateway.tokens import MINTING, ClientTokens, Minted, TokenSpec
from gateway.urlguard import Lookups, check_url
from gateway.webhooks import Webhooks

#: An admission that met Redis trouble is sent again, for this long, before the request
#: is answered 503: admit.lua knows its own job id, so a second send of one that ran is
#: answered with that job. Redis restarting between running an admission and replying
#: would otherwise leave a job accepted and charged behind a 503 (docs/api.md#durability).
ADMIT_AGAIN_SECONDS = 3.0
ADMIT_AGAIN_FIRST = 0.05  # the first wait; each next one twice as long
#: after the job id in a left request's note (`Gateway.left`): its leaving was counted
COUNTED = "counted"


@contextlib.contextmanager
def store_errors(
    message: str = "the job store is unreachable; nothing was charged",
) -> Iterator[None]:
    """Redis unreachable: fail closed with a clear 503 (and Retry-After)."""
    try:
        yield
    except Exception as exc:
        if unreachable(exc):
            raise ServiceUnavailable(message) from exc
        raise


def unreachable(exc: BaseException) -> bool:
    """Redis trouble, or the network's to it."""
    return isinstance(exc, OSError) or store_trouble(exc)


@dataclass(frozen=True)
class Estimate:
    credits: int
    width: int
    height: int
    num_images: int
    backends: list[str]


def _theirs(principal: Principal, job: Job | None) -> Job | None:
    """`job` when the caller may see it: its account's (the key it was read with), and a
    client token's own."""
    if job is None or (principal.token and job.token != principal.token.id):
        return None
    return job


#: `jobs`' page when `first` is left out (or null, as GraphQL's `Int` allows)
PAGE = 20
#: what `jobs` may be narrowed to
STATUSES = frozenset({"queued", "processing", *TERMINAL})


def page_size(first: int | None, after: str | None, status: str | None) -> int:
    """`jobs`' arguments checked, GraphQL's and REST's alike, before the key is (a bad
    page costs no read): the page's size; BadUserInput naming the one at fault."""
    first = PAGE if first is None else first
    if not 1 <= first <= 100:
        raise BadUserInput("first must be between 1 and 100", field="first")
    if after is not None and not JOB_ID.fullmatch(after):
        raise BadUserInput("after must be a pageInfo.endCursor (a job id)", field="after")
    if status is not None and status not in STATUSES:
        raise BadUserInput(f"status must be one of {sorted(STATUSES)}", field="status")
    return first


class Gateway:
    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        scripts: Scripts,
        router: Router,
        artifacts: ArtifactStore,
        queue: Queue,
        store: JobStore,
        events: Events,
        cache: Cache,
        webhooks: Webhooks,
        inbox: RedisInbox,
        watch: JobWatch,
        lookups: Lookups,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Every part comes built (by `gateway/runtime.py`); the job store, events, cache
        and webhooks are the worker's too."""
        self.settings = settings
        self.redis = redis
        self.scripts = scripts
        self.router = router
        self.artifacts = artifacts
        self.queue = queue
        self.store = store
        self.events = events
        self.cache = cache
        self.webhooks = webhooks
        self.inbox = inbox  # receives the upstreams' callbacks (`POST /v1/callbacks/...`)
        self.watch = watch  # answers that wait for their job's end
        self.lookups = lookups  # the process's, shared with webhook deliveries
        self.clock = clock
        self.accounts = Accounts(redis, scripts, settings, clock)
        self.tokens = ClientTokens(redis, scripts, settings.client_tokens_max)
        self.plans = plan_table(settings.plans)

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def authenticate(
        self, key: str | None, *, read: bool = False, origin: str | None = None
    ) -> Principal:
        """The caller holding `key` (an API key or a client token, which may be bound to
        origins: `origin` is the request's Origin header)."""
        principal, _ = await self._authenticate(key, read, origin, "")
        return principal

    async def _authenticate(
        self, key: str | None, read: bool, origin: str | None, job_id: str
    ) -> tuple[Principal, dict[str, Any]]:
        with store_errors():
            principal, record = await authenticate(
                self.redis,
                self.scripts,
                self.settings,
                key,
                self.now_ms(),
                plans=self.plans,
                read=read,
                origin=origin,
                job_id=job_id,
            )
        telemetry.note(account=principal.account)
        return principal, record

    async def _refuse(
        self,
        api_key: str | None,
        origin: str,
        exc: GatewayError,
        principal: Principal | None = None,
    ) -> NoReturn:
        """A generation request refused before admission (bad input, nothing routable):
        a bad key still gets its 401, a good one its X-RateLimit-* headers. `principal`:
        the caller, when its key was checked already."""
        if principal is None:
            principal = await self.authenticate(api_key, origin=origin)
        exc.headers = {**principal.rate_headers(), **exc.headers}
        raise exc

    def estimate(self, principal: Principal, request: GenerationRequest) -> Estimate:
        """What `request` would cost `principal`: refused as admission would refuse a
        client token the service (`admit.lua` checks it there)."""
        token = principal.token
        if token is not None and token.services and request.provider not in token.services:
            raise Forbidden(TOKEN_RULES["service"])
        backends = self.router.route(request.provider)
        width, height = request.size()
        credits = pricing.cost(width, height, request.num_images)
        return Estimate(credits, width, height, request.num_images, backends)

    async def generate(
        self,
        api_key: str | None,
        parse: Callable[[], Awaitable[GenerationRequest]],
        origin: str = "",
        webhook_shape: dict[str, Any] | None = None,
        *,
        rejoin: bool = False,
    ) -> tuple[Job, Principal]:
        """`_generate`, its outcome counted (`gateway_admissions_total`), in an
        `admission` span while tracing."""
        try:
            with telemetry.span("admission") as span:
                job, principal = await self._generate(api_key, parse, origin, webhook_shape, rejoin)
                if span is not None:
                    span.set_attributes({"gateway.job_id": job.id, "gateway.service": job.provider})
        except GatewayError as exc:
            metrics.refused(exc.code)
            raise
        telemetry.note(account=principal.account, job_id=job.id)
        return job, principal

    async def _generate(
        self,
        api_key: str | None,
        parse: Callable[[], Awaitable[GenerationRequest]],
        origin: str,
        webhook_shape: dict[str, Any] | None,
        rejoin: bool = False,
    ) -> tuple[Job, Principal]:
        """Check the key, parse and validate the input, price, admit and enqueue, the key
        check and admission in one Lua call; the job and the caller as admission left it.

        `parse` reads the caller's input (GraphQL or REST): a refusal before admission
        is answered here, once, with the key still checked. `origin`: the request's
        Origin header (a client token may be bound to origins). `webhook_shape`: the
        protocol its webhook speaks when not ours (`Job.webhook_shape`, set by the
        provider-compatible routes). `rejoin`: an answer that waits for the job
        (`endpoints.wait_answering`); the same request sent again after its client left
        (its own timeout ran out first: `left`) joins that job rather than start and pay
        for another, unless it ended without an image (failed, cancelled)."""
        credential = credentials(api_key)
        try:
            request = await parse()
            self.router.enabled(request.provider)  # unknown -> 400, nothing enabled -> 503
            if request.webhook_url and credential.token:
                raise Forbidden("a client token cannot set webhookUrl")
            credits = pricing.cost(*request.size(), request.num_images)
        except GatewayError as exc:
            await self._refuse(api_key, origin, exc)
        if request.webhook_url:
            # The key is checked before the URL's name is looked up, so that no one
            # without a key can make the gateway query DNS: one more round trip, for the
            # requests that name a webhook only (its refusal is the answer).
            checked = await self.authenticate(api_key, origin=origin)
            try:
                await check_url(
                    request.webhook_url,
                    self.settings.allow_cidrs,
                    lookups=self.lookups,
                    owner=credential.account,
                )
            except GatewayError as exc:
                await self._refuse(api_key, origin, exc, checked)
        # A seed is fixed at admission, so a retry or failover makes the same picture.
        # One read of the system's randomness for the job id and the seed. A drawn seed
        # fits every route's input (GraphQL's Int too), so any client can send it back.
        raw = os.urandom(16)
        seed = request.seed if request.seed is not None else int.from_bytes(raw[12:]) & INT_MAX
        params = request.image_fields(seed)
        now = self.now_ms()
        job = Job(
            id=raw[:12].hex(),
            account=credential.account,
            status="queued",
            provider=request.provider,
            params=params,
            cost=credits,
            created_at=now,
            webhook_url=request.webhook_url,
            cache_key=self.cache.digest(request),
            token=credential.token or None,
            webhook_shape=webhook_shape if request.webhook_url else None,
            trace=telemetry.traceparent(),  # None unless tracing
        )
        idempotency = (
            (request.idempotency_key, request.fingerprint) if request.idempotency_key else None
        )

        async def admitted(rejoin: str) -> Admitted | Duplicate:
            wait, until = ADMIT_AGAIN_FIRST, time.monotonic() + ADMIT_AGAIN_SECONDS
            while True:
                try:
                    return await admit_once(rejoin)
                except Exception as exc:
                    if not unreachable(exc) or time.monotonic() + wait > until:
                        raise
                await asyncio.sleep(wait)
                wait *= 2

        async def admit_once(rejoin: str) -> Admitted | Duplicate:
            return await admit(
                self.redis,
                self.scripts,
                credential,
                job,
                plans=self.plans,
                now_ms=now,
                # A queued job holds its slot until it ends (bounded by the deadline);
                # once a worker starts it, the slot becomes a short lease it renews.
                lease_ms=int(self.settings.job_deadline_seconds * 1000),
                idempotency=idempotency,
                cache_digest=job.cache_key,
                retention_ms=self.cache.retention_ms,
                origin=origin,
                ledger_keep_ms=self.settings.ledger_keep_ms,
                rejoin=rejoin,
            )

        rejoining = rejoin and not idempotency
        # Not "nothing was charged": a Redis gone for longer than the admission's
        # re-sends, just after running it, leaves it accepted (docs/api.md#durability).
        with store_errors(
            "the job store is unreachable; send the request again later (with an "
            "idempotency key, sending it again never makes a second job)"
        ):
            verdict = await admitted(request.fingerprint if rejoining else "")
            while isinstance(verdict, Duplicate):  # twice at most: see `continue`
                if idempotency and verdict.job_id != job.id:
                    # Answered with an earlier job, as a read of it is, so counted as one
                    # (the key check reads the job in the same round trip): repeats of one
                    # key are not free of every limit (each may carry the job's images,
                    # base64). A request rejoining the job it left is not: it is the same
                    # client's retry, which a refusal would make a new job.
                    _, record = await self._authenticate(api_key, True, origin, verdict.job_id)
                    earlier = Job.from_record(record) if record else None
                else:
                    job_id, _, counted = verdict.job_id.partition(" ")  # the note (`left`)
                    if rejoining and counted:
                        # Back for the job its leaving was counted on, first (`left`): a
                        # worker reaching the job now starts it; one that cancelled it
                        # before is read so.
                        await self.store.mark_left(credential.account, job_id, False)
                    earlier = await self.store.get(credential.account, job_id)
                if rejoining:
                    # Used up here, not in admit.lua: a script sent again after its reply
                    # was lost still finds it. The same request sent later is a new job.
                    rejoining = False
                    left = keys.left(credential.account, credential.token, request.fingerprint)
                    await self.redis.delete(left)
                    if earlier is None or (earlier.ended and earlier.status != "completed"):
                        verdict = await admitted("")  # the left job had no image: a new one
                        continue  # (a Duplicate now is this admission's own, run already)
                if earlier is None:
                    raise NotFound("the job of this idempotencyKey no longer exists")
                metrics.ADMITTED["duplicate"].inc()
                return earlier, verdict.principal
        metrics.ADMITTED_AS[verdict.mode].inc()
        if verdict.mode == "run":
            self.queue.notify()
        else:
            job.cost = 0  # a cache hit or a request coalesced into one in flight
        hit = verdict.outcome
        if hit:
            job.status, job.completed_at = "completed", now
            job.urls = orjson.loads(hit.urls)
            job.width, job.height = int(hit.width), int(hit.height)
            job.metadata = orjson.loads(hit.metadata)
        return job, verdict.principal

    async def job(self, principal: Principal, job_id: str) -> Job | None:
        """One of the caller's jobs (a client token's: one made with it), or None."""
        with store_errors():
            job = await self.store.get(principal.account, job_id)
        return _theirs(principal, job)

    async def poll(
        self, key: str | None, job_id: str, origin: str | None = None, *, read: bool = True
    ) -> tuple[Principal, Job | None]:
        """`authenticate` and `job`, in one round trip: a poll's. `read`: counted as a read
        (a stream's later reads are not: `follow`)."""
        wanted = job_id if self.store.plausible(job_id) else ""  # "": no record looked for
        principal, record = await self._authenticate(key, read, origin, wanted)
        return principal, _theirs(principal, Job.from_record(record) if record else None)

    async def jobs(
        self, principal: Principal, first: int, after: str | None, status: str | None
    ) -> tuple[list[Job], bool, str | None]:
        """A page of the caller's jobs, whether more may follow, and its end cursor."""
        with store_errors():
            return await self.store.page(
                principal.account, first, after, status, principal.token_id()
            )

    async def cancel(self, principal: Principal, job_id: str) -> Job:
        """Cancel a job that has not ended: refunded at once, its slot freed.

        A queued job never starts; a running one is stopped by its worker at its next
        poll (and cancelled upstream where the provider allows).
        """
        job = await self.job(principal, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        with store_errors():
            if not job.ended:
                ended = await self.store.finish(
                    job, "cancelled", self.now_ms(), refund=True, error="cancelled by the client"
                )
                job = await self.store.get(principal.account, job_id) or job
                if ended:
                    if job.cost > 0:  # one that waited on an identical job never ran
                        metrics.job_ended(job.provider, metrics.NO_BACKEND, "cancelled")
                    await self.events.publish(job)
                    if job.cache_key:  # a waiter runs in its place
                        promoted = await self.cache.release(job, self.now_ms())
                        if promoted:
                            self.queue.notify()
                            await self.events.publish_stored(*promoted)
            return job

    async def left(
        self, principal: Principal, job: Job, request: GenerationRequest, *, mark: bool
    ) -> None:
        """The client waiting on `job`'s answer, which sent `request`, left before it (its
        own timeout ran out first): the same request, sent again within LEFT_MS by the
        same caller with `rejoin`, joins `job` rather than start and pay for another (if
        `job` is cancelled meanwhile, it makes a new one). `mark`: nobody else would see
        the job's end (no webhook): the leaving is counted on the job, and a worker that
        reaches it still queued while every request that waited on it is away cancels it,
        refunded (docs/api.md#waiting). Counted before the note is written: a rejoin that
        finds the note counts its coming back."""
        left = keys.left(principal.account, principal.token_id(), request.fingerprint)
        with store_errors():
            if mark:
                await self.store.mark_left(principal.account, job.id)
            # The note says whether this leaving was counted: only a request back for
            # such a one counts coming back (a wait that ran out counts neither).
            note = f"{job.id} {COUNTED}" if mark else job.id
            await self.redis.set(left, note, px=keys.LEFT_MS)

    async def wait(self, job: Job, seconds: float) -> Job:
        """`job` once it has ended, or as it stands after `seconds`: it goes on either
        way, and so does it when Redis goes away meanwhile (the job was accepted; the
        caller gets it as it was, to read again by its id)."""
        if job.ended or seconds <= 0:
            return job
        try:
            ended = await self.watch.until_ended(job.account, job.id, seconds)
        except Exception as exc:
            if not unreachable(exc):
                raise
            return job
        return ended or job

    async def follow(
        self, principal: Principal, job_id: str, key: str | None, origin: str | None = None
    ) -> AsyncIterator[Job]:
        """The updates of the job `principal` (holding `key`) found (`JobWatch.follow`). A
        stream outlives what its credential may: each read checks the key or token
        again, in the same round trip (not counted as a read), so one revoked or
        expired meanwhile ends the stream with its refusal at the next update."""

        async def read() -> Job | None:
            return (await self.poll(key, job_id, origin, read=False))[1]

        seen = False
        async for update in self.watch.follow(principal.account, job_id, read):
            seen = True
            yield update
        if not seen:
            raise NotFound(f"no job {job_id}")

    async def me(self, principal: Principal) -> dict[str, Any]:
        """Plan, balance, and each limit with its use and reset time."""
        now = self.now_ms()
        account = principal.account
        with store_errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hget(keys.account(account), "credits")
                pipe.get(keys.day(account, utc_day(now)))
                pipe.zcount(keys.running(account), now, "+inf")
                pipe.get(keys.reads(account, now, principal.token_id()))
                credits, today, running, reads = await pipe.execute()
        limits = principal.limits
        day_reset = (now // 86_400_000 + 1) * 86_400
        reads_allowed = principal.read_limit

        def usage(name: str, limit: int | None, used: int, reset: int | None) -> dict[str, Any]:
            remaining = None if limit is None else max(0, limit - used)
            return {
                "name": name,
                "limit": limit,
                "used": used,
                "remaining": remaining,
                "reset": reset,
            }

        token = principal.token
        # A client token is a page's visitor's: the account's name and what its cache
        # saved it are the backend's business (`cache.NO_STATS`).
        cache = dict(NO_STATS) if token else await self.cache.stats(account)
        return {
            "cache": cache,
            "id": account,
            "name": "" if token else principal.name,
            "plan": principal.plan,
            # a client token sees what is left of its budget, not its account's balance
            "credits": principal.credits if token else int(credits or 0),
            "client_token": token,
            # what signs the key's webhooks (docs/api.md#webhooks), read with the key (a
            # client token's is blanked: never a page's to see)
            "webhook_secret": principal.webhook_secret or None,
            "limits": [
                usage("minute", limits.rpm, principal.window_used, principal.window_reset),
                usage("day", limits.daily, int(today or 0), day_reset),
                usage("concurrency", limits.concurrency, int(running or 0), None),
                usage("read", reads_allowed, int(reads or 0), (now // 60000 + 1) * 60),
            ],
        }

    async def usage(
        self,
        start: str,
        end: str,
        group_by: str,
        *,
        principal: Principal | None = None,
        account: str | None = None,
    ) -> usage.Report:
        """docs/api.md#usage: the caller's own (`principal`, a key: a client token is
        refused), or any `account`'s (the caller checked as admin; NOT_FOUND if none)."""
        if principal is not None:
            principal.require_key("read usage")
            account = principal.account
        assert account is not None
        start_ms, end_ms = usage.parse_range(start, end)
        with store_errors("the store is unreachable"):
            if principal is None:
                await self.accounts.get(account)
            report = await usage.report(self.redis, account, start_ms, end_ms, group_by)
            extra = report.pages - 2  # the first of the ledger's and of the jobs' free
            if principal is not None and extra > 0:
                # A read for each page beyond (the report itself was one, counted when
                # the key was checked): a report of 100,000 rows is no one read; the
                # key's next reads wait when it took more than was left.
                reads = keys.reads(account, self.now_ms())
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.incrby(reads, extra)
                    pipe.pexpire(reads, keys.READS_KEPT_MS)
                    await pipe.execute()
            return report

    async def webhook_deliveries(self, principal: Principal, job_id: str) -> list[dict[str, Any]]:
        principal.require_key("read webhook deliveries")
        with store_errors():
            if await self.store.get(principal.account, job_id) is None:
                raise NotFound(f"no job {job_id}")
            return await self.webhooks.attempts(principal.account, job_id)

    async def resend_webhook(self, principal: Principal, job_id: str) -> None:
        principal.require_key("resend webhooks")
        with store_errors():
            job = await self.store.get(principal.account, job_id)
            if job is None:
                raise NotFound(f"no job {job_id}")
            await self.webhooks.resend(job)

    async def create_client_token(self, principal: Principal, wanted: TokenSpec) -> Minted:
        """A client token for a page, minted by a key (never by a token)."""
        principal.require_key(MINTING)
        for name in wanted.services:
            try:
                self.router.route(name)
            except BadUserInput as exc:  # an unknown service or backend, in this input
                raise BadUserInput(exc.message, field="services") from None
        with store_errors("the store is unreachable; no token was made"):
            return await self.tokens.mint(
                principal.account, principal.key_hash, wanted, self.now_ms()
            )

    async def revoke_client_token(self, principal: Principal, token: str) -> bool:
        """End one of the key's tokens now; False when it is no token of this key's."""
        principal.require_key("revoke client tokens")
        with store_errors("the store is unreachable; the token was not revoked"):
            return await self.tokens.revoke(principal.account, token)

    def providers(self) -> list[dict[str, Any]]:
        return self.router.describe()

    async def ready(self) -> dict[str, bool]:
        """Redis and the output store answer; a Redis that does not answer within 5 s
        (hung, paused) is not ready either, said in time for a probe's own timeout."""
        try:
            async with asyncio.timeout(5.0):
                redis_ok = bool(await self.redis.ping())
        except Exception:
            redis_ok = False
        return {"redis": redis_ok, "storage": await self.artifacts.ready()}
