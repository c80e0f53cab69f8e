"""Signed webhooks with retries, and the private-address guard (docs/api.md#webhooks)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import ssl
import tempfile
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis import Redis
from standardwebhooks.webhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import metrics
from gateway.accounts import Accounts
from gateway.config import load_settings
from gateway.errors import BadUserInput
from gateway.jobs.model import Job
from gateway.jobs.store import JobStore
from gateway.store import keys
from gateway.store.redis import Scripts, connect
from gateway.store.scripts import source
from gateway.urlguard import Lookups, check_url
from gateway.webhooks import Webhooks, session
from tests.conftest import RedisServer
from tests.harness import gateway, until
from tests.records import record
from tests.servers import HOOKS_NAME, ReplyCutter, black_hole, free_port, resolving, serve

FAST = {"url_allow_cidrs": "127.0.0.0/8", "webhook_retry_delays": [0.05] * 6}


class Receiver:
    """A webhook receiver that fails `failures` times, then answers 200."""

    def __init__(self, failures: int = 0, status: int = 500) -> None:
        self.failures = failures
        self.status = status
        self.calls: list[tuple[dict[str, str], bytes, int]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        body = await request.body()
        status = 200
        if self.failures > 0:
            self.failures -= 1
            status = self.status
        self.calls.append((dict(request.headers), body, status))
        if status in (301, 302):
            return Response(status_code=status, headers={"location": "http://10.0.0.1/x"})
        return Response(status_code=status)


async def test_receiver_failing_twice_gets_one_signed_delivery_and_attempts_are_recorded(
    redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=2)
    async with serve(receiver.app) as hook_base, gateway(redis_url, storage_dir, **FAST) as gw:
        key = await gw.key()
        # The key's holder reads the secret back (it is printed once, at creation).
        me = (await gw.gql("{ me { webhookSecret } }", key=key)).json()["data"]["me"]
        secret = me["webhookSecret"]
        assert secret == gw.keys[key]["webhookSecret"]
        job = (
            await gw.gql(
                """mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }""",
                {
                    "i": {
                        "service": "local",
                        "prompt": "a lighthouse",
                        "width": 512,
                        "height": 512,
                        "webhookUrl": f"{hook_base}/hook",
                    }
                },
                key,
            )
        ).json()["data"]["generateImage"]
        done = await gw.wait(key, job["id"])
        assert done["status"] == "completed"

        async def delivered() -> bool:
            return any(status == 200 for _, _, status in receiver.calls)

        await until(delivered)
        job_key = keys.job(gw.keys[key]["id"], job["id"])

        async def settled() -> bool:
            return await gw.accounts.redis.zscore(keys.webhooks(0), job_key) is None

        await until(settled)
        assert [s for _, _, s in receiver.calls] == [500, 500, 200]

        ids = {h["webhook-id"] for h, _, _ in receiver.calls}
        assert len(ids) == 1  # the same id on every retry
        headers, body, _ = receiver.calls[-1]
        # Doitong: HMAC-SHA256 of the raw body, keyed with the secret string as printed.
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-doitong-signature"] == f"sha256={expected}"
        # Standard Webhooks: keyed with the base64 part of whsec_..., over id.timestamp.body.
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        mac = hmac.new(base64.b64decode(secret.removeprefix("whsec_")), signed, hashlib.sha256)
        assert headers["webhook-signature"] == "v1," + base64.b64encode(mac.digest()).decode()

        sent = orjson.loads(body)
        assert sent["id"] == job["id"] and sent["status"] == "completed"
        assert sent["url"] == done["url"] and sent["service"] == "local"
        assert sent["urls"] == done["urls"] == [done["url"]]
        assert sent["metadata"]["width"] == 512 and sent["metadata"]["duration"] >= 0
        assert sent["createdAt"].endswith("Z") and sent["completedAt"]

        r = await gw.gql(
            """query($id: ID!) { webhookDeliveries(id: $id) {
            attempt statusCode success error } }""",
            {"id": job["id"]},
            key,
        )
        attempts = r.json()["data"]["webhookDeliveries"]
        assert attempts == [
            {"attempt": 1, "statusCode": 500, "success": False, "error": "HTTP 500"},
            {"attempt": 2, "statusCode": 500, "success": False, "error": "HTTP 500"},
            {"attempt": 3, "statusCode": 200, "success": True, "error": None},
        ]
        # The job says how its webhook went, over GraphQL and REST alike.
        status = "query($id: ID!) { job(id: $id) { webhookStatus } }"
        r = await gw.gql(status, {"id": job["id"]}, key)
        assert r.json()["data"]["job"]["webhookStatus"] == "delivered"
        r = await gw.http.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": key})
        assert r.json()["webhookStatus"] == "delivered"

        # Re-send on request: one more signed delivery.
        r = await gw.gql("mutation($id: ID!) { resendWebhook(id: $id) }", {"id": job["id"]}, key)
        assert r.json()["data"]["resendWebhook"] is True

        async def resent() -> bool:
            return len(receiver.calls) == 4

        await until(resent)


async def test_the_generate_shape_takes_its_webhook_url_in_the_options_too(
    redis_url: str, storage_dir: Path
) -> None:
    """Doitong's parameter table lists `webhookUrl` beside width and height, which the
    generate shape takes in `options`: a client that sent it there too got a 400 and no
    job. Over POST with variables (the prepared
    path) and inline (Strawberry's), the webhook is delivered, the key joins."""
    receiver = Receiver()
    async with serve(receiver.app) as hook_base, gateway(redis_url, storage_dir, **FAST) as gw:
        key = await gw.key()
        options = {"width": 512, "height": 512, "webhookUrl": f"{hook_base}/hook"}
        hook = f"{hook_base}/hook"
        made = [
            (await gw.generate(key, "a lighthouse", idempotencyKey="once", **options)).json()
            for _ in range(2)
        ]
        [job_id] = {m["data"]["generate"]["id"] for m in made}  # the same key: the same job
        assert made[0]["data"]["generate"]["webhookUrl"] == hook
        inline = f"""mutation {{ generate(input: {{provider: "local", input: {{text: "a kite"}},
          options: {{width: 512, height: 512, webhookUrl: "{hook}"}}}}) {{ id webhookUrl }} }}"""
        other = (await gw.gql(inline, key=key)).json()["data"]["generate"]
        assert other["webhookUrl"] == hook

        def delivered() -> bool:
            return {json.loads(body)["id"] for _, body, _ in receiver.calls} >= {
                job_id,
                other["id"],
            }

        await until(delivered)


async def test_a_resend_sends_now_but_never_beside_an_attempt_under_way(
    redis_url: str, storage_dir: Path
) -> None:
    """A receiver mended while its retries wait (hours apart, late in the schedule): a
    resend sends now, its attempt counted on. An attempt under way is left to run:
    resent every few ms, it is never sent beside itself (that made four attempts a
    second, and a log of millions). Once the delivery has ended, a resend starts a new
    round, counted from 1."""
    receiver = Receiver(failures=1_000)
    slow = {**FAST, "webhook_retry_delays": [600.0] * 6}
    async with serve(receiver.app) as hook_base, gateway(redis_url, storage_dir, **slow) as gw:
        key = await gw.key()
        made = await gw.gql(
            """mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }""",
            {"i": {"service": "local", "prompt": "a kite", "webhookUrl": f"{hook_base}/hook"}},
            key,
        )
        job_id = made.json()["data"]["generateImage"]["id"]
        await gw.wait(key, job_id)

        async def calls(n: int) -> bool:
            return len(receiver.calls) == n

        deliveries = "query($id: ID!) { webhookDeliveries(id: $id) { attempt } }"

        async def logged() -> list[int]:
            r = await gw.gql(deliveries, {"id": job_id}, key)
            return [a["attempt"] for a in r.json()["data"]["webhookDeliveries"]]

        async def logged_as(attempts: list[int]) -> bool:
            return await logged() == attempts

        async def first_attempt_logged() -> bool:
            return await logged_as([1])

        await until(lambda: calls(1))  # failed: the next attempt is ten minutes off
        # Its retry is scheduled with its log line (one transaction): read the schedule
        # once that is written, not while the attempt's claim still holds it.
        await until(first_attempt_logged)
        shard = keys.shard_of(gw.keys[key]["id"])
        schedule = keys.webhooks(shard)
        job_key = keys.job(gw.keys[key]["id"], job_id)
        resend = "mutation($id: ID!) { resendWebhook(id: $id) }"

        async def resent() -> None:
            assert (await gw.gql(resend, {"id": job_id}, key)).json()["data"]["resendWebhook"]

        await resent()  # its retry ten minutes off: now
        await until(lambda: calls(2))
        await until(lambda: logged_as([1, 2]))

        # Its next retry taken by a deliverer, under way: claim.lua holds it a lease ahead.
        lease = gw.app.state.gateway.webhooks.lease_ms()
        leased = int(time.time() * 1000) + lease
        await gw.accounts.redis.zadd(schedule, {job_key: leased})
        for _ in range(20):
            await resent()
        assert await gw.accounts.redis.zscore(schedule, job_key) == leased
        assert await logged() == [1, 2] and len(receiver.calls) == 2

        await gw.accounts.redis.zrem(schedule, job_key)  # its retries over
        await resent()
        await until(lambda: calls(3))
        await until(lambda: logged_as([1, 2, 1]))  # a new round


async def test_one_accounts_silent_receiver_does_not_hold_another_accounts_webhooks(
    redis_url: str, storage_dir: Path
) -> None:
    """An account whose receiver never answers, with more jobs ended than the process has
    delivery slots, holds each attempt for the whole timeout: it gets its share of the
    slots (`webhook_account_concurrency`), no more, and another account's webhook is
    delivered meanwhile, not after the timeouts."""
    silent, healthy = RawReceiver(silent=True), Receiver()
    options = {**FAST, "webhook_concurrency": 4, "webhook_account_concurrency": 2}
    async with (  # the receivers go first: the gateway's attempts end as they close
        gateway(redis_url, storage_dir, webhook_timeout=60, **options) as gw,
        silent.serving() as port,
        serve(healthy.app) as hook_base,
    ):
        made = "mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }"

        async def ended(key: str, url: str, prompt: str) -> None:
            body = {"service": "local", "prompt": prompt, "webhookUrl": url}
            r = await gw.gql(made, {"i": body}, key)
            await gw.wait(key, r.json()["data"]["generateImage"]["id"])

        flood, other = await gw.key(plan="enterprise"), await gw.key()
        for n in range(6):
            await ended(flood, f"http://127.0.0.1:{port}/hook", f"flood {n}")
        await until(lambda: len(silent.heads) == 2, what="two attempts held by the receiver")
        await ended(other, f"{hook_base}/hook", "another account's")
        await until(lambda: healthy.calls, timeout=15, what="the other account's webhook")
        assert len(silent.heads) == 2  # still its two, each waiting out its timeout


async def test_failed_and_cancelled_jobs_are_reported_and_retries_end(
    redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=100, status=503)
    async with (
        serve(receiver.app) as hook_base,
        gateway(
            redis_url,
            storage_dir,
            inprocess_workers=True,
            **{**FAST, "webhook_retry_delays": [0.02, 0.02]},
        ) as gw,
    ):
        key = await gw.key()
        job = (
            await gw.gql(
                """mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }""",
                {"i": {"service": "local", "prompt": "x", "webhookUrl": f"{hook_base}/hook"}},
                key,
            )
        ).json()["data"]["generateImage"]
        await gw.wait(key, job["id"])

        async def gave_up() -> bool:
            stored = await record(gw.accounts.redis, keys.job(gw.keys[key]["id"], job["id"]))
            return stored.get("webhook_status") == "failed"

        await until(gave_up)
        assert len(receiver.calls) == 3  # the first attempt and two retries, then no more
        listed = await gw.gql("{ jobs { nodes { id webhookStatus } } }", key=key)
        assert listed.json()["data"]["jobs"]["nodes"] == [
            {"id": job["id"], "webhookStatus": "failed"}
        ]


async def test_redirects_are_not_followed(redis_url: str, storage_dir: Path) -> None:
    receiver = Receiver(failures=100, status=302)
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **{**FAST, "webhook_retry_delays": [0.02]}) as gw,
    ):
        key = await gw.key()
        job = (
            await gw.gql(
                """mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }""",
                {"i": {"service": "local", "prompt": "x", "webhookUrl": f"{hook_base}/hook"}},
                key,
            )
        ).json()["data"]["generateImage"]
        await gw.wait(key, job["id"])

        async def attempts() -> list[dict[str, Any]]:
            r = await gw.gql(
                "query($id: ID!) { webhookDeliveries(id: $id) { statusCode } }",
                {"id": job["id"]},
                key,
            )
            return list(r.json()["data"]["webhookDeliveries"])

        async def two() -> bool:
            return len(await attempts()) == 2

        await until(two)
        assert [a["statusCode"] for a in await attempts()] == [302, 302]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://[fe80::1]/hook",
        "http://[fd00:ec2::254]/",
        "http://localhost:8080/hook",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
    ],
)
async def test_private_addresses_are_refused(url: str) -> None:
    with pytest.raises(BadUserInput) as refused:
        await check_url(url, [])
    assert refused.value.extensions["field"] == "webhookUrl"


