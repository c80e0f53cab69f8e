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

from gateway.rest import prefer_wait
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
        assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"  # where it will be
        polled = await gw.http.get(r.headers["Location"], headers={"X-API-Key": key})
        assert polled.status_code == 200 and polled.json()["id"] == r.json()["id"]
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


#: three requests, one a route, that each wait for their job; distinct, so that none
#: joins another's job or waits on it as an identical request would
LEAVING = {
    "REST": (
        "/v1/text_to_image",
        {"service": "flux-krea", "prompt": "a kite", "width": 512, "height": 512},
    ),
    "flux-krea": ("/compat/fluxkrea/v1/generate", {"prompt": "a lighthouse", "width": 512}),
}


async def gives_up(
    gw: Harness, path: str, body: dict[str, Any], headers: dict[str, str], seconds: float = 0.5
) -> None:
    """Send a request as a client whose own timeout of `seconds` runs out before its
    answer comes, and leaves."""
    async with httpx.AsyncClient(base_url=gw.base, timeout=seconds) as short:
        with pytest.raises(httpx.TimeoutException):
            await short.post(path, json=body, headers=headers)


async def leave_queued(gw: Harness, key: str, seconds: float = 0.5) -> None:
    """Leave a job on each route that answers when its job ends (REST's `Prefer: wait`,
    flux-krea's, Segmind's through its SDK), as clients whose own timeout of `seconds`
    runs out first do; return once the gateway noted all three."""
    headers = {"X-API-Key": key, "Authorization": f"Bearer {key}", "Prefer": "wait=60"}
    segmind = SegmindClient(api_key=key, base_url=f"{gw.base}/compat/segmind/v1", timeout=seconds)

    async def sdk() -> None:
        with pytest.raises(httpx.TimeoutException):
            await asyncio.to_thread(segmind.run_sync, "flux-krea-dev", prompt="a harbour")

    try:
        leaving = (gives_up(gw, *sent, headers, seconds) for sent in LEAVING.values())
        await asyncio.gather(sdk(), *leaving)
    finally:
        segmind._client.close()
    await until(lambda: noted(gw, 3), what="three jobs noted as left")


async def busy(
    gw: Harness, flux: FluxKreaEmulator, key: str, prompt: str
) -> asyncio.Task[httpx.Response]:
    """A `flux-krea` request of `key` waiting for its job, once its job is submitted
    upstream: a gateway with one worker (`workers=1`) is busy with it until it ends."""
    submitted = flux.submissions
    ahead = asyncio.create_task(
        gw.http.post(
            "/v1/text_to_image",
            json={**LEAVING["REST"][1], "prompt": prompt},
            headers={"X-API-Key": key, "Prefer": "wait=60"},
        )
    )
    await until(lambda: flux.submissions > submitted)
    return ahead


async def noted(gw: Harness, count: int) -> bool:
    return len(await left(gw)) == count


async def test_a_job_its_client_left_before_it_started_keeps_its_place_for_the_retry(
    redis_url: str, storage_dir: Path
) -> None:
    """A client whose own timeout ends the wait first (the flux-krea guide's and Segmind's
    clients wait 30 s; a proxy in front, nginx's 60 s) never learnt the job's id. A job
    it left queued behind others keeps its place: the same request sent again joins it,
    charged once (a new job would go to the back of the queue at every retry, and under
    a backlog never be served). One not asked for again is cancelled and refunded when a
    worker reaches it, on every route that answers when a job ends. (OpenAI's SDK, which
    says its timeout, is answered 504 just before it: test_openai_api.py.)"""
    async with slow_flux_krea(redis_url, storage_dir, 2.5, workers=1) as (gw, flux):
        other, key = await gw.key(), await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        ahead = await busy(gw, flux, other, "ahead")  # the one worker, for 2.5 s
        await leave_queued(gw, key)
        jobs = await gw.gql("{ jobs(first: 5) { nodes { status creditCost } } }", key=key)
        nodes = jobs.json()["data"]["jobs"]["nodes"]
        assert [n["status"] for n in nodes] == ["queued"] * 3
        charged = sum(n["creditCost"] for n in nodes)
        assert (await gw.accounts.get(account)).credits == 1000 - charged  # each still charged

        path, body = LEAVING["REST"]
        headers = {"X-API-Key": key, "Prefer": "wait=60"}
        again = await gw.http.post(path, json=body, headers=headers)
        assert again.status_code == 200 and again.json()["status"] == "completed", again.text
        assert (await ahead).json()["status"] == "completed"

        jobs = await gw.gql("{ jobs(first: 5) { nodes { id status } } }", key=key)
        nodes = jobs.json()["data"]["jobs"]["nodes"]
        assert len(nodes) == 3 and again.json()["id"] in {n["id"] for n in nodes}  # joined
        await until(
            lambda: _statuses(gw, key, ["cancelled", "cancelled", "completed"]),
            what="the two jobs not asked for again cancelled",
        )
        assert (await gw.accounts.get(account)).credits == 990
        assert flux.submissions == 2 and await noted(gw, 2)  # the joined one's used up


