"""Waiting for a job an upstream has accepted: polled at the provider's pace, slowing
down on long jobs, or woken by the upstream's callback when it reports to us.

No thread or task per job: thousands of jobs wait at once, each in its own coroutine.
The wait notices a cancellation by the client, and the job's deadline, within one poll
interval, and then cancels the upstream job (best effort).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import ProviderError, ProviderTimeout
from gateway.providers.base import Polled, Provider

if TYPE_CHECKING:
    from gateway.callbacks import RedisInbox

#: seconds between polls of a job whose upstream will call back: a lost callback only
#: delays the job by this much
CALLBACK_FALLBACK = 30.0
#: failed polls in a row that end the wait (fewer are passing trouble, polled again)
POLL_ERRORS_IN_A_ROW = 5
#: after this many seconds the poll interval grows by half each poll, up to SLOWEST_POLL
SLOW_DOWN_AFTER = 30.0
SLOWEST_POLL = 10.0


class JobCancelled(Exception):
    """The client cancelled the job while it ran."""


Hook = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True)
class UpstreamJob:
    """A job an upstream has accepted, and what waiting for it reports to."""

    backend: str
    provider: Provider
    upstream_id: str
    progress: Hook  # called with each new upstream status (and its metadata)
    cancelled: Callable[[], Awaitable[bool]]  # whether the client has cancelled the job
    deadline: float  # on the waiter's clock


class UpstreamWait:
    """Waits for upstream jobs; one per process, shared by every job it runs.

    `slots` bounds the upstream calls in flight per backend (shared with submissions);
    `poll_interval` overrides the providers' own pace; `inbox` receives the upstreams'
    callbacks (None: every job is polled).
    """

    def __init__(
        self,
        *,
        slots: dict[str, asyncio.Semaphore],
        poll_interval: float | None = None,
        inbox: RedisInbox | None = None,
        callback_fallback: float = CALLBACK_FALLBACK,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = slots
        self.poll_interval = poll_interval
        self.inbox = inbox
        self.callback_fallback = callback_fallback
        self.clock = clock

    async def wait(self, job: UpstreamJob) -> Polled:
        """The upstream job's last poll, once it is no longer pending.

        A job whose upstream calls back is polled once its callback came, and otherwise
        only every `callback_fallback` seconds (a lost callback is slower, not lost);
        the wait still notices a cancellation within one poll interval. Raises
        `JobCancelled`, `ProviderTimeout` at the deadline, or the `ProviderError` of
        the last of `POLL_ERRORS_IN_A_ROW` failed polls.
        """
        backend, provider, upstream_id = job.backend, job.provider, job.upstream_id
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
                if await job.cancelled():
                    await self.cancel(job)
                    raise JobCancelled("cancelled by the client")
                if self.clock() >= job.deadline:
                    await self.cancel(job)
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
                        if errors_in_a_row >= POLL_ERRORS_IN_A_ROW:
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
                        await job.progress({"upstreamStatus": last_status, **polled.metadata})
                if self.clock() - started > SLOW_DOWN_AFTER:
                    interval = min(interval * 1.5, SLOWEST_POLL)
                pause = interval * random.uniform(0.9, 1.1)
                if waiter is not None:
                    await waiter.wait(pause)
                else:
                    await asyncio.sleep(pause)
        finally:
            if waiter is not None:
                waiter.close()

    async def cancel(self, job: UpstreamJob) -> None:
        """Best effort: the job ends on our side whatever the upstream answers."""
        with contextlib.suppress(ProviderError):
            async with self.slots[job.backend]:
                await job.provider.cancel(job.upstream_id)
