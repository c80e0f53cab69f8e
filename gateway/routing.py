"""Service -> ordered backends, and failover along them.

A request names a service (`flux-krea`) or pins a backend (`krea`). The route is the
service's ordered list of *enabled* backends; a backend without credentials is never
tried. A job fails over to the next backend on upstream errors (connection, timeout,
5xx, 429) but not when the upstream refused the user's own input. A backend that fails
`threshold` times in a row is taken out for `cooldown` seconds (its circuit opens,
`gateway/breaker.py`), then given one trial. Outside dev mode `local` is never
substituted for a real backend.

On each backend a job is submitted (or a stored upstream job resumed, never submitted
again) and then waited for (`gateway/upstream_wait.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.breaker import Breaker
from gateway.config import BACKENDS
from gateway.errors import (
    BadUserInput,
    ProviderError,
    ProviderJobFailed,
    ProviderUnavailable,
    ServiceUnavailable,
)
from gateway.providers.base import ImageParams, Output, Provider
from gateway.upstream_wait import (
    CALLBACK_FALLBACK,
    Hook,
    JobCancelled,
    UpstreamJob,
    UpstreamWait,
)

if TYPE_CHECKING:
    from gateway.callbacks import RedisInbox


class JobFailed(Exception):
    """Every backend of the route failed (or the upstream refused the input: `rejected`).
    `backend`: the one that failed last, `none` when none was tried (the metrics' label)."""

    def __init__(self, message: str, backend: str = "none", *, rejected: bool = False) -> None:
        super().__init__(message)
        self.backend = backend
        self.rejected = rejected


@dataclass
class Result:
    backend: str
    provider: Provider
    outputs: list[Output]
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobRun:
    """What a job brings to each backend it is tried on."""

    params: ImageParams
    save_upstream: Hook  # stores the upstream's job id before the wait
    progress: Hook
    cancelled: Callable[[], Awaitable[bool]]
    deadline: float  # on the router's clock
    key: str = ""  # the job's (its record's key): a cancellation nudges its wait


def _all_of(backend: str, outputs: list[Output], params: ImageParams) -> None:
    """Fewer images than asked for (and paid for) is no answer to keep, nor to cache
    as the answer for that many: the next backend is tried."""
    if len(outputs) < params.num_images:
        raise ProviderUnavailable(
            f"{backend} returned {len(outputs)} of {params.num_images} images"
        )


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
        self.providers = providers
        self.routes = routes
        #: every name a request may ask for: the services, then the backends not one
        self.names = (*routes, *(b for b in BACKENDS if b not in routes))
        self.dev = dev
        self.clock = clock
        self.breakers = {name: Breaker(threshold, cooldown) for name in providers}
        # Bounds the upstream calls in flight per backend, not the jobs waiting on it.
        self.slots = {name: asyncio.Semaphore(backend_concurrency) for name in providers}
        self.upstream = UpstreamWait(
            slots=self.slots,
            poll_interval=poll_interval,
            inbox=inbox,
            callback_fallback=callback_fallback,
            clock=clock,
        )

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
        known = ", ".join(sorted(self.names))
        raise BadUserInput(f"unknown provider {name!r}; known: {known}", field="provider")

    def configured(self, name: str, backend: str) -> bool:
        """`backend` is one the route of `name` names (not dev mode's stand-in)."""
        return backend in self.routes.get(name, (name,))

    def enabled(self, name: str) -> list[str]:
        """The route's enabled backends; none at all means the service is unavailable."""
        backends = self._configured(name)
        if not backends:
            # Its operator's to set up: the client is told what, not how (the variables
            # are in the `providers` reasons), nor to try again.
            raise ServiceUnavailable(
                f"no backend of {name!r} is configured on this gateway", retry_after=None
            )
        return backends

    def runs(self, name: str) -> bool:
        """Whether a service or backend has a backend configured to run it (`enabled`)."""
        return bool(self._configured(name))

    def _configured(self, name: str) -> list[str]:
        return [b for b in self.route(name) if b in self.providers and self._on(b)]

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
            circuit = breaker.circuit(now)
            if circuit != "closed":
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
        key: str = "",
    ) -> Result:
        """Run the job on the first backend that delivers; resume a stored upstream job."""
        try:
            order = self.order(name)
        except ServiceUnavailable as exc:
            raise JobFailed(exc.message) from None
        stored = resume.get("backend") if resume else None
        if stored in order:
            # Backends before the stored one already failed this job: do not retry them.
            order = order[order.index(stored) :]
        # One that would draw another size or shape is passed over while another can
        # draw this one (Segmind's megapixels and ratios); alone, it is tried.
        order = [b for b in order if b == stored or self.providers[b].serves(params)] or order
        job = JobRun(params, save_upstream, progress, cancelled, deadline, key)
        errors: list[str] = []
        tried = "none"
        for backend in order:
            tried = backend
            stored = resume if resume and resume.get("backend") == backend else None
            try:
                result = await self._attempt(backend, job, stored=stored)
            except ProviderError as exc:
                if not exc.failover:
                    # The upstream refused this user's input: the backend is healthy, so
                    # one user's bad prompts must not open its circuit for everyone.
                    raise JobFailed(exc.message, backend, rejected=True) from None
                if not isinstance(exc, ProviderJobFailed):
                    self.breakers[backend].failure(exc.message, self.clock())
                errors.append(f"{backend}: {exc.message}")
                if self.clock() >= deadline:
                    break
                continue
            self.breakers[backend].success()
            return result
        raise JobFailed("; ".join(errors) or "no backend could run the job", tried)

    async def _attempt(self, backend: str, job: JobRun, *, stored: dict[str, Any] | None) -> Result:
        """The job on one backend: submitted, or `stored` (this backend's upstream job,
        saved by an earlier attempt) resumed; then waited for."""
        provider = self.providers[backend]
        upstream_id: str | None = stored.get("id") if stored else None
        sent: dict[str, Any] = stored.get("sent", {}) if stored and upstream_id else {}
        metadata: dict[str, Any] = (
            {"seeds": stored["seeds"]} if stored and "seeds" in stored else {}
        )
        if upstream_id is None:
            if self.clock() >= job.deadline:
                # Taken after its deadline (a backlog, a waiter promoted late): failed
                # now, refunded, rather than paid for upstream and then given up on.
                raise JobFailed("the job's time ran out before it could start", backend)
            async with self.slots[backend]:
                submitted = await provider.submit(job.params)
            sent, metadata = submitted.sent, dict(submitted.metadata)
            if submitted.outputs is not None:
                _all_of(backend, submitted.outputs, job.params)
                return Result(backend, provider, submitted.outputs, {**metadata, "sent": sent})
            upstream_id = submitted.upstream_id
            if not upstream_id:
                raise JobFailed(f"{backend} returned neither outputs nor a job id", backend)
            # Stored before waiting: a worker that takes over polls it, never resubmits
            # (and knows each image's seed, where the submission chose them: Krea's).
            upstream = {"backend": backend, "id": upstream_id, "sent": sent}
            if "seeds" in metadata:
                upstream["seeds"] = metadata["seeds"]
            await job.save_upstream(upstream)
        polled = await self.upstream.wait(
            UpstreamJob(
                backend=backend,
                provider=provider,
                upstream_id=upstream_id,
                progress=job.progress,
                cancelled=job.cancelled,
                deadline=job.deadline,
                key=job.key,
                resumed=stored is not None,
            )
        )
        if polled.state == "cancelled":
            raise JobCancelled(f"{backend} cancelled the job")
        if polled.state == "failed":
            raise ProviderJobFailed(polled.error or f"{backend} job failed")
        _all_of(backend, polled.outputs, job.params)
        return Result(
            backend,
            provider,
            polled.outputs,
            {
                **metadata,
                **polled.metadata,
                "upstreamId": provider.shown_id(upstream_id),
                "sent": sent,
            },
        )
