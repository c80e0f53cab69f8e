"""Waiting before trying again: upstream calls (`gateway/providers/http.py`: `backoff`,
`Retry-After`) and webhook deliveries (`gateway/webhooks.py`: the retry schedule).

No server and no network: upstream answers are scripted, and the webhook test runs on
the embedded store (fakeredis) with a receiver that stands in for the deliverers' aiohttp
session (`FailingReceiver`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import orjson
import pytest
import structlog.testing
from multidict import CIMultiDict, CIMultiDictProxy

from gateway import telemetry
from gateway.accounts import Accounts
from gateway.config import load_settings
from gateway.errors import ProviderRateLimited, ProviderUnavailable
from gateway.jobs.model import Job
from gateway.jobs.store import JobStore
from gateway.providers import http
from gateway.providers.http import Answer, UpstreamClient, backoff, retry_after_seconds
from gateway.store import keys
from gateway.store.redis import Scripts, connect
from gateway.urlguard import Lookups
from gateway.webhooks import Webhooks
from tests.records import record


def answer(status: int = 429, retry_after: str | None = None) -> Answer:
    headers = CIMultiDict({} if retry_after is None else {"Retry-After": retry_after})
    return Answer(status, CIMultiDictProxy(headers), b"{}", "http://upstream/x")


# -- Retry-After --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("120", 120.0), ("0", 0.0), ("0.5", 0.5), ("-3", 0.0)],
)
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert retry_after_seconds(answer(retry_after=value)) == seconds


def test_retry_after_header_name_is_case_insensitive() -> None:
    headers = CIMultiDictProxy(CIMultiDict({"RETRY-AFTER": "7"}))
    assert retry_after_seconds(Answer(429, headers, b"", "http://upstream/x")) == 7.0


@pytest.mark.parametrize("value", [None, "", "soon", "1e", "Wed, 99 Foo 2015"])
def test_retry_after_missing_or_unreadable_is_none(value: str | None) -> None:
    assert retry_after_seconds(answer(retry_after=value)) is None


def test_retry_after_as_an_http_date() -> None:
    later = datetime.now(UTC) + timedelta(seconds=90)
    seconds = retry_after_seconds(answer(retry_after=email.utils.format_datetime(later, True)))
    assert seconds is not None
    assert 80 <= seconds <= 90  # the date has whole seconds, and time passes while parsing


def test_retry_after_as_a_date_in_the_past_is_now() -> None:
    earlier = email.utils.formatdate(time.time() - 3600, usegmt=True)
    assert retry_after_seconds(answer(retry_after=earlier)) == 0.0


# -- exponential backoff with full jitter ---------------------------------------------------


@pytest.fixture
def top_of_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every random draw at the top of its range: the ceiling of each wait."""
    monkeypatch.setattr(http.random, "uniform", lambda low, high: high)