async def test_a_left_job_an_identical_request_waits_on_runs_for_it(
    redis_url: str, storage_dir: Path
) -> None:
    """Another key's identical request waits on a job (the cache's coalescing, docs/api.md
    #cache): one its own client left queued then runs for it when a worker reaches it,
    instead of being cancelled and the waiter queued again behind everyone. And a waiting
    job whose client left is not run, nor charged, in the place of a leader that ended
    without an image: it is cancelled then."""
    async with slow_flux_krea(redis_url, storage_dir, 2.0, workers=1) as (gw, flux):
        other, a, b = await gw.key(), await gw.key(credits=1000), await gw.key(credits=1000)
        path = "/v1/text_to_image"
        body = {"service": "flux-krea", "prompt": "a kite", "width": 512, "height": 512}

        async def leave_one(key: str, sent: dict[str, Any]) -> str:
            await gives_up(gw, path, sent, {"X-API-Key": key, "Prefer": "wait=60"})
            await until(lambda: noted(gw, len(noted_before) + 1))
            noted_before.append(key)
            jobs = await gw.gql("{ jobs(first: 1) { nodes { id } } }", key=key)
            return str(jobs.json()["data"]["jobs"]["nodes"][0]["id"])

        noted_before: list[str] = []
        ahead = await busy(gw, flux, other, "ahead")
        kite = {**body, "seed": 7}
        led = await leave_one(a, kite)  # left queued: marked
        waits = await gw.http.post(path, json=kite, headers={"X-API-Key": b})
        assert waits.json()["creditCost"] == 0  # waiting on the left one
        assert (await ahead).json()["status"] == "completed"
        assert (await gw.wait(a, led))["status"] == "completed"  # it ran: B waits on it
        assert (await gw.wait(b, waits.json()["id"]))["status"] == "completed"
        assert flux.submissions == 2  # ahead, and the kite once

        ahead = await busy(gw, flux, other, "ahead again")
        gull = {**body, "prompt": "a gull", "seed": 8}
        leader = await gw.http.post(path, json=gull, headers={"X-API-Key": other})
        waiter = await leave_one(b, gull)  # waiting on `leader`, and left
        before = len(await gw.accounts.ledger(gw.keys[b]["id"]))
        cancel = await gw.http.post(
            f"/v1/jobs/{leader.json()['id']}/cancel", headers={"X-API-Key": other}
        )
        assert cancel.json()["status"] == "cancelled"
        ended = await gw.wait(b, waiter)
        assert ended["status"] == "cancelled" and "left" in ended["error"]
        assert not ahead.done()  # at once: not run, nor queued, in the leader's place
        assert len(await gw.accounts.ledger(gw.keys[b]["id"])) == before  # never charged
        await ahead
        assert flux.submissions == 3


async def _statuses(gw: Harness, key: str, expected: list[str]) -> bool:
    jobs = await gw.gql("{ jobs(first: 20) { nodes { status } } }", key=key)
    return sorted(n["status"] for n in jobs.json()["data"]["jobs"]["nodes"]) == expected


