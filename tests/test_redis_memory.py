"""What keeps Redis bounded and whole (issue #19, part 4): a Redis that may evict keys is
refused at start-up; the ledger is trimmed by age after an export can save it; a cache
hit's job record refers to its cache entry instead of copying the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from gateway.jobs.model import Job
from gateway.runtime import EvictingRedis, check_eviction_policy
from gateway.store import keys
from gateway.store.redis import connect
from tests.conftest import RedisServer
from tests.harness import Clock, Harness, gateway, gateway_processes
from tests.servers import free_port

GATEWAY = str(Path(sys.executable).with_name("gateway"))


@contextlib.contextmanager
def plain_redis(workdir: Path, *args: str) -> Iterator[str]:
    """A plain (not Cluster) redis-server started with `args`; its URL."""
    server = RedisServer(workdir, cluster=False, args=args)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def run(command: str, redis_url: str, storage: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_STORAGE_DIR": str(storage),
            "GATEWAY_PORT": str(free_port()),
        }
    )
    return subprocess.run(
        [GATEWAY, command], capture_output=True, text=True, env=env, timeout=60, check=False
    )


# -- 1. a Redis that may evict keys is refused ---------------------------------------


@pytest.mark.parametrize("policy", ["allkeys-lru", "volatile-ttl"])
def test_serve_and_worker_refuse_a_redis_that_may_evict_keys(
    tmp_path: Path, storage_dir: Path, policy: str
) -> None:
    with plain_redis(tmp_path, "--maxmemory-policy", policy) as url:
        for command in ("serve", "worker"):
            result = run(command, url, storage_dir)
            assert result.returncode != 0, (command, result.stdout, result.stderr)
            assert policy in result.stderr, (command, result.stderr)
            assert "noeviction" in result.stderr


def test_a_redis_that_refuses_config_is_read_through_info(
    tmp_path: Path, storage_dir: Path
) -> None:
    """Managed Redis services disable CONFIG; INFO still tells their policy."""
    no_config = ("--rename-command", "CONFIG", "")
    with plain_redis(tmp_path, "--maxmemory-policy", "allkeys-lru", *no_config) as url:
        for command in ("serve", "worker"):
            result = run(command, url, storage_dir)
            assert result.returncode != 0, (command, result.stdout, result.stderr)
            assert "allkeys-lru" in result.stderr, (command, result.stderr)


def test_serve_starts_on_noeviction_and_when_the_policy_cannot_be_read(
    tmp_path: Path, storage_dir: Path
) -> None:
    with (
        plain_redis(tmp_path, "--maxmemory-policy", "noeviction") as url,
        gateway_processes(url, storage_dir, tmp_path) as bases,
    ):
        assert bases
    with (
        plain_redis(tmp_path, "--rename-command", "CONFIG", "") as url,
        gateway_processes(url, storage_dir, tmp_path) as bases,
    ):
        assert "maxmemory-policy" not in (tmp_path / "gw0.log").read_text()  # read by INFO
    # Neither CONFIG nor INFO: it cannot be checked, so a warning, and it runs.
    refused = ("--rename-command", "CONFIG", "", "--rename-command", "INFO", "")
    with (
        plain_redis(tmp_path, *refused) as url,
        gateway_processes(url, storage_dir, tmp_path) as bases,
    ):
        assert "maxmemory-policy" in (tmp_path / "gw0.log").read_text()


async def test_each_node_of_a_cluster_is_checked(redis_url: str) -> None:
    """The suite's Redis is a one-node Cluster: the Cluster client asks each node."""
    admin = redis.Redis.from_url(redis_url)
    client = await connect(redis_url)
    try:
        await check_eviction_policy(client)  # noeviction, the default
        admin.config_set("maxmemory-policy", "volatile-lru")
        with pytest.raises(EvictingRedis, match="volatile-lru"):
            await check_eviction_policy(client)
    finally:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
        await client.aclose()


# -- 3. a cache hit refers to its cache entry -----------------------------------------


async def _hit_setup(gw: Harness) -> tuple[str, dict[str, Any]]:
    key = await gw.key(plan="enterprise", credits=1_000)  # no minute or day limit
    first = await gw.generate(key, PROMPT, seed=7)
    leader = await gw.wait(key, first.json()["data"]["generate"]["id"])
    assert leader["status"] == "completed"
    return key, leader


PROMPT = "a red fox in the snow at dusk, oil on canvas, wide shot, soft evening light"


