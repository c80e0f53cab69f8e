"""Admission as a client meets it: per-minute, daily, concurrency and read limits,
credits under races across two gateway processes, idempotency, per-key overrides.

Time moves with the injectable `Clock`, never by sleeping; waits are on conditions
with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.requests import Request
from starlette.responses import Response

from gateway.accounts import Accounts
from gateway.auth import hash_secret
from gateway.config import load_settings
from gateway.errors import BadUserInput
from gateway.jobs.store import JobStore
from gateway.providers import krea
from gateway.store import keys as rkeys
from gateway.store.redis import Scripts, connect
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.harness import GENERATE, Clock, Harness, gateway, reads_limited, until
from tests.servers import serve

DAY = 86_400
ME = "{ me { credits limits { name limit used remaining reset } } }"
CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
UPDATE_KEY = "mutation($id: ID!, $rpm: Int) { updateKey(id: $id, rpm: $rpm) { id rpm } }"
ESTIMATE = """query($input: GenerateInput!) {
  estimate(input: $input) { credits width height numImages } }"""


# -- helpers ---------------------------------------------------------------------------


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The first GraphQL error's extensions (and message), asserting there is one."""
    body = response.json()
    assert body.get("errors"), response.text
    error = body["errors"][0]
    return {"message": error["message"], **error["extensions"]}


def job_id(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["generate"]["id"])


def assert_rate_limited(response: httpx.Response, limit: str) -> int:
    """A 429 as docs/api.md#errors states it; returns its retryAfter (seconds)."""
    assert response.status_code == 429, response.text
    error = error_of(response)
    assert error["code"] == "RATE_LIMITED", error
    assert error["limit"] == limit, error
    retry_after = error["retryAfter"]
    assert isinstance(retry_after, int) and retry_after > 0, error
    assert response.headers["Retry-After"] == str(retry_after)
    # Its X-RateLimit-* describe the limit that refused it (docs/api.md#rate-limit-headers): none
    # left.
    assert response.headers["X-RateLimit-Remaining"] == "0", response.headers
    return retry_after


async def limits_of(gw: Harness, key: str) -> dict[str, dict[str, Any]]:
    r = await gw.gql(ME, key=key)
    assert r.status_code == 200, r.text
    return {row["name"]: row for row in r.json()["data"]["me"]["limits"]}


async def credits_of(gw: Harness, key: str) -> int:
    r = await gw.gql(ME, key=key)
    assert r.status_code == 200, r.text
    return int(r.json()["data"]["me"]["credits"])


def next_utc_midnight(now: float) -> int:
    return (int(now) // DAY + 1) * DAY


# -- 1. the per-minute limit -------------------------------------------------------------


async def test_a_request_refused_for_its_input_still_carries_its_keys_headers(
    redis_url: str, storage_dir: Path
) -> None:
    """Refused by the schema (a variable of the wrong type) or by the gateway's own
    checks (out of range): 400 either way, with the good key's X-RateLimit-* headers
    (docs/api.md#rate-limit-headers). With a bad key, the schema's 400 carries none."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=1000)
        base = {"type": "IMAGE", "provider": "local", "input": {"text": "fox"}}
        for width in ("100", 100):
            variables = {"input": {**base, "options": {"width": width}}}
            r = await gw.gql(GENERATE, variables, key)
            assert r.status_code == 400, r.text
            assert r.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
            assert r.headers["X-RateLimit-Limit"] == "10", (width, r.headers)
            assert r.headers["X-RateLimit-Remaining"] == "10"
        wrong_type = {"input": {**base, "options": {"width": "100"}}}
        r = await gw.gql(GENERATE, wrong_type, "gk_abc_notarealsecret")
        assert r.status_code == 400 and "X-RateLimit-Limit" not in r.headers


async def test_a_key_with_no_minute_limit_says_so_in_numbers(
    redis_url: str, storage_dir: Path
) -> None:
    """Every authenticated answer carries X-RateLimit-* (CONTRACT §7), an unlimited key's
    too: INT_MAX, counting down, which a client reading them as numbers can use."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=1000)  # no minute, day or job limit
        answers = [await gw.generate(key, f"fox {i}", width=512, height=512) for i in range(2)]
        job = job_id(answers[0])
        answers.append(await gw.http.get(f"/v1/jobs/{job}", headers={"X-API-Key": key}))
        answers.append(await gw.gql("{ me { plan } }", key=key))
        for i, r in enumerate(answers):
            assert r.status_code == 200, r.text
            assert r.headers["X-RateLimit-Limit"] == str(2**31 - 1)
            used = min(i + 1, 2)  # the two generations; reads count in their own limit
            assert r.headers["X-RateLimit-Remaining"] == str(2**31 - 1 - used)
            assert int(r.headers["X-RateLimit-Reset"]) > 0


async def test_free_plan_admits_ten_a_minute_then_429_until_retry_after(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False) as gw:
        # A free key's plan limit is 10/minute; concurrency is raised so that only the
        # minute window is in play (queued jobs hold a slot while no worker runs).
        key = await gw.key("free", credits=1000, concurrency=100)
        resets = set()
        for i in range(10):
            r = await gw.generate(key, f"fox {i}", width=512, height=512)
            assert r.status_code == 200, r.text
            assert r.headers["X-RateLimit-Limit"] == "10"
            assert r.headers["X-RateLimit-Remaining"] == str(9 - i)
            resets.add(int(r.headers["X-RateLimit-Reset"]))
        # The window slides from the first admission: its reset stays put.
        assert len(resets) == 1
        reset = resets.pop()
        assert clock() < reset <= clock() + 61

        refused = await gw.generate(key, "one too many")
        retry_after = assert_rate_limited(refused, "minute")
        assert retry_after <= 60
        assert refused.headers["X-RateLimit-Limit"] == "10"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["X-RateLimit-Reset"]) == reset
        # Refused: charged nothing, counted nothing.
        assert await credits_of(gw, key) == 1000 - 10 * 10
        assert (await limits_of(gw, key))["minute"]["used"] == 10

        # A client that honours Retry-After gets in.
        clock.advance(retry_after)
        again = await gw.generate(key, "after waiting")
        assert again.status_code == 200, again.text

        # A whole minute later the full allowance is back.
        clock.advance(61)
        for i in range(10):
            r = await gw.generate(key, f"next minute {i}")
            assert r.status_code == 200, r.text
            assert r.headers["X-RateLimit-Remaining"] == str(9 - i)
        assert_rate_limited(await gw.generate(key, "too many again"), "minute")


