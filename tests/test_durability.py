"""Accepted jobs survive crashed and stopped workers and a Redis restart
(docs/api.md#durability)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from gateway.store import keys
from tests.conftest import RedisServer
from tests.emulators.krea import KreaEmulator
from tests.harness import Harness, gateway, replies_cut, until
from tests.records import record, records
from tests.servers import serve

GATEWAY = str(Path(sys.executable).with_name("gateway"))
TERMINAL = ("completed", "failed", "cancelled")


def start_worker(
    redis_url: str, krea_base: str, storage: Path, log: Path | None = None, **extra: str
) -> subprocess.Popen[bytes]:
    """A `gateway worker` process routed to the Krea emulator; its log lines in `log`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_KREA_API_BASE": krea_base,
            "GATEWAY_KREA_API_TOKEN": "test-token",
            "GATEWAY_STORAGE_DIR": str(storage),
            "GATEWAY_POLL_INTERVAL": "0.05",
            "GATEWAY_JOB_LEASE_SECONDS": "1.5",
            **extra,
        }
    )
    out = log.open("ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([GATEWAY, "worker"], env=env, stdout=out, stderr=out)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]  # the child holds its own copy


@contextlib.asynccontextmanager
async def held_krea(
    redis_url: str, storage_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[KreaEmulator, str, Harness]]:
    """A Krea emulator whose jobs run until the test lets them end (`steps_to_complete`),
    and a gateway routed to it (no in-process workers unless asked for)."""
    emu = KreaEmulator(steps_to_complete=10**9)
    overrides.setdefault("inprocess_workers", False)
    async with (
        serve(emu.app) as krea,
        gateway(
            redis_url, storage_dir, krea_api_base=krea, krea_api_token="test-token", **overrides
        ) as gw,
    ):
        yield emu, krea, gw


async def submit(gw: Harness, key: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        r = await gw.generate(key, f"durable {i}", provider="flux-dev", width=512, height=512)
        assert r.status_code == 200, r.text
        ids.append(r.json()["data"]["generate"]["id"])
    return ids


async def jobs_state(gw: Harness, key: str, ids: list[str]) -> list[dict[str, Any]]:
    account = gw.keys[key]["id"]
    return await records(gw.accounts.redis, [keys.job(account, job_id) for job_id in ids])


async def accepted_upstream(gw: Harness, key: str, ids: list[str]) -> None:
    """Wait until every job's upstream id is stored (the upstream has accepted it)."""

    async def check() -> bool:
        return all(r.get("upstream") for r in await jobs_state(gw, key, ids))

    await until(check, timeout=60.0)


async def all_ended(gw: Harness, key: str, ids: list[str], timeout: float = 60.0) -> None:
    """Wait until every job is terminal (tolerating a store that is coming back)."""

    async def check() -> bool:
        try:
            rows = await jobs_state(gw, key, ids)
        except Exception:
            return False
        return all(r.get("status") in TERMINAL for r in rows)

    await until(check, timeout=timeout)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


async def check_outcome(gw: Harness, key: str, ids: list[str], emu: KreaEmulator) -> None:
    rows = await jobs_state(gw, key, ids)
    assert all(r["status"] == "completed" for r in rows), [
        (r["status"], r.get("error")) for r in rows if r["status"] != "completed"
    ]
    # Every upstream job was resumed, never submitted twice.
    assert emu.submissions == len(ids)
    # Credits match outcomes: every job charged once, none refunded.
    ledger = await gw.accounts.ledger(gw.keys[key]["id"])
    assert [e["reason"] for e in ledger].count("charge") == len(ids)
    assert "refund" not in [e["reason"] for e in ledger]
    me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
    assert me["credits"] == 10_000 - 10 * len(ids)


@pytest.mark.parametrize(
    ("how", "jobs", "exit_code"),
    [
        (signal.SIGKILL, 20, -signal.SIGKILL),  # crashed: its jobs are claimed after the lease
        (signal.SIGTERM, 10, 0),  # stopped: a clean exit, running jobs handed over
    ],
    ids=["kill-9", "sigterm"],
)
async def test_a_worker_stopped_mid_run_loses_nothing_and_pays_upstream_once(
    redis_url: str, storage_dir: Path, how: signal.Signals, jobs: int, exit_code: int
) -> None:
    async with held_krea(redis_url, storage_dir) as (emu, krea, gw):
        key = await gw.key("enterprise", credits=10_000)
        ids = await submit(gw, key, jobs)
        first = start_worker(redis_url, krea, storage_dir, GATEWAY_SHUTDOWN_GRACE_SECONDS="0.2")
        try:
            await accepted_upstream(gw, key, ids)
            first.send_signal(how)
            assert first.wait(20) == exit_code
            emu.steps_to_complete = 1  # upstream finishes them now
            second = start_worker(redis_url, krea, storage_dir)
            try:
                await all_ended(gw, key, ids)
            finally:
                stop(second)
        finally:
            stop(first)
        await check_outcome(gw, key, ids, emu)
        rows = await jobs_state(gw, key, ids)
        assert all(int(r["attempts"]) == 2 for r in rows)  # resumed, each once


async def test_redis_restart_with_aof_loses_no_accepted_job(
    storage_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    try:
        async with held_krea(server.url, storage_dir) as (emu, krea, gw):
            key = await gw.key("enterprise", credits=10_000)
            ids = await submit(gw, key, 10)
            worker = start_worker(server.url, krea, storage_dir)
            try:
                await accepted_upstream(gw, key, ids)
                # Redis goes away mid-run and comes back from its append-only file.
                port = server.port
                server.stop()
                server.port = port
                server.start()
                emu.steps_to_complete = 1

                await all_ended(gw, key, ids, timeout=90)
            finally:
                stop(worker)
            await check_outcome(gw, key, ids, emu)
    finally:
        server.stop()


async def test_cancel_while_running_stops_upstream_refunds_and_frees_the_slot(
    redis_url: str, storage_dir: Path
) -> None:
    async with held_krea(redis_url, storage_dir, inprocess_workers=True) as (emu, _, gw):
        key = await gw.key("free", credits=100)
        [job_id] = await submit(gw, key, 1)

        await accepted_upstream(gw, key, [job_id])
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status creditCost } }", {"id": job_id}, key
        )
        assert r.json()["data"]["cancelJob"] == {"status": "cancelled", "creditCost": 0}
        me = (await gw.gql("{ me { credits limits { name used } } }", key=key)).json()
        assert me["data"]["me"]["credits"] == 100
        assert {"name": "concurrency", "used": 0} in me["data"]["me"]["limits"]

        # The worker notices at its next poll and stops polling the upstream job.
        async def stopped() -> bool:
            before = len(emu.requests)
            await asyncio.sleep(0.3)
            return len(emu.requests) == before

        await until(stopped, timeout=60.0)
        # The free key's one slot is free: a new job is admitted at once.
        again = await gw.generate(key, provider="local", width=512, height=512)
        assert again.status_code == 200, again.text


