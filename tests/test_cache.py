"""Result cache by parameter hash, and coalescing of identical requests in flight."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.store import keys
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import KreaEmulator
from tests.harness import GENERATE, Harness, gateway, until
from tests.servers import free_port, serve
from tests.test_durability import jobs_state

GATEWAY = str(Path(sys.executable).with_name("gateway"))


def krea_settings(base: str) -> dict[str, Any]:
    return {"krea_api_base": base, "krea_api_token": "test-token"}


async def gen(gw: Harness, key: str, **options: Any) -> dict[str, Any]:
    r = await gw.generate(
        key,
        options.pop("prompt", "a red kite over dunes"),
        provider=options.pop("provider", "flux-dev"),
        **options,
    )
    assert r.status_code == 200, r.text
    return dict(r.json()["data"]["generate"])


async def test_a_seeded_request_twice_costs_one_upstream_call(
    redis_url: str, storage_dir: Path
) -> None:
    emu = KreaEmulator(steps_to_complete=2)
    async with serve(emu.app) as krea, gateway(redis_url, storage_dir, **krea_settings(krea)) as gw:
        key, other = await gw.key(), await gw.key()
        first = await gen(gw, key, seed=42, width=1024, height=768)
        assert first["creditCost"] == 17
        done = await gw.wait(key, first["id"])
        assert done["metadata"]["cached"] is False

        # Another key with the same request: served from cache at once, for nothing.
        second = await gen(gw, other, seed=42, width=1024, height=768)
        assert second["status"] == "completed"
        assert second["creditCost"] == 0
        assert second["metadata"]["cached"] is True
        assert second["id"] != first["id"]
        assert emu.submissions == 1
        a = await gw.http.get(done["url"])
        b = await gw.http.get(second["url"])
        assert a.content == b.content and len(a.content) > 0

        # The same request spelled differently: other key order, defaults written out.
        variables = {
            "input": {
                "options": {
                    "cache": True,
                    "outputFormat": "png",
                    "numImages": 1,
                    "height": 768,
                    "seed": 42,
                    "width": 1024,
                },
                "input": {"text": "a red kite over dunes"},
                "provider": "flux-dev",
                "type": "IMAGE",
            }
        }
        r = await gw.gql(GENERATE, variables, other)
        assert r.json()["data"]["generate"]["metadata"]["cached"] is True

        # Anything that changes the picture misses.
        for change in (
            {"seed": 43},
            {"width": 768},
            {"prompt": "a blue kite"},
            {"steps": 10},
            {"outputFormat": "jpg"},
        ):
            options = {"seed": 42, "width": 1024, "height": 768, **change}
            missed = await gen(gw, other, **options)
            assert missed["status"] == "queued", change
            assert missed["creditCost"] > 0
            await gw.wait(other, missed["id"])
        assert emu.submissions == 6

        me = (
            await gw.gql("{ me { credits cache { hits misses creditsSaved } } }", key=other)
        ).json()["data"]["me"]
        assert me["cache"] == {"hits": 2, "misses": 5, "creditsSaved": 34}
        ledger = await gw.accounts.ledger(gw.keys[other]["id"])
        assert [e["reason"] for e in ledger].count("charge") == 5


async def test_cache_false_bypasses_and_no_seed_means_a_new_picture(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        first = await gen(gw, key, provider="local", seed=5, width=512, height=512)
        await gw.wait(key, first["id"])
        bypass = await gen(gw, key, provider="local", seed=5, width=512, height=512, cache=False)
        assert bypass["status"] == "queued" and bypass["creditCost"] == 10
        unseeded = [await gen(gw, key, provider="local", width=512, height=512) for _ in range(2)]
        assert all(j["status"] == "queued" for j in unseeded)
        # cache: true without a seed: the second identical request reuses the first.
        opted = await gen(gw, key, provider="local", prompt="opt in", cache=True)
        await gw.wait(key, opted["id"])
        again = await gen(gw, key, provider="local", prompt="opt in", cache=True)
        assert again["status"] == "completed" and again["creditCost"] == 0


async def test_cache_can_be_turned_off_per_service(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, cache_disabled_services=["local"]) as gw:
        key = await gw.key()
        first = await gen(gw, key, provider="local", seed=1, width=512, height=512)
        await gw.wait(key, first["id"])
        second = await gen(gw, key, provider="local", seed=1, width=512, height=512)
        assert second["status"] == "queued" and second["creditCost"] == 10


def start_gateway(redis_url: str, krea: str, storage: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_PORT": str(port),
            "GATEWAY_KREA_API_BASE": krea,
            "GATEWAY_KREA_API_TOKEN": "test-token",
            "GATEWAY_STORAGE_DIR": str(storage),
            "GATEWAY_POLL_INTERVAL": "0.05",
        }
    )
    return subprocess.Popen(
        [GATEWAY, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def test_twenty_identical_requests_on_two_processes_share_one_upstream_job(
    redis_url: str, storage_dir: Path
) -> None:
    emu = KreaEmulator(steps_to_complete=10**9)
    port = free_port()
    async with serve(emu.app) as krea, gateway(redis_url, storage_dir, **krea_settings(krea)) as gw:
        other = start_gateway(redis_url, krea, storage_dir, port)
        try:
            # Room for twenty at once: each one waiting holds a slot (docs/api.md#limits).
            key = await gw.key(credits=1000, concurrency=20)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as b:

                async def ready() -> bool:
                    try:
                        return (await b.get("/readyz")).status_code == 200
                    except httpx.HTTPError:
                        return False

                await until(ready, timeout=60.0)
                query = (
                    "mutation($i: ImageGenerationInput!) "
                    "{ generateImage(input: $i) { id creditCost } }"
                )
                body = {
                    "query": query,
                    "variables": {"i": {"service": "flux-dev", "prompt": "one harbour", "seed": 9}},
                }
                headers = {"Authorization": f"Bearer {key}"}
                replies = await asyncio.gather(
                    *(
                        (gw.http if i % 2 else b).post("/graphql", json=body, headers=headers)
                        for i in range(20)
                    )
                )
            jobs = [r.json()["data"]["generateImage"] for r in replies]
            assert sorted(j["creditCost"] for j in jobs) == [0] * 19 + [20]
            emu.steps_to_complete = 1
            ids = [j["id"] for j in jobs]

            async def all_done() -> bool:
                return all(r["status"] == "completed" for r in await jobs_state(gw, key, ids))

            await until(all_done, timeout=60.0)
        finally:
            other.terminate()
            other.wait(20)
        assert emu.submissions == 1
        done = [await gw.job(key, i) for i in ids]
        assert len({d["url"] for d in done if d}) == 1
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert [e["reason"] for e in ledger].count("charge") == 1
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 980


async def test_when_the_leader_fails_a_waiter_runs_in_its_place(
    redis_url: str, storage_dir: Path
) -> None:
    emu = KreaEmulator(steps_to_complete=10**9)
    async with serve(emu.app) as krea, gateway(redis_url, storage_dir, **krea_settings(krea)) as gw:
        key, other = await gw.key(credits=100), await gw.key(credits=100)
        leader = await gen(gw, key, seed=3)
        waiters = [await gen(gw, other, seed=3) for _ in range(2)]
        assert [w["creditCost"] for w in waiters] == [0, 0]

        async def submitted() -> bool:
            return len(emu.jobs) == 1

        await until(submitted, timeout=60.0)
        next(iter(emu.jobs.values())).outcome = "failed"
        emu.steps_to_complete = 1
        done = await gw.wait(key, leader["id"])
        assert done["status"] == "failed" and done["creditCost"] == 0
        finished = [await gw.wait(other, w["id"]) for w in waiters]
        assert [f["status"] for f in finished] == ["completed", "completed"]
        assert emu.submissions == 2  # the failed leader's and one retry: not one per waiter
        # The waiter that ran paid for it; the one that waited for it did not.
        assert sorted(f["creditCost"] for f in finished) == [0, 20]
        me = (await gw.gql("{ me { credits } }", key=other)).json()["data"]["me"]
        assert me["credits"] == 80
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 100


async def test_waiters_of_a_leader_whose_worker_died_are_rescued(
    redis_url: str, storage_dir: Path
) -> None:
    from gateway.jobs.store import JobStore
    from gateway.store.redis import Scripts

    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=100)
        leader = await gen(gw, key, provider="local", seed=11, width=512, height=512)
        waiter = await gen(gw, key, provider="local", seed=11, width=512, height=512)
        assert waiter["creditCost"] == 0
        # A worker ended the leader (failed) and died before releasing its waiters.
        redis = gw.accounts.redis
        store = JobStore(redis, Scripts.register(redis))
        job = await store.get(gw.keys[key]["id"], leader["id"])
        assert job is not None
        await store.finish(job, "failed", 0, refund=True, error="worker died")
    async with gateway(redis_url, storage_dir, job_lease_seconds=0.3) as gw2:
        gw2.keys.update(gw.keys)
        done = await gw2.wait(key, waiter["id"])
        assert done["status"] == "completed"
        assert done["creditCost"] == 10  # it ran in the leader's place, and paid for it


async def test_a_hit_keeps_its_picture_when_the_request_runs_again_later(
    redis_url: str, storage_dir: Path
) -> None:
    """Once an entry's outputs retention has passed it answers no new hit, and the next
    identical request runs again; the hits made earlier (their records live on) still show
    the picture they were given, in every shard, and new hits get the new one."""
    async with gateway(redis_url, storage_dir, redis_shards=2) as gw:
        first, other = await gw.key(shard=0), await gw.key(shard=1)
        assert keys.shard_of(gw.keys[other]["id"]) == 1

        async def ask(key: str) -> dict[str, Any]:
            return await gen(gw, key, provider="local", seed=5, width=512, height=512)

        ran = await gw.wait(first, (await ask(first))["id"])
        earlier = {key: await ask(key) for key in (first, other)}
        for hit in earlier.values():
            assert hit["metadata"]["cached"] is True and hit["url"] == ran["url"]

        gw.clock.advance(gw.settings.retention_days * 86_400 + 60)
        again = await ask(other)
        assert again["status"] == "queued", "an entry past its retention served a hit"
        rerun = await gw.wait(other, again["id"])
        assert rerun["url"] != ran["url"]

        for key, hit in earlier.items():
            seen = await gw.job(key, hit["id"])
            assert seen is not None
            assert seen["url"] == hit["url"] == ran["url"], "an earlier hit changed picture"
            assert seen["width"] == 512 and seen["metadata"]["cached"] is True
        for key in (first, other):
            assert (await ask(key))["url"] == rerun["url"]


# -- a promotion is paid once, by what may pay it ------------------------------------------

CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
MINT = "mutation($c: Int!) { createClientToken(input: {maxCredits: $c}) { token } }"


async def balance(gw: Harness, credential: str) -> int:
    return int((await gw.gql("{ me { credits } }", key=credential)).json()["data"]["me"]["credits"])


async def test_concurrent_cancels_of_a_leader_promote_its_waiter_once(
    redis_url: str, storage_dir: Path
) -> None:
    """Cancels of one leader sent together (a double click, or another account's doing)
    promote its waiter once: charged once, queued once."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        for seed in range(20, 25):
            key, other = await gw.key(credits=100), await gw.key(credits=100)
            leader = await gen(gw, key, provider="local", seed=seed, width=512, height=512)
            waiter = await gen(gw, other, provider="local", seed=seed, width=512, height=512)
            assert waiter["creditCost"] == 0
            cancels = await asyncio.gather(
                *(gw.gql(CANCEL, {"id": leader["id"]}, key) for _ in range(8))
            )
            assert all(c.json()["data"]["cancelJob"]["status"] == "cancelled" for c in cancels)
            assert await balance(gw, key) == 100  # the leader refunded
            assert await balance(gw, other) == 90, seed  # the waiter charged once
            account = gw.keys[other]["id"]
            ledger = await gw.accounts.redis.xrange(keys.ledger(account))
            charges = [e for _, e in ledger if e["reason"] == "charge"]
            assert [e["job"] for e in charges] == [waiter["id"]]
            queued = await gw.accounts.redis.xrange(keys.queue(keys.shard_of(account)))
            job_key = keys.job(account, waiter["id"])
            assert [e["job"] for _, e in queued].count(job_key) == 1


async def test_a_waiter_cancelled_saved_nothing_and_never_ran(
    redis_url: str, storage_dir: Path
) -> None:
    """A job waiting on an identical one, cancelled: its account's `creditsSaved` no
    longer counts what it would have cost, and no job is counted as ended (it never
    ran; a coalesced request counts only as an admission: docs/api.md#metrics)."""

    def cancelled_jobs(text: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("gateway_jobs_total{") and 'status="cancelled"' in line
        )

    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=100)
        leader = await gen(gw, key, provider="local", seed=31, width=512, height=512)
        waiter = await gen(gw, key, provider="local", seed=31, width=512, height=512)
        saved = "{ me { cache { creditsSaved } } }"
        assert (await gw.gql(saved, key=key)).json()["data"]["me"]["cache"]["creditsSaved"] == 10
        before = cancelled_jobs((await gw.http.get("/metrics")).text)
        done = await gw.gql(CANCEL, {"id": waiter["id"]}, key)
        assert done.json()["data"]["cancelJob"]["status"] == "cancelled"
        assert (await gw.gql(saved, key=key)).json()["data"]["me"]["cache"]["creditsSaved"] == 0
        assert cancelled_jobs((await gw.http.get("/metrics")).text) == before
        assert await balance(gw, key) == 90  # the leader's charge only
        await gw.gql(CANCEL, {"id": leader["id"]}, key)
        assert cancelled_jobs((await gw.http.get("/metrics")).text) == before + 1