async def test_the_minute_window_slides_rather_than_resetting_on_the_clock_minute(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=1000, concurrency=100)
        for i in range(5):
            assert (await gw.generate(key, f"early {i}")).status_code == 200
        clock.advance(30)
        for i in range(5):
            assert (await gw.generate(key, f"late {i}")).status_code == 200
        # 40 s after the first five: all ten are within the last 60 s.
        clock.advance(10)
        retry_after = assert_rate_limited(await gw.generate(key, "x"), "minute")
        assert 19 <= retry_after <= 21  # the first five leave the window at t = 60
        # t = 61: the first five have left, the last five have not.
        clock.advance(21)
        for i in range(5):
            r = await gw.generate(key, f"again {i}")
            assert r.status_code == 200, r.text
            assert r.headers["X-RateLimit-Remaining"] == str(4 - i)
        assert_rate_limited(await gw.generate(key, "y"), "minute")


# -- 2. concurrency ----------------------------------------------------------------------


class GatedFluxKrea(FluxKreaEmulator):
    """The flux-krea emulator, holding every generation until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(api_key="test-key")
        self.gate = asyncio.Event()
        self.arrived = 0

    async def _generate(self, request: Request) -> Response:
        self.arrived += 1
        await self.gate.wait()
        return await super()._generate(request)


@contextlib.asynccontextmanager
async def gated_upstream() -> AsyncIterator[tuple[GatedFluxKrea, str]]:
    emu = GatedFluxKrea()
    try:
        async with serve(emu.app) as base:
            yield emu, base
    finally:
        emu.gate.set()  # never leave a handler hanging at shutdown


async def test_a_second_job_waits_for_the_first_to_end_on_a_free_key(
    redis_url: str, storage_dir: Path
) -> None:
    async with (
        gated_upstream() as (emu, upstream),
        gateway(
            redis_url,
            storage_dir,
            fluxkrea_api_key="test-key",
            fluxkrea_api_base=f"{upstream}/v1",
            routes={"flux-krea": ["fluxkrea"]},
            url_allow_cidrs="127.0.0.0/8",
        ) as gw,
    ):
        key = await gw.key("free", credits=100)
        first = job_id(await gw.generate(key, "first", provider="flux-krea", width=512, height=512))
        await until(lambda: emu.arrived == 1, what="the first job to reach the upstream")
        assert (await gw.job(key, first))["status"] == "processing"  # type: ignore[index]

        refused = await gw.generate(key, "second", provider="flux-krea")
        retry_after = assert_rate_limited(refused, "concurrency")
        assert retry_after <= 30
        assert refused.headers["X-RateLimit-Limit"] == "1"  # the plan's one job at a time
        limits = await limits_of(gw, key)
        assert limits["concurrency"]["used"] == 1 and limits["concurrency"]["remaining"] == 0
        assert limits["minute"]["used"] == 1  # the refused one counted nothing
        assert await credits_of(gw, key) == 90

        emu.gate.set()
        done = await gw.wait(key, first)
        assert done["status"] == "completed", done["error"]
        assert (await limits_of(gw, key))["concurrency"]["used"] == 0
        second = await gw.generate(key, "second", provider="flux-krea")
        assert second.status_code == 200, second.text
        assert (await gw.wait(key, job_id(second)))["status"] == "completed"


async def test_cancelling_a_running_job_frees_its_slot_at_once(
    redis_url: str, storage_dir: Path
) -> None:
    async with (
        gated_upstream() as (emu, upstream),
        gateway(
            redis_url,
            storage_dir,
            fluxkrea_api_key="test-key",
            fluxkrea_api_base=f"{upstream}/v1",
            routes={"flux-krea": ["fluxkrea"]},
            url_allow_cidrs="127.0.0.0/8",
        ) as gw,
    ):
        key = await gw.key("free", credits=100)
        first = job_id(await gw.generate(key, "first", provider="flux-krea"))
        await until(lambda: emu.arrived == 1, what="the first job to reach the upstream")
        assert_rate_limited(await gw.generate(key, "second", provider="flux-krea"), "concurrency")
        r = await gw.gql(CANCEL, {"id": first}, key)
        assert r.json()["data"]["cancelJob"]["status"] == "cancelled"
        # The upstream still holds the first request: the slot is free all the same.
        second = await gw.generate(key, "second", provider="flux-krea", width=512, height=512)
        assert second.status_code == 200, second.text
        assert await credits_of(gw, key) == 90  # first refunded, second charged
        emu.gate.set()
        assert (await gw.wait(key, job_id(second)))["status"] == "completed"
        assert (await gw.job(key, first))["status"] == "cancelled"  # type: ignore[index]


# -- 3. a dead worker's lease ------------------------------------------------------------


async def test_a_killed_workers_slot_comes_back_after_its_lease(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(
        redis_url, storage_dir, clock, inprocess_workers=False, job_lease_seconds=5
    ) as gw:
        key = await gw.key("free", credits=100)
        account = gw.keys[key]["id"]
        first = job_id(await gw.generate(key, "doomed"))
        # 3 s later a worker takes the job (as `gateway worker` does: a 5 s lease on the
        # slot, from now) and then dies without renewing it or ending the job.
        clock.advance(3)
        store = JobStore(gw.accounts.redis, gw.accounts.scripts)
        job = await store.start(rkeys.job(account, first), int(clock() * 1000), 5000)
        assert job is not None and (job.status, job.attempts) == ("processing", 1)

        retry_after = assert_rate_limited(await gw.generate(key, "blocked"), "concurrency")
        assert retry_after <= 5
        # Past the lease taken at admission, but within the worker's: still held.
        clock.advance(3)
        assert_rate_limited(await gw.generate(key, "still blocked"), "concurrency")
        assert (await limits_of(gw, key))["concurrency"]["used"] == 1
        # Past the worker's lease: nothing renews it, so the slot is free again.
        clock.advance(3)
        assert (await limits_of(gw, key))["concurrency"]["used"] == 0
        r = await gw.generate(key, "after the lease")
        assert r.status_code == 200, r.text


# -- 4. the daily limit ------------------------------------------------------------------


async def test_the_daily_limit_rolls_over_at_utc_midnight(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=1000, rpm=100, concurrency=100, daily=3)
        for i in range(3):
            assert (await gw.generate(key, f"today {i}")).status_code == 200
        refused = await gw.generate(key, "one more today")
        retry_after = assert_rate_limited(refused, "day")
        to_midnight = next_utc_midnight(clock()) - clock()
        assert abs(retry_after - to_midnight) <= 2
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert refused.headers["X-RateLimit-Reset"] == str(next_utc_midnight(clock()))
        day = (await limits_of(gw, key))["day"]
        assert (day["limit"], day["used"], day["remaining"]) == (3, 3, 0)
        assert day["reset"] == next_utc_midnight(clock())

        # One second before midnight: still today.
        clock.advance(to_midnight - 1)
        assert_rate_limited(await gw.generate(key, "not yet"), "day")
        # Just after midnight UTC: a new day.
        clock.advance(2)
        r = await gw.generate(key, "tomorrow")
        assert r.status_code == 200, r.text
        day = (await limits_of(gw, key))["day"]
        assert (day["used"], day["remaining"]) == (1, 2)
        assert day["reset"] == next_utc_midnight(clock())
        assert await credits_of(gw, key) == 1000 - 4 * 20  # 1024x1024 by default


# -- 5. two gateway processes, one key, a storm of requests --------------------------------


async def storm(bases: list[str], key: str, n: int) -> list[httpx.Response]:
    """`n` generation requests at once, alternating between the gateway processes."""
    body = {
        "query": GENERATE,
        "variables": {
            "input": {
                "type": "IMAGE",
                "provider": "local",
                "input": {"text": "storm"},
                "options": {"width": 512, "height": 512},
            }
        },
    }
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(f"{bases[i % len(bases)]}/graphql", json=body, headers=headers)
                    for i in range(n)
                )
            )
        )


async def check_books(accounts: Accounts, account: str, admitted: int, cost: int) -> int:
    """The ledger balances to the account's credits and never went below zero."""
    balance = (await accounts.get(account)).credits
    ledger = await accounts.ledger(account)
    charges = [-int(e["delta"]) for e in ledger if e["reason"] == "charge"]
    refunds = [int(e["delta"]) for e in ledger if e["reason"] == "refund"]
    topups = [int(e["delta"]) for e in ledger if e["reason"] not in ("charge", "refund")]
    assert charges == [cost] * admitted
    assert balance >= 0
    assert all(int(e["balance"]) >= 0 for e in ledger)
    assert balance + sum(charges) - sum(refunds) == sum(topups)
    jobs = await accounts.redis.zcard(rkeys.jobs(account))
    assert jobs == admitted  # nothing refused left a job behind
    return balance


