"""The Lua scripts as typed calls, and what a failure of the store means.

- Each wrapper of `gateway/store/scripts.py` decodes its script's reply by name, and the
  set of scripts is built by name: each attribute runs the file of its own name.
- A store error is classified by its type: unreachable (503, a job left for a retry)
  or a bug (Redis refused the command: a Lua error, WRONGTYPE), which the API answers
  with a masked 500 and a worker ends by failing the job with a refund.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.accounts import Accounts
from gateway.admission import admit, plan_table
from gateway.auth import authenticate, credentials
from gateway.config import PlanLimits, load_settings
from gateway.jobs.model import Job
from gateway.store import keys, scripts
from gateway.store.redis import HiredisPacked, connect, store_trouble
from gateway.store.scripts import (
    Admit,
    AdmitReply,
    Auth,
    Claim,
    Credit,
    Finish,
    Hit,
    Promote,
    Scripts,
    ScriptSourceError,
    Settle,
    Start,
    source,
)
from tests.harness import gateway
from tests.records import change

STORE = Path(scripts.__file__).parent

# -- each wrapper's reply, decoded by name ---------------------------------------------


def test_admit_replies_are_decoded_by_verdict() -> None:
    head = ["ok", 60, 2, -1, 3, 1_700_000_060, 480, "pro", "run"]
    ok = Admit.decode(head)
    assert (ok.verdict, ok.mode, ok.hit) == ("ok", "run", None)
    assert (ok.rpm, ok.concurrency, ok.daily) == (60, 2, -1)
    assert (ok.window_used, ok.window_reset, ok.balance, ok.plan) == (3, 1_700_000_060, 480, "pro")

    hit = Admit.decode([*head[:8], "hit", '["u"]', "512", "768", '{"cached": true}'])
    assert hit.mode == "hit"
    assert hit.hit == Hit(urls='["u"]', width="512", height="768", metadata='{"cached": true}')
    assert hit.hit._asdict() == {
        "urls": '["u"]',
        "width": "512",
        "height": "768",
        "metadata": '{"cached": true}',
    }

    limited = Admit.decode(["limited", *head[1:8], "minute", 1500])
    assert (limited.limit, limited.wait_ms, limited.mode) == ("minute", 1500, "")
    credits = Admit.decode(["credits", *head[1:8], 20])
    assert (credits.cost, credits.balance) == (20, 480)
    duplicate = Admit.decode(["duplicate", *head[1:8], "abc123"])
    assert duplicate.job_id == "abc123"
    forbidden = Admit.decode(["forbidden", *head[1:8], "origin"])
    assert (forbidden.verdict, forbidden.rule) == ("forbidden", "origin")
    mismatch = Admit.decode(["idempotency_mismatch", *head[1:8]])
    assert (mismatch.verdict, mismatch.job_id, mismatch.limit) == ("idempotency_mismatch", "", "")
    assert Admit.decode(["unauthenticated"]) == AdmitReply(verdict="unauthenticated")


def test_the_other_replies_are_decoded_by_name() -> None:
    known = Auth.decode(
        [["name", "n", "plan", "pro"], 4, 1_700_000_060, 7, 60, -1, 100, ["spent", "5"], 600, 9]
    )
    assert known.account == {"name": "n", "plan": "pro"}
    assert known.token == {"spent": "5"}
    assert (known.read_limit, known.tokens_reads, known.record) == (600, 9, {})
    assert (known.window_used, known.window_reset, known.reads) == (4, 1_700_000_060, 7)
    assert (known.rpm, known.concurrency, known.daily) == (60, -1, 100)
    assert Auth.decode([[]]).account == {}

    started = Start.decode(["queued", 1, '{"status": "processing", "attempts": 1}'])
    assert started.status == "queued" and started.attempts == 1
    assert started.record == {"status": "processing", "attempts": 1}
    assert Start.decode(["missing", 0]).record == {}

    ended = Finish.decode([1, 80])
    assert (ended.ended, ended.balance, ended.status) == (True, 80, "")
    not_ended = Finish.decode([0, "cancelled"])
    assert (not_ended.ended, not_ended.status) == (False, "cancelled")

    assert tuple(Credit.decode(["ok", 150])) == ("ok", 150)
    assert Credit.decode(["negative", 3]).outcome == "negative"
    assert Claim.decode(["k1", "k2"]).due == ["k1", "k2"]
    assert Settle.decode([1, "k"]) == (True, ["k"]) and Settle.decode([0]) == (False, [])
    assert Promote.decode("poor").verdict == "poor"


# -- the set of scripts, by name ----------------------------------------------------


def test_each_script_runs_the_file_of_its_own_name() -> None:
    client = aioredis.Redis()  # never connected
    made = Scripts(client)
    files = {p.stem for p in STORE.glob("*.lua")} - {
        "once",
        "limits",
        "record",
        "entry_write",
        "read_record",
        "ledger",
    }
    assert set(made.by_name) == files == set(scripts.NAMES)
    once = (STORE / "once.lua").read_text()
    for name, script in made.by_name.items():
        assert getattr(made, name) is script and script.name == name
        assert script.source == source(name)
        body = (STORE / f"{name}.lua").read_text()
        for line in body.splitlines():
            if not line.startswith("-- include: "):
                assert line in script.source  # its own file, not another's
        assert script.once == (name in {"start", "finish", "promote"})
        wrapped = once.split("-- include: record.lua\n")[0]  # once.lua's head, up to its include
        assert script.source.startswith(wrapped) == script.once
    # admit.lua and auth.lua share one statement of a key's limits
    shared = (STORE / "limits.lua").read_text()
    assert shared in made.admit.source and shared in made.auth.source
    assert "local function key_limits" not in (STORE / "admit.lua").read_text()
    # each script that reads or writes a job record, one statement of its format
    record = (STORE / "record.lua").read_text()
    for name in ("admit", "auth", "start", "finish", "promote", "settle", "read", "patch", "lease"):
        assert made.by_name[name].source.count(record) == 1, name
    # read.lua and auth.lua (a poll's key check) read a record one way
    reader = (STORE / "read_record.lua").read_text()
    for name in ("read", "auth"):
        assert made.by_name[name].source.count(reader) == 1, name
    # settle.lua and entry.lua write a cache entry one way
    writer = (STORE / "entry_write.lua").read_text()
    for name in ("settle", "entry"):
        assert made.by_name[name].source.count(writer) == 1, name
    # the four that write a ledger entry write it one way
    ledger = (STORE / "ledger.lua").read_text()
    for name in ("admit", "credit", "finish", "promote"):
        assert made.by_name[name].source.count(ledger) == 1, name
        assert "'MINID'" not in (STORE / f"{name}.lua").read_text(), name


@pytest.fixture
def scripts_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the scripts' directory the sources are read from, for breaking."""
    for path in STORE.glob("*.lua"):
        shutil.copy(path, tmp_path)
    monkeypatch.setattr(scripts, "HERE", tmp_path)
    source.cache_clear()
    yield tmp_path
    source.cache_clear()