async def test_retention_removes_records_and_outputs_together(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, retention_days=1 / 86400) as gw:  # one second
        key = await gw.key()
        r = await gw.generate(key, provider="local", width=512, height=512)
        job_id = r.json()["data"]["generate"]["id"]
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed"

        async def expired() -> bool:
            return await gw.job(key, job_id) is None

        await until(expired, timeout=60.0)
        listed = (await gw.gql("{ jobs { nodes { id } } }", key=key)).json()
        assert listed["data"]["jobs"]["nodes"] == []


async def test_outputs_past_retention_are_swept_and_fresh_ones_kept(storage_dir: Path) -> None:
    """Old outputs go, and the temporary file of a write a crash cut short; fresh ones
    stay, and so does any file the gateway did not make, however old."""
    from gateway.artifacts import LocalArtifactStore, new_name

    store = LocalArtifactStore(storage_dir, "http://gw")
    old = await store.put(b"old", "png")
    new = await store.put(b"new", "png")
    old_path = storage_dir / old.rsplit("/", 1)[1]
    cut_short = storage_dir / f".{new_name('png')}.tmp"
    names = ("README", "photo.png", ".keep", "a" * 24 + ".png.bak")
    others = [storage_dir / name for name in names]
    for path in (cut_short, *others):
        path.write_bytes(b"x")
    for path in (old_path, cut_short, *others):
        os.utime(path, (time.time() - 10 * 86400, time.time() - 10 * 86400))
    assert await store.sweep(time.time() - 7 * 86400) == 2
    assert not old_path.exists() and not cut_short.exists()
    assert (storage_dir / new.rsplit("/", 1)[1]).read_bytes() == b"new"
    assert all(path.read_bytes() == b"x" for path in others)