async def test_two_processes_admit_exactly_the_minute_limit_from_one_key(
    redis_url: str, two_gateways: list[str]
) -> None:
    settings = load_settings(redis_url=redis_url)
    redis = await connect(redis_url)
    accounts = Accounts(redis, Scripts.register(redis), settings)
    try:
        # Minute limit first: 50 a minute, credits for 70 images (10 each at 512x512).
        made = await accounts.create("enterprise", 700, rpm=50, concurrency=1000, daily=1000)
        replies = await storm(two_gateways, made["key"], 200)
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 50, sorted(set(statuses))
        assert statuses.count(429) == 150
        assert {error_of(r)["limit"] for r in replies if r.status_code == 429} == {"minute"}
        ids = {r.json()["data"]["generate"]["id"] for r in replies if r.status_code == 200}
        assert len(ids) == 50
        # Both processes answered their half (which of them admitted is a race).
        served = [str(r.request.url).removesuffix("/graphql") for r in replies]
        assert [served.count(base) for base in two_gateways] == [100, 100]
        remaining = sorted(
            int(r.headers["X-RateLimit-Remaining"]) for r in replies if r.status_code == 200
        )
        assert remaining == list(range(50))  # each admission saw its own place in the window
        assert await check_books(accounts, made["id"], admitted=50, cost=10) == 200

        # Credits first: enough for 30 images, the minute limit (50) not reached.
        made = await accounts.create("enterprise", 300, rpm=50, concurrency=1000, daily=1000)
        replies = await storm(two_gateways, made["key"], 200)
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 30, sorted(set(statuses))
        assert statuses.count(402) == 170
        refused = error_of(next(r for r in replies if r.status_code == 402))
        assert refused["code"] == "INSUFFICIENT_CREDITS"
        assert (refused["creditsRequired"], refused["creditsAvailable"]) == (10, 0)
        assert await check_books(accounts, made["id"], admitted=30, cost=10) == 0
    finally:
        await redis.aclose()


