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
    from gateway.callbacks import RedisInbox, Waiter

#: seconds before the first poll of a job whose upstream will call back (a lost callback
#: only delays the job by this much); each later one waits twice as long, up to
#: FALLBACK_LONGEST, so a long job that waits for its callback is hardly ever woken
CALLBACK_FALLBACK = 30.0
FALLBACK_LONGEST = 300.0
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
    key: str = ""  # the job's, for `UpstreamWait.nudge`


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
        self.waiters: dict[str, Waiter] = {}  # the jobs waiting for a callback, by key

    def nudge(self, key: str) -> None:
        """Wake the job `key` if it waits for a callback (it was cancelled, say): such a
        job sleeps until its callback, its next fallback poll or its deadline."""
        waiter = self.waiters.get(key)
        if waiter is not None:
            waiter.nudge()

    async def wait(self, job: UpstreamJob) -> Polled:
        """The upstream job's last poll, once it is no longer pending.

        A job whose upstream calls back is polled once its callback came, and otherwise
        only after `callback_fallback` seconds, then twice as long each time (a lost
        callback is slower, not lost); it sleeps until then, its deadline, or a `nudge`
        (the worker's, when the job is cancelled). A polled job notices a cancellation
        within one poll interval. Raises
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
        fallback = self.callback_fallback
        if waiter is not None and job.key:
            self.waiters[job.key] = waiter
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
                called_back = waiter is not None and waiter.delivered
                due = waiter is None or called_back or self.clock() - polled_at >= fallback
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
                    if waiter is not None and not called_back:  # a lost callback?
                        fallback = min(fallback * 2, FALLBACK_LONGEST)
                    elif waiter is not None:
                        if waiter.settled:  # all called back, still pending: at the pace
                            self._forget(job, waiter)
                            waiter = None
                        else:  # one job of several done: wait for the others
                            waiter.delivered = False
                    if polled.upstream_status and polled.upstream_status != last_status:
                        last_status = polled.upstream_status
                        await job.progress({"upstreamStatus": last_status, **polled.metadata})
                if waiter is not None:
                    until = min(polled_at + fallback * random.uniform(0.9, 1.1), job.deadline)
                    await waiter.wait(max(until - self.clock(), 0.0))
                    continue
                if self.clock() - started > SLOW_DOWN_AFTER:
                    interval = min(interval * 1.5, SLOWEST_POLL)
                await asyncio.sleep(interval * random.uniform(0.9, 1.1))
        finally:
            if waiter is not None:
                self._forget(job, waiter)

    def _forget(self, job: UpstreamJob, waiter: Waiter) -> None:
        waiter.close()
        if self.waiters.get(job.key) is waiter:
            del self.waiters[job.key]

    async def cancel(self, job: UpstreamJob) -> None:
        """Best effort: the job ends on our side whatever the upstream answers."""
        with contextlib.suppress(ProviderError):
            async with self.slots[job.backend]:
                await job.provider.cancel(job.upstream_id)