def test_a_missing_script_or_marker_fails_at_start_up(scripts_dir: Path) -> None:
    client = aioredis.Redis()
    Scripts(client)  # the copy is whole
    source.cache_clear()
    once = scripts_dir / "once.lua"
    once.write_text(once.read_text().replace("-- BODY\n", "-- body\n"))
    with pytest.raises(ScriptSourceError, match="BODY"):
        Scripts(client)
    source.cache_clear()
    once.write_text(once.read_text().replace("-- body\n", "-- BODY\n"))
    (scripts_dir / "limits.lua").unlink()
    with pytest.raises(ScriptSourceError, match=r"limits\.lua"):
        Scripts(client)
    with pytest.raises(ScriptSourceError, match="no script named"):
        source("nope")


async def test_every_wrapper_runs_its_script(redis_url: str) -> None:
    """Against a real Redis: each wrapper's keys and arguments reach its script, and its
    reply decodes (the unknown account, the missing job, the empty schedule)."""
    client = await connect(redis_url)
    try:
        made = Scripts.register(client)
        await made.load()
        a, shard = "feedc0ffee00", 0
        admitted = await made.admit(
            account=keys.account(a),
            rate=keys.rate(a),
            day=keys.day(a, "20250101"),
            running=keys.running(a),
            ledger=keys.ledger(a),
            job=keys.job(a, "j1"),
            jobs=keys.jobs(a),
            idempotency=keys.idempotency(a, ""),
            queue=keys.queue(shard),
            cache_entry=keys.cache_entry(shard, ""),
            inflight=keys.inflight(shard, ""),
            followers=keys.followers(shard, ""),
            coalescing=keys.coalescing(shard),
            client_token=keys.client_token(a, ""),
            token_jobs=keys.token_jobs(a, ""),
            webhooks=keys.webhooks(shard),
            now_ms=1,
            secret_hash="0" * 64,
            plans=";pro:60:2:-1",
            cost=1,
            job_id="j1",
            lease_ms=1000,
            ms_to_day_end=1000,
            idempotency_hash="",
            cacheable=False,
            retention_ms=1000,
            token=False,
            origin="",
            service="local",
            record_head=b'{"status":"queued"}',
            record_rest=b'{"provider":"local"}',
            webhook=False,
        )
        assert admitted.verdict == "unauthenticated"
        auth = await made.auth(
            account=keys.account(a),
            rate=keys.rate(a),
            reads=keys.reads(a, 0),
            client_token=keys.client_token(a, ""),
            tokens_reads=keys.tokens_reads(a, 0),
            now_ms=1,
            count_read=True,
            secret_hash="0" * 64,
            plans=";pro:60:2:-1",
            token=False,
            read_rpm=600,
            read_rpm_per_job=70,
        )
        assert auth.account == {}
        job = keys.job(a, "j1")
        started = await made.start(
            job=job, running=keys.running(a), now_ms=1, lease_ms=1000, job_id="j1"
        )
        assert (started.status, started.attempts, started.record) == ("missing", 0, {})
        finished = await made.finish(
            job=job,
            running=keys.running(a),
            account=keys.account(a),
            ledger=keys.ledger(a),
            webhooks=keys.webhooks(shard),
            cancellations=keys.cancellations(shard),
            client_token=keys.client_token(a, ""),
            status="failed",
            now_ms=1,
            job_id="j1",
            refund=True,
            retention_ms=1000,
            fields={"error": "x"},
        )
        assert (finished.ended, finished.status) == (False, "missing")
        credit = await made.credit(
            account=keys.account(a),
            ledger=keys.ledger(a),
            topup=keys.topup(a, "t"),
            delta=5,
            reason="topup",
            most=10,
        )
        assert credit.outcome == "unknown"
        webhooks = keys.webhooks(shard)
        claim = await made.claim(schedule=webhooks, now_ms=1, lease_ms=1, count=5)
        assert claim.due == []
        resent = await made.resend(schedule=webhooks, job=job, now_ms=1, lease_ms=1)
        assert resent == "missing"
        settled = await made.settle(
            cache_entry=keys.cache_entry(shard, "d"),
            inflight=keys.inflight(shard, "d"),
            followers=keys.followers(shard, "d"),
            webhooks=keys.webhooks(shard),
            coalescing=keys.coalescing(shard),
            leader=job,
            now_ms=1,
            retention_ms=1000,
            urls='["u"]',
            width=1,
            height=1,
            metadata="{}",
            hit_metadata='{"cached": true}',
            params="{}",
            count=10,
        )
        assert settled == (False, [])
        promoted = await made.promote(
            job=job,
            account=keys.account(a),
            ledger=keys.ledger(a),
            queue=keys.queue(shard),
            inflight=keys.inflight(shard, "d"),
            webhooks=keys.webhooks(shard),
            client_token=keys.client_token(a, ""),
            running=keys.running(a),
            now_ms=1,
            lease_ms=1000,
            job_id="j1",
            retention_ms=1000,
            leader="",
        )
        assert promoted.verdict == "skip"
        stream = keys.queue(shard)
        await client.xgroup_create(stream, keys.QUEUE_GROUP, id="0", mkstream=True)
        forgot = await made.forget(stream=stream, group=keys.QUEUE_GROUP, idle_ms=0, keep="me")
        assert forgot.deleted == 0
        mint = dict(
            account=keys.account(a),
            live=keys.client_tokens(a),
            now_ms=1000,
            expires_ms=5000,
            keep_ms=60_000,
            cap=1,
            secret_hash="h",
            max_credits=1,
            max_jobs=-1,
            origins="",
            services="",
            key_hash="",  # the account's, as stored (none here)
        )
        minted = await made.mint(record=keys.client_token(a, "t1"), token_id="t1", **mint)
        assert minted == (True, 0, False)
        full = await made.mint(record=keys.client_token(a, "t2"), token_id="t2", **mint)
        assert full == (False, 5000, False)
        # Asked with a key the account no longer has (replaced since the request's check).
        mint["key_hash"] = "an-old-key"
        stale = await made.mint(record=keys.client_token(a, "t3"), token_id="t3", **mint)
        assert stale == (False, 0, True)
    finally:
        await client.aclose()