async def test_allow_list_exempts_test_receivers() -> None:
    import ipaddress

    allowed = await check_url("http://127.0.0.1:9/x", [ipaddress.ip_network("127.0.0.0/8")])
    assert [str(a) for a in allowed] == ["127.0.0.1"]
    public = await check_url("http://93.184.215.14/x", [])
    assert [str(a) for a in public] == ["93.184.215.14"]


async def test_a_cache_hit_with_a_webhook_is_delivered_once(
    redis_url: str, storage_dir: Path
) -> None:
    """A hit ends in the very answer to its request: admission schedules its webhook."""
    receiver = Receiver()
    async with serve(receiver.app) as hook_base, gateway(redis_url, storage_dir, **FAST) as gw:
        key = await gw.key()
        query = """mutation($i: ImageGenerationInput!) {
          generateImage(input: $i) { id status metadata } }"""
        base = {"service": "local", "prompt": "a hit", "width": 512, "height": 512, "seed": 7}
        first = (await gw.gql(query, {"i": base}, key)).json()["data"]["generateImage"]
        await gw.wait(key, first["id"])
        hooked = {**base, "webhookUrl": f"{hook_base}/hook", "idempotencyKey": "hit-1"}
        for _ in range(2):  # the same request again: one job, one delivery
            hit = (await gw.gql(query, {"i": hooked}, key)).json()["data"]["generateImage"]
            assert hit["status"] == "completed" and hit["metadata"]["cached"] is True

        async def delivered() -> bool:
            return len(receiver.calls) >= 1

        await until(delivered)
        job_key = keys.job(gw.keys[key]["id"], hit["id"])

        async def settled() -> bool:
            return await gw.accounts.redis.zscore(keys.webhooks(0), job_key) is None

        await until(settled)
        assert len(receiver.calls) == 1
        body = json.loads(receiver.calls[0][1])
        assert (body["id"], body["status"]) == (hit["id"], "completed")