async def test_a_promoted_waiter_is_paid_from_its_client_tokens_budget(
    redis_url: str, storage_dir: Path
) -> None:
    """A job a client token made that waits for an identical one and is promoted when
    that one is cancelled is charged to the token's budget as any job it makes: the
    token cannot spend past its maxCredits by cancelling leaders."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=1000)
        token = (await gw.gql(MINT, {"c": 10}, key)).json()["data"]["createClientToken"]["token"]
        for seed in range(30, 33):
            leader = await gen(gw, token, provider="local", seed=seed, width=512, height=512)
            waiter = await gen(gw, token, provider="local", seed=seed, width=512, height=512)
            assert (leader["creditCost"], waiter["creditCost"]) == (10, 0)
            await gw.gql(CANCEL, {"id": leader["id"]}, token)
            assert await balance(gw, token) == 0  # the waiter now holds the budget
            await gw.gql(CANCEL, {"id": waiter["id"]}, token)
            assert await balance(gw, token) == 10
        assert await balance(gw, key) == 1000

        # A waiter its token can no longer pay for fails instead of running.
        leader = await gen(gw, key, provider="local", seed=40, width=512, height=512)
        waiter = await gen(gw, token, provider="local", seed=40, width=512, height=512)
        spend = await gen(gw, token, provider="local", seed=41, width=512, height=512)
        assert spend["creditCost"] == 10 and await balance(gw, token) == 0
        await gw.gql(CANCEL, {"id": leader["id"]}, key)
        failed = await gw.wait(token, waiter["id"])
        assert failed["status"] == "failed" and failed["creditCost"] == 0
        assert "budget" in failed["error"]
        # Every waiter here ended without its outcome: none saved the account anything.
        saved = (await gw.gql("{ me { cache { creditsSaved } } }", key=key)).json()
        assert saved["data"]["me"]["cache"]["creditsSaved"] == 0
        assert await balance(gw, key) == 990  # only `spend`

        # Nor does one its token, expired meanwhile, was made with.
        short = (await gw.gql(MINT, {"c": 50}, key)).json()["data"]["createClientToken"]
        leader = await gen(gw, key, provider="local", seed=42, width=512, height=512)
        waiter = await gen(gw, short["token"], provider="local", seed=42, width=512, height=512)
        gw.clock.advance(16 * 60)  # past its 15 minutes
        await gw.gql(CANCEL, {"id": leader["id"]}, key)
        failed = await gw.wait(key, waiter["id"])
        assert failed["status"] == "failed" and "expired" in failed["error"]
        assert await balance(gw, key) == 990


async def test_a_promoted_waiter_holds_a_concurrency_slot_of_its_account(
    redis_url: str, storage_dir: Path
) -> None:
    """A waiter that runs in its leader's place counts against its account's concurrent
    jobs as any running job does: the account cannot start more than its plan allows."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key, other = await gw.key(credits=100), await gw.key("free", credits=100)
        leader = await gen(gw, key, provider="local", seed=50, width=512, height=512)
        waiter = await gen(gw, other, provider="local", seed=50, width=512, height=512)
        assert waiter["creditCost"] == 0
        await gw.gql(CANCEL, {"id": leader["id"]}, key)
        assert await balance(gw, other) == 90  # promoted: it runs now
        refused = await gw.generate(other, "another", provider="local", width=512, height=512)
        assert refused.status_code == 429, refused.text
        assert refused.json()["errors"][0]["extensions"]["limit"] == "concurrency"
        await gw.gql(CANCEL, {"id": waiter["id"]}, other)  # its slot freed at its end
        again = await gw.generate(other, "another", provider="local", width=512, height=512)
        assert again.status_code == 200, again.text