# -- 6. idempotency ----------------------------------------------------------------------


def _ordered(idempotency_key: str, **more: Any) -> dict[str, Any]:
    """`generate`'s variables: the same picture, under `idempotency_key`."""
    return {
        "input": {
            "type": "IMAGE",
            "provider": "local",
            "input": {"text": "same"},
            "idempotencyKey": idempotency_key,
            **more,
        }
    }


async def test_idempotency_key_makes_concurrent_retries_one_job(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        # A free key: one slot, ten a minute; retries of one request take neither.
        key = await gw.key("free", credits=100)
        variables = _ordered("order-17", options={"width": 1024, "height": 1024})
        replies = await asyncio.gather(*(gw.gql(GENERATE, variables, key) for _ in range(20)))
        assert [r.status_code for r in replies] == [200] * 20, replies[0].text
        assert len({job_id(r) for r in replies}) == 1
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert [(e["reason"], int(e["delta"])) for e in ledger] == [
            ("initial", 100),
            ("charge", -20),
        ]
        limits = await limits_of(gw, key)
        assert limits["minute"]["used"] == 1 and limits["day"]["used"] == 1

        # The same key asking for something else is a client bug: 400, nothing taken.
        changed = {"input": {**variables["input"], "input": {"text": "different"}}}
        r = await gw.gql(GENERATE, changed, key)
        assert r.status_code == 400, r.text
        error = error_of(r)
        assert error["code"] == "BAD_USER_INPUT" and error["field"] == "idempotencyKey"
        assert len(await gw.accounts.ledger(gw.keys[key]["id"])) == 2
        # Another idempotency key is another request (and meets the concurrency limit).
        other = {"input": {**variables["input"], "idempotencyKey": "order-18"}}
        assert_rate_limited(await gw.gql(GENERATE, other, key), "concurrency")


async def test_repeats_of_an_idempotency_key_count_as_reads(
    redis_url: str, storage_dir: Path
) -> None:
    """A repeat is answered with the job (its images too, on OpenAI's and Segmind's
    routes), as a read of it is: it counts as one, so no key or client token can have
    it served without a limit."""
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        key = await gw.key("free", credits=100, rpm=1)  # its read limit: the 5 configured
        variables = _ordered("order-19")
        first = await gw.gql(GENERATE, variables, key)
        assert first.status_code == 200, first.text
        for _ in range(5):
            again = await gw.gql(GENERATE, variables, key)
            assert again.status_code == 200 and job_id(again) == job_id(first), again.text
        assert_rate_limited(await gw.gql(GENERATE, variables, key), "read")
        assert len(await gw.accounts.ledger(gw.keys[key]["id"])) == 2  # one charge


# -- 7. reads --------------------------------------------------------------------------


async def test_reads_have_their_own_limit(redis_url: str, storage_dir: Path) -> None:
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        clock = gw.clock
        key = await gw.key("free", credits=100)
        for i in range(5):
            r = await gw.gql("{ me { plan } }", key=key)
            assert r.status_code == 200, (i, r.text)
        refused = await gw.gql("{ me { plan } }", key=key)
        retry_after = assert_rate_limited(refused, "read")
        assert retry_after <= 60
        # Its headers describe the limit that refused it: the read limit, used up.
        assert refused.headers["X-RateLimit-Limit"] == "5"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert int(refused.headers["X-RateLimit-Reset"]) == int(clock()) + retry_after
        rest = await gw.http.get("/v1/jobs/x", headers={"X-API-Key": key})
        assert rest.status_code == 429 and rest.headers["X-RateLimit-Limit"] == "5"
        assert rest.headers["X-RateLimit-Remaining"] == "0"
        # Generating is not a read: still admitted.
        r = await gw.generate(key, "while reads are limited")
        assert r.status_code == 200, r.text
        assert r.headers["X-RateLimit-Remaining"] == "9"
        # Polling the job is a read, and is refused too.
        polled = await gw.gql("query($id: ID!) { job(id: $id) { status } }", {"id": job_id(r)}, key)
        assert_rate_limited(polled, "read")
        clock.advance(retry_after)
        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200


async def test_a_keys_own_higher_minute_limit_raises_its_read_limit(
    redis_url: str, storage_dir: Path
) -> None:
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        key = await gw.key("enterprise", credits=100, rpm=8)
        for i in range(8):
            r = await gw.gql("{ me { limits { name limit used } } }", key=key)
            assert r.status_code == 200, (i, r.text)
        read = next(x for x in r.json()["data"]["me"]["limits"] if x["name"] == "read")
        assert read == {"name": "read", "limit": 8, "used": 8}
        refused = await gw.gql("{ me { plan } }", key=key)
        assert_rate_limited(refused, "read")
        assert refused.headers["X-RateLimit-Limit"] == "8"
        # A plan's limit is not the key's own: a free key (10 a minute) reads 5.
        free = await gw.key("free", credits=100)
        for _ in range(5):
            assert (await gw.gql("{ me { plan } }", key=free)).status_code == 200
        assert_rate_limited(await gw.gql("{ me { plan } }", key=free), "read")


async def test_a_key_may_poll_every_job_it_may_run_every_second(
    redis_url: str, storage_dir: Path
) -> None:
    """Segmind's SDK polls each job every second: a key running as many jobs as it may
    at once must not run out of reads doing that, whatever GATEWAY_READ_RPM says."""
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False, read_rpm=5) as gw:
        key = await gw.key("enterprise", credits=10_000, concurrency=3)
        clock.advance(61 - clock() % 60)  # 1 s into a clock minute: no rollover mid-test
        jobs = [job_id(await gw.generate(key, f"job {i}", seed=i)) for i in range(3)]
        for second in range(60):  # a minute of polling each job every second
            for job in jobs:
                polled = await gw.http.get(f"/v1/jobs/{job}", headers={"X-API-Key": key})
                assert polled.status_code == 200, (second, polled.text)
        for _ in range(210 - 180):  # 70 a minute for each of its slots
            assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200
        refused = await gw.http.get(f"/v1/jobs/{jobs[0]}", headers={"X-API-Key": key})
        assert refused.status_code == 429 and refused.headers["X-RateLimit-Limit"] == "210"


