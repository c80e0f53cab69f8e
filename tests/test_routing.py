"""Routing end to end: the real gateway against the three upstream emulators over loopback.

Failover on upstream trouble (5xx, 429), none on the user's own bad input, circuit
breakers, backends without credentials, resuming a stored upstream job instead of paying
for it twice, and Krea's lifecycle statuses as progress (docs/api.md: services and
backends, durability).
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from gateway.jobs import worker as worker_module
from gateway.jobs.worker import Worker
from gateway.store import keys
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import LIFECYCLE, KreaEmulator
from tests.emulators.segmind import SegmindEmulator
from tests.harness import Clock, Harness, gateway, until
from tests.records import change
from tests.servers import serve

PROVIDERS = "{ providers { name kind enabled reason circuit } }"


class HoldingKrea(KreaEmulator):
    """Krea's emulator, able to hold its jobs at one lifecycle status while a test looks.

    While `hold_at` is set, a pending job's poll answers that status (or an earlier one)
    again and again instead of advancing; clearing it lets the lifecycle go on.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.hold_at: str | None = None
        super().__init__(**kwargs)

    async def _job(self, request: Request) -> Response:
        if self.hold_at is not None:
            index = LIFECYCLE.index(self.hold_at)
            job = self.jobs.get(request.path_params["job_id"])
            if job is not None and job.completed_at is None and job.polls >= index:
                job.polls = index - 1  # the emulator adds one: the same status again
        return await super()._job(request)


@dataclass
class Upstreams:
    fluxkrea: FluxKreaEmulator
    segmind: SegmindEmulator
    krea: HoldingKrea
    settings: dict[str, Any]


@pytest.fixture
async def up() -> AsyncIterator[Upstreams]:
    fluxkrea = FluxKreaEmulator(api_key="test-key")
    segmind = SegmindEmulator(api_key="test-key")
    krea = HoldingKrea(token="test-token")
    async with serve(fluxkrea.app) as fb, serve(segmind.app) as sb, serve(krea.app) as kb:
        yield Upstreams(fluxkrea, segmind, krea, {
            "fluxkrea_api_base": f"{fb}/v1", "fluxkrea_api_key": "test-key",
            "segmind_api_base": sb, "segmind_api_key": "test-key",
            "krea_api_base": kb, "krea_api_token": "test-token",
        })  # fmt: skip


async def submit(gw: Harness, key: str, provider: str = "flux-krea", **options: Any) -> str:
    options.setdefault("width", 1024)
    options.setdefault("height", 1024)
    r = await gw.generate(key, "a red fox in the snow", provider=provider, **options)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "errors" not in body, body
    return str(body["data"]["generate"]["id"])


async def providers(gw: Harness, key: str) -> dict[str, dict[str, Any]]:
    r = await gw.gql(PROVIDERS, key=key)
    assert r.status_code == 200, r.text
    return {p["name"]: p for p in r.json()["data"]["providers"]}


async def credits(gw: Harness, key: str) -> int:
    r = await gw.gql("{ me { credits } }", key=key)
    return int(r.json()["data"]["me"]["credits"])


async def image_size(gw: Harness, url: str) -> tuple[int, int]:
    assert url.startswith(gw.base + "/outputs/"), url  # ours, not the upstream's
    r = await gw.http.get(url)
    assert r.status_code == 200
    return Image.open(io.BytesIO(r.content)).size


def job_key(gw: Harness, key: str, job_id: str) -> str:
    return keys.job(gw.keys[key]["id"], job_id)


# -- 1. failover ---------------------------------------------------------------------------