async def test_a_waiting_job_holds_a_concurrency_slot_until_it_ends(
    redis_url: str, storage_dir: Path
) -> None:
    """Concurrent = jobs not yet ended (docs/api.md#limits), and a job waiting for an
    identical one in flight has not ended. A free key (one slot) with a job waiting holds its slot:
    neither another request nor a second identical one is let in. The slot is given back
    when the waiter completes with its leader's images, and when it fails because its
    account cannot pay to run in a failed leader's place."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        key, free = await gw.key(credits=100), await gw.key("free", credits=100)

        async def slots_used(credential: str) -> int:
            me = await gw.gql("{ me { limits { name used } } }", key=credential)
            return next(
                limit["used"]
                for limit in me.json()["data"]["me"]["limits"]
                if limit["name"] == "concurrency"
            )

        async def refused_for_a_slot(**options: Any) -> None:
            r = await gw.generate(free, provider="local", width=512, height=512, **options)
            assert r.status_code == 429, r.text
            assert r.json()["errors"][0]["extensions"]["limit"] == "concurrency"

        leader = await gen(gw, key, provider="local", seed=61, width=512, height=512)
        waiter = await gen(gw, free, provider="local", seed=61, width=512, height=512)
        assert waiter["creditCost"] == 0
        assert await slots_used(free) == 1
        await refused_for_a_slot(prompt="another")
        await refused_for_a_slot(prompt="a red kite over dunes", seed=61)

        # The leader completes: its waiter with it, and the slot is free again.
        job = await service.store.get(gw.keys[key]["id"], leader["id"])
        now = service.now_ms()
        url = f"{gw.base}/outputs/made.png"
        assert await service.store.finish(
            job, "completed", now, refund=False, urls=[url], width=512, height=512
        )
        job.completed_at = now
        assert len(await service.cache.settle(job, [url], 512, 512, {"seed": 61})) == 1
        assert (await gw.job(free, waiter["id"]))["status"] == "completed"
        assert await slots_used(free) == 0

        # A waiter whose account cannot pay to run in its failed leader's place fails,
        # and gives its slot back.
        poor = await gw.key("free", credits=5)
        leader = await gen(gw, key, provider="local", seed=62, width=512, height=512)
        waiter = await gen(gw, poor, provider="local", seed=62, width=512, height=512)
        assert await slots_used(poor) == 1
        await gw.gql(CANCEL, {"id": leader["id"]}, key)
        assert (await gw.job(poor, waiter["id"]))["status"] == "failed"
        assert await slots_used(poor) == 0


async def test_a_release_racing_another_promotes_nothing_more(
    redis_url: str, storage_dir: Path
) -> None:
    """Whoever promotes second in the place of the same leader (a rescue that read the
    leader before a release promoted its waiter, two releases) changes nothing: the
    waiter is charged and queued once, and the next waiter stays listed."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        key, other = await gw.key(credits=100), await gw.key(credits=100)
        leader = await gen(gw, key, provider="local", seed=60, width=512, height=512)
        waiters = [await gen(gw, other, provider="local", seed=60, width=512, height=512)]
        waiters.append(await gen(gw, other, provider="local", seed=60, width=512, height=512))
        account = gw.keys[key]["id"]
        job = await service.store.get(account, leader["id"])
        assert job is not None and job.cache_key
        assert await service.store.finish(job, "cancelled", service.now_ms(), refund=True)
        leader_key, shard = keys.job(account, job.id), keys.shard_of(account)
        first = await service.cache._promote_next(
            shard, job.cache_key, service.now_ms(), leader_key
        )
        again = await service.cache._promote_next(
            shard, job.cache_key, service.now_ms(), leader_key
        )
        assert len(first) == 1 and again == []
        assert await balance(gw, other) == 90  # one waiter charged, once
        waiting = await service.redis.lrange(keys.followers(shard, job.cache_key), 0, -1)
        assert len(waiting) == 1  # the other still waits, now for the promoted one
        inflight = await service.redis.get(keys.inflight(shard, job.cache_key))
        assert inflight == first[0]