@pytest.mark.usefixtures("top_of_jitter")
def test_backoff_doubles_from_base_up_to_cap() -> None:
    assert [backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert [backoff(n, base=1, cap=3) for n in range(4)] == [1, 2, 3, 3]


def test_backoff_is_jittered_over_the_whole_range() -> None:
    draws = [backoff(3) for _ in range(2000)]
    assert all(0 <= d <= 4.0 for d in draws)
    assert min(draws) < 0.5 and max(draws) > 3.5  # full jitter: not clustered at the top


# -- what the retries of an upstream call wait ------------------------------------------------


class Scripted(UpstreamClient):
    """An upstream client that answers from a script instead of the network."""

    def __init__(self, *answers: Answer) -> None:
        super().__init__(timeout=1)
        self.answers = list(answers)
        self.calls = 0

    async def request(self, method: str, url: str, **kwargs: Any) -> Answer:
        self.calls += 1
        return self.answers.pop(0)


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The sleeps asked for, recorded and skipped."""
    asked: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args: Any, **kwargs: Any) -> None:
        asked.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(http.asyncio, "sleep", sleep)
    yield asked


async def test_a_short_retry_after_is_honoured_before_each_retry(waits: list[float]) -> None:
    client = Scripted(answer(retry_after="2"), answer(retry_after="3"), answer(200))
    result = await http.request(client, "POST", "http://upstream/x", upstream="u", idempotent=False)
    assert result.status_code == 200
    assert client.calls == 3
    assert waits == [2.0, 3.0]


async def test_a_retry_after_longer_than_max_wait_is_not_waited_out(waits: list[float]) -> None:
    client = Scripted(answer(retry_after="60"), answer(200))
    with pytest.raises(ProviderRateLimited) as raised:
        await http.request(client, "POST", "http://upstream/x", upstream="u", idempotent=False)
    assert raised.value.retry_after == 60.0
    assert client.calls == 1  # the caller fails over to another backend at once
    assert waits == []


@pytest.mark.usefixtures("top_of_jitter")
async def test_a_429_without_retry_after_backs_off_exponentially(waits: list[float]) -> None:
    client = Scripted(answer(), answer(), answer(), answer())
    with pytest.raises(ProviderRateLimited):
        await http.request(
            client, "GET", "http://upstream/x", upstream="u", idempotent=True, attempts=4
        )
    assert client.calls == 4
    assert waits == [0.5, 1.0, 2.0]  # none after the last attempt


async def test_a_5xx_is_retried_only_when_the_call_is_idempotent(waits: list[float]) -> None:
    submit = Scripted(answer(503), answer(200))
    with pytest.raises(ProviderUnavailable):  # a submit the upstream may have taken
        await http.request(submit, "POST", "http://upstream/x", upstream="u", idempotent=False)
    assert (submit.calls, waits) == (1, [])

    poll = Scripted(answer(503), answer(200))
    result = await http.request(poll, "GET", "http://upstream/x", upstream="u", idempotent=True)
    assert (result.status_code, poll.calls, len(waits)) == (200, 2, 1)


# -- the webhook retry schedule ---------------------------------------------------------------


class FailingReceiver:
    """In place of an `aiohttp.ClientSession`: every POST is kept and answered 500."""

    def __init__(self) -> None:
        self.received: list[tuple[Any, dict[str, Any]]] = []

    @contextlib.asynccontextmanager
    async def post(self, url: Any, **options: Any) -> AsyncIterator[SimpleNamespace]:
        self.received.append((url, options))

        async def empty() -> bytes:  # the body's end, at once
            return b""

        yield SimpleNamespace(status=500, content=SimpleNamespace(readany=empty))


async def test_failed_webhook_deliveries_follow_the_schedule_then_give_up(
    tmp_path: Path,
) -> None:
    delays = [5.0, 30.0, 120.0]
    settings = load_settings(
        redis_url=None,
        storage_dir=tmp_path,
        webhook_retry_delays=delays,
        url_allow_cidrs="127.0.0.0/8",  # the receiver's address: a loopback IP literal
    )
    now = 1_700_000_000.0
    redis = await connect(None)
    scripts = Scripts.register(redis)
    store = JobStore(redis, scripts, settings.retention_days)
    account = await Accounts(redis, scripts, settings).create("pro")  # its signing secret
    receiver = FailingReceiver()
    received = receiver.received

    job = Job(
        id="0123456789abcdef01234567",
        account=account["id"],
        status="completed",
        provider="local",
        params={},
        cost=1,
        created_at=int(now * 1000),
        completed_at=int(now * 1000),
        webhook_url="http://127.0.0.1:9/hook",
    )
    job_key = keys.job(job.account, job.id)
    schedule = keys.webhooks(keys.shard_of_key(job_key))
    await redis.set(job_key, orjson.dumps(job.to_record()))
    hooks = Webhooks(
        redis=redis,
        scripts=scripts,
        store=store,
        client=cast(aiohttp.ClientSession, receiver),
        settings=settings,
        lookups=Lookups(),
        clock=lambda: now,
    )
    for attempt, delay in enumerate(delays, start=1):
        assert await hooks.deliver(job_key) is False
        due = await redis.zscore(schedule, job_key)
        assert due is not None
        due_in = due - now * 1000
        # Jittered below the schedule, never above it: 80% to 100% of the delay.
        assert delay * 800 <= due_in <= delay * 1000, (attempt, due_in)
        assert (await record(redis, job_key))["webhook_status"] == "retrying"
    assert await hooks.deliver(job_key) is False  # one more than there are delays
    assert await redis.zscore(schedule, job_key) is None
    assert (await record(redis, job_key))["webhook_status"] == "failed"
    assert len(received) == len(delays) + 1
    log = await hooks.attempts(job.account, job.id)
    assert [(a["attempt"], a["statusCode"], a["success"]) for a in log] == [
        (n, 500, False) for n in range(1, len(delays) + 2)
    ]

    # A record gone before its delivery ended (a cache hit's lives as long as its cache
    # entry): the delivery ends, and says so.
    await redis.zadd(schedule, {job_key: now * 1000})
    await redis.delete(job_key)
    with structlog.testing.capture_logs() as logged:
        assert await hooks.deliver(job_key) is False
    assert await redis.zscore(schedule, job_key) is None
    assert [(e["event"], e["job_id"]) for e in logged] == [
        ("webhook dropped: the job's record expired before it was delivered", job.id)
    ]
    await redis.aclose()


def test_a_loop_failing_again_and_again_logs_its_first_failure_then_one_line_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis away for an hour: each background loop logs its trouble once a minute, not
    at every try (the webhook deliverer's 0.25 s was 14,400 lines an hour)."""
    now = [1000.0]
    monkeypatch.setattr(telemetry.time, "monotonic", lambda: now[0])
    streak = telemetry.Streak("webhook dispatch")
    with structlog.testing.capture_logs() as logged:
        for _ in range(3_600 * 4):  # an hour of tries, four a second
            streak.failed(ConnectionError("Error 111 connecting to redis:6379"))
            now[0] += 0.25
        streak.ok()
        streak.ok()
    events = [(e["event"], e.get("failures")) for e in logged]
    assert events[0] == ("webhook dispatch failed", 1)
    assert len(events) == 61  # the first, one a minute after it, and the recovery
    assert events[-1] == ("webhook dispatch recovered", 14_400)
    assert all(e["log_level"] == "warning" for e in logged[:-1])
