"""Service -> ordered backends, failover, circuit breakers, and the submit/poll loop.

A request names a service (`flux-krea`) or pins a backend (`krea`). The route is the
service's ordered list of *enabled* backends; a backend without credentials is never
tried. A job fails over to the next backend on upstream errors (connection, timeout,
5xx, 429) but not when the upstream refused the user's own input. A backend that fails
`threshold` times in a row is taken out for `cooldown` seconds (its circuit opens),
then given one trial. Outside dev mode `local` is never substituted for a real backend.

The breaker is per process on purpose: each process sees its own failures at once, and
a shared breaker would add a Redis round trip to every upstream call.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.config import BACKENDS
from gateway.errors import (
    BadUserInput,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    ServiceUnavailable,
)
from gateway.providers.base import ImageParams, Output, Polled, Provider

if TYPE_CHECKING:
    from gateway.callbacks import RedisInbox

#: seconds between polls of a job whose upstream will call back: a lost callback only
#: delays the job by this much
CALLBACK_FALLBACK = 30.0


class JobFailed(Exception):
    """Every backend of the route failed (or the upstream refused the input)."""


class JobCancelled(Exception):
    """The client cancelled the job while it ran."""


@dataclass
class Breaker:
    threshold: int
    cooldown: float
    failures: int = 0
    opened_at: float | None = None
    reason: str = ""

    def allows(self, now: float) -> bool:
        return self.opened_at is None or now - self.opened_at >= self.cooldown

    def success(self) -> None:
        self.failures, self.opened_at, self.reason = 0, None, ""

    def failure(self, reason: str, now: float) -> None:
        self.failures += 1
        self.reason = reason
        if self.failures >= self.threshold:
            self.opened_at = now  # (re)open: a failed half-open trial restarts the cool-down


@dataclass
class Result:
    backend: str
    provider: Provider
    outputs: list[Output]
    metadata: dict[str, Any] = field(default_factory=dict)


Hook = Callable[[dict[str, Any]], Awaitable[None]]


class Router:
    def __init__(
        self,
        providers: dict[str, Provider],
        routes: dict[str, list[str]],
        *,
        dev: bool = False,
        threshold: int = 3,
        cooldown: float = 30.0,
        backend_concurrency: int = 256,
        poll_interval: float | None = None,
        inbox: RedisInbox | None = None,
        callback_fallback: float = CALLBACK_FALLBACK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox = inbox
        self.callback_fallback = callback_fallback
        self.providers = providers
        self.routes = routes
        self.dev = dev
        self.clock = clock
        self.poll_interval = poll_interval
        self.breakers = {name: Breaker(threshold, cooldown) for name in providers}
        # Bounds the upstream calls in flight per backend, not the jobs waiting on it.
        self.slots = {name: asyncio.Semaphore(backend_concurrency) for name in providers}

    # -- which backends --------------------------------------------------------------

    def route(self, name: str) -> list[str]:
        """The configured backends for a service or pinned backend; unknown names refused."""
        if name in self.routes:
            backends = list(self.routes[name])
            if self.dev and "local" not in backends:
                backends.append("local")  # dev mode only: the README works offline
            return backends
        if name in BACKENDS:
            return [name]
        known = ", ".join(sorted({*self.routes, *BACKENDS}))
        raise BadUserInput(f"unknown provider {name!r}; known: {known}", field="provider")

    def enabled(self, name: str) -> list[str]:
        """The route's enabled backends; none at all means the service is unavailable."""
        backends = [b for b in self.route(name) if b in self.providers and self._on(b)]
        if not backends:
            raise ServiceUnavailable(f"no backend of {name!r} is enabled: {self._why_off(name)}")
        return backends

    def _on(self, backend: str) -> bool:
        return self.providers[backend].status()[0]

    def _why_off(self, name: str) -> str:
        reasons = []
        for b in self.route(name):
            provider = self.providers.get(b)
            reasons.append(f"{b}: {provider.status()[1] if provider else 'not configured'}")
        return "; ".join(reasons)

    def order(self, name: str) -> list[str]:
        """Enabled backends with closed circuits first, open ones last as a final trial."""
        backends = self.enabled(name)
        now = self.clock()
        closed = [b for b in backends if self.breakers[b].allows(now)]
        return closed + [b for b in backends if b not in closed]

    def describe(self) -> list[dict[str, Any]]:
        """Services and backends for the `providers` query."""
        now = self.clock()
        out: list[dict[str, Any]] = []
        for service in self.routes:
            route = self.route(service)
            on = [b for b in route if b in self.providers and self._on(b)]
            out.append(
                {
                    "name": service,
                    "kind": "service",
                    "enabled": bool(on),
                    "reason": "ok" if on else self._why_off(service),
                    "backends": route,
                    "circuit": "closed",
                }
            )
        for name, provider in self.providers.items():
            enabled, reason = provider.status()
            breaker = self.breakers[name]
            circuit = "closed"
            if breaker.opened_at is not None:
                circuit = "half-open" if breaker.allows(now) else "open"
                reason = f"{breaker.failures} failures in a row, last: {breaker.reason}"
            out.append(
                {
                    "name": name,
                    "kind": "backend",
                    "enabled": enabled,
                    "reason": reason,
                    "backends": [name],
                    "circuit": circuit,
                }
            )
        return out

    # -- running a job ---------------------------------------------------------------

    async def execute(
        self,
        name: str,
        params: ImageParams,
        *,
        resume: dict[str, Any] | None,
        save_upstream: Hook,
        progress: Hook,
        cancelled: Callable[[], Awaitable[bool]],
        deadline: float,
    ) -> Result:
        """Run the job on the first backend that delivers; resume a stored upstream job."""
        try:
            order = self.order(name)
        except ServiceUnavailable as exc:
            raise JobFailed(exc.message) from None
        if resume and resume.get("backend") in order:
            # Backends before the stored one already failed this job: do not retry them.
            order = order[order.index(resume["backend"]) :]
        errors: list[str] = []
        for backend in order:
            provider = self.providers[backend]
            upstream_id = resume.get("id") if resume and resume.get("backend") == backend else None
            try:
                result = await self._attempt(
                    backend,
                    provider,
                    params,
                    upstream_id,
                    resume,
                    save_upstream,
                    progress,
                    cancelled,
                    deadline,
                )
            except ProviderError as exc:
                if not exc.failover:
                    # The upstream refused this user's input: the backend is healthy, so
                    # one user's bad prompts must not open its circuit for everyone.
                    raise JobFailed(exc.message) from None
                self.breakers[backend].failure(exc.message, self.clock())
                errors.append(f"{backend}: {exc.message}")
                if self.clock() >= deadline:
                    break
                continue
            self.breakers[backend].success()
            return result
        raise JobFailed("; ".join(errors) or "no backend could run the job")

    async def _attempt(
        self,
        backend: str,
        provider: Provider,
        params: ImageParams,
        upstream_id: str | None,
        resume: dict[str, Any] | None,
        save_upstream: Hook,
        progress: Hook,
        cancelled: Callable[[], Awaitable[bool]],
        deadline: float,
    ) -> Result:
        sent: dict[str, Any] = (resume or {}).get("sent", {}) if upstream_id else {}
        metadata: dict[str, Any] = {}
        if upstream_id is None:
            async with self.slots[backend]:
                submitted = await provider.submit(params)
            sent, metadata = submitted.sent, dict(submitted.metadata)
            if submitted.outputs is not None:
                return Result(backend, provider, submitted.outputs, {**metadata, "sent": sent})
            upstream_id = submitted.upstream_id
            if not upstream_id:
                raise JobFailed(f"{backend} returned neither outputs nor a job id")
            # Stored before waiting: a worker that takes over polls it, never resubmits.
            await save_upstream({"backend": backend, "id": upstream_id, "sent": sent})
        polled = await self._wait(backend, provider, upstream_id, progress, cancelled, deadline)
        if polled.state == "cancelled":
            raise JobCancelled(f"{backend} cancelled the job")
        if polled.state == "failed":
            raise ProviderUnavailable(polled.error or f"{backend} job failed")
        return Result(
            backend,
            provider,
            polled.outputs,
            {**metadata, **polled.metadata, "upstreamId": upstream_id, "sent": sent},
        )

    async def _wait(
        self,
        backend: str,
        provider: Provider,
        upstream_id: str,
        progress: Hook,
        cancelled: Callable[[], Awaitable[bool]],
        deadline: float,
    ) -> Polled:
        """Poll at the provider's pace, slowing down on long jobs; no thread per job.

        A job whose upstream calls back is polled once its callback came, and otherwise
        only every `callback_fallback` seconds (a lost callback is slower, not lost);
        the wait still notices a cancellation within one poll interval.
        """
        started = self.clock()
        interval = self.poll_interval or provider.poll_interval
        tokens = provider.callbacks(upstream_id) if self.inbox is not None else []
        waiter = await self.inbox.waiter(tokens) if self.inbox is not None and tokens else None
        errors_in_a_row = 0
        last_status = ""
        polled_at = -math.inf
        try:
            if waiter is not None and not await waiter.check():
                polled_at = started  # the submit's answer is news enough: wait first
            while True:
                if await cancelled():
                    await self._cancel_upstream(backend, provider, upstream_id)
                    raise JobCancelled("cancelled by the client")
                if self.clock() >= deadline:
                    await self._cancel_upstream(backend, provider, upstream_id)
                    raise ProviderTimeout(f"{backend} did not finish in time")
                due = (
                    waiter is None
                    or waiter.delivered
                    or self.clock() - polled_at >= self.callback_fallback
                )
                if due:
                    polled_at = self.clock()
                    try:
                        async with self.slots[backend]:
                            polled = await provider.poll(upstream_id)
                        errors_in_a_row = 0
                    except ProviderError:
                        # The upstream has our job: a passing poll failure is no reason
                        # to pay twice.
                        errors_in_a_row += 1
                        if errors_in_a_row >= 5:
                            raise
                        polled = Polled(state="pending")
                    if polled.state != "pending":
                        return polled
                    if waiter is not None and waiter.delivered:
                        if waiter.settled:  # all called back, still pending: at the pace
                            waiter.close()
                            waiter = None
                        else:  # one job of several done: wait for the others
                            waiter.delivered = False
                    if polled.upstream_status and polled.upstream_status != last_status:
                        last_status = polled.upstream_status
                        await progress({"upstreamStatus": last_status, **polled.metadata})
                if self.clock() - started > 30:
                    interval = min(interval * 1.5, 10.0)
                pause = interval * random.uniform(0.9, 1.1)
                if waiter is not None:
                    await waiter.wait(pause)
                else:
                    await asyncio.sleep(pause)
        finally:
            if waiter is not None:
                waiter.close()

    async def _cancel_upstream(self, backend: str, provider: Provider, upstream_id: str) -> None:
        """Best effort: the job ends on our side whatever the upstream answers."""
        with contextlib.suppress(ProviderError):
            async with self.slots[backend]:
                await provider.cancel(upstream_id)