async def test_waiters_of_a_leader_that_ran_out_of_time_end_too(
    redis_url: str, storage_dir: Path
) -> None:
    """A leader failing at its deadline still finds its waiters (their list and its key
    live as long as job records, not just the deadline): each runs in turn and ends,
    none is left queued forever."""
    emu = KreaEmulator(steps_to_complete=10**9)  # never finishes
    settings = {**krea_settings("http://x"), "job_deadline_seconds": 2}
    async with serve(emu.app) as krea:
        settings["krea_api_base"] = krea
        async with gateway(redis_url, storage_dir, **settings) as gw:
            key, other = await gw.key(credits=100), await gw.key(credits=100)
            leader = await gen(gw, key, seed=70, width=512, height=512)
            waiter = await gen(gw, other, seed=70, width=512, height=512)
            assert waiter["creditCost"] == 0
            ended = [
                await gw.wait(k, j["id"], timeout=30) for k, j in ((key, leader), (other, waiter))
            ]
            assert [e["status"] for e in ended] == ["failed", "failed"]
            assert await balance(gw, key) == await balance(gw, other) == 100  # refunded


async def test_a_leader_that_completed_unsettled_hands_its_waiters_its_images(
    redis_url: str, storage_dir: Path
) -> None:
    """The leader completed but its worker died before settling (or a cancel lost the
    race to its completion and released it): its waiters get its images, free, and are
    neither charged nor run again."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        key, other = await gw.key(credits=100), await gw.key(credits=100)
        leader = await gen(gw, key, provider="local", seed=80, width=512, height=512)
        waiter = await gen(gw, other, provider="local", seed=80, width=512, height=512)
        job = await service.store.get(gw.keys[key]["id"], leader["id"])
        assert job is not None
        url = f"{gw.base}/outputs/made.png"
        ended = await service.store.finish(
            job, "completed", service.now_ms(), refund=False, urls=[url], width=512, height=512
        )
        assert ended  # ... and the worker dies here, before settle
        assert await service.cache.release(job, service.now_ms()) == []  # a late cancel's
        await service.cache.rescue(service.now_ms())  # any worker's next heartbeat
        done = await gw.job(other, waiter["id"])
        assert done is not None
        assert (done["status"], done["url"], done["creditCost"]) == ("completed", url, 0)
        assert await balance(gw, other) == 100
        queued = await service.redis.xrange(keys.queue(keys.shard_of(gw.keys[other]["id"])))
        assert keys.job(gw.keys[other]["id"], waiter["id"]) not in [e["job"] for _, e in queued]


async def test_many_waiters_are_settled_a_few_at_a_time_and_none_is_forgotten(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader's waiters are completed a bounded number per script (thousands in one
    would hold Redis, and every other request, for as long), until none is left. A
    worker that dies between two of those leaves the rest to the rescue: each waiter is
    completed with the leader's images, once, free, and none is run. A preview's
    waiters (an outcome not cached) are completed in one script."""
    from gateway import cache

    monkeypatch.setattr(cache, "SETTLED_AT_ONCE", 2)
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        url = f"{gw.base}/outputs/made.png"

        async def coalesced(seed: int) -> tuple[Any, list[tuple[str, str]]]:
            """A leader completed (not settled yet) and its five waiters, each a key's."""
            key = await gw.key(credits=100)
            leader = await gen(gw, key, provider="local", seed=seed, width=512, height=512)
            waiters = []
            for _ in range(5):
                other = await gw.key(credits=100)
                made = await gen(gw, other, provider="local", seed=seed, width=512, height=512)
                assert made["creditCost"] == 0
                waiters.append((other, made["id"]))
            job = await service.store.get(gw.keys[key]["id"], leader["id"])
            now = service.now_ms()
            assert await service.store.finish(
                job, "completed", now, refund=False, urls=[url], width=512, height=512
            )
            job.completed_at = now
            return job, waiters

        async def all_done(waiters: list[tuple[str, str]]) -> None:
            for other, job_id in waiters:
                done = await gw.job(other, job_id)
                assert (done["status"], done["url"], done["creditCost"]) == ("completed", url, 0)
                assert await balance(gw, other) == 100

        job, waiters = await coalesced(81)
        settled = await service.cache.settle(job, [url], 512, 512, {"seed": 81})
        assert len(settled) == 5
        await all_done(waiters)

        # The worker dies after the first two (its second call never reaches Redis).
        job, waiters = await coalesced(82)
        settle, calls = service.scripts.settle, []

        async def counted(**arguments: Any) -> Any:
            calls.append(arguments["count"])
            return await settle(**arguments)

        async def dies_after_one(**arguments: Any) -> Any:
            calls.append(arguments["count"])
            if len(calls) > 1:
                raise ConnectionError("the worker died")
            return await settle(**arguments)

        monkeypatch.setattr(service.scripts, "settle", dies_after_one)
        with pytest.raises(ConnectionError):
            await service.cache.settle(job, [url], 512, 512, {"seed": 82})
        monkeypatch.setattr(service.scripts, "settle", settle)
        assert calls == [2, 2]
        rescued = await service.cache.rescue(service.now_ms())  # any worker's next heartbeat
        assert len(rescued) == 3
        await all_done(waiters)
        # The rescue wrote the entry again: the same outcome, so no second generation.
        entry = keys.cache_entry(keys.shard_of(job.account), job.cache_key)
        until = await service.redis.hget(entry, "until")
        assert until and not await service.redis.exists(f"{entry}:{until}")
        # A preview's waiters (keep False: no entry answers a hit) are settled in one go:
        # between two calls an identical request would run, and its waiters join them.
        job, others = await coalesced(83)
        calls.clear()
        monkeypatch.setattr(service.scripts, "settle", counted)
        assert len(await service.cache.settle(job, [url], 512, 512, {}, keep=False)) == 5
        assert len(calls) == 1
        await all_done(others)
        for shard in range(gw.settings.redis_shards):
            queued = await service.redis.xrange(keys.queue(shard))
            assert not {e["job"] for _, e in queued} & {
                keys.job(gw.keys[o]["id"], j) for o, j in waiters
            }