async def test_admission_and_auth_read_a_keys_limits_alike(redis_url: str) -> None:
    """One statement of the rule (limits.lua), read by both scripts: the plan's limits,
    each overridden by the key's own (negative: unlimited)."""
    settings = load_settings(redis_url=redis_url)
    client = await connect(redis_url)
    try:
        made = Scripts.register(client)
        accounts = Accounts(client, made, settings)
        plans = plan_table(settings.plans)
        now = 1_700_000_000_000
        for plan, overrides, expected in [
            ("free", {}, PlanLimits(rpm=10, concurrency=1, daily=100)),
            ("free", {"rpm": 100}, PlanLimits(rpm=100, concurrency=1, daily=100)),
            ("enterprise", {}, PlanLimits()),
            ("enterprise", {"rpm": 50, "daily": -1}, PlanLimits(rpm=50)),
            ("pro", {"concurrency": -5}, PlanLimits(rpm=60, daily=10_000)),
        ]:
            key = (await accounts.create(plan, 100, **overrides))["key"]
            credential = credentials(key)
            account = credential.account
            caller, _ = await authenticate(client, made, settings, key, now, plans=plans)
            job = Job(
                id=os.urandom(6).hex(),
                account=account,
                status="queued",
                provider="local",
                params={},
                cost=1,
                created_at=now,
            )
            admitted = await admit(
                client, made, credential, job, plans=plans, now_ms=now, lease_ms=1000
            )
            assert caller.limits == admitted.principal.limits == expected, (plan, overrides)
            assert caller.window_reset == admitted.principal.window_reset == now // 1000 + 60
    finally:
        await client.aclose()


