"""Credits: exact under concurrency, refunded in full when a job fails."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.store import keys
from tests.conftest import RedisServer
from tests.harness import gateway, replies_cut
from tests.records import record


async def test_fifty_racing_requests_for_the_last_credits(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        # Enough for exactly five 1024x1024 images (20 each); no limit but credits.
        key = await gw.key("enterprise", credits=100)
        replies = await asyncio.gather(
            *(gw.generate(key, f"race {i}", width=1024, height=1024) for i in range(50))
        )
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) == 5
        assert statuses.count(402) == 45
        refused = next(r for r in replies if r.status_code == 402).json()["errors"][0]
        assert refused["extensions"]["code"] == "INSUFFICIENT_CREDITS"
        assert refused["extensions"]["creditsRequired"] == 20
        me = (await gw.gql("{ me { credits limits { name used } } }", key=key)).json()
        assert me["data"]["me"]["credits"] == 0
        # Refused requests counted nothing.
        assert {"name": "minute", "used": 5} in me["data"]["me"]["limits"]
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert sum(int(e["delta"]) for e in ledger) == 0
        assert [e["reason"] for e in ledger].count("charge") == 5


async def test_a_failed_job_is_refunded_exactly_once(redis_url: str, storage_dir: Path) -> None:
    # flux-krea routed to a backend that cannot be reached: every attempt fails.
    async with gateway(
        redis_url,
        storage_dir,
        fluxkrea_api_key="k",
        fluxkrea_api_base="http://127.0.0.1:9/v1",
        routes={"flux-krea": ["fluxkrea"]},
    ) as gw:
        key = await gw.key(credits=50)
        job = (await gw.generate(key, provider="flux-krea", width=512, height=512)).json()
        job = job["data"]["generate"]
        assert job["creditCost"] == 10
        done = await gw.wait(key, job["id"])
        assert done["status"] == "failed"
        assert "fluxkrea" in done["error"] and "unreachable" in done["error"]
        assert done["creditCost"] == 0
        me = (await gw.gql("{ me { credits limits { name used } } }", key=key)).json()
        assert me["data"]["me"]["credits"] == 50
        assert {"name": "concurrency", "used": 0} in me["data"]["me"]["limits"]
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert [(e["reason"], int(e["delta"])) for e in ledger] == [
            ("initial", 50),
            ("charge", -10),
            ("refund", 10),
        ]
        # Cancelling the failed job afterwards refunds nothing more.
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status } }", {"id": job["id"]}, key
        )
        assert r.json()["data"]["cancelJob"]["status"] == "failed"
        assert len(await gw.accounts.ledger(gw.keys[key]["id"])) == 3


async def test_an_admission_whose_reply_is_lost_is_charged_once(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """The connection drops after Redis ran the admission, before its reply arrived:
    redis-py sends the command again on a new connection. The job is the same one and
    it is charged once (admit.lua recognises its own job id)."""
    async with replies_cut(plain_redis_server.port, "admit", storage_dir) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        account = gw.keys[key]["id"]
        cutter.armed = True
        r = await gw.generate(key, width=1024, height=1024)
        assert cutter.cut == 1
        assert r.status_code == 200, r.text
        job = r.json()["data"]["generate"]
        assert job["status"] == "queued" and job["creditCost"] == 20
        store = gw.accounts.redis
        assert await store.zrange(keys.jobs(account), 0, -1) == [job["id"]]
        assert int(await store.hget(keys.account(account), "credits")) == 80
        ledger = await gw.accounts.ledger(account)
        assert [e["reason"] for e in ledger].count("charge") == 1
        me = (await gw.gql("{ me { limits { name used } } }", key=key)).json()
        assert {"name": "minute", "used": 1} in me["data"]["me"]["limits"]
        assert {"name": "day", "used": 1} in me["data"]["me"]["limits"]


async def test_an_admission_whose_reply_is_lost_as_redis_restarts_is_answered_with_its_job(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """Redis runs the admission, then goes away before replying and refuses connections
    for a second (a restart): the request is not answered 503 over a job it was charged
    for (whose client would send it again, as a second job); it is sent again until Redis
    is back, and answered with that one job."""
    async with replies_cut(plain_redis_server.port, "admit", storage_dir) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        account = gw.keys[key]["id"]
        cutter.armed, cutter.down_after_cut = True, 1.0
        r = await gw.generate(key, width=1024, height=1024)
        assert cutter.cut == 1
        assert r.status_code == 200, r.text
        job = r.json()["data"]["generate"]
        store = gw.accounts.redis
        assert await store.zrange(keys.jobs(account), 0, -1) == [job["id"]]
        assert int(await store.hget(keys.account(account), "credits")) == 80
        assert [e["reason"] for e in await gw.accounts.ledger(account)].count("charge") == 1


async def test_a_top_up_whose_reply_is_lost_is_applied_once(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """The same cut for an admin top-up: applied once, one ledger entry."""
    async with replies_cut(plain_redis_server.port, "credit", storage_dir) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        account = gw.keys[key]["id"]
        cutter.armed = True
        assert await gw.accounts.add_credits(account, 50) == 150
        assert cutter.cut == 1
        assert int(await gw.accounts.redis.hget(keys.account(account), "credits")) == 150
        ledger = await gw.accounts.ledger(account)
        assert [(e["reason"], e["delta"]) for e in ledger] == [("initial", "100"), ("topup", "50")]


async def test_a_promotion_whose_reply_is_lost_is_charged_once(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """The same cut for `promote.lua`: a job that waited for an identical one, promoted
    to run when that one was cancelled, is charged and queued once."""
    async with replies_cut(plain_redis_server.port, "promote", storage_dir) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        account = gw.keys[key]["id"]
        leader, follower = [
            (await gw.generate(key, "a lighthouse", width=1024, height=1024, seed=7)).json()[
                "data"
            ]["generate"]
            for _ in range(2)
        ]
        assert (leader["creditCost"], follower["creditCost"]) == (20, 0)
        cutter.armed = True
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status } }", {"id": leader["id"]}, key
        )
        assert r.json()["data"]["cancelJob"]["status"] == "cancelled"
        assert cutter.cut == 1
        store = gw.accounts.redis
        assert (await record(store, keys.job(account, follower["id"])))["cost"] == 20
        assert int(await store.hget(keys.account(account), "credits")) == 80
        ledger = await gw.accounts.ledger(account)
        assert [e["reason"] for e in ledger] == ["initial", "charge", "refund", "charge"]
        queued = [fields["job"] for _, fields in await store.xrange(keys.queue(0))]
        assert queued.count(keys.job(account, follower["id"])) == 1