async def test_an_output_is_on_disk_before_put_returns(
    storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job is completed once `put` returns, so the file and its name must then survive
    a power cut: the file is synced before its rename, and the directory after it. (A
    power cut cannot be made here; the syncs, in their order, can be watched.) A sync
    that fails leaves neither file behind, and the job a retry."""
    from gateway.artifacts import LocalArtifactStore, StorageUnavailable

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", fsync)
    store = LocalArtifactStore(storage_dir, "http://gw")
    url = await store.put(b"picture", "png")
    name = url.rsplit("/", 1)[1]
    where = storage_dir.resolve()
    assert synced == [str(where / f".{name}.tmp"), str(where)]
    assert (storage_dir / name).read_bytes() == b"picture"

    def failing(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}") == str(where):
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(StorageUnavailable):
        await store.put(b"lost", "png")
    assert sorted(p.name for p in storage_dir.iterdir()) == [name]


async def test_an_output_directory_that_refuses_writes_leaves_the_job_for_a_retry(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    """A full disk or a volume gone is the store's trouble, not the job's: as with a
    bucket away, the job (its upstream already paid) is tried again, not failed."""
    async with gateway(redis_url, storage_dir, job_lease_seconds=0.6) as gw:
        key = await gw.key(credits=1000)
        away = tmp_path / "away"
        storage_dir.rename(away)
        storage_dir.write_bytes(b"")  # a file where the directory was: every write fails
        made = await gw.generate(key, width=512, height=512)
        job_id = made.json()["data"]["generate"]["id"]
        store = gw.app.state.gateway.store
        account = gw.keys[key]["id"]
        deadline = time.monotonic() + 20
        while True:  # taken again after its first attempt could not store its image
            job = await store.get(account, job_id)
            assert job.status != "failed", job.error
            if job.attempts >= 2:
                break
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.02)
        storage_dir.unlink()
        away.rename(storage_dir)
        done = await gw.wait(key, job_id)
        assert done["status"] == "completed", done["error"]
        assert (await gw.http.get(done["url"])).status_code == 200


async def test_a_job_that_keeps_killing_workers_is_failed_and_refunded(
    redis_url: str, storage_dir: Path
) -> None:
    async with held_krea(redis_url, storage_dir) as (emu, krea, gw):
        key = await gw.key("enterprise", credits=100)
        [job_id] = await submit(gw, key, 1)
        for _ in range(2):  # each worker takes the job and dies with it
            worker = start_worker(redis_url, krea, storage_dir, GATEWAY_JOB_MAX_TRIES="2")
            attempts_before = int((await jobs_state(gw, key, [job_id]))[0].get("attempts", 0))

            async def taken(before: int = attempts_before) -> bool:
                row = (await jobs_state(gw, key, [job_id]))[0]
                return int(row.get("attempts", 0)) > before and bool(row.get("upstream"))

            await until(taken, timeout=60.0)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        last = start_worker(redis_url, krea, storage_dir, GATEWAY_JOB_MAX_TRIES="2")
        try:
            done = await gw.wait(key, job_id, timeout=60)
        finally:
            stop(last)
        assert done["status"] == "failed"
        assert "gave up after 2 attempts" in done["error"]
        assert done["creditCost"] == 0
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 100
        assert emu.submissions == 1  # the second worker resumed the upstream job


async def test_a_job_start_whose_reply_is_lost_counts_one_attempt(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """The connection drops after Redis ran `start.lua`, before its reply arrived:
    redis-py sends it again. The job is started once: one attempt counted (a second
    would bring GATEWAY_JOB_MAX_TRIES one nearer), completed, charged once."""
    async with replies_cut(
        plain_redis_server.port, "start", storage_dir, inprocess_workers=True
    ) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        account = gw.keys[key]["id"]
        cutter.armed = True
        r = await gw.generate(key, width=1024, height=1024)
        job = r.json()["data"]["generate"]
        done = await gw.wait(key, job["id"])
        assert cutter.cut == 1
        assert done["status"] == "completed" and done["creditCost"] == 20
        stored = await record(gw.accounts.redis, keys.job(account, job["id"]))
        assert stored["attempts"] == 1
        assert (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"] == {"credits": 80}


async def test_a_job_end_whose_reply_is_lost_keeps_its_images(
    plain_redis_server: RedisServer, storage_dir: Path
) -> None:
    """The same cut for `finish.lua`: the re-sent end must not read as "someone else
    ended it" (the worker would then delete the images of a completed job)."""
    async with replies_cut(
        plain_redis_server.port, "finish", storage_dir, inprocess_workers=True
    ) as (cutter, gw):
        key = await gw.key("pro", credits=100)
        cutter.armed = True
        r = await gw.generate(key, width=1024, height=1024)
        done = await gw.wait(key, r.json()["data"]["generate"]["id"])
        assert cutter.cut == 1
        assert done["status"] == "completed" and done["creditCost"] == 20
        image = await gw.http.get(urlsplit(done["url"]).path)
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert [e["reason"] for e in ledger] == ["initial", "charge"]


def test_a_failure_inside_the_redis_client_is_the_stores_not_the_jobs() -> None:
    # redis-py's cluster client, while a node restarts, can send on a connection it has
    # just dropped: AttributeError from inside redis-py. The job must wait for a retry.
    from gateway.store.redis import store_trouble

    inside: dict[str, Any] = {"__name__": "redis.asyncio.connection"}
    exec("def send(writer):\n    writer.writelines([b'PING'])", inside)
    with pytest.raises(AttributeError) as dropped:
        inside["send"](None)
    assert store_trouble(dropped.value)
    with pytest.raises(ValueError) as ours:
        int("not a number")
    assert not store_trouble(ours.value)  # a bug of our own still fails the job


async def test_a_redis_that_comes_back_empty_gets_its_queue_read_again(
    storage_dir: Path, tmp_path: Path
) -> None:
    """Redis restarted without its data (no persistence, or flushed) while a worker runs:
    the worker makes the queue's consumer group again, and a job admitted afterwards
    runs, instead of NOGROUP on every read until the worker is restarted."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with held_krea(server.url, storage_dir) as (emu, krea, gw):
            emu.steps_to_complete = 1
            worker = start_worker(server.url, krea, storage_dir)
            try:
                key = await gw.key(credits=1000)
                [before] = await submit(gw, key, 1)
                assert (await gw.wait(key, before))["status"] == "completed"
                port = server.port
                server.stop()  # and back with nothing: no AOF, no snapshot
                server.port = port
                server.start()
                key = await gw.key(credits=1000)  # the accounts went with it
                [after] = await submit(gw, key, 1)
                done = await gw.wait(key, after, timeout=30)
                assert done["status"] == "completed", done
            finally:
                stop(worker)
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def queue_of(redis_url: str, jobs: int, **options: Any) -> AsyncIterator[tuple[Any, Any]]:
    """The client and the job queue on `redis_url` (blocking reads unless `options` say),
    its group made, shard 0's stream holding `jobs` entries: `job-0`, `job-1`, ..."""
    from gateway.jobs.queue import Queue
    from gateway.store.redis import Scripts, connect

    redis = await connect(redis_url)
    try:
        queue = Queue(redis, Scripts.register(redis), **{"blocking": True, **options})
        await queue.ensure_group()
        for n in range(jobs):
            await redis.xadd(keys.queue(0), {"job": f"job-{n}"})
        yield redis, queue
    finally:
        await redis.aclose()


async def test_a_worker_with_one_free_slot_takes_over_a_dead_workers_job(
    redis_url: str,
) -> None:
    """The entries a silent worker left are found wherever they sit among the pending
    ones: behind eleven that a live worker keeps renewing, a worker with one free slot
    takes the dead one's job (XAUTOCLAIM looks at ten entries per one it may take)."""
    stream = keys.queue(0)
    async with queue_of(redis_url, 12) as (redis, queue):
        live = await queue.read("live", 11, block_ms=10)
        [(dead_entry, dead_job)] = await queue.read("dead", 1, block_ms=10)
        assert len(live) == 11 and dead_job == "job-11"

        async def dead_is_idle() -> bool:
            rows = await redis.xpending_range(stream, keys.QUEUE_GROUP, "-", "+", 20, "dead")
            return bool(rows) and rows[0]["time_since_delivered"] >= 200

        await until(dead_is_idle, timeout=60.0)
        await queue.touch("live", [handle for handle, _ in live])  # the live one renews
        taken = await queue.reclaim("rescuer", min_idle_ms=200, count=1)
        assert taken == [(dead_entry, "job-11")]


async def test_a_worker_that_was_cut_off_stops_the_jobs_another_took_over(
    redis_url: str,
) -> None:
    """A worker that could not renew its entries for longer than a lease finds, when it
    can again, which ones another worker took over meanwhile: it renews only its own,
    never claiming those back (both would run them, and submit twice upstream)."""
    async with queue_of(redis_url, 3) as (redis, queue):
        held = await queue.read("cut-off", 3, block_ms=10)
        handles = [handle for handle, _ in held]

        async def all_idle() -> bool:
            rows = await redis.xpending_range(keys.queue(0), keys.QUEUE_GROUP, "-", "+", 10)
            return all(row["time_since_delivered"] >= 200 for row in rows)

        await until(all_idle, timeout=60.0)
        await queue.touch("cut-off", handles[:1])  # it reaches Redis for one entry only
        taken = await queue.reclaim("other", min_idle_ms=200, count=10)
        assert sorted(h for h, _ in taken) == sorted(handles[1:])

        assert sorted(await queue.touch("cut-off", handles)) == sorted(handles[1:])
        rows = await redis.xpending_range(keys.queue(0), keys.QUEUE_GROUP, "-", "+", 10)
        owners = {row["message_id"]: row["consumer"] for row in rows}
        assert [owners[h.partition("/")[2]] for h in handles] == ["cut-off", "other", "other"]


async def test_a_worker_paused_past_its_lease_stops_the_jobs_another_took_over(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    """A worker stopped (SIGSTOP, as a long GC pause or a frozen VM would) longer than its
    lease: another takes its jobs over and resumes them upstream. When the first runs
    again it finds them taken and stops them, so each is run by one worker only: polled,
    downloaded and stored once, submitted upstream once."""
    lease = "6"  # seconds: heartbeats every 2 s
    async with held_krea(redis_url, storage_dir) as (emu, krea, gw):
        key = await gw.key("enterprise", credits=10_000)
        ids = await submit(gw, key, 3)
        log = tmp_path / "first.log"
        first = start_worker(redis_url, krea, storage_dir, log, GATEWAY_JOB_LEASE_SECONDS=lease)
        second = None
        try:
            await accepted_upstream(gw, key, ids)
            redis = gw.accounts.redis

            async def owners() -> set[str]:
                rows = await redis.xpending_range(keys.queue(0), keys.QUEUE_GROUP, "-", "+", 10)
                return {str(row["consumer"]) for row in rows}

            (paused,) = await owners()
            first.send_signal(signal.SIGSTOP)
            second = start_worker(redis_url, krea, storage_dir, GATEWAY_JOB_LEASE_SECONDS=lease)

            async def taken_over() -> bool:
                return paused not in await owners()

            await until(taken_over, timeout=60.0)
            first.send_signal(signal.SIGCONT)

            async def stopped_there() -> bool:
                return log.read_text().count("job taken over by another worker") == len(ids)

            await until(stopped_there, timeout=60.0)
            # Only the second runs them now: paused, nobody polls Krea (a job polled every
            # 0.05 s by a worker still running it would be ~20 more in the window). Half a
            # second first for the polls already on the wire to arrive; the whole within a
            # heartbeat (whose retry would hide a cancel Python 3.11 lost: `stop_task`)
            # and well within the lease, after which the first could rightly take them back.
            second.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.5)
            polled = len(emu.received("GET", "/jobs/"))
            await asyncio.sleep(1)
            assert len(emu.received("GET", "/jobs/")) - polled <= len(ids)
            second.send_signal(signal.SIGCONT)
            emu.steps_to_complete = 1
            await all_ended(gw, key, ids)
        finally:
            for proc in (first, second):
                if proc is not None:
                    proc.send_signal(signal.SIGCONT)
                    stop(proc)
        await check_outcome(gw, key, ids, emu)
        assert len(list(storage_dir.glob("*.png"))) == len(ids)  # stored once each


async def test_a_queue_read_cancelled_as_a_job_arrives_is_cancelled(redis_url: str) -> None:
    """A worker stopping (its read cancelled) in the same moment as this process enqueues
    a job stops: the cancellation is not lost to the wake-up. (`asyncio.wait_for` on
    Python 3.11 returned the wake-up and dropped the cancellation; the next read then
    took a job on the way out.)"""
    # Not blocking in Redis: an idle sweep waits on this process's own wake-up.
    async with queue_of(redis_url, 0, blocking=False, idle_ms=60_000) as (_, queue):
        reading = asyncio.create_task(queue.read("stopping", 1, block_ms=60_000))

        async def asleep() -> bool:  # on the wake-up
            return bool(queue.wakeup._waiters)  # type: ignore[attr-defined]

        await until(asleep, timeout=60.0)
        queue.wakeup.set()
        reading.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reading


async def test_the_queue_forgets_workers_gone_but_not_one_holding_a_job(redis_url: str) -> None:
    """Every worker reads the queue under a name of its own, so each start adds one to
    the group. The hourly sweep deletes those that hold no entry and have not read for
    a while; one that still holds a job's entry is kept until another worker takes the
    entry over, so no job drops out of the pending ones."""
    stream = keys.queue(0)
    async with queue_of(redis_url, 3) as (redis, queue):
        [(done, _)] = await queue.read("gone-idle", 1, block_ms=10)
        await queue.ack(done)
        [(held, _)] = await queue.read("gone-holding", 1, block_ms=10)
        [(mine, _)] = await queue.read("me", 1, block_ms=10)
        await queue.ack(mine)

        async def names() -> set[str]:
            return {c["name"] for c in await redis.xinfo_consumers(stream, keys.QUEUE_GROUP)}

        async def all_idle() -> bool:
            rows = await redis.xinfo_consumers(stream, keys.QUEUE_GROUP)
            return all(row["idle"] >= 200 for row in rows)

        await until(all_idle, timeout=60.0)
        assert await queue.forget_gone("me", idle_ms=200) == 1
        assert await names() == {"gone-holding", "me"}
        # None has gone without a read for a minute: none is deleted.
        assert await queue.forget_gone("other", idle_ms=60_000) == 0

        assert await queue.reclaim("rescuer", min_idle_ms=200, count=1) == [(held, "job-1")]
        await until(all_idle, timeout=60.0)
        assert await queue.forget_gone("me", idle_ms=200) == 1
        assert await names() == {"rescuer", "me"}
        pending = await redis.xpending_range(stream, keys.QUEUE_GROUP, "-", "+", 10)
        assert [row["consumer"] for row in pending] == ["rescuer"]


async def test_each_image_of_a_krea_job_keeps_its_seed_when_another_worker_resumes_it(
    redis_url: str, storage_dir: Path
) -> None:
    """Krea draws one image a job: two images are two jobs, seeded s and s + 1
    (docs/providers/krea.md). Each image's seed is reported as drawn, by a job that ran
    straight through and by one another worker resumed."""
    emu = KreaEmulator(steps_to_complete=10**9)
    async with serve(emu.app) as krea:
        settings = {"krea_api_base": krea, "krea_api_token": "test-token"}

        async def two_images(gw: Harness, key: str, seed: int) -> str:
            r = await gw.generate(key, "twins", provider="flux-dev", seed=seed, numImages=2)
            assert r.status_code == 200, r.text
            return str(r.json()["data"]["generate"]["id"])

        async with gateway(redis_url, storage_dir, **settings) as gw:
            key = await gw.key(credits=1000)
            resumed = await two_images(gw, key, 7)
            await accepted_upstream(gw, key, [resumed])
        emu.steps_to_complete = 1
        async with gateway(redis_url, storage_dir, job_lease_seconds=0.3, **settings) as gw2:
            gw2.keys.update(gw.keys)
            straight = await two_images(gw2, key, 40)
            for job_id, seed in ((resumed, 7), (straight, 40)):
                done = await gw2.wait(key, job_id)
                assert done["status"] == "completed" and len(done["urls"]) == 2
                assert done["metadata"]["seeds"] == [seed, seed + 1], done["metadata"]
        assert emu.submissions == 4