# -- store errors, by type --------------------------------------------------------------


async def test_store_errors_are_classified_by_type(redis_url: str) -> None:
    for trouble in (
        RedisConnectionError("refused"),
        RedisTimeoutError("slow"),
        ClusterDownError("CLUSTERDOWN"),
        TryAgainError("TRYAGAIN"),
        ReadOnlyError("READONLY"),
    ):
        assert store_trouble(trouble), trouble
    # What a real Redis refuses is raised from inside redis-py, and is no trouble of the
    # store's: sent again it fails the same way.
    client = await connect(redis_url)
    try:
        await client.set("gw:{s0}:not-a-hash", "x")
        with pytest.raises(ResponseError, match="WRONGTYPE") as refused:
            await client.hget("gw:{s0}:not-a-hash", "f")
        assert not store_trouble(refused.value)
        with pytest.raises(ResponseError) as failed:
            await client.eval("return redis.call('INCR', KEYS[1])", 1, "gw:{s0}:not-a-hash")
        assert not store_trouble(failed.value)
    finally:
        await client.aclose()
    assert not store_trouble(ValueError("ours"))


class TornDown:
    """A connection's writer whose transport was torn down under it: asyncio then raises
    AttributeError or TypeError, not an OSError (redis-py issue #4287)."""

    def writelines(self, data: Any) -> None:
        raise AttributeError("'NoneType' object has no attribute '_add_writer'")

    async def drain(self) -> None:
        raise AssertionError("not reached")

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


