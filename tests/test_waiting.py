"""Answers that wait for their job (docs/api.md#waiting): `Prefer: wait` on REST, and the
one pub/sub connection every waiting request of a process shares (`gateway/job_watch.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from segmind import SegmindClient

from gateway.config import DEFAULT_ROUTES
from gateway.rest import prefer_wait
from gateway.store import keys
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.harness import Harness, gateway, until
from tests.servers import serve

BODY = {"service": "local", "prompt": "a lighthouse", "width": 512, "height": 512}


def test_prefer_wait_is_read_as_rfc_7240_says() -> None:
    assert prefer_wait(None) is None
    assert prefer_wait("wait=5") == 5
    assert prefer_wait("respond-async, wait=10") == 10
    assert prefer_wait("wait") == 60
    assert prefer_wait("wait=600") == 60
    assert prefer_wait('wait="2.5"') == 2.5
    assert prefer_wait("wait=soon") is None
    assert prefer_wait("wait=-1") is None
    assert prefer_wait("wait=nan") is None
    assert prefer_wait("handling=lenient") is None


async def test_prefer_wait_answers_when_the_job_ends_or_the_time_is_up(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        headers = {"X-API-Key": key, "Prefer": "wait=30"}
        r = await gw.http.post("/v1/text_to_image", json=BODY, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "completed" and r.json()["url"]
        assert r.headers["Preference-Applied"] == "wait=30"
        assert (await gw.http.get(r.json()["url"])).status_code == 200
        r = await gw.http.post("/v1/text_to_image", json=BODY, headers={"X-API-Key": key})
        assert r.status_code == 202 and "Preference-Applied" not in r.headers
        # Preferences in several fields are one list (RFC 7240 §2).
        fields = [("X-API-Key", key), ("Prefer", "respond-async"), ("Prefer", "wait=30")]
        r = await gw.http.post("/v1/text_to_image", json={**BODY, "seed": 5}, headers=fields)
        assert r.status_code == 200 and r.headers["Preference-Applied"] == "wait=30"
        r = await gw.http.post(
            "/v1/text_to_image", json=BODY, headers={"X-API-Key": key, "Prefer": "wait=x"}
        )
        assert r.status_code == 202  # a preference it cannot read is ignored

    # No worker: the time runs out, the job goes on.
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        started = time.monotonic()
        r = await gw.http.post(
            "/v1/text_to_image", json=BODY, headers={"X-API-Key": key, "Prefer": "wait=0.5"}
        )
        assert r.status_code == 202 and r.json()["status"] == "queued"
        assert time.monotonic() - started >= 0.5
        assert r.headers["Preference-Applied"] == "wait=0.5"


async def pubsub_clients(redis: Redis) -> int:
    return len(await redis.client_list(_type="pubsub"))


async def test_two_hundred_waiting_requests_share_one_redis_connection(
    redis_url: str, storage_dir: Path
) -> None:
    """They wait on jobs no worker runs yet; then workers start and every answer comes."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(plan="enterprise", credits=100_000)
        redis = gw.accounts.redis
        before = await pubsub_clients(redis)
        headers = {"X-API-Key": key, "Prefer": "wait=60"}
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(base_url=gw.base, timeout=90, limits=limits) as client:
            waiting = [
                asyncio.create_task(
                    client.post("/v1/text_to_image", json={**BODY, "seed": i}, headers=headers)
                )
                for i in range(200)
            ]
            watch = gw.app.state.gateway.watch
            while len(watch.waiting) < 200:  # every request admitted and waiting
                assert not any(t.done() for t in waiting), [t.result() for t in waiting if t.done()]
                await asyncio.sleep(0.02)
            assert await pubsub_clients(redis) - before <= 1
            async with gateway(redis_url, storage_dir) as workers:  # its workers run them
                answers = await asyncio.wait_for(asyncio.gather(*waiting), 90)
                assert workers.base
        assert [r.status_code for r in answers] == [200] * 200
        assert {r.json()["status"] for r in answers} == {"completed"}
        assert watch.waiting == {}  # every waiter gone, every channel unsubscribed