async def test_a_hit_record_refers_to_its_entry_and_every_reader_sees_the_outcome(
    redis_url: str, storage_dir: Path
) -> None:
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    async with gateway(redis_url, storage_dir) as gw:
        key, leader = await _hit_setup(gw)
        gw.clock.advance(-5)  # the hit made by a host whose clock is 5 s behind
        made = (await gw.generate(key, PROMPT, seed=7)).json()["data"]["generate"]
        assert made["status"] == "completed" and made["metadata"]["cached"] is True
        [record_key] = [k for k in admin.keys(f"*:job:{made['id']}")]
        record = json.loads(admin.get(record_key) or "{}")
        assert "urls" not in record and "params" not in record
        assert admin.memory_usage(record_key, samples=0) < 600
        entry = next(iter(admin.keys("*:cache:*")))
        assert record["hit"] == int(admin.hget(entry, "until") or 0)  # its generation
        # The entry outlives the hit that reads through it, by more than the skew.
        assert admin.pttl(entry) - admin.pttl(record_key) > 30_000

        # GraphQL, REST and the jobs list all read the outcome through the entry.
        job = await gw.job(key, made["id"])
        assert job is not None
        assert (job["url"], job["width"], job["height"]) == (
            leader["url"],
            leader["width"],
            leader["height"],
        )
        assert job["metadata"]["cached"] is True and job["creditCost"] == 0
        rest = await gw.http.get(
            f"/v1/jobs/{made['id']}", headers={"Authorization": f"Bearer {key}"}
        )
        assert rest.status_code == 200, rest.text
        assert rest.json()["url"] == leader["url"]
        listed = await gw.gql("{ jobs(first: 5) { nodes { id url } } }", key=key)
        nodes = {n["id"]: n["url"] for n in listed.json()["data"]["jobs"]["nodes"]}
        assert nodes[made["id"]] == leader["url"]
        stored = await gw.app.state.gateway.store.get(gw.keys[key]["id"], made["id"])
        assert stored.params["prompt"] == PROMPT and stored.urls == [leader["url"]]
    admin.close()


