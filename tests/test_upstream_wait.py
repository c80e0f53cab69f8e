"""Waiting for upstream jobs (`gateway/upstream_wait.py`): one sweep wakes every waiting
job at its fallback poll or its deadline, callbacks and nudges wake it sooner, and no
job holds a timer or a task of its own while it waits.

Against the real redis-server of `conftest.py` (the callback inbox), with an upstream
that answers from memory: what is measured is the waiting, not an HTTP round trip.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from gateway.callbacks import RedisInbox
from gateway.errors import ProviderTimeout, ProviderUnavailable
from gateway.providers.base import ImageParams, Output, Polled, Submitted
from gateway.store import keys
from gateway.upstream_wait import JobCancelled, UpstreamJob, UpstreamWait
from tests.harness import until


class Upstream:
    """A provider whose jobs are pending until `finish`ed; each job announces its end by
    one callback token (when `calls_back`). Counts polls and cancellations."""

    name = "fake"
    poll_interval = 0.05

    def __init__(self, *, calls_back: bool = True, failing: int | None = None) -> None:
        """`failing`: each poll fails, answered with this status."""
        self.calls_back = calls_back
        self.failing = failing
        self.tokens: dict[str, str] = {}
        self.polls: Counter[str] = Counter()
        self.polled_at: dict[str, list[float]] = {}
        self.finished: set[str] = set()
        self.cancelled: list[str] = []

    def job(self) -> str:
        upstream_id = secrets.token_hex(8)
        self.tokens[upstream_id] = secrets.token_urlsafe(24)
        return upstream_id

    def status(self) -> tuple[bool, str]:
        return True, "ok"

    async def submit(self, params: ImageParams) -> Submitted:
        raise NotImplementedError

    def callbacks(self, upstream_id: str) -> list[str]:
        return [self.tokens[upstream_id]] if self.calls_back else []

    async def poll(self, upstream_id: str) -> Polled:
        self.polls[upstream_id] += 1
        self.polled_at.setdefault(upstream_id, []).append(time.monotonic())
        if self.failing:
            error = ProviderUnavailable(f"fake upstream answered {self.failing}")
            error.answer = httpx.Response(self.failing)  # what `providers.http` attaches
            raise error
        if upstream_id in self.finished:
            return Polled(state="completed", outputs=[Output(url="http://fake/x.png")])
        return Polled(state="pending", upstream_status="processing")

    async def cancel(self, upstream_id: str) -> None:
        self.cancelled.append(upstream_id)

    async def fetch(self, output: Output) -> bytes:
        return b""


@pytest.fixture
async def inbox(redis_url: str) -> AsyncIterator[RedisInbox]:
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    box = RedisInbox(redis, "http://gateway.test", ttl_seconds=600)
    try:
        yield box
    finally:
        await box.aclose()
        await redis.aclose()


def waiting(
    upstream: Upstream,
    inbox: RedisInbox | None,
    *,
    fallback: float = 30.0,
    poll_interval: float | None = None,
) -> UpstreamWait:
    return UpstreamWait(
        slots={"fake": asyncio.Semaphore(64)},
        inbox=inbox,
        callback_fallback=fallback,
        poll_interval=poll_interval,
    )


class Jobs:
    """Jobs waited for: their tasks, and which ones the client has cancelled."""

    def __init__(self, wait: UpstreamWait, upstream: Upstream) -> None:
        self.wait, self.upstream = wait, upstream
        self.cancelled: set[str] = set()
        self.progress: list[dict[str, Any]] = []

    async def start(
        self, inbox: RedisInbox | None, *, deadline_in: float = 600.0, resumed: bool = False
    ) -> tuple[str, asyncio.Task[Polled]]:
        upstream_id = self.upstream.job()
        if inbox is not None and self.upstream.calls_back:
            await inbox.expect(self.upstream.tokens[upstream_id])
        key = f"job-{upstream_id}"

        async def cancelled() -> bool:
            return key in self.cancelled

        async def progress(meta: dict[str, Any]) -> None:
            self.progress.append(meta)

        job = UpstreamJob(
            backend="fake",
            provider=self.upstream,
            upstream_id=upstream_id,
            progress=progress,
            cancelled=cancelled,
            deadline=time.monotonic() + deadline_in,
            key=key,
            resumed=resumed,
        )
        return upstream_id, asyncio.create_task(self.wait.wait(job))


async def test_a_waiting_job_is_woken_by_the_sweep_at_its_fallback_polls(
    inbox: RedisInbox,
) -> None:
    """No callback comes: the job is polled after the fallback (0.3 s here), then after
    twice that, each time woken by the sweep, never before its time."""
    upstream = Upstream()
    wait = waiting(upstream, inbox, fallback=0.3)
    jobs = Jobs(wait, upstream)
    started = time.monotonic()
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: upstream.polls[upstream_id] >= 2, what="two fallback polls", timeout=10.0)
    first, second = upstream.polled_at[upstream_id][:2]
    assert first - started >= 0.3 * 0.9 - 0.01  # not polled before its fallback
    assert second - first >= 0.6 * 0.9 - 0.01  # the next one twice as late
    assert not task.done()
    upstream.finished.add(upstream_id)
    await inbox.deliver(upstream.tokens[upstream_id], {})
    assert (await asyncio.wait_for(task, 5)).state == "completed"
    assert upstream.polls[upstream_id] == 3
    assert jobs.progress[0]["upstreamStatus"] == "processing"
    assert wait.waiters == {}


async def test_a_callback_wakes_the_job_at_once(inbox: RedisInbox) -> None:
    upstream = Upstream()
    wait = waiting(upstream, inbox)  # fallback 30 s: only the callback can wake it
    jobs = Jobs(wait, upstream)
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: wait.waiters, what="the job to wait", timeout=10.0)
    upstream.finished.add(upstream_id)
    assert await inbox.deliver(upstream.tokens[upstream_id], {"status": "completed"})
    assert (await asyncio.wait_for(task, 5)).state == "completed"
    assert upstream.polls[upstream_id] == 1  # read once, when called back


async def test_a_callback_stored_before_the_wait_is_found(inbox: RedisInbox) -> None:
    """Delivered before the job listened (its announcement unheard): found in Redis."""
    upstream = Upstream()
    wait = waiting(upstream, inbox)
    upstream_id = upstream.job()
    token = upstream.tokens[upstream_id]
    await inbox.expect(token)
    assert await inbox.deliver(token, {})
    upstream.finished.add(upstream_id)
    job = UpstreamJob(
        backend="fake",
        provider=upstream,
        upstream_id=upstream_id,
        progress=lambda meta: asyncio.sleep(0),
        cancelled=lambda: asyncio.sleep(0, False),
        deadline=time.monotonic() + 600,
    )
    assert (await asyncio.wait_for(wait.wait(job), 5)).state == "completed"
    assert upstream.polls[upstream_id] == 1


async def test_the_sweep_ends_a_job_at_its_deadline(inbox: RedisInbox) -> None:
    upstream = Upstream()
    wait = waiting(upstream, inbox)  # fallback 30 s: the deadline comes first
    jobs = Jobs(wait, upstream)
    started = time.monotonic()
    upstream_id, task = await jobs.start(inbox, deadline_in=0.4)
    with pytest.raises(ProviderTimeout):
        await asyncio.wait_for(task, 5)
    assert time.monotonic() - started >= 0.4 - 0.01
    # Asleep until its deadline, then asked once (its callback may have been lost).
    assert upstream.polls[upstream_id] == 1
    assert upstream.cancelled == [upstream_id]  # and cancelled upstream (best effort)
    assert wait.waiters == {}


async def test_a_job_resumed_past_its_deadline_is_asked_once_before_it_is_given_up(
    inbox: RedisInbox,
) -> None:
    """Its worker died; the upstream finished (and charged) while none was there. The
    worker that takes it over after its deadline keeps the image, and, its callback
    gone unheard, asks at once rather than after the callback fallback."""
    upstream = Upstream()
    wait = waiting(upstream, inbox)  # fallback 30 s
    jobs = Jobs(wait, upstream)
    upstream.calls_back = False  # its callback went to the dead worker: none stored
    upstream_id, task = await jobs.start(inbox, deadline_in=-5, resumed=True)
    upstream.finished.add(upstream_id)
    assert (await asyncio.wait_for(task, 5)).state == "completed"
    assert upstream.polls[upstream_id] == 1 and upstream.cancelled == []

    upstream.calls_back = True
    started = time.monotonic()
    late_id, late = await jobs.start(inbox, resumed=True)
    await until(lambda: upstream.polls[late_id], what="a first poll", timeout=10.0)
    assert time.monotonic() - started < 5  # not the 30 s fallback
    upstream.finished.add(late_id)
    await inbox.deliver(upstream.tokens[late_id], {})
    assert (await asyncio.wait_for(late, 5)).state == "completed"


async def test_a_nudge_notices_a_cancellation_at_once(inbox: RedisInbox) -> None:
    upstream = Upstream(calls_back=False)
    wait = waiting(upstream, inbox, poll_interval=30.0)  # polled, but not for 30 s
    jobs = Jobs(wait, upstream)
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: upstream.polls[upstream_id] == 1, what="the first poll", timeout=10.0)
    await until(lambda: wait._heap, what="the job to sleep", timeout=10.0)
    jobs.cancelled.add(f"job-{upstream_id}")
    wait.nudge(f"job-{upstream_id}")
    with pytest.raises(JobCancelled):
        await asyncio.wait_for(task, 2)
    assert upstream.polls[upstream_id] == 1
    assert upstream.cancelled == [upstream_id]


async def test_a_cancellation_during_a_poll_is_not_slept_through(inbox: RedisInbox) -> None:
    """The worker nudges a cancelled job once; a nudge finds no sleeper while the job is
    being polled, so the wait looks for the cancellation again before it sleeps."""
    gate = asyncio.Event()

    class Slow(Upstream):
        async def poll(self, upstream_id: str) -> Polled:
            polled = await super().poll(upstream_id)
            await gate.wait()
            return polled

    upstream = Slow(calls_back=False)
    wait = waiting(upstream, inbox, poll_interval=30.0)  # the next poll: 30 s away
    jobs = Jobs(wait, upstream)
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: upstream.polls[upstream_id] == 1, what="the poll to start", timeout=10.0)
    jobs.cancelled.add(f"job-{upstream_id}")
    wait.nudge(f"job-{upstream_id}")  # mid-poll: nobody asleep to wake
    gate.set()
    with pytest.raises(JobCancelled):
        await asyncio.wait_for(task, 2)
    assert upstream.cancelled == [upstream_id]


async def test_a_polled_job_sleeps_in_the_sweep_between_polls(inbox: RedisInbox) -> None:
    upstream = Upstream(calls_back=False)
    wait = waiting(upstream, inbox, poll_interval=0.1)
    jobs = Jobs(wait, upstream)
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: upstream.polls[upstream_id] >= 4, what="four polls", timeout=10.0)
    times = upstream.polled_at[upstream_id]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.1 * 0.9 - 0.01, gaps  # at the interval, not sooner
    upstream.finished.add(upstream_id)
    assert (await asyncio.wait_for(task, 5)).state == "completed"


async def test_an_upstream_that_lost_the_job_ends_the_wait_and_one_in_trouble_does_not(
    inbox: RedisInbox,
) -> None:
    """Five polls in a row answered 404 (the upstream has no such job) end the wait, so
    the job fails over; polls failing otherwise (503) go on: the upstream may have it."""
    upstream = Upstream(calls_back=False, failing=404)
    wait = waiting(upstream, inbox, poll_interval=0.01)
    jobs = Jobs(wait, upstream)
    upstream_id, task = await jobs.start(inbox)
    with pytest.raises(ProviderUnavailable):
        await asyncio.wait_for(task, 5)
    assert upstream.polls[upstream_id] == 5

    upstream.failing = 503
    upstream_id, task = await jobs.start(inbox)
    await until(lambda: upstream.polls[upstream_id] >= 20, what="twenty failed polls", timeout=10.0)
    assert not task.done()
    upstream.failing = None
    upstream.finished.add(upstream_id)
    polled = await asyncio.wait_for(task, 5)
    assert polled.state == "completed"


async def test_thousands_of_waiting_jobs_hold_no_timer_or_task_of_their_own(
    inbox: RedisInbox,
) -> None:
    """2,000 jobs wait for their callbacks: the loop holds one timer (the sweep's) and
    one task per job (its own, no helper); each job wakes once, when called back."""
    upstream = Upstream()
    wait = waiting(upstream, inbox, fallback=60.0)
    jobs = Jobs(wait, upstream)
    loop = asyncio.get_running_loop()

    def timers() -> int:  # asyncio's own loop: its pending timers
        return sum(not handle.cancelled() for handle in getattr(loop, "_scheduled", []))

    timers_before = timers()
    tasks_before = len(asyncio.all_tasks())
    started = [await jobs.start(inbox) for _ in range(2000)]
    await until(lambda: len(wait._heap) == 2000, what="every job asleep", timeout=10.0)
    assert wait.waiters.keys() == {f"job-{upstream_id}" for upstream_id, _ in started}
    assert hasattr(loop, "_scheduled")
    assert timers() - timers_before <= 2  # the sweep's (and a Redis read's timeout)
    assert len(asyncio.all_tasks()) - tasks_before <= 2000 + 1  # the inbox's listener
    assert sum(upstream.polls.values()) == 0
    for upstream_id, _ in started:
        upstream.finished.add(upstream_id)
        await inbox.deliver(upstream.tokens[upstream_id], {})
    results = await asyncio.wait_for(asyncio.gather(*(task for _, task in started)), 20)
    assert {polled.state for polled in results} == {"completed"}
    assert all(upstream.polls[upstream_id] == 1 for upstream_id, _ in started)
    # Woken early, their sweep entries are stale: dropped, not kept until 60 s from now.
    assert wait.waiters == {}
    assert len(wait._heap) <= 1024
    assert inbox.waiting == {}


async def test_a_callback_announced_while_the_subscription_was_down_is_found(
    inbox: RedisInbox,
) -> None:
    """Stored but never announced (the subscription was down, Redis restarting): the
    listener looks every waiting token up once it has subscribed again, and the job is
    woken then, not at its fallback poll 30 s later."""
    upstream = Upstream()
    wait = waiting(upstream, inbox)
    jobs = Jobs(wait, upstream)
    started = [await jobs.start(inbox) for _ in range(3)]
    await until(lambda: len(wait._heap) == 3, what="every job asleep", timeout=10.0)
    upstream_id, task = started[1]
    upstream.finished.add(upstream_id)
    stored = await inbox.redis.set(
        keys.callback(upstream.tokens[upstream_id]), b"{}", xx=True, keepttl=True
    )
    assert stored
    assert upstream.polls[upstream_id] == 0
    assert await inbox.redis.client_kill_filter(_type="pubsub") == 1
    assert (await asyncio.wait_for(task, 10)).state == "completed"
    assert upstream.polls[upstream_id] == 1
    assert [upstream.polls[other] for other, _ in started] == [0, 1, 0]
    for _, other in started:
        other.cancel()