async def test_flux_krea_500s_fail_over_to_segmind_and_the_image_is_ours(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(5, 500)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key)
        done = await gw.wait(key, job_id)

        assert done["status"] == "completed", done["error"]
        meta = done["metadata"]
        assert meta["backend"] == "segmind"
        # A 500 on a generate may hide a paid job: it is not sent again, it fails over.
        assert up.fluxkrea.submissions == 1
        assert up.segmind.submissions == 1
        assert up.krea.submissions == 0
        (segmind_id,) = up.segmind.jobs
        assert meta["upstreamId"] == segmind_id
        assert meta["sent"]["prompt"] == "a red fox in the snow"
        assert meta["sent"]["aspect_ratio"] == "1:1"
        assert (meta["width"], meta["height"]) == (1024, 1024)
        assert (done["width"], done["height"]) == (1024, 1024)

        assert await image_size(gw, done["url"]) == (1024, 1024)
        assert done["creditCost"] == 20
        assert await credits(gw, key) == 980


async def test_a_size_segmind_cannot_draw_fails_over_past_it(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Segmind draws 1 or 0.25 megapixels at its own ratios (docs/providers/segmind.md): 2048x512
    would come back about 1 megapixel at 21:9, smaller and another shape than asked and paid for.
    The route goes on to Krea, which draws it."""
    up.fluxkrea.fail_next(5, 500)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        done = await gw.wait(key, await submit(gw, key, width=2048, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "krea"
        assert up.segmind.submissions == 0
        assert await image_size(gw, done["url"]) == (2048, 512)


async def test_a_segmind_request_it_lost_fails_over_to_krea_at_once(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """404 on a poll: an unknown or expired request_id (docs/providers/segmind.md). Five in a row
    and the job goes on to the next backend, not waiting out its deadline."""
    up.fluxkrea.fail_next(5, 500)
    up.segmind.polls_to_complete = 10_000
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, width=512, height=512)
        (request_id,) = await until(
            lambda: list(up.segmind.jobs), what="Segmind's request", timeout=10.0
        )
        up.segmind.expire(request_id)
        done = await gw.wait(key, job_id, timeout=20)
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "krea"
        assert len(up.segmind.calls("GET", "/status")) < 20  # not polled to a deadline


async def test_jobs_segmind_ran_and_failed_fail_over_but_leave_its_circuit_closed(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Segmind's FAILED includes its content blocks (docs/providers/segmind.md): three users'
    blocked prompts say nothing of Segmind's health, and must not take it away from everyone."""
    up.fluxkrea.fail_next(1000, 503)
    up.segmind.fail_jobs = True
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        for seed in range(3):
            done = await gw.wait(key, await submit(gw, key, width=512, height=512, seed=seed))
            assert done["status"] == "completed", done["error"]
            assert done["metadata"]["backend"] == "krea"
        assert up.segmind.submissions == 3
        assert (await providers(gw, key))["segmind"]["circuit"] == "closed"


async def test_fewer_images_than_asked_fail_over_rather_than_charge_for_all(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """One image back for four asked (and charged): not kept, nor cached as the answer
    for four; the next backend draws the four."""
    base = up.settings["fluxkrea_api_base"].removesuffix("/v1")
    up.fluxkrea.images["one"] = (512, 512, (200, 30, 30))
    one = {"url": f"{base}/images/generated/one.jpg", "seed": 7, "width": 512, "height": 512}
    up.fluxkrea.answer_next(1, {"status": "success", "request_id": "r1", "images": [one]})
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, width=512, height=512, numImages=4)
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "segmind"
        assert len(done["urls"]) == 4


async def test_fewer_images_at_the_end_of_a_polled_job_fail_over_too(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """The same when the short answer comes from a job that was polled to its end
    (Segmind's queue answering one URL, a string, for four asked)."""
    up.segmind.output_style = "string"
    routes = {"flux-dev": ["segmind", "fluxkrea"]}
    async with gateway(redis_url, storage_dir, routes=routes, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, provider="flux-dev", width=512, height=512, numImages=4)
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "fluxkrea"
        assert len(done["urls"]) == 4
        (tried,) = up.segmind.jobs.values()
        assert tried.status == "COMPLETED"  # polled to its end, then not kept


# -- 2. 429s fail over; the user's own bad input does not -----------------------------------


@pytest.mark.parametrize("retry_after", [0.05, 60])
async def test_a_429_storm_fails_over_without_holding_the_job(
    up: Upstreams, redis_url: str, storage_dir: Path, retry_after: float
) -> None:
    up.fluxkrea.rate_limit_next(50, retry_after=retry_after)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "segmind"
        assert await image_size(gw, done["url"]) == (512, 512)
        tries = [r["at"] for r in up.fluxkrea.requests if r["path"] == "/v1/generate"]
        assert len(tries) == up.fluxkrea.submissions
        (segmind_job,) = up.segmind.jobs.values()
        assert tries[-1] < segmind_job.submitted  # failed over once flux-krea gave up
        if retry_after == 60:
            # A long Retry-After is not waited out: no retry at all, and the next backend
            # has the job before flux-krea would even take another request.
            assert len(tries) == 1
            assert segmind_job.submitted < tries[0] + retry_after
        else:
            # A short one is honoured, a bounded number of times: each retry comes no
            # sooner than the upstream asked.
            assert len(tries) == 3
            assert all(later - earlier >= retry_after for earlier, later in pairwise(tries))


async def test_upstream_refusing_the_users_input_fails_the_job_without_failover(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1, 400)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key)
        done = await gw.wait(key, job_id)

        assert done["status"] == "failed"
        assert "flux-krea answered 400" in done["error"]
        assert "injected failure" in done["error"]  # the upstream's own words
        assert up.fluxkrea.submissions == 1
        assert up.segmind.submissions == 0
        assert up.krea.submissions == 0
        assert await credits(gw, key) == 1000  # refunded in full


async def test_users_bad_input_does_not_open_the_circuit_for_everyone(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(3, 400)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        for _ in range(3):
            done = await gw.wait(key, await submit(gw, key))
            assert done["status"] == "failed"
        assert (await providers(gw, key))["fluxkrea"]["circuit"] == "closed"
        done = await gw.wait(key, await submit(gw, key))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "fluxkrea"
        assert up.fluxkrea.submissions == 4
        assert up.segmind.submissions == 0


# -- 3. circuit breaker ----------------------------------------------------------------------


async def test_three_failures_open_the_circuit_and_the_next_job_skips_the_backend(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1000, 503)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        before = await providers(gw, key)
        assert before["fluxkrea"]["circuit"] == "closed"
        assert before["fluxkrea"]["enabled"] is True

        for n in range(1, 4):
            done = await gw.wait(key, await submit(gw, key, width=512, height=512))
            assert done["status"] == "completed", done["error"]
            assert done["metadata"]["backend"] == "segmind"
            assert up.fluxkrea.submissions == n
            state = (await providers(gw, key))["fluxkrea"]["circuit"]
            assert state == ("open" if n == 3 else "closed"), (n, state)

        listed = await providers(gw, key)
        fluxkrea = listed["fluxkrea"]
        assert fluxkrea["circuit"] == "open"
        assert "3 failures in a row" in fluxkrea["reason"]
        assert "503" in fluxkrea["reason"]
        assert listed["segmind"]["circuit"] == "closed"
        assert listed["flux-krea"]["enabled"] is True

        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "segmind"
        assert up.fluxkrea.submissions == 3  # the broken backend saw nothing new
        assert len(up.fluxkrea.requests) == 3
        assert up.segmind.submissions == 4


async def test_an_open_circuit_is_tried_again_after_its_cool_down_and_closes(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(3, 503)
    async with gateway(redis_url, storage_dir, breaker_cooldown_seconds=0.5, **up.settings) as gw:
        key = await gw.key()
        for _ in range(3):
            await gw.wait(key, await submit(gw, key, width=512, height=512))

        async def half_open() -> bool:
            return (await providers(gw, key))["fluxkrea"]["circuit"] == "half-open"

        await until(half_open, what="the cool-down to pass", timeout=10.0)
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["metadata"]["backend"] == "fluxkrea"  # the trial went to it, and it healed
        assert (await providers(gw, key))["fluxkrea"]["circuit"] == "closed"


async def test_an_upstream_that_hangs_times_out_and_fails_over(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.stall = 3
    async with gateway(redis_url, storage_dir, upstream_timeout=0.5, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "segmind"
        assert up.fluxkrea.submissions == 1  # a submission that may have landed: not re-sent


async def test_a_job_that_fails_everywhere_says_why_and_is_refunded(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1000, 502)
    up.segmind.fail_jobs = True
    up.krea.fail_jobs = True
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "failed"
        for backend in ("fluxkrea", "segmind", "krea"):
            assert f"{backend}:" in done["error"], done["error"]
        assert done["creditCost"] == 0
        assert await credits(gw, key) == 100


async def test_flux_krea_reports_by_callback_when_the_gateway_has_a_callback_url(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, public=True, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, width=768, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "fluxkrea"
        assert done["metadata"]["sent"]["async"] is True
        sent = up.fluxkrea.requests[0]
        assert sent["path"] == "/v1/generate/async"
        assert sent["json"]["webhook_url"].startswith(gw.base + "/v1/callbacks/fluxkrea/")
        assert [status for _, _, status in up.fluxkrea.callbacks] == [200]
        token = sent["json"]["webhook_url"].rsplit("/", 1)[1]
        assert token not in json.dumps(done) and "upstreamId" not in done["metadata"]
        assert await image_size(gw, done["url"]) == (768, 512)

        # Only a callback URL the gateway handed out accepts a report.
        forged = await gw.http.post(
            "/v1/callbacks/fluxkrea/" + "A" * 32, json={"status": "completed", "images": []}
        )
        assert forged.status_code == 404

        # A failure reported by callback fails over like any other upstream failure.
        up.fluxkrea.fail_async = True
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "segmind"

    # A public URL for outputs alone asks no upstream to call back (it may be one they
    # cannot reach, and flux-krea has nothing to poll): flux-krea answers synchronously.
    up.fluxkrea.fail_async = False
    up.fluxkrea.requests.clear()
    outputs = {**up.settings, "public_url": "http://gateway.internal:8000"}
    async with gateway(redis_url, storage_dir, **outputs) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["url"].startswith("http://gateway.internal:8000/outputs/")
        assert [r["path"] for r in up.fluxkrea.requests if r["method"] == "POST"] == [
            "/v1/generate"
        ]


# -- 4. a backend without credentials -------------------------------------------------------


async def test_backend_without_credentials_is_not_tried_and_says_why(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    settings = {**up.settings, "fluxkrea_api_key": None}
    async with gateway(redis_url, storage_dir, **settings) as gw:
        key = await gw.key()
        listed = await providers(gw, key)
        assert listed["fluxkrea"]["enabled"] is False
        assert "GATEWAY_FLUXKREA_API_KEY" in listed["fluxkrea"]["reason"]
        assert listed["segmind"]["enabled"] is True
        assert listed["flux-krea"]["enabled"] is True

        for _ in range(3):
            done = await gw.wait(key, await submit(gw, key, width=512, height=512))
            assert done["status"] == "completed", done["error"]
            assert done["metadata"]["backend"] == "segmind"
        assert up.fluxkrea.requests == []
        # Never tried, so never counted as failing: it still says why it is off.
        after = (await providers(gw, key))["fluxkrea"]
        assert after["circuit"] == "closed"
        assert after["reason"] == listed["fluxkrea"]["reason"]


async def test_pinned_backend_without_credentials_is_refused_and_providers_says_why(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """The operator reads which variable is missing in `providers`; a client is told
    only that nothing is configured (docs/api.md#errors)."""
    settings = {**up.settings, "krea_api_token": None}
    async with gateway(redis_url, storage_dir, **settings) as gw:
        key = await gw.key(credits=1000)
        listed = await providers(gw, key)
        assert listed["krea"]["enabled"] is False
        assert "GATEWAY_KREA_API_TOKEN" in listed["krea"]["reason"]
        assert listed["flux-dev"]["enabled"] is False
        assert "GATEWAY_KREA_API_TOKEN" in listed["flux-dev"]["reason"]

        r = await gw.generate(key, "a red fox", provider="flux-dev", width=512, height=512)
        (error,) = r.json()["errors"]
        assert error["extensions"]["code"] == "SERVICE_UNAVAILABLE"
        assert error["message"] == "no backend of 'flux-dev' is configured on this gateway"
        assert up.krea.requests == []
        assert await credits(gw, key) == 1000


# -- 5. resume, never resubmit ---------------------------------------------------------------


async def test_a_job_krea_accepted_is_resumed_by_another_process_not_submitted_again(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    settings = {**up.settings, "job_lease_seconds": 1.0, "shutdown_grace_seconds": 0.0}
    up.krea.hold_at = "processing"
    async with gateway(redis_url, storage_dir, **settings) as first:
        key = await first.key(credits=1000)
        job_id = await submit(first, key, provider="flux-dev", width=768, height=512)
        stored_key = job_key(first, key, job_id)

        async def stored() -> Any:
            job = await first.app.state.gateway.store.get_by_key(stored_key)
            return job.upstream if job else None

        upstream = await until(stored, what="the upstream id to be stored", timeout=10.0)

        async def polled() -> bool:
            return bool(up.krea.received("GET", "/jobs/"))

        await until(polled, what="a first poll", timeout=10.0)
        assert (await first.job(key, job_id))["status"] == "processing"
    # The first process is gone mid-job (its worker cancelled, nothing acknowledged).
    (krea_id,) = up.krea.jobs
    assert upstream["backend"] == "krea" and upstream["id"] == krea_id
    assert up.krea.submissions == 1
    polls_before = len(up.krea.received("GET", "/jobs/"))

    up.krea.hold_at = None
    up.krea.steps_to_complete = 1  # Krea has finished meanwhile
    async with gateway(redis_url, storage_dir, **settings) as second:
        done = await second.wait(key, job_id, timeout=20)
        assert done["status"] == "completed", done["error"]
        meta = done["metadata"]
        assert meta["backend"] == "krea"
        assert meta["upstreamId"] == krea_id
        assert meta["sent"] == up.krea.jobs[krea_id].body
        assert up.krea.submissions == 1  # polled, never submitted again
        assert len(up.krea.received("GET", "/jobs/")) > polls_before
        assert await image_size(second, done["url"]) == (768, 512)
        assert await credits(second, key) == 1000 - done["creditCost"]  # charged once


async def test_a_job_taken_after_its_deadline_fails_refunded_without_being_sent(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """A backlog, or a waiter promoted after its leader ran out of time: a job whose
    GATEWAY_JOB_DEADLINE_SECONDS are up when a worker takes it is not paid for upstream
    only to be given up on at once."""
    clock = Clock()
    settings = {**up.settings, "job_deadline_seconds": 60}
    async with gateway(redis_url, storage_dir, clock, inprocess_workers=False, **settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, provider="flux-dev", width=512, height=512)
    clock.advance(61)  # no worker ran meanwhile
    async with gateway(redis_url, storage_dir, clock, **settings) as gw:
        done = await gw.wait(key, job_id)
        assert done["status"] == "failed" and "time ran out" in done["error"]
        assert up.krea.submissions == 0
        assert await credits(gw, key) == 1000


async def test_a_running_jobs_slot_that_lapsed_is_taken_again_by_its_worker(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Renewals stopped for longer than a lease (Redis away, say) and an admission
    dropped the running job's slot meanwhile: the next renewal takes it again, so the
    plan's concurrency holds again until the job ends (it was lost for good)."""
    settings = {**up.settings, "job_lease_seconds": 0.6}
    up.krea.hold_at = "processing"
    async with gateway(redis_url, storage_dir, **settings) as gw:
        key = await gw.key("free", credits=1000)  # one job at a time
        account = gw.keys[key]["id"]
        running = await submit(gw, key, provider="flux-dev", width=512, height=512)
        await until(lambda: up.krea.submissions, what="the job to be sent to Krea", timeout=10.0)
        redis = gw.accounts.redis
        await redis.zadd(keys.running(account), {running: 1})  # its lease ran out
        lapsed = await submit(gw, key, provider="flux-dev", width=512, height=512)
        cancel = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
        assert (await gw.gql(cancel, {"id": lapsed}, key)).status_code == 200

        async def slot() -> Any:
            return await redis.zscore(keys.running(account), running)

        assert (
            await until(slot, what="the running job's slot taken again", timeout=10.0)
            > gw.clock() * 1000
        )
        refused = await gw.generate(key, "another", provider="flux-dev", width=512, height=512)
        assert refused.status_code == 429, refused.text
        assert refused.json()["errors"][0]["extensions"]["limit"] == "concurrency"
        assert (await gw.job(key, running))["status"] == "processing"


async def test_a_stored_upstream_id_is_polled_by_a_fresh_worker(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """The same guarantee without a takeover: a queued job whose upstream id is stored."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False, **up.settings) as gw:
        key = await gw.key()
        job_id = await submit(gw, key, provider="flux-dev", width=512, height=640)
        # A Krea job made outside the gateway, as a worker that died would have left it.
        r = await gw.http.post(
            up.settings["krea_api_base"] + "/generate/image/bfl/flux-1-dev",
            headers={"Authorization": "Bearer test-token"},
            json={"prompt": "a red fox in the snow", "width": 512, "height": 640},
        )
        assert r.status_code == 200, r.text
        krea_id = r.json()["job_id"]
        upstream = {"backend": "krea", "id": krea_id, "sent": {"prompt": "a red fox"}}
        await change(gw.accounts.redis, job_key(gw, key, job_id), upstream=upstream)
        assert (await gw.job(key, job_id))["status"] == "queued"
    assert up.krea.submissions == 1

    async with gateway(redis_url, storage_dir, **up.settings) as gw2:
        done = await gw2.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "krea"
        assert done["metadata"]["upstreamId"] == krea_id
        assert up.krea.submissions == 1
        assert await image_size(gw2, done["url"]) == (512, 640)


# -- 6. Krea's lifecycle ------------------------------------------------------------------


async def test_krea_lifecycle_statuses_show_as_progress_until_completed(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.hold_at = "sampling"
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        job_id = await submit(gw, key, provider="flux-dev", width=768, height=512)

        async def sampling() -> dict[str, Any] | None:
            job = await gw.job(key, job_id)
            assert job is not None and job["status"] in ("queued", "processing"), job
            meta = job["metadata"] or {}
            return job if meta.get("upstreamStatus") == "sampling" else None

        running = await until(sampling, what="upstreamStatus sampling", timeout=10.0)
        assert running["status"] == "processing"
        (krea_id,) = up.krea.jobs
        assert up.krea.jobs[krea_id].status == "sampling"

        up.krea.hold_at = None
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        meta = done["metadata"]
        assert meta["backend"] == "krea"
        assert meta["upstreamId"] == krea_id
        assert meta["sent"] == up.krea.jobs[krea_id].body
        assert meta["sent"]["width"] == 768 and meta["sent"]["height"] == 512
        # Every documented status was polled through, in order, to the end.
        assert up.krea.jobs[krea_id].status == "completed"
        assert up.krea.jobs[krea_id].polls == len(LIFECYCLE)
        assert await image_size(gw, done["url"]) == (768, 512)


# -- 7. Krea calls back -------------------------------------------------------------------


async def test_krea_calls_back_and_the_job_is_read_once_instead_of_polled(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.job_seconds = 1.0  # jobs end by time; the harness polls every 0.02 s
    async with gateway(redis_url, storage_dir, public=True, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, provider="flux-dev", width=768, height=512))
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "krea"
        (submitted,) = up.krea.received("POST", "/generate/")
        hook = submitted.headers["x-webhook-url"]
        assert hook.startswith(gw.base + "/v1/callbacks/krea/")
        assert [url for url, _ in up.krea.webhooks_sent] == [hook]
        (job,) = up.krea.jobs.values()
        # The callback's token is a capability: never shown, only Krea's own job id.
        assert done["metadata"]["upstreamId"] == job.job_id
        assert hook.rsplit("/", 1)[1] not in json.dumps(done)
        # Woken by the callback, then one authenticated read: not fifty polls.
        assert job.polls == 1
        assert await image_size(gw, done["url"]) == (768, 512)

    # The same job without a public URL is polled at the pace.
    up.krea.jobs.clear()
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, provider="flux-dev"))
        assert done["status"] == "completed", done["error"]
        (job,) = up.krea.jobs.values()
        assert job.polls > 5


async def test_two_krea_images_wait_for_both_callbacks(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.job_seconds = 1.0
    up.krea.job_delays = [0.2, 1.2]  # the second image is done a second after the first
    async with gateway(redis_url, storage_dir, public=True, **up.settings) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, provider="flux-dev", numImages=2))
        assert done["status"] == "completed", done["error"]
        assert len(done["urls"]) == 2
        assert len(up.krea.webhooks_sent) == 2
        # Each callback, one read of both jobs: not a poll every 0.02 s after the first.
        assert [job.polls for job in up.krea.jobs.values()] == [2, 2]


@pytest.mark.parametrize(
    ("job_seconds", "polls"),
    # Fallback polls 1, 2, 4 s apart (each wait twice the last): a 0.2-second job is read
    # once, a second after its submission; a 5-second one three times (at ~1, ~3 and
    # ~7 s), not five, and a long one never at its provider's pace.
    [(0.2, 1), (5.0, 3)],
)
async def test_a_lost_krea_callback_costs_slower_polls_not_the_job(
    up: Upstreams, redis_url: str, storage_dir: Path, job_seconds: float, polls: int
) -> None:
    up.krea.job_seconds = job_seconds
    up.krea.drop_webhooks = True
    async with gateway(
        redis_url, storage_dir, public=True, callback_fallback_seconds=1.0, **up.settings
    ) as gw:
        key = await gw.key()
        done = await gw.wait(key, await submit(gw, key, provider="flux-dev"))
        assert done["status"] == "completed", done["error"]
        (job,) = up.krea.jobs.values()
        assert job.polls == polls


async def test_a_job_waiting_for_its_callback_is_cancelled_at_once(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Such a job sleeps until its callback or its fallback poll (30 s here): the
    worker's cancellation watch wakes it, so a cancel ends it within about a second."""
    up.krea.job_seconds = 120.0
    async with gateway(redis_url, storage_dir, public=True, **up.settings) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, provider="flux-dev")
        upstream = gw.app.state.gateway.router.upstream
        await until(lambda: upstream.waiters, what="the job to wait for its callback", timeout=10.0)
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status } }", {"id": job_id}, key
        )
        assert r.json()["data"]["cancelJob"]["status"] == "cancelled", r.text
        await until(lambda: not upstream.waiters, what="the wait to end", timeout=5)
        (job,) = up.krea.jobs.values()
        assert job.polls == 0  # never woken to poll while it waited


async def test_a_polled_job_is_cancelled_at_once_between_slow_polls(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Polled every 30 s here: between two polls the job sleeps in the wait's sweep, and
    the worker's cancellation watch wakes it there, as it does one awaiting a callback."""
    up.krea.job_seconds = 120.0
    async with gateway(redis_url, storage_dir, **{**up.settings, "poll_interval": 30.0}) as gw:
        key = await gw.key(credits=1000)
        job_id = await submit(gw, key, provider="flux-dev")
        upstream = gw.app.state.gateway.router.upstream
        (job,) = await until(
            lambda: list(up.krea.jobs.values()), what="the submission", timeout=10.0
        )
        await until(
            lambda: job.polls == 1 and upstream._heap,
            what="the job asleep after a poll",
            timeout=10.0,
        )
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status } }", {"id": job_id}, key
        )
        assert r.json()["data"]["cancelJob"]["status"] == "cancelled", r.text
        await until(lambda: not upstream.waiters, what="the wait to end", timeout=5)
        assert job.polls == 1  # not polled again: woken, it saw the cancellation


async def test_a_burst_of_completions_stores_a_few_images_at_a_time(
    up: Upstreams, redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Thousands of callbacks may come in a few seconds: the jobs then download and
    store their images `STORING_AT_ONCE` at a time (2 here), the others waiting their
    turn rather than holding every image at once."""
    monkeypatch.setattr(worker_module, "STORING_AT_ONCE", 2)
    arrived = storing = most = 0
    release = asyncio.Event()
    store_output, store_one = Worker._store_output, Worker._store_one

    async def arriving(self: Worker, *args: Any) -> Any:
        nonlocal arrived
        arrived += 1
        return await store_output(self, *args)

    async def stored(self: Worker, *args: Any) -> Any:
        nonlocal storing, most
        storing += 1
        most = max(most, storing)
        try:
            await release.wait()  # held until every job is queued behind the first two
            return await store_one(self, *args)
        finally:
            storing -= 1

    monkeypatch.setattr(Worker, "_store_output", arriving)
    monkeypatch.setattr(Worker, "_store_one", stored)
    up.krea.job_seconds = 0.1
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=1000)
        ids = [await submit(gw, key, provider="flux-dev") for _ in range(6)]
        await until(
            lambda: arrived == 6, what="every job done upstream, storing its image", timeout=10.0
        )
        assert (storing, most) == (2, 2)
        release.set()
        for job_id in ids:
            done = await gw.wait(key, job_id)
            assert done["status"] == "completed", done["error"]
        assert most == 2


async def test_a_forged_krea_callback_completes_nothing(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.job_seconds = 1.5
    async with gateway(redis_url, storage_dir, public=True, **up.settings) as gw:
        key = await gw.key()
        job_id = await submit(gw, key, provider="flux-dev")
        (submitted,) = await until(
            lambda: up.krea.received("POST", "/generate/"), what="the submission", timeout=10.0
        )
        hook = submitted.headers["x-webhook-url"]
        unknown = await gw.http.post("/v1/callbacks/krea/" + "A" * 32, json={})
        assert unknown.status_code == 404
        # Somebody who learnt the real URL claims the job is done, with their image.
        (job,) = up.krea.jobs.values()
        forged = {
            "job_id": job.job_id,
            "status": "completed",
            "created_at": job.created_at,
            "completed_at": job.created_at,
            "result": {"urls": ["http://127.0.0.1:9/evil.png"]},
        }
        assert (await gw.http.post(hook, json=forged)).status_code == 200
        # The gateway reads the job from Krea with its token: still processing.
        await until(lambda: job.polls >= 1, what="a poll after the forged callback", timeout=10.0)
        assert (await gw.job(key, job_id))["status"] in ("queued", "processing")
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        assert await image_size(gw, done["url"]) == (1024, 1024)  # Krea's, not theirs


async def test_a_status_endpoint_in_trouble_is_polled_again_not_paid_twice(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Krea has our job and its status polls fail for a while (5xx): the job is polled
    again until Krea answers, never submitted to the next backend meanwhile (which
    would pay twice); it completes on Krea."""
    up.krea.hold_at = "processing"
    routes = {"flux-dev": ["krea", "segmind"]}
    async with gateway(redis_url, storage_dir, routes=routes, **up.settings) as gw:
        key = await gw.key()
        job_id = await submit(gw, key, provider="flux-dev", width=512, height=512)
        await until(lambda: up.krea.jobs, what="the job on Krea", timeout=10.0)
        failures = 24  # a dozen polls or more, each retried once or twice
        up.krea.fail_next(failures, 503)
        await until(lambda: not up.krea._fail, what="every failing poll", timeout=60)
        up.krea.hold_at = None
        up.krea.steps_to_complete = 1
        done = await gw.wait(key, job_id, timeout=30)
        assert done["status"] == "completed", done["error"]
        assert done["metadata"]["backend"] == "krea"
        assert (up.krea.submissions, up.segmind.submissions) == (1, 0)