async def test_requests_with_a_wrong_secret_do_not_use_up_a_keys_reads(
    redis_url: str, storage_dir: Path
) -> None:
    """Knowing a key's account id (its visible prefix) is not enough to starve it."""
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        key = await gw.key("free", credits=100)
        forged = "_".join(key.split("_", 2)[:2]) + "_" + "x" * 43
        for _ in range(10):
            r = await gw.gql("{ me { plan } }", key=forged)
            assert r.status_code == 401, r.text
        for i in range(5):
            r = await gw.gql("{ me { plan } }", key=key)
            assert r.status_code == 200, (i, r.text)
        assert_rate_limited(await gw.gql("{ me { plan } }", key=key), "read")


async def test_a_poll_is_one_round_trip_and_reads_nothing_for_a_wrong_secret(
    redis_url: str, storage_dir: Path
) -> None:
    """Every poll route checks the key and reads the job in one EVALSHA (auth.lua with
    the record); the record is read only for the key's own secret."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)

    def commands() -> dict[str, int]:
        return {name: int(v["calls"]) for name, v in admin.info("commandstats").items()}

    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=1_000)
        made = job_id(await gw.generate(key, "polled once a round trip"))
        auth = {"Authorization": f"Bearer {key}"}
        polls = {
            "GraphQL": lambda: gw.gql("query($id: ID!) { job(id: $id) { id } }", {"id": made}, key),
            "REST": lambda: gw.http.get(f"/v1/jobs/{made}", headers=auth),
            "Krea": lambda: gw.http.get(f"/compat/krea/jobs/{made}", headers=auth),
            "Segmind": lambda: gw.http.get(
                f"/compat/segmind/v2/requests/{made}/status", headers={"x-api-key": key}
            ),
        }
        for name, poll in polls.items():
            before = commands()
            for _ in range(5):
                answer = await poll()
                shown = krea.as_uuid(made) if name == "Krea" else made  # Krea's ids are UUIDs
                assert answer.status_code == 200 and shown in answer.text, (name, answer.text)
            # (the counts include the commands the scripts ran; a poll runs one script)
            assert commands()["cmdstat_evalsha"] - before["cmdstat_evalsha"] == 5, name

        account = gw.keys[key]["id"]
        scripts = Scripts.register(await connect(redis_url))
        for secret, seen in (("0" * 64, False), (gw.keys[key]["key"].split("_", 2)[2], True)):
            reply = await scripts.auth(
                account=rkeys.account(account),
                rate=rkeys.rate(account),
                reads=rkeys.reads(account, 0),
                client_token=rkeys.client_token(account, ""),
                tokens_reads=rkeys.tokens_reads(account, 0),
                now_ms=int(time.time() * 1000),
                count_read=True,
                secret_hash=hash_secret(secret),
                plans="",
                token=False,
                read_rpm=600,
                read_rpm_per_job=70,
                job=rkeys.job(account, made),
            )
            assert (reply.record.get("id") == made) is seen


async def test_polling_every_two_seconds_never_exhausts_a_plan(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=100)
        first = job_id(await gw.generate(key, "polled"))
        for _ in range(90):  # three minutes of polling every 2 s
            assert (await gw.job(key, first)) is not None
            clock.advance(2)


# -- 8. per-key overrides and the admin API -------------------------------------------------


async def test_admin_raises_a_keys_limit_and_only_the_admin_may(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False, admin_token="adm") as gw:
        key = await gw.key("enterprise", credits=1000, rpm=2)
        account = gw.keys[key]["id"]
        for _ in range(2):
            assert (await gw.generate(key)).status_code == 200
        r = await gw.generate(key)
        assert_rate_limited(r, "minute")
        assert r.headers["X-RateLimit-Limit"] == "2"

        # Not with the key's own API key, not without a token, not with a wrong one.
        as_user = await gw.gql(UPDATE_KEY, {"id": account, "rpm": 100}, key)
        assert as_user.status_code == 403 and error_of(as_user)["code"] == "FORBIDDEN"
        anonymous = await gw.gql(UPDATE_KEY, {"id": account, "rpm": 100})
        assert anonymous.status_code == 401
        assert error_of(anonymous)["code"] == "UNAUTHENTICATED"
        wrong = await gw.gql(UPDATE_KEY, {"id": account, "rpm": 100}, "admx")
        assert wrong.status_code == 403 and error_of(wrong)["code"] == "FORBIDDEN"
        assert_rate_limited(await gw.generate(key), "minute")

        r = await gw.gql(UPDATE_KEY, {"id": account, "rpm": 5}, "adm")
        assert r.status_code == 200, r.text
        assert r.json()["data"]["updateKey"] == {"id": account, "rpm": 5}
        for i in range(3):
            r = await gw.generate(key)
            assert r.status_code == 200, r.text
            assert r.headers["X-RateLimit-Limit"] == "5"
            assert r.headers["X-RateLimit-Remaining"] == str(2 - i)
        assert_rate_limited(await gw.generate(key), "minute")
        limits = await limits_of(gw, key)
        assert (limits["minute"]["limit"], limits["minute"]["used"]) == (5, 5)

        # An unknown key id is a 404, not a new account.
        missing = await gw.gql(UPDATE_KEY, {"id": "nope", "rpm": 5}, "adm")
        assert error_of(missing)["code"] == "NOT_FOUND"


async def test_a_balance_graphql_could_not_read_back_is_refused_before_it_is_made(
    redis_url: str, storage_dir: Path
) -> None:
    """GraphQL's `Int` is 32 bits: a top-up past 2**31 - 1 was applied, then answered
    500 (an admin trying again added it twice), and `me` failed from then on."""
    most = 2**31 - 1
    async with gateway(redis_url, storage_dir, inprocess_workers=False, admin_token="adm") as gw:
        key = await gw.key("enterprise", credits=most - 10)
        account = gw.keys[key]["id"]
        add = "mutation($id: ID!, $n: Int!) { addCredits(id: $id, amount: $n) }"
        r = await gw.gql(add, {"id": account, "n": 11}, "adm")
        assert r.status_code == 400 and error_of(r)["code"] == "BAD_USER_INPUT", r.text
        assert error_of(r)["field"] == "amount"  # addCredits's argument
        r = await gw.gql(add, {"id": account, "n": 10}, "adm")
        assert r.json()["data"]["addCredits"] == most
        r = await gw.gql(add, {"id": account, "n": -5}, "adm")
        assert r.json()["data"]["addCredits"] == most - 5
        r = await gw.gql(add, {"id": account, "n": 5}, "adm")
        # In the ledger as the CLI records them: a top-up, a correction.
        reasons = [e["reason"] for e in await gw.accounts.ledger(account)]
        assert reasons[-3:] == ["topup", "correction", "topup"]
        assert (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]["credits"] == most
        with pytest.raises(BadUserInput):
            await gw.accounts.create("pro", most + 1)
        with pytest.raises(BadUserInput):
            await gw.accounts.update(account, rpm=most + 1)
        assert (await gw.accounts.get(account)).credits == most


ROTATE = """mutation($id: ID!, $w: Boolean!) {
  rotateKey(id: $id, webhookSecret: $w) { id key credits webhookSecret } }"""


async def test_admin_rotates_a_leaked_key_and_the_account_stays(
    redis_url: str, storage_dir: Path
) -> None:
    """A leaked key, or one revoked by mistake, gets a new key: the old one and the client
    tokens it minted are refused at once; the new one has the balance and the jobs; the
    webhook secret changes only when asked. Only the admin may."""
    limited = {"admin_token": "adm", "client_tokens_max": 1}  # one live client token a key
    async with gateway(redis_url, storage_dir, inprocess_workers=False, **limited) as gw:
        key, other = await gw.key(credits=1000), await gw.key()
        account, secret = gw.keys[key]["id"], gw.keys[key]["webhookSecret"]
        job_id = (await gw.generate(key)).json()["data"]["generate"]["id"]
        minted = await gw.http.post(
            "/v1/client_tokens", json={"maxCredits": 100}, headers={"X-API-Key": key}
        )
        token = minted.json()["token"]
        paid = (await gw.accounts.get(account)).credits
        await gw.accounts.revoke(account)

        refused = await gw.gql(ROTATE, {"id": account, "w": False}, other)
        assert refused.status_code == 403 and error_of(refused)["code"] == "FORBIDDEN"
        r = await gw.gql(ROTATE, {"id": account, "w": False}, "adm")
        assert r.status_code == 200, r.text
        rotated = r.json()["data"]["rotateKey"]
        assert rotated["id"] == account and rotated["key"] != key
        assert (rotated["credits"], rotated["webhookSecret"]) == (paid, secret)
        for old in (key, token):
            assert (await gw.gql("{ me { credits } }", key=old)).status_code == 401
        new = rotated["key"]
        assert (await gw.gql("{ me { credits } }", key=new)).json()["data"]["me"]["credits"] == paid
        assert (await gw.job(new, job_id) or {})["id"] == job_id  # its jobs are its own
        # The old key's token, refused, no longer takes the one place: the new key mints.
        minted = await gw.http.post(
            "/v1/client_tokens", json={"maxCredits": 10}, headers={"X-API-Key": new}
        )
        assert minted.status_code == 201, minted.text

        again = (await gw.gql(ROTATE, {"id": account, "w": True}, "adm")).json()["data"]
        assert again["rotateKey"]["webhookSecret"] not in (secret, None)
        assert (await gw.gql("{ me { credits } }", key=new)).status_code == 401
        missing = await gw.gql(ROTATE, {"id": "nosuchkey", "w": False}, "adm")
        assert error_of(missing)["code"] == "NOT_FOUND"


async def test_after_a_limit_is_lowered_retry_after_says_when_a_request_gets_in(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(
        redis_url, storage_dir, clock, inprocess_workers=False, admin_token="adm"
    ) as gw:
        key = await gw.key("enterprise", credits=1000, rpm=5)
        for _ in range(5):  # one every 10 s: at t = 0, 10, 20, 30, 40
            assert (await gw.generate(key)).status_code == 200
            clock.advance(10)
        # t = 50: five in the window. Down to 2 a minute: four must leave first, the
        # fourth (t = 30) at t = 90, so the answer is 40 s, not the oldest's 10 s.
        r = await gw.gql(UPDATE_KEY, {"id": gw.keys[key]["id"], "rpm": 2}, "adm")
        assert r.json()["data"]["updateKey"]["rpm"] == 2
        retry_after = assert_rate_limited(await gw.generate(key), "minute")
        assert 39 <= retry_after <= 41
        clock.advance(retry_after - 2)
        assert_rate_limited(await gw.generate(key), "minute")
        clock.advance(2)
        r = await gw.generate(key)
        assert r.status_code == 200, r.text


async def test_admin_api_is_off_without_an_admin_token(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=100, rpm=2)
        r = await gw.gql(UPDATE_KEY, {"id": gw.keys[key]["id"], "rpm": 5}, key)
        assert r.status_code == 403 and error_of(r)["code"] == "FORBIDDEN"


# -- 9. me and estimate -------------------------------------------------------------------


async def test_me_reports_each_limit_as_admitted(redis_url: str, storage_dir: Path) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False) as gw:
        key = await gw.key("starter", credits=200)  # 30/min, 3 at once, 1000/day
        if next_utc_midnight(clock()) - clock() < 600:  # the day must not roll over either
            clock.advance(next_utc_midnight(clock()) - clock())
        clock.advance(61 - clock() % 60)  # 1 s into a clock minute: reads do not roll over
        replies = [await gw.generate(key, f"job {i}", width=512, height=512) for i in range(2)]
        first_reset = int(replies[0].headers["X-RateLimit-Reset"])
        await gw.gql(CANCEL, {"id": job_id(replies[0])}, key)
        me = (await gw.gql(ME, key=key)).json()["data"]["me"]
        now = clock()
        assert me["credits"] == 200 - 10  # the cancelled one was refunded
        limits = {row["name"]: row for row in me["limits"]}
        assert [row["name"] for row in me["limits"]] == ["minute", "day", "concurrency", "read"]
        assert limits["minute"] == {
            "name": "minute",
            "limit": 30,
            "used": 2,
            "remaining": 28,
            "reset": first_reset,
        }
        assert now < first_reset <= now + 61
        # A cancelled job still counts against the minute and the day, not the slots.
        assert limits["day"] == {
            "name": "day",
            "limit": 1000,
            "used": 2,
            "remaining": 998,
            "reset": next_utc_midnight(now),
        }
        assert {k: limits["concurrency"][k] for k in ("limit", "used", "remaining")} == {
            "limit": 3,
            "used": 1,
            "remaining": 2,
        }
        # Reads: the two cancelJob/generate mutations are not reads; this `me` is the first.
        read = limits["read"]
        assert (read["limit"], read["used"], read["remaining"]) == (600, 1, 599)
        assert read["reset"] == math.floor(now / 60) * 60 + 60

        # A minute later the window is empty again; the day is not.
        clock.advance(61)
        limits = await limits_of(gw, key)
        assert (limits["minute"]["used"], limits["minute"]["remaining"]) == (0, 30)
        assert limits["day"]["used"] == 2


@pytest.mark.parametrize(
    ("options", "credits"),
    [
        ({"width": 512, "height": 512}, 10),
        ({"width": 1024, "height": 1024}, 20),
        ({"width": 2048, "height": 2048}, 30),
        ({"width": 1024, "height": 1024, "numImages": 3}, 60),
        ({"width": 2048, "height": 2048, "numImages": 4}, 120),
        ({"width": 768, "height": 768}, 14),  # (768² - 512²) / (1024² - 512²) = 5/12 -> 14.17
    ],
)
async def test_estimate_quotes_the_documented_price_and_takes_nothing(
    redis_url: str, storage_dir: Path, options: dict[str, int], credits: int
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=50)
        variables = {
            "input": {
                "type": "IMAGE",
                "provider": "local",
                "input": {"text": "how much?"},
                "options": options,
            }
        }
        for _ in range(12):  # more than a free key may generate in a minute
            r = await gw.gql(ESTIMATE, variables, key)
            assert r.status_code == 200, r.text
            quote = r.json()["data"]["estimate"]
            assert quote["credits"] == credits
            assert (quote["width"], quote["height"]) == (options["width"], options["height"])
            assert quote["numImages"] == options.get("numImages", 1)
        me = (await gw.gql(ME, key=key)).json()["data"]["me"]
        assert me["credits"] == 50
        used = {row["name"]: row["used"] for row in me["limits"]}
        assert (used["minute"], used["day"], used["concurrency"]) == (0, 0, 0)
        assert await gw.accounts.ledger(gw.keys[key]["id"]) == [
            {"delta": "50", "reason": "initial", "job": "", "balance": "50"}
        ]
        # What the estimate said is what a generation is charged, when it can be paid.
        r = await gw.generate(key, "how much?", **options)
        if credits <= 50:
            assert r.json()["data"]["generate"]["creditCost"] == credits
            assert await credits_of(gw, key) == 50 - credits
        else:
            error = error_of(r)
            assert error["code"] == "INSUFFICIENT_CREDITS"
            assert (error["creditsRequired"], error["creditsAvailable"]) == (credits, 50)


async def test_a_burst_larger_than_the_redis_pool_is_admitted_not_refused(
    any_redis_url: str, storage_dir: Path
) -> None:
    # More requests in flight at once than redis-py's default pool has connections (100):
    # each waits for a connection instead of failing with a 503.
    async with gateway(any_redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=10**6)
        body = {"service": "local", "prompt": "a burst", "width": 512, "height": 512}
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
        async with httpx.AsyncClient(base_url=gw.base, limits=limits, timeout=60) as client:
            answers = await asyncio.gather(
                *(
                    client.post("/v1/text_to_image", headers={"X-API-Key": key}, json=body)
                    for _ in range(300)
                )
            )
        assert [r.status_code for r in answers].count(202) == 300, {r.status_code for r in answers}
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 10**6 - 300 * 10
