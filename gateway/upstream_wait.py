"""Waiting for a job an upstream has accepted: polled at the provider's pace, slowing
down on long jobs, or woken by the upstream's callback when it reports to us.

No thread, task or timer per job: thousands of jobs wait at once, each a coroutine
asleep on a future (a `Waiter`'s). One heap of wake-up times, swept by one timer, wakes
each at its next poll (the provider's pace, or the fallback poll of a job awaiting its
callback) or its deadline; a callback (`gateway/callbacks.py`) or a `nudge` (the
worker's, when the client cancels) wakes it sooner. The wait notices a cancellation by
the client at once when nudged, and otherwise within one poll interval; at the deadline
it cancels the upstream job (best effort).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.callbacks import Waiter
from gateway.errors import ProviderError, ProviderTimeout
from gateway.providers.base import Polled, Provider

if TYPE_CHECKING:
    from gateway.callbacks import RedisInbox

#: seconds before the first poll of a job whose upstream will call back (a lost callback
#: only delays the job by this much); each later one waits twice as long, up to
#: FALLBACK_LONGEST, so a long job that waits for its callback is hardly ever woken
CALLBACK_FALLBACK = 30.0
FALLBACK_LONGEST = 300.0
#: polls in a row answered "no such job" (404) that end the wait, so that the job fails
#: over: the upstream lost it (fewer may be its own lag right after the submit). Any other
#: failed poll (5xx, a timeout, our credentials) is polled again until the deadline: the
#: upstream may well have the job still, and a submit elsewhere would pay twice.
POLL_ERRORS_IN_A_ROW = 5
#: after this many seconds the poll interval grows by half each poll, up to SLOWEST_POLL
SLOW_DOWN_AFTER = 30.0
SLOWEST_POLL = 10.0
#: a wake-up this close to its time is on time: the event loop's timers count whole
#: milliseconds, and may fire a little before the clock reaches the time asked for
ON_TIME = 0.005
#: stale heap entries (of waiters woken early) always tolerated: beyond these, the heap
#: is rebuilt without them once they are most of it
STALE_SLACK = 1024


class JobCancelled(Exception):
    """The client cancelled the job while it ran."""


Hook = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class UpstreamJob:
    """A job an upstream has accepted, and what waiting for it reports to."""

    backend: str
    provider: Provider
    upstream_id: str
    progress: Hook  # called with each new upstream status (and its metadata)
    cancelled: Callable[[], Awaitable[bool]]  # whether the client has cancelled the job
    deadline: float  # on the waiter's clock
    key: str = ""  # the job's, for `UpstreamWait.nudge`
    resumed: bool = False  # submitted by an earlier attempt (a worker that died, say)


def _jitter(seconds: float) -> float:
    """±10%: jobs submitted together do not all wake together."""
    return seconds * random.uniform(0.9, 1.1)


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
        self.waiters: dict[str, Waiter] = {}  # the jobs waiting upstream, by key
        # (when, waiter): each sleeping waiter's wake-up, on `clock`. An entry whose
        # waiter was woken sooner (its `due` is no longer `when`) is stale, skipped.
        self._heap: list[tuple[float, Waiter]] = []
        self._stale = 0  # about how many entries are stale
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        # the loop the timer runs on (a wait from another loop, in tests, arms its own)
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def nudge(self, key: str) -> None:
        """Wake the job `key` if it waits (it was cancelled, say): it looks at its job
        again at once rather than at its next poll or its deadline."""
        waiter = self.waiters.get(key)
        if waiter is not None:
            waiter.nudge()

    async def wait(self, job: UpstreamJob) -> Polled:
        """The upstream job's last poll, once it is no longer pending.

        A job whose upstream calls back is polled once its callback came, and otherwise
        only after `callback_fallback` seconds, then twice as long each time up to
        FALLBACK_LONGEST (a lost callback is slower, not lost); until then it sleeps,
        woken by the callback, the sweep (its fallback poll or its deadline) or a `nudge`
        (the worker's, when the job is cancelled). A polled job sleeps the provider's
        interval between polls the same way. Raises `JobCancelled`, `ProviderTimeout` at
        the deadline, or the `ProviderError` of the last of `POLL_ERRORS_IN_A_ROW` polls
        in a row that found no such job.
        """
        inbox, clock = self.inbox, self.clock
        tokens = tuple(job.provider.callbacks(job.upstream_id)) if inbox is not None else ()
        waiter = Waiter(tokens)
        listening = inbox is not None and bool(tokens)
        if inbox is not None and listening:
            await inbox.listen(waiter)
        if job.key:
            self.waiters[job.key] = waiter
        started = clock()
        interval = self.poll_interval or job.provider.poll_interval
        fallback = self.callback_fallback
        errors_in_a_row = 0
        last_status = ""
        next_poll = started
        asked = False  # polled at least once
        try:
            if (
                inbox is not None
                and listening
                and not job.resumed  # its callback may have come while no one listened
                and not await inbox.check(waiter)
            ):
                next_poll = started + _jitter(fallback)  # the submit's answer is news enough
            while True:
                if await job.cancelled():
                    await self.cancel(job)
                    raise JobCancelled("cancelled by the client")
                now = clock()
                # A job resumed past its deadline is asked once first: it may have
                # finished, paid for, while no worker was there to see it.
                late = now >= job.deadline - ON_TIME
                if late and asked:
                    await self.cancel(job)
                    raise ProviderTimeout(f"{job.backend} did not finish in time")
                called_back = waiter.delivered
                if late or called_back or now >= next_poll - ON_TIME:
                    waiter.delivered = False  # a callback during the poll polls again
                    asked = True
                    try:
                        polled = await self._poll(job)
                        errors_in_a_row = 0
                    except ProviderError as exc:
                        # The upstream has our job: a failing poll is no reason to pay
                        # twice, unless it says, again and again, that it has no such job.
                        gone = getattr(exc.answer, "status_code", None) == 404
                        errors_in_a_row = errors_in_a_row + 1 if gone else 0
                        if errors_in_a_row >= POLL_ERRORS_IN_A_ROW:
                            raise
                        polled = Polled(state="pending")
                    if polled.state != "pending":
                        return polled
                    if listening and not called_back:  # a lost callback?
                        fallback = min(fallback * 2, FALLBACK_LONGEST)
                    elif listening and waiter.settled:  # all called back, still pending
                        listening = False  # polled at the pace from now on
                        if inbox is not None:
                            inbox.forget(waiter)
                    if listening:
                        next_poll = now + _jitter(fallback)
                    else:
                        if clock() - started > SLOW_DOWN_AFTER:
                            interval = min(interval * 1.5, SLOWEST_POLL)
                        next_poll = clock() + _jitter(interval)
                    status = polled.upstream_status
                    if status and status != last_status:
                        last_status = status
                        await job.progress({"upstreamStatus": status, **polled.metadata})
                    del polled  # not kept while asleep
                # A nudge comes only while asleep: a cancellation during the poll is
                # looked for here (a set lookup), not slept through.
                if not waiter.delivered and not await job.cancelled():
                    await self._sleep(waiter, min(next_poll, job.deadline))
                    waiter.woken = None
        finally:
            waiter.woken = None
            if inbox is not None and listening:
                inbox.forget(waiter)
            if job.key and self.waiters.get(job.key) is waiter:
                del self.waiters[job.key]
            if waiter.due != math.inf:  # woken by something else than the sweep
                self._went_stale(waiter)

    async def _poll(self, job: UpstreamJob) -> Polled:
        async with self.slots[job.backend]:
            return await job.provider.poll(job.upstream_id)

    async def cancel(self, job: UpstreamJob) -> None:
        """Best effort: the job ends on our side whatever the upstream answers."""
        with contextlib.suppress(ProviderError):
            async with self.slots[job.backend]:
                await job.provider.cancel(job.upstream_id)

    # -- the sweep -----------------------------------------------------------------------

    def _sleep(self, waiter: Waiter, until: float) -> asyncio.Future[None]:
        """A future the sweep completes at `until` (on `clock`), a callback or a nudge
        sooner. Awaited directly by `wait`: no coroutine of its own while asleep."""
        if waiter.due != math.inf:  # its last sleep ended early: that entry is stale
            self._went_stale(waiter)
        loop = asyncio.get_running_loop()
        woken = waiter.woken = loop.create_future()
        waiter.due = until
        heapq.heappush(self._heap, (until, waiter))
        if until < self._timer_at or self._timer_loop is not loop:
            self._arm(loop, until)
        return woken

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None and self._timer_loop is loop:
            self._timer.cancel()
        self._timer_at, self._timer_loop = when, loop
        self._timer = loop.call_later(max(when - self.clock(), 0.0), self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake every waiter whose time has come; set the timer for the next one."""
        self._timer, self._timer_at = None, math.inf
        heap, now = self._heap, self.clock() + ON_TIME
        try:
            while heap and heap[0][0] <= now:
                when, waiter = heapq.heappop(heap)
                if waiter.due == when:
                    waiter.due = math.inf
                    with contextlib.suppress(RuntimeError):  # its loop closed: none to wake
                        waiter.nudge()
                elif self._stale > 0:
                    self._stale -= 1
        finally:
            if heap:
                self._arm(loop, heap[0][0])

    def _went_stale(self, waiter: Waiter) -> None:
        """`waiter`'s entry will wake nobody: once most entries are such, and more than
        STALE_SLACK, the heap is rebuilt without them (not kept until their time)."""
        waiter.due = math.inf
        self._stale += 1
        heap = self._heap
        if self._stale > STALE_SLACK and self._stale * 2 > len(heap):
            heap[:] = [entry for entry in heap if entry[1].due == entry[0]]
            heapq.heapify(heap)
            self._stale = 0