async def test_a_hit_lives_no_longer_than_the_images_it_shows(
    redis_url: str, storage_dir: Path
) -> None:
    """The outputs are swept a retention (and an hour) after they were made: a hit made
    late in that time keeps its record only until then, so its URL never goes dead
    while its job still shows it; a minute before the end it is a miss, run afresh."""
    async with gateway(redis_url, storage_dir, inprocess_workers=True) as gw:
        key = await gw.key(credits=1000)
        first = await gen(gw, key, provider="local", seed=90, width=512, height=512)
        done = await gw.wait(key, first["id"])
        assert done["status"] == "completed"
        retention = gw.settings.retention_days * 86400
        gw.clock.advance(retention - 7200)  # two hours left
        hit = await gen(gw, key, provider="local", seed=90, width=512, height=512)
        assert hit["status"] == "completed" and hit["url"] == done["url"]
        ttl = await gw.accounts.redis.pttl(keys.job(gw.keys[key]["id"], hit["id"]))
        assert 0 < ttl <= 7200 * 1000  # gone with the images, not a week later
        gw.clock.advance(7200 - 30)  # half a minute left: no hit any more
        late = await gen(gw, key, provider="local", seed=90, width=512, height=512)
        assert late["status"] == "queued" and late["creditCost"] > 0