async def test_a_client_that_leaves_before_its_job_starts_is_not_charged_for_it(
    redis_url: str, storage_dir: Path
) -> None:
    """A client whose own timeout ends the wait first (the flux-krea guide's and Segmind's
    clients wait 30 s) never learnt the job's id: a job it left before it started is
    cancelled and refunded, on every route that answers when a job ends. (OpenAI's SDK,
    which says its timeout, is answered 504 just before it: test_openai_api.py.)"""
    routes = {**DEFAULT_ROUTES, "flux-krea": ["local"]}
    async with gateway(redis_url, storage_dir, inprocess_workers=False, routes=routes) as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]

        async with httpx.AsyncClient(base_url=gw.base, timeout=0.5) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post(
                    "/v1/text_to_image", json=BODY, headers={"X-API-Key": key, "Prefer": "wait=60"}
                )
            with pytest.raises(httpx.TimeoutException):
                await http.post(
                    "/compat/fluxkrea/v1/generate",
                    json={"prompt": "a lighthouse", "width": 512, "height": 512},
                    headers={"Authorization": f"Bearer {key}"},
                )
        segmind = SegmindClient(api_key=key, base_url=f"{gw.base}/compat/segmind/v1", timeout=0.5)
        try:
            with pytest.raises(httpx.TimeoutException):
                await asyncio.to_thread(segmind.run_sync, "flux-krea-dev", prompt="a lighthouse")
        finally:
            segmind._client.close()

        async def statuses() -> list[str]:
            jobs = await gw.gql("{ jobs(first: 20) { nodes { status } } }", key=key)
            return [n["status"] for n in jobs.json()["data"]["jobs"]["nodes"]]

        deadline = time.monotonic() + 20
        while (await statuses()).count("cancelled") < 3:  # REST, flux-krea, Segmind
            assert time.monotonic() < deadline, await statuses()
            await asyncio.sleep(0.05)
        assert await statuses() == ["cancelled"] * 3
        assert (await gw.accounts.get(account)).credits == 1000