# -- one attempt, by the deliverer alone: where it connects and what it sends ----------------


class RawReceiver:
    """An HTTP/1.1 server on one loopback address that keeps each request's head as it
    arrived (request line and headers, bytes), and the TLS server name each connection
    asked for; it answers `status` with `body` on a kept-alive connection, or never answers
    when `silent`; with `endless`, a 200 whose body (said to be 10 MB) stops after
    `endless` bytes, then waits (or, `cut`, closes the connection)."""

    def __init__(
        self,
        tls: ssl.SSLContext | None = None,
        silent: bool = False,
        body: bytes = b"ok",
        status: bytes = b"200 OK",
        endless: int = 0,
        cut: bool = False,
    ) -> None:
        self.tls = tls
        self.silent = silent
        self.body = body
        self.status = status
        self.endless = endless
        self.cut = cut
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.names: list[str | None] = []
        self.done = asyncio.Event()  # set at the end of the test: silent handlers return
        if tls is not None:
            tls.sni_callback = lambda _sock, name, _ctx: self.names.append(name)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.bodies.append(await reader.readexactly(length))
                self.heads.append(head)
                if self.silent:
                    await self.done.wait()
                    return
                if self.endless:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
                    writer.write(b"x" * self.endless)
                    await writer.drain()
                    if not self.cut:
                        await self.done.wait()
                    return
                head = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n" % (self.status, len(self.body))
                writer.write(head)
                writer.write(self.body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
        """Listen on `host`; yield the port."""
        server = await asyncio.start_server(self.handle, host, port, ssl=self.tls)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            self.done.set()
            server.close()
            await server.wait_closed()

    def request_line(self, n: int) -> bytes:
        return self.heads[n].split(b"\r\n", 1)[0]

    def header(self, n: int, name: str) -> str:
        for line in self.heads[n].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode()
        raise KeyError(name)


class Deliverer:
    """`Webhooks` on the embedded store with the runtime's session, one job per URL."""

    def __init__(self, tmp_path: Path, tls: ssl.SSLContext | None = None, **options: Any):
        # the receivers' address; 127.0.0.2 is refused
        options.setdefault("url_allow_cidrs", "127.0.0.1/32")
        self.settings = load_settings(redis_url=None, storage_dir=tmp_path, **options)
        self.tls = tls

    @contextlib.asynccontextmanager
    async def running(self, redis_url: str | None = None) -> AsyncIterator[Deliverer]:
        self.redis = await connect(redis_url)
        scripts = Scripts.register(self.redis)
        await scripts.load()  # as the runtime does: a call's first send runs it
        store = JobStore(self.redis, scripts, self.settings.retention_days)
        self.accounts = Accounts(self.redis, scripts, self.settings)
        made = await self.accounts.create("pro")
        self.account, self.secret = made["id"], made["webhookSecret"]
        async with session(self.settings, self.tls) as client:
            self.hooks = Webhooks(
                redis=self.redis,
                scripts=scripts,
                store=store,
                client=client,
                settings=self.settings,
                lookups=Lookups(),
            )
            try:
                yield self
            finally:
                await self.redis.aclose()

    async def attempt(self, url: str) -> dict[str, Any]:
        """One delivery attempt of a completed job to `url`: its logged record."""
        now = int(time.time() * 1000)
        job = Job(
            id=secrets.token_hex(12),
            account=self.account,
            status="completed",
            provider="local",
            params={},
            cost=1,
            created_at=now,
            completed_at=now,
            webhook_url=url,
        )
        job_key = keys.job(job.account, job.id)
        await self.redis.set(job_key, orjson.dumps(job.to_record()))
        ok = await self.hooks.deliver(job_key)
        (logged,) = await self.hooks.attempts(job.account, job.id)
        assert logged["success"] is ok
        return dict(logged)


async def test_the_request_goes_to_the_checked_address_whatever_the_name_resolves_to_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name resolves to an allowed address when checked, then to a refused one where
    another server listens: the request still goes to the checked address, with the
    URL's Host header, and the name is looked up only by the check."""
    receiver, rogue = RawReceiver(), RawReceiver()
    async with (
        receiver.serving("127.0.0.1") as port,
        rogue.serving("127.0.0.2", port),
        Deliverer(tmp_path).running() as deliverer,
    ):
        given = resolving(monkeypatch, ["127.0.0.1", "127.0.0.2"])
        logged = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert (logged["statusCode"], logged["error"]) == (200, None)
        assert given == ["127.0.0.1"]
        assert rogue.heads == []
        assert receiver.request_line(0) == b"POST /hook HTTP/1.1"
        assert receiver.header(0, "Host") == f"{HOOKS_NAME}:{port}"

        # Resolved to the refused address at the check: no request at all.
        given = resolving(monkeypatch, ["127.0.0.2"])
        refused = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert refused["statusCode"] is None and "private" in refused["error"]
        assert given == ["127.0.0.2"] and rogue.heads == [] and len(receiver.heads) == 1


async def test_an_address_that_cannot_be_reached_passes_the_attempt_to_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver's name has two addresses and nothing listens on the first (a host
    down behind a round-robin name): the attempt is delivered at the second, with the
    URL's Host header. With every address down, the attempt fails as one did before;
    only the first four are tried."""
    receiver = RawReceiver()
    allow = {"url_allow_cidrs": "127.0.0.0/8"}
    async with (
        receiver.serving("127.0.0.2") as port,
        Deliverer(tmp_path, **allow).running() as deliverer,
    ):
        resolving(monkeypatch, ["127.0.0.3,127.0.0.2"])
        logged = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert (logged["statusCode"], logged["error"]) == (200, None)
        assert receiver.request_line(0) == b"POST /hook HTTP/1.1"
        assert receiver.header(0, "Host") == f"{HOOKS_NAME}:{port}"

        resolving(monkeypatch, ["127.0.0.3,127.0.0.4"])
        down = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert (down["statusCode"], down["error"]) == (
            None,
            "connection failed: ClientConnectorError",
        )
        # The first four at most: a name's hundred addresses are not a hundred connections.
        resolving(monkeypatch, ["127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.2"])
        fifth = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert fifth["error"] == "connection failed: ClientConnectorError"
        assert len(receiver.heads) == 1


async def test_an_address_that_never_answers_leaves_the_next_its_share_of_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first of the name's addresses drops every connection attempt (a host down
    behind a firewall): it gets its share of the attempt's time to connect, and the
    attempt is delivered at the second, within the timeout."""
    receiver = RawReceiver()
    options = {"url_allow_cidrs": "127.0.0.0/8", "webhook_timeout": 2.0}
    async with (
        receiver.serving("127.0.0.1") as port,
        Deliverer(tmp_path, **options).running() as deliverer,
    ):
        with black_hole("127.0.0.5", port):
            resolving(monkeypatch, ["127.0.0.5,127.0.0.1"])
            logged = await deliverer.attempt(f"http://{HOOKS_NAME}:{port}/hook")
        assert (logged["statusCode"], logged["error"]) == (200, None)
        assert len(receiver.heads) == 1