async def test_a_hit_on_an_entry_from_before_entries_had_a_generation_copies_its_outcome(
    redis_url: str, storage_dir: Path
) -> None:
    """An entry an earlier version wrote (no `until`): a hit's record holds the outcome
    itself, completed and free, as hits once did, and reads whole."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    async with gateway(redis_url, storage_dir) as gw:
        key, leader = await _hit_setup(gw)
        for entry in admin.keys("*:cache:*"):
            admin.hdel(entry, "until")
        made = (await gw.generate(key, PROMPT, seed=7)).json()["data"]["generate"]
        assert made["status"] == "completed" and made["creditCost"] == 0
        [record_key] = admin.keys(f"*:job:{made['id']}")
        record = json.loads(admin.get(record_key) or "{}")
        assert "hit" not in record and record["urls"] == [leader["url"]]
        assert record["status"] == "completed" and record["params"]["prompt"] == PROMPT
        job = await gw.job(key, made["id"])
        assert job is not None and job["url"] == leader["url"]
        assert job["metadata"]["cached"] is True
    admin.close()


async def test_an_entry_past_its_outputs_retention_serves_no_new_hit_but_keeps_old_ones(
    redis_url: str, storage_dir: Path
) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock) as gw:
        key, leader = await _hit_setup(gw)
        hit = (await gw.generate(key, PROMPT, seed=7)).json()["data"]["generate"]
        assert hit["creditCost"] == 0
        clock.advance(7 * 86400 + 60)  # past the leader's retention (of its outputs)
        again = (await gw.generate(key, PROMPT, seed=7)).json()["data"]["generate"]
        assert again["creditCost"] > 0 and again["metadata"] is None  # runs anew
        old = await gw.job(key, hit["id"])
        assert old is not None and old["url"] == leader["url"]


async def test_ten_thousand_cache_hits_take_under_six_megabytes(
    redis_url: str, storage_dir: Path
) -> None:
    """What 10,000 hits keep: their records and their place in the key's job index.
    (Their one-minute rate window, ~120 bytes a hit while it lasts, is let pass first:
    the clock moves on a minute and a read forgets it.)"""
    admin = redis.Redis.from_url(redis_url)
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock) as gw:
        key, leader = await _hit_setup(gw)
        rest_body = {"service": "local", "prompt": PROMPT, "seed": 7}
        headers = {"Authorization": f"Bearer {key}"}
        before = int(admin.info("memory")["used_memory"])

        async def one() -> None:
            r = await gw.http.post("/v1/text_to_image", json=rest_body, headers=headers)
            assert r.status_code in (200, 201, 202), r.text
            assert r.json()["creditCost"] == 0, r.text  # a hit

        for _ in range(100):
            await asyncio.gather(*(one() for _ in range(100)))
        clock.advance(61)
        assert await gw.job(key, leader["id"])  # forgets the minute's window
        grown = int(admin.info("memory")["used_memory"]) - before
        jobs = admin.zcard(next(iter(admin.keys("*:jobs"))))
        assert jobs == 10_001
        assert grown < 6_000_000, f"{grown} bytes for 10,000 hits"
    admin.close()


# -- 2. the ledger is trimmed by age, after an export can keep it ------------------------


def _export(redis_url: str, account: str, since: str) -> list[dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_REDIS_URL"] = redis_url
    result = subprocess.run(
        [GATEWAY, "ledger", "export", account, "--since", since],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


async def test_the_ledger_is_trimmed_by_age_and_the_export_before_holds_what_went(
    redis_url: str, storage_dir: Path
) -> None:
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, ledger_retention_days=90) as gw:
        key = await gw.key(plan="enterprise", credits=0)
        account = gw.keys[key]["id"]
        for _ in range(250):  # three stream nodes' worth (stream-node-max-entries 100)
            await gw.accounts.add_credits(account, 2)
        ran = (await gw.generate(key, "a lighthouse")).json()["data"]["generate"]
        assert ran["creditCost"] > 0
        await gw.wait(key, ran["id"])
        ledger = keys.ledger(account)
        assert admin.xlen(ledger) == 251
        exported = _export(redis_url, account, "1970-01-01T00:00:00Z")
        assert len(exported) == 251 and exported[-1]["reason"] == "charge"
        assert exported[0] == {**exported[0], "delta": 2, "reason": "topup", "balance": 2}
        since = exported[100]["at"]
        partial = _export(redis_url, account, str(since))
        assert len(partial) >= 151 and all(e["at"] >= since for e in partial)

        # 91 days on, the next charge trims what is older than 90 days: whole nodes.
        clock.advance(91 * 86400)
        balance = int(admin.hget(keys.account(account), "credits"))
        later = (await gw.generate(key, "a lighthouse at night")).json()["data"]["generate"]
        assert later["creditCost"] > 0
        kept = [i for i, _ in admin.xrange(ledger)]
        assert len(kept) < 251 - 100  # at least two nodes went
        # The oldest went, whole nodes of them, each exported before; what stays is the
        # newest of them. (The new charge's own entry is stamped with Redis's clock, 91
        # days behind the gateway's here: trimmed with them.)
        ids = [e["id"] for e in exported]
        assert kept == ids[len(ids) - len(kept) :]
        # The balance is the account's field, exact whatever the ledger keeps.
        assert int(admin.hget(keys.account(account), "credits")) == (balance - later["creditCost"])
        after = gw.accounts
        after.clock = lambda: clock()
        assert await after.add_credits(account, 1) == balance - later["creditCost"] + 1
    admin.close()


async def test_an_accounts_job_index_keeps_only_what_its_records_may_still_show(
    redis_url: str, storage_dir: Path
) -> None:
    """Every job was added to the index and nothing took it out but a page that read
    its expired record, newest first, so an active account's tail was never reached:
    ~120 bytes a job, forever. An admission drops old entries whose records are gone,
    and keeps the one of a job whose record lives on (queued through a long outage)."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    clock = Clock()
    settings = {"retention_days": 1, "job_deadline_seconds": 600, "inprocess_workers": False}
    async with gateway(redis_url, storage_dir, clock, **settings) as gw:
        key = await gw.key(plan="enterprise", credits=10_000)
        account = gw.keys[key]["id"]
        index = keys.jobs(account)
        made = []
        for n in range(5):
            r = await gw.generate(key, f"a lighthouse {n}")
            made.append(r.json()["data"]["generate"]["id"])
        clock.advance(86_400)  # within what a record may live: nothing goes
        later = await gw.generate(key, "a lighthouse, a day on")
        assert later.status_code == 200
        assert admin.zcard(index) == 6
        clock.advance(600 + 3_600 + 1)  # the five are past it; four records expired
        admin.delete(*(keys.job(account, job_id) for job_id in made[1:]))
        # A younger entry whose record is gone is not looked at: only those past the
        # age a record may live are (an admission in four reads the oldest few: its job
        # id decides, so a few more are made until one has looked).
        day_on = later.json()["data"]["generate"]["id"]
        admin.delete(keys.job(account, day_on))
        for n in range(60):
            assert (await gw.generate(key, f"a lighthouse at last {n}")).status_code == 200
            listed = set(admin.zrange(index, 0, -1))
            if not listed & set(made[1:]):
                break
        assert not listed & set(made[1:])  # the four whose records expired went
        assert {made[0], day_on} <= listed  # its record lives, or it is too young: listed
        assert len(listed) == 2 + n + 1
    admin.close()