async def test_a_worker_that_starts_the_job_as_its_client_leaves_keeps_it(
    redis_url: str, storage_dir: Path
) -> None:
    """The cancel of a job its client left reads it queued, then ends it. A worker that
    takes it in between (its upstream may be paid by then) wins: the job runs on,
    charged, and no waiter is let in on its place."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=1000)
        r = await gw.http.post("/v1/text_to_image", json=BODY, headers={"X-API-Key": key})
        job_id = r.json()["id"]
        gateway_: Any = gw.app.state.gateway
        store = gateway_.store
        real_finish = store.finish

        async def worker_starts_first(job: Any, *args: Any, **kwargs: Any) -> bool:
            # The race's other side, for real: a worker's start script, between the read
            # and the end.
            assert await store.start(keys.job(job.account, job.id), int(gw.clock() * 1000), 60_000)
            return bool(await real_finish(job, *args, **kwargs))

        store.finish = worker_starts_first
        principal = await gateway_.authenticate(key)
        job = await gateway_.cancel(principal, job_id, unstarted=True)
        store.finish = real_finish
        assert job.status == "processing" and job.cost == 10
        assert (await gw.job(key, job_id) or {})["status"] == "processing"
        assert (await gw.accounts.get(principal.account)).credits == 990


async def test_a_job_already_started_or_claimable_goes_on_when_its_client_leaves(
    redis_url: str, storage_dir: Path
) -> None:
    """A started job is paid for upstream: it goes on, and ends charged. One the client
    can claim again (an idempotency key, which the same request sent again finds) goes
    on even before it starts."""
    path, body, extra = SENT_AGAIN["REST, Prefer: wait"]
    async with slow_flux_krea(redis_url, storage_dir, 1.5) as (gw, flux):
        key = await gw.key(credits=1000)
        async with httpx.AsyncClient(base_url=gw.base, timeout=60) as http:
            await leave(gw, flux, http, path, body, {"X-API-Key": key, **extra})
        jobs = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
        [job] = jobs.json()["data"]["jobs"]["nodes"]
        done = await gw.wait(key, job["id"])
        assert done["status"] == "completed" and done["creditCost"] == 10

    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=1000)
        headers = {"X-API-Key": key, "Prefer": "wait=60", "Idempotency-Key": "order-7"}
        async with httpx.AsyncClient(base_url=gw.base, timeout=0.5) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post("/v1/text_to_image", json=BODY, headers=headers)
        again = await gw.http.post(
            "/v1/text_to_image", json=BODY, headers={**headers, "Prefer": "wait=0.2"}
        )
        assert again.status_code == 202 and again.json()["status"] == "queued"
        jobs = (await gw.gql("{ jobs(first: 5) { nodes { id status } } }", key=key)).json()
        assert jobs["data"]["jobs"]["nodes"] == [{"id": again.json()["id"], "status": "queued"}]
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 990


#: the same request on each route that answers when its job ends, and how it names the job
SENT_AGAIN = {
    "REST, Prefer: wait": (
        "/v1/text_to_image",
        {"service": "flux-krea", "prompt": "a kite", "width": 512, "height": 512},
        {"Prefer": "wait=60"},
    ),
    "OpenAI": ("/v1/images/generations", {"prompt": "a kite", "size": "512x512"}, {}),
    "flux-krea": ("/compat/fluxkrea/v1/generate", {"prompt": "a kite", "width": 512}, {}),
    "Segmind": ("/compat/segmind/v1/flux-krea-dev", {"prompt": "a kite", "width": 512}, {}),
}


@contextlib.asynccontextmanager
async def slow_flux_krea(
    redis_url: str, storage_dir: Path, delay: float, **overrides: Any
) -> AsyncIterator[tuple[Harness, FluxKreaEmulator]]:
    """A gateway whose `flux-krea` service's images take `delay` s at flux-krea's."""
    flux = FluxKreaEmulator(api_key="test-key")
    flux.delay = delay
    async with serve(flux.app) as upstream:
        settings = {"fluxkrea_api_base": f"{upstream}/v1", "fluxkrea_api_key": "test-key"}
        settings.update(overrides)
        async with gateway(redis_url, storage_dir, **settings) as gw:
            yield gw, flux


async def left(gw: Harness) -> list[str]:
    """The jobs waiting clients left, for the same request sent again (`keys.left`)."""
    return [k async for k in gw.accounts.redis.scan_iter(match="*:left:*")]


async def leave(
    gw: Harness,
    flux: FluxKreaEmulator,
    http: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
) -> None:
    """Send a request and leave once its job is submitted upstream (started, and paid),
    as a client whose own timeout ran out does; return once the gateway noted it."""
    submitted = flux.submissions
    leaving = asyncio.create_task(http.post(path, json=body, headers=headers))
    await until(lambda: flux.submissions > submitted or leaving.done())
    assert not leaving.done()
    leaving.cancel()
    await until(lambda: left(gw))


@pytest.mark.parametrize("route", SENT_AGAIN)
async def test_a_request_sent_again_after_its_client_left_joins_its_job(
    redis_url: str, storage_dir: Path, route: str
) -> None:
    """A client whose own timeout ran out while its job ran upstream (the flux-krea
    guide's client waits 30 s, then sends the request again, up to three times) never
    learnt the job's id. The same request sent again by the same key, while the job
    still runs, joins it: one upstream generation, charged once, its image in the
    answer. Once answered, the same request is a new job again; another key's never
    joins it."""
    path, body, extra = SENT_AGAIN[route]
    async with slow_flux_krea(redis_url, storage_dir, 1.0) as (gw, flux):
        key, other = await gw.key(credits=1000), await gw.key(credits=1000)
        headers = {"Authorization": f"Bearer {key}", "X-API-Key": key, **extra}

        def job_id(r: httpx.Response) -> str:
            return r.headers.get("x-gateway-job-id") or r.json()["id"]

        async def credits() -> int:
            return (await gw.accounts.get(gw.keys[key]["id"])).credits

        async with httpx.AsyncClient(base_url=gw.base, timeout=60) as http:
            await leave(gw, flux, http, path, body, headers)
            paid = await credits()
            assert paid < 1000
            jobs = await gw.gql("{ jobs(first: 5) { nodes { id status } } }", key=key)
            [job] = jobs.json()["data"]["jobs"]["nodes"]
            assert job["status"] == "processing"  # still running upstream

            again = await http.post(path, json=body, headers=headers)
            assert again.status_code == 200, again.text
            assert job_id(again) == job["id"]
            assert (await gw.job(key, job["id"]) or {})["status"] == "completed"
            assert flux.submissions == 1 and await credits() == paid
            assert await left(gw) == []  # used up

            theirs = {"Authorization": f"Bearer {other}", "X-API-Key": other, **extra}
            not_theirs = await http.post(path, json=body, headers=theirs)
            assert not_theirs.status_code == 200 and flux.submissions == 2

            anew = await http.post(path, json=body, headers=headers)
            assert anew.status_code == 200 and job_id(anew) != job["id"]
            assert flux.submissions == 3 and await credits() < paid


async def test_a_request_rejoining_its_job_is_not_refused_by_the_read_limit(
    redis_url: str, storage_dir: Path
) -> None:
    """A request sent again to rejoin the job it left is the same client's retry, not a
    read: refused, the SDK's next retry would be a new job, charged again."""
    path, body, extra = SENT_AGAIN["OpenAI"]
    limited = {"read_rpm": 1, "read_rpm_per_job": 0}
    async with slow_flux_krea(redis_url, storage_dir, 1.0, **limited) as (gw, flux):
        gw.clock.advance(61 - gw.clock() % 60)  # 1 s into a minute: none rolls over
        key = await gw.key(credits=1000, rpm=1)  # one generation and one read a minute
        headers = {"Authorization": f"Bearer {key}", **extra}
        async with httpx.AsyncClient(base_url=gw.base, timeout=60) as http:
            await leave(gw, flux, http, path, body, headers)
            jobs = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
            [job] = jobs.json()["data"]["jobs"]["nodes"]  # the minute's one read
            again = await http.post(path, json=body, headers=headers)
            assert again.status_code == 200, again.text
            assert again.headers["x-gateway-job-id"] == job["id"]
            assert flux.submissions == 1


async def test_a_request_sent_again_after_its_left_job_was_cancelled_is_a_new_job(
    redis_url: str, storage_dir: Path
) -> None:
    """A job its client left that ended without an image (cancelled here, or failed) is
    not joined: the request sent again is a new job, and gets its image."""
    path, body, extra = SENT_AGAIN["REST, Prefer: wait"]
    async with slow_flux_krea(redis_url, storage_dir, 1.0) as (gw, flux):
        key = await gw.key(credits=1000)
        headers = {"X-API-Key": key, **extra}
        async with httpx.AsyncClient(base_url=gw.base, timeout=60) as http:
            await leave(gw, flux, http, path, body, headers)
            jobs = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
            [job] = jobs.json()["data"]["jobs"]["nodes"]
            cancelled = await http.post(f"/v1/jobs/{job['id']}/cancel", headers=headers)
            assert cancelled.json()["status"] == "cancelled"
            again = await http.post(path, json=body, headers=headers)
            assert again.status_code == 200 and again.json()["id"] != job["id"]
            assert again.json()["status"] == "completed"
            assert flux.submissions == 2 and await left(gw) == []  # one new job, noted none


@pytest.mark.parametrize("route", SENT_AGAIN)
async def test_a_request_sent_again_after_its_wait_ran_out_joins_its_job_unless_it_had_the_id(
    redis_url: str, storage_dir: Path, route: str
) -> None:
    """A route that answers an error when its wait runs out (504: OpenAI's, flux-krea's,
    Segmind's) has clients and wrappers that retry it: the same request sent again joins
    the job still running, charged once. REST's 202 gives the job's id, so its client
    has the job: the same request again is another one. (Sent again once the job is done,
    as a retry after a backoff is: the route's wait here is too short to outlast it.)"""
    path, body, extra = SENT_AGAIN[route]
    out = {"Prefer": "wait=0.3"} if route.startswith("REST") else {}
    async with slow_flux_krea(redis_url, storage_dir, 1.5, sync_wait_seconds=0.3) as (gw, flux):
        key = await gw.key(credits=1000)
        headers = {"Authorization": f"Bearer {key}", "X-API-Key": key, **extra}
        async with httpx.AsyncClient(base_url=gw.base, timeout=60) as http:
            first = await http.post(path, json=body, headers={**headers, **out})
            assert first.status_code == (202 if out else 504), first.text
            paid = (await gw.accounts.get(gw.keys[key]["id"])).credits
            assert paid < 1000
            jobs = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
            [job] = jobs.json()["data"]["jobs"]["nodes"]
            assert (first.headers.get("x-gateway-job-id") or first.json()["id"]) == job["id"]

            await gw.wait(key, job["id"])  # a retry after a backoff finds it done
            again = await http.post(path, json=body, headers=headers)
            joined = again.headers.get("x-gateway-job-id") == job["id"] or (
                out and again.json()["id"] == job["id"]
            )
            if out:  # a second picture, as asked
                assert again.json()["status"] in ("queued", "processing", "completed")
                assert not joined and flux.submissions == 2
            else:
                assert again.status_code == 200, again.text
                assert joined and flux.submissions == 1
                assert (await gw.accounts.get(gw.keys[key]["id"])).credits == paid