async def test_a_job_waiting_on_an_identical_one_reads_as_processing_while_it_runs(
    redis_url: str, storage_dir: Path
) -> None:
    """Doitong's guide polls `while (status === 'processing')`: a coalesced job that read
    `queued` while its leader ran ended that loop with no image. It reads as its leader
    does once that one runs (created `queued`, as every job), on every read path."""
    emu = KreaEmulator(steps_to_complete=10**9)
    async with serve(emu.app) as krea, gateway(redis_url, storage_dir, **krea_settings(krea)) as gw:
        key = await gw.key()
        leader = await gen(gw, key, seed=5)

        async def running() -> bool:
            return (await gw.job(key, leader["id"]) or {}).get("status") == "processing"

        await until(running, timeout=60.0)
        waiting = await gen(gw, key, seed=5)
        assert (waiting["status"], waiting["creditCost"]) == ("queued", 0)
        polled = await gw.job(key, waiting["id"])
        assert polled is not None and polled["status"] == "processing"
        rest = await gw.http.get(f"/v1/jobs/{waiting['id']}", headers={"X-API-Key": key})
        assert rest.json()["status"] == "processing"
        emu.steps_to_complete = 1
        done = await gw.wait(key, waiting["id"])
        assert done["status"] == "completed" and done["metadata"]["coalesced"] is True
        assert emu.submissions == 1