# -- 4. a job record is one small JSON string ------------------------------------------

README_PROMPT = "a lighthouse on a cliff at dusk, oil painting"


async def test_a_completed_job_record_is_under_600_bytes_and_reads_whole(
    redis_url: str, storage_dir: Path
) -> None:
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=100)
        r = await gw.http.post(
            "/v1/text_to_image",
            json={"service": "local", "prompt": README_PROMPT, "width": 768, "height": 512},
            headers={"Authorization": f"Bearer {key}", "Prefer": "wait=20"},
        )
        assert r.status_code == 200, r.text
        job = r.json()
        [record_key] = admin.keys(f"*:job:{job['id']}")
        assert admin.type(record_key) == "string"
        assert admin.memory_usage(record_key, samples=0) < 600
        stored = json.loads(admin.get(record_key))
        assert "metadata" not in stored and "meta" in stored  # restated fields left out
        # Every field a client reads is there, as the worker made it.
        meta, seed = job["metadata"], job["metadata"]["seed"]
        assert (job["width"], job["height"], meta["width"], meta["height"]) == (768, 512) * 2
        assert meta["seeds"] == [seed] and meta["cached"] is False and meta["attempts"] == 1
        assert meta["sent"]["prompt"] == README_PROMPT and meta["sent"]["seed"] == seed
        assert meta["backend"] == "local" and meta["duration"] == job["duration"]
        listed = await gw.gql("{ jobs(first: 1) { nodes { metadata width } } }", key=key)
        assert listed.json()["data"]["jobs"]["nodes"] == [{"metadata": meta, "width": 768}]
    admin.close()


async def test_a_record_written_as_a_hash_by_an_earlier_version_runs_and_reads(
    redis_url: str, storage_dir: Path
) -> None:
    """Records stored before this format (a hash, every value a string) are read,
    started, finished and refunded as they were: an upgrade loses no job."""
    admin = redis.Redis.from_url(redis_url, decode_responses=True)
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=100)
        made = (await gw.generate(key, README_PROMPT)).json()["data"]["generate"]
        [record_key] = admin.keys(f"*:job:{made['id']}")
        record = json.loads(admin.get(record_key))
        as_hash = {
            name: value if isinstance(value, str) else json.dumps(value)
            for name, value in {**record, "id": made["id"]}.items()
        }
        admin.delete(record_key)
        admin.hset(record_key, mapping=as_hash)
        queued = await gw.job(key, made["id"])
        assert queued is not None and queued["status"] == "queued"
    async with gateway(redis_url, storage_dir) as gw2:
        done = await gw2.wait(key, made["id"])
        assert done["status"] == "completed" and done["metadata"]["sent"]["prompt"] == README_PROMPT
        assert admin.type(record_key) == "string"  # rewritten in the new format
    admin.close()


async def test_what_no_script_reads_comes_back_as_it_was_written(
    redis_url: str, storage_dir: Path
) -> None:
    """A record's nested values pass the scripts (start, patch, finish) as JSON text: a
    client's callback data, an upstream's job and metadata with numbers of 19 digits and
    empty lists are read back unchanged (Lua's cjson would write 1.2345678901235e+18 and
    {})."""
    big, other = 1234567890123456789, 9876543210987654321
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        store = gw.app.state.gateway.store
        shape = {"protocol": "fluxkrea", "callback_data": {"ids": [], "order": big, "v": 0.1}}
        job = Job(
            id="a" * 24,
            account="feedc0ffee00",
            status="queued",
            provider="flux-krea",
            params={"prompt": README_PROMPT, "seed": 7},
            cost=20,
            created_at=1_000,
            webhook_url="https://hooks.example/x",
            webhook_shape=shape,
        )
        key = keys.job(job.account, job.id)
        await gw.accounts.redis.set(key, orjson.dumps(job.to_record()))
        started = await store.start(key, 2_000, 60_000)
        assert started is not None and started.webhook_shape == shape
        upstream = {"backend": "fluxkrea", "id": "u1", "sent": {"seed": other, "tags": []}}
        await store.save_upstream(started, upstream)
        metadata = {"seeds": [big], "model": "m", "empty": [], "upstreamId": "u1"}
        assert await store.finish(
            started,
            "completed",
            3_000,
            refund=False,
            urls=["https://x.example/1.png"],
            width=768,
            height=512,
            metadata=metadata,
        )
        done = await store.get_by_key(key)
        assert done is not None
        assert (done.webhook_shape, done.upstream) == (shape, upstream)
        assert {k: done.metadata[k] for k in metadata} == metadata