async def test_the_request_target_goes_out_byte_for_byte(tmp_path: Path) -> None:
    """Dot segments, escapes of `/` and `.`, an empty query: none is resolved, decoded,
    re-encoded or dropped; every attempt shares one kept-alive connection (each answer's
    body, too large to come in one read, is read to its end)."""
    receiver = RawReceiver(body=b"x" * 1_000_000)
    connections: list[int] = []
    targets = [
        "/a/./b/../%7e?",
        "/hook/..%2F..%2fadmin/%2E%2e/x?next=..%2F&q=a+b&%e2%9c%93",
        "/x/..",
        "//double//slash/?",
        "/?only=query?and=more",
        "/sub;p=1,2/(x)*!$'+=:@end?a=b&c=d;e=/?",
        "/",
    ]

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await RawReceiver.handle(receiver, reader, writer)

    receiver.handle = counted  # type: ignore[method-assign]
    async with receiver.serving() as port, Deliverer(tmp_path).running() as deliverer:
        for target in targets:
            logged = await deliverer.attempt(f"http://127.0.0.1:{port}{target}")
            assert logged["error"] is None, target
        assert [receiver.request_line(n) for n in range(len(targets))] == [
            f"POST {target} HTTP/1.1".encode() for target in targets
        ]
        # No target at all: "/" is sent, as `parse_url` reads it.
        await deliverer.attempt(f"http://127.0.0.1:{port}?q")
        assert receiver.request_line(len(targets)) == b"POST /?q HTTP/1.1"
    assert len(connections) == 1