async def test_a_request_back_for_its_job_as_a_worker_cancels_it_keeps_it(
    redis_url: str, storage_dir: Path
) -> None:
    """A worker reaching a job its client left reads it marked, then cancels it unless
    still marked. The same request sent back for it in between wins: the job runs,
    charged once, and the request gets its image."""
    async with slow_flux_krea(redis_url, storage_dir, 1.5, workers=1) as (gw, flux):
        other, key = await gw.key(), await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        ahead = await busy(gw, flux, other, "ahead")
        await leave_queued(gw, key)
        path, body = LEAVING["REST"]
        store: Any = gw.app.state.gateway.store
        real_finish = store.finish
        sent_again: list[httpx.Response] = []

        async def back_in_between(job: Any, *args: Any, **kwargs: Any) -> bool:
            # The race's other side, for real: the request sent again (answered 202 with
            # the job once its short wait runs out), between the worker's start and end.
            if kwargs.get("only_from") == "left" and job.params["prompt"] == body["prompt"]:
                headers = {"X-API-Key": key, "Prefer": "wait=0.1"}
                sent_again.append(await gw.http.post(path, json=body, headers=headers))
            return bool(await real_finish(job, *args, **kwargs))

        store.finish = back_in_between
        try:
            assert (await ahead).json()["status"] == "completed"
            [again] = await until(lambda: sent_again, what="the worker reaching the job")
        finally:
            store.finish = real_finish
        assert again.status_code == 202 and again.json()["status"] == "queued", again.text
        done = await gw.wait(key, again.json()["id"])
        assert done["status"] == "completed" and done["creditCost"] == 10
        await until(lambda: _statuses(gw, key, ["cancelled", "cancelled", "completed"]))
        assert (await gw.accounts.get(account)).credits == 990 and flux.submissions == 2


async def test_a_left_job_two_retries_joined_runs_while_one_of_them_is_still_there(
    redis_url: str, storage_dir: Path
) -> None:
    """Two retries of the same request can both join the job their client left (each
    admission reads the note before either uses it up). One leaving again leaves the job
    to the other: it runs when a worker reaches it, charged once, and the one still
    waiting gets its image; a job is cancelled only once every client has left it."""
    async with slow_flux_krea(redis_url, storage_dir, 1.5, workers=1) as (gw, flux):
        other, key = await gw.key(), await gw.key(credits=1000)
        ahead = await busy(gw, flux, other, "ahead")
        path, body = LEAVING["REST"]
        headers = {"X-API-Key": key, "Prefer": "wait=60"}
        await gives_up(gw, path, body, headers)
        [note] = await until(lambda: left(gw), what="the job noted as left")
        noted_as = await gw.accounts.redis.get(note)
        job_id = noted_as.split()[0]

        staying = asyncio.create_task(gw.http.post(path, json=body, headers=headers))
        await until(lambda: noted(gw, 0), what="the first retry joining (its note used up)")
        # The second retry's admission read the note as the first's did, at once.
        await gw.accounts.redis.set(note, noted_as, px=60_000)
        await gives_up(gw, path, body, headers)  # joins, and leaves again
        await until(lambda: noted(gw, 1), what="the second retry leaving again")

        assert (await ahead).json()["status"] == "completed"
        stayed = await staying
        assert stayed.status_code == 200 and stayed.json()["status"] == "completed", stayed.text
        assert stayed.json()["id"] == job_id
        assert await _statuses(gw, key, ["completed"])  # one job, charged once
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 990
        assert flux.submissions == 2


async def test_a_retry_of_a_504_that_leaves_before_the_job_started_leaves_it_cancelled(
    redis_url: str, storage_dir: Path
) -> None:
    """A wait that ran out (504) is not a client leaving: the job is kept for the retry,
    not counted as left. The retry joins it and then leaves too, its own timeout out
    first: nobody waits on the job now, and it is cancelled, refunded, when a worker
    reaches it (a retry's coming back is counted only against a leaving that was)."""
    async with slow_flux_krea(redis_url, storage_dir, 1.5, workers=1) as (gw, flux):
        other, key = await gw.key(), await gw.key(credits=1000)
        ahead = await busy(gw, flux, other, "ahead")
        path, body = "/v1/images/generations", {"model": "flux-krea", "prompt": "a lighthouse"}
        headers = {"Authorization": f"Bearer {key}"}
        # OpenAI's SDK says its timeout: the route answers 504 just before it.
        said = {**headers, "x-stainless-read-timeout": "1"}
        first = await gw.http.post(path, json=body, headers=said)
        assert first.status_code == 504, first.text
        job_id = first.headers["x-gateway-job-id"]
        await until(lambda: noted(gw, 1), what="the 504's job noted for its retry")
        await gives_up(gw, path, body, headers)  # the retry joins, then leaves
        await until(lambda: noted(gw, 1), what="the retry noted as left")
        assert (await ahead).json()["status"] == "completed"
        ended = await gw.wait(key, job_id)
        assert ended["status"] == "cancelled" and "left" in ended["error"], ended
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000
        assert flux.submissions == 1  # only the one ahead


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
        await gives_up(gw, "/v1/text_to_image", BODY, headers)
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
