"""Signed webhooks with retries, and the private-address guard (docs/api.md#webhooks)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import BadUserInput
from gateway.store import keys
from gateway.urlguard import check_url
from tests.harness import gateway
from tests.records import record
from tests.servers import serve

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


async def until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_receiver_failing_twice_gets_one_signed_delivery_and_attempts_are_recorded(
    redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=2)
    async with serve(receiver.app) as hook_base, gateway(redis_url, storage_dir, **FAST) as gw:
        key = await gw.key()
        secret = gw.keys[key]["webhookSecret"]
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

        # Re-send on request: one more signed delivery.
        r = await gw.gql("mutation($id: ID!) { resendWebhook(id: $id) }", {"id": job["id"]}, key)
        assert r.json()["data"]["resendWebhook"] is True

        async def resent() -> bool:
            return len(receiver.calls) == 4

        await until(resent)


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
