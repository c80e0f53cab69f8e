"""The keyspace on Redis Cluster: every script and transaction stays in one hash slot.

These run with the keyspace cut into 4 shards, against the suite's one-node Redis
Cluster (see conftest) and against a real three-node Cluster, whose nodes refuse any
command whose keys span two slots (and redirect any sent to the wrong node); each test
then checks that no refusal happened at all.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from gateway.jobs.store import JobStore
from gateway.store import keys, shards
from gateway.store.redis import Scripts, connect
from gateway.store.shards import FewerShards
from tests.conftest import ThreeNodeCluster
from tests.emulators.krea import KreaEmulator
from tests.harness import GENERATE, Harness, gateway, until
from tests.servers import free_port, serve
from tests.test_cache import krea_settings
from tests.test_webhooks import FAST, Receiver

SHARDS = {"redis_shards": 4}
GATEWAY = str(Path(sys.executable).with_name("gateway"))


@pytest.fixture(params=["one-node", "three-nodes"])
def cluster_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "one-node":
        yield request.getfixturevalue("redis_url")
        return
    cluster: ThreeNodeCluster = request.getfixturevalue("three_node_cluster")
    cluster.flush()
    yield cluster.url
    assert cluster.cross_slot_refusals() == 0, "a command spanned two hash slots"


def test_an_account_id_names_its_shard() -> None:
    assert keys.shard_of("a1b2c3d4e5f6") == 0  # a plain id (and every id before shards)
    assert keys.shard_of("a1b2c3d4e5f6s3") == 3
    assert keys.account_id("a1b2c3d4e5f6", 0) == "a1b2c3d4e5f6"
    assert keys.shard_of(keys.account_id("a1b2c3d4e5f6", 17)) == 17
    for hostile in ("s", "xs", "as99999999", "s-1", "s٣", ""):
        assert keys.shard_of(hostile) == 0
    job_key = keys.job("a1b2c3d4e5f6s2", "j1")
    assert keys.shard_of_key(job_key) == 2
    # Everything one admission touches is in one slot; two shards are two slots.
    slots = {
        key_slot(k.encode())
        for k in (
            job_key,
            keys.account("a1b2c3d4e5f6s2"),
            keys.queue(2),
            keys.webhooks(2),
            keys.cache_entry(2, "d"),
            keys.inflight(2, "d"),
            keys.coalescing(2),
        )
    }
    assert len(slots) == 1
    assert key_slot(keys.queue(1).encode()) not in slots


async def generate(
    gw: Harness, key: str, webhook: str | None = None, provider: str = "local", **options: object
) -> dict[str, Any]:
    variables = {
        "input": {
            "type": "IMAGE",
            "provider": provider,
            "webhookUrl": webhook,
            "input": {"text": "a harbour at dawn"},
            "options": {"width": 512, "height": 512, **options},
        }
    }
    body = (await gw.gql(GENERATE, variables, key)).json()
    assert "errors" not in body, body
    return dict(body["data"]["generate"])


async def test_jobs_of_every_shard_run_and_deliver_their_webhooks(
    cluster_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=1)
    async with (
        serve(receiver.app) as hook,
        gateway(cluster_url, storage_dir, **SHARDS, **FAST) as gw,
    ):
        made = [await gw.key(credits=100, shard=n) for n in range(4)]
        assert [keys.shard_of(gw.keys[k]["id"]) for k in made] == [0, 1, 2, 3]
        jobs = [await generate(gw, k, webhook=f"{hook}/hook") for k in made]
        done = [await gw.wait(k, j["id"]) for k, j in zip(made, jobs, strict=True)]
        assert [d["status"] for d in done] == ["completed"] * 4

        async def delivered() -> bool:
            return len([c for c in receiver.calls if c[2] == 200]) == 4

        await until(delivered)  # the failed first attempt was retried from its own shard
        for key in made:
            me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
            assert me["credits"] == 90
        listed = (await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=made[3])).json()
        assert [n["id"] for n in listed["data"]["jobs"]["nodes"]] == [jobs[3]["id"]]

        # The shards are spread over slots, and no key lives outside a shard but the
        # account index, the shard count and callback tokens (each used one key at a time).
        client: Any = gw.accounts.redis
        names = [str(k) for k in await client.keys("*", target_nodes=client.PRIMARIES)]
        untagged = [k for k in names if "{s" not in k]
        assert sorted(untagged) == sorted([keys.ACCOUNTS, keys.SHARDS])
        tags = {k[k.index("{") : k.index("}") + 1] for k in names if "{s" in k}
        assert tags == {"{s0}", "{s1}", "{s2}", "{s3}"}
        assert len({key_slot(t.encode()) for t in tags}) == 4


async def test_a_cached_result_is_shared_by_keys_of_other_shards(
    cluster_url: str, storage_dir: Path
) -> None:
    async with gateway(cluster_url, storage_dir, **SHARDS) as gw:
        first, second, third = [await gw.key(credits=100, shard=n) for n in (1, 3, 0)]
        leader = await generate(gw, first, seed=7)
        assert (await gw.wait(first, leader["id"]))["status"] == "completed"
        for key in (second, third):
            hit = await generate(gw, key, seed=7)
            assert hit["status"] == "completed" and hit["creditCost"] == 0
            assert hit["url"] == (await gw.job(first, leader["id"]) or {})["url"]


async def test_waiters_in_a_shard_are_completed_or_promoted_with_their_leader(
    cluster_url: str, storage_dir: Path
) -> None:
    # No workers at first: the leader and its waiters stay queued in shard 2.
    async with gateway(cluster_url, storage_dir, inprocess_workers=False, **SHARDS) as gw:
        key, other = await gw.key(credits=100, shard=2), await gw.key(credits=100, shard=2)
        leader = await generate(gw, key, seed=5)
        waiter = await generate(gw, other, seed=5)
        assert waiter["creditCost"] == 0 and waiter["status"] == "queued"
        failing = await generate(gw, key, seed=6)
        rescued = await generate(gw, other, seed=6)
        # A worker ended the second leader (failed) and died before releasing its waiter.
        client = gw.accounts.redis
        store = JobStore(client, Scripts.register(client))
        job = await store.get(gw.keys[key]["id"], failing["id"])
        assert job is not None
        await store.finish(job, "failed", 0, refund=True, error="worker died")
    async with gateway(cluster_url, storage_dir, job_lease_seconds=0.3, **SHARDS) as gw2:
        gw2.keys.update(gw.keys)
        assert (await gw2.wait(key, leader["id"]))["creditCost"] == 10
        settled = await gw2.wait(other, waiter["id"])
        assert settled["status"] == "completed" and settled["creditCost"] == 0
        assert settled["metadata"]["coalesced"] is True
        promoted = await gw2.wait(other, rescued["id"])
        assert promoted["status"] == "completed" and promoted["creditCost"] == 10
        me = (await gw2.gql("{ me { credits } }", key=other)).json()["data"]["me"]
        assert me["credits"] == 90


async def test_identical_requests_of_two_shards_share_one_upstream_job(
    cluster_url: str, storage_dir: Path
) -> None:
    """Identical requests in flight share one upstream job, whatever shards their accounts
    live in (docs/api.md#cache). The second shard's job waits for the first's upstream job
    (its metadata says `coalesced` while it does), then completes with its images, its
    charge refunded; when the first fails or is cancelled, the one that waited runs in its
    place."""
    emu = KreaEmulator(steps_to_complete=10**9)
    async with (
        serve(emu.app) as krea,
        gateway(cluster_url, storage_dir, **SHARDS, **krea_settings(krea)) as gw,
    ):
        first, second = [await gw.key(credits=100, shard=n) for n in (1, 3)]

        async def both(seed: int) -> tuple[str, str]:
            """The two shards' identical requests, the second waiting for the first."""
            leader = await generate(gw, first, provider="flux-dev", seed=seed)
            await submitted(emu, emu.submissions + 1)
            waiter = await generate(gw, second, provider="flux-dev", seed=seed)
            assert waiter["creditCost"] == 10  # charged as a miss, at admission
            await waiting(gw, second, waiter["id"])
            return leader["id"], waiter["id"]

        leader, waiter = await both(seed=31)
        emu.steps_to_complete = 1
        led, joined = await gw.wait(first, leader), await gw.wait(second, waiter)
        assert emu.submissions == 1
        assert (led["status"], joined["status"]) == ("completed", "completed")
        assert joined["url"] == led["url"]
        assert joined["creditCost"] == 0 and joined["metadata"]["coalesced"] is True
        assert await credits(gw, second) == 100  # refunded
        stats = "{ me { cache { misses coalesced creditsSaved } } }"
        saved = (await gw.gql(stats, key=second)).json()["data"]["me"]["cache"]
        assert saved == {"misses": 0, "coalesced": 1, "creditsSaved": 10}
        ledger = await gw.accounts.ledger(gw.keys[second]["id"])
        assert sorted(e["reason"] for e in ledger) == ["charge", "initial", "refund"]
        # Its shard's entry is the leader's, written as the leader wrote it: no shard
        # keeps a second generation of it (entry_write.lua).
        job = await gw.app.state.gateway.store.get(gw.keys[second]["id"], waiter)
        client: Any = gw.accounts.redis
        pattern = f"{keys.PREFIX}:*:cache:{job.cache_key}:*"
        assert not await client.keys(pattern, target_nodes=client.PRIMARIES)
        assert (await generate(gw, second, provider="flux-dev", seed=31))["url"] == led["url"]

        # A waiting job cancelled ends cancelled, refunded; its leader runs on.
        emu.steps_to_complete = 10**9
        leader, waiter = await both(seed=33)
        cancel = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
        done = await gw.gql(cancel, {"id": waiter}, second)
        assert done.json()["data"]["cancelJob"]["status"] == "cancelled"
        assert await credits(gw, second) == 100
        emu.steps_to_complete = 1
        assert (await gw.wait(first, leader))["status"] == "completed"
        assert (await gw.job(second, waiter) or {})["status"] == "cancelled"

        # The first fails upstream: the waiter calls the upstream itself, and pays.
        emu.steps_to_complete = 10**9
        leader, waiter = await both(seed=32)
        list(emu.jobs.values())[-1].outcome = "failed"  # the newest: the first's
        emu.steps_to_complete = 1
        assert (await gw.wait(first, leader))["status"] == "failed"
        ran = await gw.wait(second, waiter)
        assert ran["status"] == "completed" and ran["creditCost"] == 10
        assert emu.submissions == 4
        assert await credits(gw, second) == 90

        # The first cancelled by its owner: the same, the waiter runs in its place.
        emu.steps_to_complete = 10**9
        leader, waiter = await both(seed=34)
        done = await gw.gql(cancel, {"id": leader}, first)
        assert done.json()["data"]["cancelJob"]["status"] == "cancelled"
        emu.steps_to_complete = 1
        ran = await gw.wait(second, waiter)
        assert ran["status"] == "completed" and ran["creditCost"] == 10
        assert emu.submissions == 6 and await credits(gw, second) == 80


async def test_a_job_waiting_for_another_shards_survives_its_workers_restart(
    cluster_url: str, storage_dir: Path
) -> None:
    """Both jobs' processes stop while the second shard's job waits for the first's
    upstream job; the next ones resume the first (never submitted again) and the second
    waits for it again: one upstream job in all, both completed with its images."""
    async with held_krea() as (emu, settings):
        async with gateway(cluster_url, storage_dir, **settings) as gw:
            first, second, leader = await leading(gw, emu, seed=41)
            waiter = await generate(gw, second, provider="flux-dev", seed=41)
            await waiting(gw, second, waiter["id"])
        emu.steps_to_complete = 1
        async with gateway(cluster_url, storage_dir, job_lease_seconds=0.3, **settings) as gw2:
            gw2.keys.update(gw.keys)
            led = await gw2.wait(first, leader["id"])
            joined = await gw2.wait(second, waiter["id"])
            assert (led["status"], joined["status"]) == ("completed", "completed")
            assert joined["url"] == led["url"] and joined["creditCost"] == 0
            assert emu.submissions == 1


async def test_a_job_waiting_for_another_shards_fails_at_its_own_deadline_refunded(
    cluster_url: str, storage_dir: Path
) -> None:
    """The first shard's job is stuck (its process stopped after its upstream call, its
    entry not yet free to take over); the second's, waiting for it, fails at its own
    deadline, refunded, without calling the upstream itself."""
    async with held_krea() as (emu, settings):
        async with gateway(cluster_url, storage_dir, **settings) as gw:
            first, second, leader = await leading(gw, emu, seed=61)
        async with gateway(cluster_url, storage_dir, job_deadline_seconds=3, **settings) as gw2:
            gw2.keys.update(gw.keys)
            waiter = await generate(gw2, second, provider="flux-dev", seed=61)
            await waiting(gw2, second, waiter["id"])
            failed = await gw2.wait(second, waiter["id"])
            assert failed["status"] == "failed", failed
            assert "waiting for an identical request" in failed["error"]
            assert await credits(gw2, second) == 100  # refunded
            assert emu.submissions == 1
            assert (await gw2.job(first, leader["id"]) or {})["status"] == "processing"


async def test_a_job_started_after_another_shards_identical_one_completed_takes_its_images(
    cluster_url: str, storage_dir: Path
) -> None:
    """A worker with one place: the second shard's job, admitted while the first's ran
    (before its images were cached in its shard), starts once the first completed. It
    takes the first's images: one upstream job for the two requests in flight."""
    emu = KreaEmulator(steps_to_complete=10**9)
    async with (
        serve(emu.app) as krea,
        gateway(cluster_url, storage_dir, workers=1, **SHARDS, **krea_settings(krea)) as gw,
    ):
        first, second = [await gw.key(credits=100, shard=n) for n in (1, 3)]
        leader = await generate(gw, first, provider="flux-dev", seed=51)
        await submitted(emu, 1)
        later = await generate(gw, second, provider="flux-dev", seed=51)
        assert later["creditCost"] == 10  # a miss: nothing cached yet, nothing in its shard
        emu.steps_to_complete = 1
        led, joined = await gw.wait(first, leader["id"]), await gw.wait(second, later["id"])
        assert joined["status"] == "completed" and joined["url"] == led["url"]
        assert joined["creditCost"] == 0 and emu.submissions == 1


async def test_jobs_waiting_for_another_shards_take_no_place_of_their_worker(
    cluster_url: str, storage_dir: Path
) -> None:
    """A worker with one place reads a job that waits for another shard's identical one,
    queued behind it: the waiting job leaves the place free, so the leader it waits for
    is read and run by the same worker (else both would wait until their deadline)."""
    async with held_krea(steps=1) as (emu, settings):
        async with gateway(cluster_url, storage_dir, inprocess_workers=False, **settings) as gw:
            # Queue order: the worker reads shard 0 first, the leader's shard 3 last.
            first, second = [await gw.key(credits=100, shard=n) for n in (3, 0)]
            leader = await generate(gw, first, provider="flux-dev", seed=52)
            waiter = await generate(gw, second, provider="flux-dev", seed=52)
            service = gw.app.state.gateway
            job = await service.store.get(gw.keys[first]["id"], leader["id"])
            # Its worker took the lead and died before its upstream call.
            assert await service.cache.lead(job) == keys.job(job.account, job.id)
        async with gateway(cluster_url, storage_dir, workers=1, **settings) as gw2:
            gw2.keys.update(gw.keys)
            led = await gw2.wait(first, leader["id"])
            joined = await gw2.wait(second, waiter["id"])
            assert (led["status"], joined["status"]) == ("completed", "completed")
            assert joined["url"] == led["url"] and emu.submissions == 1


@contextlib.asynccontextmanager
async def held_krea(steps: int = 10**9) -> AsyncIterator[tuple[KreaEmulator, dict[str, Any]]]:
    """Krea's emulator (a job done after `steps` polls) and the settings of a gateway of
    4 shards routed to it, for the gateways a test starts one after another."""
    emu = KreaEmulator(steps_to_complete=steps)
    async with serve(emu.app) as krea:
        yield emu, {**SHARDS, **krea_settings(krea)}


async def leading(gw: Harness, emu: KreaEmulator, seed: int) -> tuple[str, str, dict[str, Any]]:
    """Keys of shards 1 and 3, and the first's job, sent to Krea's emulator (which holds
    it there)."""
    first, second = [await gw.key(credits=100, shard=n) for n in (1, 3)]
    leader = await generate(gw, first, provider="flux-dev", seed=seed)
    await submitted(emu, 1)
    return first, second, leader


async def submitted(emu: KreaEmulator, count: int) -> None:
    """Until Krea's emulator has been sent `count` jobs."""

    async def reached() -> bool:
        return emu.submissions == count

    await until(reached)


async def waiting(gw: Harness, key: str, job_id: str) -> None:
    """Until the job says it waits for another shard's identical one."""

    async def marked() -> bool:
        job = await gw.job(key, job_id) or {}
        return (job.get("metadata") or {}).get("coalesced") is True

    await until(marked)


async def credits(gw: Harness, key: str) -> int:
    return int((await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]["credits"])


# -- the shard count is the keyspace's, not each process's -----------------------------


def gateway_command(
    redis_url: str, storage: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """A `gateway` command with GATEWAY_REDIS_SHARDS unset (1) unless `env` sets it, as on
    a host that lacks it; one that would keep running (a worker, a server) fails the
    test by its timeout."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full |= {"GATEWAY_REDIS_URL": redis_url, "GATEWAY_STORAGE_DIR": str(storage)}
    full |= {"GATEWAY_PUBLIC_URL": "https://images.example.com", **env}
    full["GATEWAY_PORT"] = str(free_port())
    return subprocess.run(
        [GATEWAY, *args], capture_output=True, text=True, env=full, timeout=30, check=False
    )


def refused(result: subprocess.CompletedProcess[str], *says: str) -> bool:
    """Exit 1 with one line saying why, no traceback."""
    lines = result.stderr.strip().splitlines()
    return (
        result.returncode == 1
        and len(lines) == 1
        and lines[0].startswith("refused: ")
        and all(s in lines[0] for s in says)
    )


async def test_a_process_set_to_fewer_shards_than_the_keyspace_is_refused(
    redis_url: str, storage_dir: Path
) -> None:
    """A worker or server set to fewer shards would leave the jobs of the accounts on the
    others queued for ever: each refuses to start, in one line saying what to set; and
    `keys create` set to more than the workers read would place a key none reads."""
    async with gateway(redis_url, storage_dir, **SHARDS) as gw:  # the keyspace: 4 shards
        key = await gw.key(shard=3)
        job = (await gw.generate(key, width=512, height=512)).json()["data"]["generate"]
        assert (await gw.wait(key, job["id"]))["status"] == "completed"
    client = await connect(redis_url)
    try:
        for forgotten in (False, True):
            if forgotten:  # a keyspace made before the count was kept: its accounts say 4
                await client.delete(keys.SHARDS)
            for command in (["worker"], ["serve"]):
                result = gateway_command(redis_url, storage_dir, *command)
                assert refused(result, "is 1", "Set GATEWAY_REDIS_SHARDS=4"), result.stderr
        made = gateway_command(redis_url, storage_dir, "keys", "create", "--json")
        assert made.returncode == 0, made.stderr  # on shard 0, which every worker reads
        more = gateway_command(redis_url, storage_dir, "keys", "create", GATEWAY_REDIS_SHARDS="6")
        assert refused(more, "Start the workers with GATEWAY_REDIS_SHARDS=6 first"), more.stderr

        # A process set higher raises the keyspace's count; the processes at 4 are refused.
        await shards.at_start(client, 6)
        assert await client.zscore(keys.SHARDS, keys.SHARDS_MEMBER) == 6
        with pytest.raises(FewerShards, match="shards 4-5"):
            await shards.at_start(client, 4)
        await shards.at_start(client, 6)  # as many: started
    finally:
        await client.aclose()


async def test_a_running_worker_stops_once_the_keyspace_outgrows_it(
    redis_url: str, storage_dir: Path
) -> None:
    """Started before the process that raised the count, a worker would read its shards
    only, for as long as it runs: it looks at each heartbeat, stops and exits 1."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env |= {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_STORAGE_DIR": str(storage_dir),
        "GATEWAY_PUBLIC_URL": "https://images.example.com",
        "GATEWAY_REDIS_SHARDS": "4",
        "GATEWAY_JOB_LEASE_SECONDS": "0.6",  # a heartbeat every 0.2 s
    }
    worker = subprocess.Popen(
        [GATEWAY, "worker"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    client = await connect(redis_url)
    try:
        await until(lambda: client.zscore(keys.SHARDS, keys.SHARDS_MEMBER), what="its start")
        assert worker.poll() is None  # started at 4; the refusal below names 6
        await shards.at_start(client, 6)  # a gateway set to 6 starts
        assert await until(lambda: worker.poll() is not None, timeout=20, what="it stops")
        assert worker.returncode == 1
        assert "Set GATEWAY_REDIS_SHARDS=6" in (worker.stderr.read() if worker.stderr else "")
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
        await client.aclose()