async def test_a_write_on_a_torn_down_connection_is_a_connection_error(redis_url: str) -> None:
    conn = HiredisPacked(host="127.0.0.1", port=urlsplit(redis_url).port or 6379)
    await conn.connect()
    socket = conn._writer
    assert socket is not None
    try:
        conn._writer = TornDown()  # type: ignore[assignment]
        with pytest.raises(RedisConnectionError) as dropped:
            await conn.send_packed_command(conn.pack_command("PING"), check_health=False)
        assert store_trouble(dropped.value)
        assert not conn.is_connected  # redis-py closed it: the next command reconnects
        await conn.send_command("PING")  # on a new connection
        assert await conn.read_response() == b"PONG"
    finally:
        socket.close()
        await conn.disconnect()


# -- through the public surface ---------------------------------------------------------


async def test_a_refused_admission_is_a_masked_500_and_the_server_keeps_serving(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        broken, fine = await gw.key(), await gw.key()
        # Something else wrote a string where the account's hash lives: admit.lua's
        # first read of it fails with WRONGTYPE.
        account = keys.account(gw.keys[broken]["id"])
        await gw.accounts.redis.delete(account)
        await gw.accounts.redis.set(account, "not a hash")

        r = await gw.generate(broken, width=512, height=512)
        assert r.status_code == 500, r.text
        (error,) = r.json()["errors"]
        assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
        assert "WRONGTYPE" not in r.text and "lua" not in r.text.lower()

        rest = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": broken},
            json={"service": "local", "prompt": "a kite", "width": 512, "height": 512},
        )
        assert rest.status_code == 500, rest.text
        assert rest.json()["error"]["code"] == "INTERNAL_SERVER_ERROR"
        assert "WRONGTYPE" not in rest.text

        me = await gw.gql("{ me { credits } }", key=broken)  # auth.lua: the same refusal
        assert me.status_code == 500
        assert me.json()["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"

        ok = await gw.generate(fine, width=512, height=512)
        assert ok.status_code == 200, ok.text
        assert ok.json()["data"]["generate"]["status"] == "queued"


async def test_a_job_a_script_cannot_start_is_failed_and_refunded(
    redis_url: str, storage_dir: Path
) -> None:
    """start.lua fails with a Lua error on this job's record however often it is sent:
    the worker fails the job and refunds it, where it once left it pending forever."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=100)
        r = await gw.generate(key, width=512, height=512)
        job = r.json()["data"]["generate"]
        assert job["status"] == "queued" and job["creditCost"] > 0
        account = gw.keys[key]["id"]
        # Its attempt count damaged (not a number): counting one more attempt fails in
        # start.lua ("attempt to perform arithmetic on a nil value").
        await change(gw.accounts.redis, keys.job(account, job["id"]), attempts=[])
    async with gateway(redis_url, storage_dir, job_lease_seconds=60) as gw2:
        done = await gw2.wait(key, job["id"], timeout=15)
        assert done["status"] == "failed" and done["creditCost"] == 0
        assert done["error"] == "internal error while starting the job"
        me = (await gw2.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me == {"credits": 100}
        ledger = await gw2.accounts.ledger(account)
        assert [e["reason"] for e in ledger] == ["initial", "charge", "refund"]
        redis = gw2.accounts.redis
        assert await redis.zcard(keys.running(account)) == 0  # its slot is free
        pending = await redis.xpending(keys.queue(0), keys.QUEUE_GROUP)
        assert pending["pending"] == 0  # taken off the queue, not left for a retry