async def test_dev_modes_offline_stand_in_is_not_kept_as_another_services_answer(
    redis_url: str, storage_dir: Path
) -> None:
    """flux-krea away in dev mode: `local` draws a preview. The identical request that
    waited on it gets it too; one made later, flux-krea back, gets flux-krea's picture,
    not that preview for seven days; nor is the preview copied into another shard
    (where entries are copied for the keys there)."""
    flux = FluxKreaEmulator(api_key="test-key")
    flux.fail_next(1, 503)  # a submit's 5xx is not sent again: it fails over at once
    options = {"provider": "flux-krea", "width": 512, "height": 512, "seed": 42}
    async with serve(flux.app) as upstream:
        settings = {
            "fluxkrea_api_base": f"{upstream}/v1",
            "fluxkrea_api_key": "test-key",
            "redis_shards": 2,
        }
        async with gateway(
            redis_url, storage_dir, dev=True, inprocess_workers=False, **settings
        ) as gw:
            keys_ = [await gw.key(shard=0) for _ in range(3)]
            made = [await gw.generate(k, "a lighthouse at dawn", **options) for k in keys_[:2]]
            ids = [m.json()["data"]["generate"]["id"] for m in made]
            assert made[1].json()["data"]["generate"]["creditCost"] == 0  # it waits on the first
        async with gateway(redis_url, storage_dir, dev=True, **settings) as gw:
            first, waited = [await gw.wait(k, i) for k, i in zip(keys_, ids, strict=False)]
            assert first["metadata"]["backend"] == "local", first
            assert waited["status"] == "completed" and waited["urls"] == first["urls"]
            # Nor is it copied as the answer into the other shard.
            assert await gw.accounts.redis.keys(f"{keys.PREFIX}:{{s1}}:cache:*") == []

            made = await gw.generate(keys_[2], "a lighthouse at dawn", **options)
            done = await gw.wait(keys_[2], made.json()["data"]["generate"]["id"])
            assert done["metadata"]["backend"] == "fluxkrea", done
            assert done["metadata"]["cached"] is False
            assert flux.submissions == 2  # the failed one, then this one
            assert await gw.job(keys_[1], ids[1]) is not None  # the waiter's record stays