def certificates(name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A certificate authority and a certificate it signed for `name` alone: the server's
    TLS context, and a client context that trusts that authority only."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            usage = x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            )
            builder = builder.add_extension(usage, critical=True)
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test authority", ca_key, "test authority", ca_key, ca=True)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate(name, leaf_key, "test authority", ca_key, ca=False)

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as folder:
        cert_file, key_file = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        key_file.write_bytes(
            leaf_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


async def test_https_sends_and_verifies_the_urls_host_name_at_the_checked_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connected to an IP address, TLS still names the URL's host (SNI) and checks the
    certificate against it: a certificate for another name is refused, nothing sent."""
    server_tls, client_tls = certificates(HOOKS_NAME)
    receiver = RawReceiver(tls=server_tls)
    async with receiver.serving() as port, Deliverer(tmp_path, client_tls).running() as d:
        resolving(monkeypatch, ["127.0.0.1"])
        written = f"Hooks.Example.test.:{port}"  # the Host header as written; SNI normalised
        logged = await d.attempt(f"https://{written}/h?")
        assert (logged["statusCode"], logged["error"]) == (200, None)
        assert receiver.names == [HOOKS_NAME]
        assert receiver.request_line(0) == b"POST /h? HTTP/1.1"
        assert receiver.header(0, "Host") == written

        # The same address under another name: its certificate does not match.
        other = "other.example.test"
        resolving(monkeypatch, ["127.0.0.1"], other)
        refused = await d.attempt(f"https://{other}:{port}/h")
        assert refused["statusCode"] is None
        assert refused["error"] == "connection failed: ClientConnectorCertificateError"
        assert receiver.names == [HOOKS_NAME, other] and len(receiver.heads) == 1


async def test_timeouts_and_connection_failures_are_recorded(tmp_path: Path) -> None:
    silent = RawReceiver(silent=True)
    async with (
        silent.serving() as port,
        Deliverer(tmp_path, webhook_timeout=0.3).running() as deliverer,
    ):
        logged = await deliverer.attempt(f"http://127.0.0.1:{port}/slow")
        assert (logged["statusCode"], logged["error"], logged["success"]) == (
            None,
            "timed out",
            False,
        )
        assert len(silent.heads) == 1  # it was sent, and no answer came in time
        closed = free_port()
        refused = await deliverer.attempt(f"http://127.0.0.1:{closed}/hook")
        assert refused["error"] == "connection failed: ClientConnectorError"


async def test_a_2xx_is_delivered_whatever_its_body_does_after(tmp_path: Path) -> None:
    """The status says whether it was delivered (Standard Webhooks): a receiver that
    answers 200 then sends a body that does not end, slowly or at length, or cuts it
    short, was delivered, not timed out or failed and sent again. Any other status is
    retried (CONTRACT: a non-2xx answer is)."""
    slow, long, cut = (
        RawReceiver(endless=1),
        RawReceiver(endless=2_000_000),
        RawReceiver(endless=10, cut=True),
    )
    async with (
        slow.serving() as slow_port,
        long.serving() as long_port,
        cut.serving() as cut_port,
        Deliverer(tmp_path, webhook_timeout=5).running() as deliverer,
    ):
        for port in (slow_port, long_port, cut_port):
            logged = await deliverer.attempt(f"http://127.0.0.1:{port}/hook")
            assert (logged["statusCode"], logged["error"], logged["success"]) == (200, None, True)
        assert await deliverer.redis.zcard(keys.webhooks(0)) == 0  # nothing to retry
        gone = RawReceiver(status=b"410 Gone")
        async with gone.serving() as port:
            logged = await deliverer.attempt(f"http://127.0.0.1:{port}/hook")
        assert (logged["statusCode"], logged["success"]) == (410, False)
        assert await deliverer.redis.zcard(keys.webhooks(0)) == 1  # retried


async def test_a_rotated_webhook_secret_signs_beside_the_new_one_for_a_day(
    redis_url: str, tmp_path: Path
) -> None:
    """A receiver still holding the secret a rotation replaced verifies what is sent for a
    day (Standard Webhooks' list of signatures), while it is given the new one; then only
    the new one signs."""
    receiver = RawReceiver()
    async with receiver.serving() as port, Deliverer(tmp_path).running(redis_url) as deliverer:
        old = deliverer.secret
        new = (await deliverer.accounts.rotate(deliverer.account, webhook_secret=True))[
            "webhookSecret"
        ]
        assert new.startswith("whsec_") and new != old

        def signers(n: int) -> set[str]:
            msg_id, stamp = (
                receiver.header(n, "webhook-id"),
                receiver.header(n, "webhook-timestamp"),
            )
            at, body = datetime.fromtimestamp(int(stamp), tz=UTC), receiver.bodies[n].decode()
            sent = set(receiver.header(n, "webhook-signature").split(" "))
            return {
                name
                for name, s in (("old", old), ("new", new))
                if Webhook(s).sign(msg_id, at, body) in sent
            }

        await deliverer.attempt(f"http://127.0.0.1:{port}/hook")
        assert signers(0) == {"old", "new"}
        Webhook(old).verify(receiver.bodies[0], dict(headers_of(receiver.heads[0])))
        doitong = hmac.new(new.encode(), receiver.bodies[0], hashlib.sha256).hexdigest()
        assert receiver.header(0, "X-Doitong-Signature") == f"sha256={doitong}"

        deliverer.hooks.clock = lambda: time.time() + 86_400 + 60  # the day is over
        await deliverer.attempt(f"http://127.0.0.1:{port}/hook")
        assert signers(1) == {"new"}


def headers_of(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]


async def test_an_attempt_whose_count_lost_its_reply_is_counted_once(
    plain_redis_server: RedisServer, tmp_path: Path
) -> None:
    """The connection drops after Redis counted the attempt, before its reply arrived:
    the count is sent again, and the attempt is still the first (a lost reply must not
    use up one of the attempts the contract promises)."""
    Redis(port=plain_redis_server.port).flushall()
    sha = hashlib.sha1(source("patch").encode()).hexdigest().encode()
    cutter = ReplyCutter(plain_redis_server.port, sha)
    receiver = Receiver()
    async with (
        cutter.running() as proxied,
        serve(receiver.app) as hook_base,
        Deliverer(tmp_path).running(f"redis://127.0.0.1:{proxied}/0") as d,
    ):
        cutter.armed = True
        logged = await d.attempt(f"{hook_base}/hook")
        assert cutter.cut == 1
        assert logged["attempt"] == 1 and logged["success"] is True


async def test_counting_attempts_leaves_the_token_of_the_jobs_end_alone(
    redis_url: str, tmp_path: Path
) -> None:
    """The record keeps one token (`op`) of its last start, end or promotion, by which
    that call, sent again after a lost reply, knows it ran already (once.lua). A webhook
    attempt, counted while that end's reply is still on its way, must not replace it: the
    end sent again would read as someone else's, and its worker throw the images away."""
    async with Deliverer(tmp_path).running(redis_url) as d:
        job_key = keys.job(d.account, secrets.token_hex(12))
        ended = {"id": "j", "status": "completed", "op": "the-end's-token"}
        await d.redis.set(job_key, orjson.dumps(ended))
        patch = d.hooks.store.scripts.patch
        for expected in (1, 2):
            counted = await patch(job=job_key, fields={}, count="webhook_attempts")
            assert counted.counted == expected
        stored = orjson.loads(await d.redis.get(job_key) or b"{}")
        assert stored["op"] == "the-end's-token" and stored["webhook_attempts"] == 2


async def test_a_delivery_whose_job_record_expired_first_is_counted_failed(
    tmp_path: Path,
) -> None:
    """A delivery due for a job whose record is gone (a cache hit's lives only as long as
    its cache entry) is dropped from the schedule and counted as a failed delivery in
    `gateway_webhook_deliveries_total`, not lost from the operator's view."""
    async with Deliverer(tmp_path).running() as d:
        failed = metrics.WEBHOOK["failed"]
        before = failed._value.get()
        job_key = keys.job(d.account, secrets.token_hex(12))
        schedule = keys.webhooks(keys.shard_of_key(job_key))
        await d.redis.zadd(schedule, {job_key: 0})
        assert await d.hooks.deliver(job_key) is False
        assert await d.redis.zscore(schedule, job_key) is None
        assert failed._value.get() == before + 1
