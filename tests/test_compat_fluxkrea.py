"""/compat/fluxkrea: the flux-krea REST API served by the gateway (docs/providers/
fluxkrea.md, "Served by the gateway"), over real HTTP on a real Redis, with the emulators
of tests/emulators as upstreams.

flux-krea's own Python client (tests/seeds/000_*.txt) runs against it as printed,
apart from its base URL and key; its requests are ordinary gateway jobs (credits,
failover, stored outputs), its answers, webhooks and refusals flux-krea's.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.providers import fluxkrea
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import KreaEmulator
from tests.harness import Harness, gateway, until
from tests.servers import serve
from tests.test_compat_krea import (
    HOOKS,
    auth,
    example,
    image_size,
    indented,
    ledger,
    run_example,
    seed_text,
    substituted,
)
from tests.test_webhooks import Receiver

BASE = "/compat/fluxkrea/v1"

#: flux-krea's "Basic Python Example" (tests/seeds/000_*.txt): one line a digit (see `indented`)
FLUXKREA_EXAMPLE_LEVELS = (
    "0000 1 222 33 2 1 333333 222222222222 2 33333 2 2 3 2 3 4444 3 3 3 2 3 000 11111 000"
)


def fluxkrea_example(base: str, key: str) -> str:
    lines = example(seed_text("000"), "Basic Python Example", "JavaScript/Node.js Integration")
    assert lines[0] == "import requests" and lines[-1].startswith('print(f"Generation time')
    code = indented(lines, FLUXKREA_EXAMPLE_LEVELS)
    return substituted(code, {"https://api.flux-krea.pro/v1": base, "your_api_key_here": key})


@dataclass
class Upstreams:
    fluxkrea: FluxKreaEmulator
    krea: KreaEmulator
    settings: dict[str, Any]


@pytest.fixture
async def up() -> AsyncIterator[Upstreams]:
    """flux-krea (the `flux-krea` service's first backend) and Krea (its last), enabled;
    Segmind, between them, is not (no key)."""
    flux = FluxKreaEmulator(api_key="test-key")
    krea_emu = KreaEmulator(token="test-token", steps_to_complete=1)
    async with serve(flux.app) as fb, serve(krea_emu.app) as kb:
        yield Upstreams(flux, krea_emu, {
            "fluxkrea_api_base": f"{fb}/v1", "fluxkrea_api_key": "test-key",
            "krea_api_base": kb, "krea_api_token": "test-token",
        })  # fmt: skip


async def generate(gw: Harness, key: str, body: Any, **headers: str) -> httpx.Response:
    return await gw.http.post(f"{BASE}/generate", json=body, headers={**auth(key), **headers})


async def generate_async(gw: Harness, key: str, body: Any) -> httpx.Response:
    return await gw.http.post(f"{BASE}/generate/async", json=body, headers=auth(key))


# -- flux-krea's example --------------------------------------------------------------------


async def test_seed_000s_python_example_gets_an_image_from_the_gateway(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        out = (await run_example(fluxkrea_example(f"{gw.base}{BASE}", key))).splitlines()

        assert out[0].startswith("Generated image URL: ")
        url = out[0].removeprefix("Generated image URL: ")
        assert await image_size(gw, url) == (1024, 1024)
        assert out[1].startswith("Generation time: ") and out[1].endswith(" seconds")
        [sent] = [r["json"] for r in up.fluxkrea.requests if r["path"] == "/v1/generate"]
        assert sent["prompt"].startswith("Professional headshot of a confident businesswoman")
        assert (sent["guidance_scale"], sent["num_inference_steps"]) == (7.5, 4)
        assert await ledger(gw, key) == [("initial", 100), ("charge", -20)]


# -- the synchronous endpoint ------------------------------------------------------------------


async def test_generate_answers_the_guide_s_success_shape_with_our_stored_images(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await generate(
            gw, key, {"prompt": "a red fox", "width": 768, "height": 512, "seed": 41,
                      "num_images": 2, "guidance_scale": 3.5, "num_inference_steps": 8},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["status"] == "success"
        assert answer["request_id"] == r.headers["x-gateway-job-id"]
        assert "x-ratelimit-limit" in r.headers
        assert [(i["seed"], i["width"], i["height"]) for i in answer["images"]] == [
            (41, 768, 512),
            (42, 768, 512),
        ]
        for image in answer["images"]:
            assert await image_size(gw, image["url"]) == (768, 512)
        assert isinstance(answer["generation_time"], float)
        assert answer["credits_used"] == 24  # 2 images at 768x512, 12 credits each
        assert set(answer) == {"status", "request_id", "images", "generation_time", "credits_used"}
        # The request_id is the gateway job, readable with the same key.
        job = await gw.http.get(f"/v1/jobs/{answer['request_id']}", headers=auth(key))
        assert job.json()["urls"] == [i["url"] for i in answer["images"]]


async def test_a_generation_the_upstream_refuses_answers_400_and_is_refunded(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1, 400)  # the user's own input: no failover
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await generate(gw, key, {"prompt": "p", "width": 512, "height": 512})
        # The guide's 400, which its client does not retry: the same input would be
        # refused again (a 5xx it retries, each retry a new job).
        assert r.status_code == 400
        body = r.json()
        assert (body["error"], body["error_code"]) == ("Bad Request", "invalid_request")
        assert "flux-krea answered 400" in body["message"] and "refunded" in body["message"]
        assert body["status"] == "failed" and body["request_id"] == r.headers["x-gateway-job-id"]
        assert await ledger(gw, key) == [("initial", 100), ("charge", -10), ("refund", 10)]
        assert up.krea.submissions == 0


async def test_a_generation_every_backend_fails_answers_502_and_is_refunded(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    """Not the caller's input: the guide's 5xx, which its client retries."""
    up.fluxkrea.fail_next(100, 500)
    up.krea.fail_next(100, 500)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await generate(gw, key, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 502
        body = r.json()
        assert body["status"] == "failed" and body["request_id"] == r.headers["x-gateway-job-id"]
        assert await ledger(gw, key) == [("initial", 100), ("charge", -10), ("refund", 10)]


async def test_a_wait_that_runs_out_answers_504_and_the_job_goes_on(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.delay = 1.0
    async with gateway(redis_url, storage_dir, sync_wait_seconds=0.2, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await generate(gw, key, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 504
        request_id = r.headers["x-gateway-job-id"]
        assert r.json()["request_id"] == request_id
        assert r.json()["status"] in ("queued", "processing")
        assert f"GET /v1/jobs/{request_id}" in r.json()["message"]
        done = await gw.wait(key, request_id)
        assert done["status"] == "completed" and done["creditCost"] == 10


async def test_flux_krea_answering_500_fails_over_and_is_charged_once(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1, 500)
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await generate(gw, key, {"prompt": "a red fox", "width": 1024, "height": 1024})
        assert r.status_code == 200, r.text
        [image] = r.json()["images"]
        assert await image_size(gw, image["url"]) == (1024, 1024)
        assert up.fluxkrea.submissions == 1 and up.krea.submissions == 1
        job = await gw.http.get(f"/v1/jobs/{r.json()['request_id']}", headers=auth(key))
        assert job.json()["metadata"]["backend"] == "krea"
        # Left out, guidance and steps are the guide's defaults (7.5, 4) whichever backend
        # draws the picture: Krea's own would be 3 and 25.
        (sent,) = up.krea.received("POST", "/generate/")
        assert (sent.json["guidance_scale_flux"], sent.json["steps"]) == (7.5, 4)
        assert await ledger(gw, key) == [("initial", 100), ("charge", -20)]
        assert r.json()["credits_used"] == 20


# -- the asynchronous endpoint and its webhook ---------------------------------------------------


async def test_async_answers_at_once_and_webhook_url_receives_the_guide_s_callback(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=1)  # answered 500 once: retried like any gateway webhook
    callback_data = {"user_id": "12345", "project_id": "project_abc"}
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key(credits=100)
        r = await generate_async(
            gw, key, {"prompt": "Your image description", "webhook_url": f"{hook_base}/hook",
                      "callback_data": callback_data, "width": 512, "height": 512},
        )  # fmt: skip
        assert r.status_code == 202, r.text
        request_id = r.headers["x-gateway-job-id"]
        assert r.json() == {"status": "queued", "request_id": request_id}

        await until(lambda: any(status == 200 for _, _, status in receiver.calls))
        assert [status for _, _, status in receiver.calls] == [500, 200]
        headers, body, _ = receiver.calls[-1]
        report = orjson.loads(body)
        job = (await gw.http.get(f"/v1/jobs/{request_id}", headers=auth(key))).json()
        assert report == {
            "status": "completed",
            "request_id": request_id,
            "images": [{"url": job["url"], "seed": job["metadata"]["seed"], "width": 512,
                        "height": 512}],
            "generation_time": job["duration"],
            "credits_used": 10,
            "callback_data": callback_data,
        }  # fmt: skip
        assert await image_size(gw, job["url"]) == (512, 512)
        secret = gw.keys[key]["webhookSecret"]
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-doitong-signature"] == f"sha256={expected}"
        # The guide's handler answers {"status": "received"}; ours, any 2xx: delivered.
        deliveries = await gw.gql(
            "query($id: ID!) { webhookDeliveries(id: $id) { success } }", {"id": request_id}, key
        )
        assert [d["success"] for d in deliveries.json()["data"]["webhookDeliveries"]] == [
            False,
            True,
        ]


async def test_a_failed_async_job_reports_failed_with_its_callback_data(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.fluxkrea.fail_next(1, 400)
    receiver = Receiver()
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key(credits=100)
        r = await generate_async(
            gw, key, {"prompt": "p", "webhook_url": f"{hook_base}/hook", "callback_data": [1]}
        )
        await until(lambda: receiver.calls)
        report = orjson.loads(receiver.calls[0][1])
        assert report["status"] == "failed" and report["request_id"] == r.json()["request_id"]
        assert "flux-krea answered 400" in report["error"]
        assert report["callback_data"] == [1] and "images" not in report
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 100  # refunded


async def test_private_webhook_urls_and_tokens_setting_one_are_refused_in_flux_krea_s_shape(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw:
        key = await gw.key(credits=100)
        r = await generate_async(gw, key, {"prompt": "p", "webhook_url": "http://10.0.0.7/hook"})
        assert r.status_code == 400
        assert r.json() == {
            "error": "Bad Request",
            "message": "webhook_url points at a private, loopback or metadata address",
            "error_code": "invalid_request",
            "field": "webhook_url",
        }
        minted = await gw.http.post("/v1/client_tokens", json={"maxCredits": 50}, headers=auth(key))
        token = minted.json()["token"]
        r = await generate_async(gw, token, {"prompt": "p", "webhook_url": "https://example.com"})
        assert r.status_code == 403
        assert r.json()["error"] == "Forbidden"
        assert r.json()["message"] == "a client token cannot set webhook_url"
        assert await ledger(gw, key) == [("initial", 100)]  # nothing charged
        assert up.fluxkrea.submissions == 0

        # Without a webhook the token works as a key does.
        r = await generate(gw, token, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 200 and r.json()["credits_used"] == 10


# -- refusals: flux-krea's shape, the right status, nothing charged -----------------------------


BAD_REQUESTS = [
    # (what, path, headers (KEY: the key), body, status, error type, message)
    ("width out of range", "/generate", {}, {"prompt": "p", "width": 4000}, 400, "Bad Request",
     "width: Input should be less than or equal to 2048"),
    ("height out of range", "/generate/async", {},
     {"prompt": "p", "height": 256, "webhook_url": "https://example.com/h"}, 400, "Bad Request",
     "height: Input should be greater than or equal to 512"),
    ("guidance out of range", "/generate", {}, {"prompt": "p", "guidance_scale": 25}, 400,
     "Bad Request", "guidance_scale: Input should be less than or equal to 20"),
    ("too many images", "/generate", {}, {"prompt": "p", "num_images": 5}, 400, "Bad Request",
     "num_images: Input should be less than or equal to 4"),
    ("missing prompt", "/generate", {}, {"width": 1024}, 400, "Bad Request",
     "prompt is required"),
    ("prompt too long", "/generate", {}, {"prompt": "x" * 1001}, 400, "Bad Request",
     "prompt: String should have at most 1000 characters"),
    ("a seed past the guide's range, as a string", "/generate", {},
     {"prompt": "p", "seed": "3000000000"}, 400, "Bad Request",
     "seed: Input should be less than or equal to 2147483647"),
    ("unknown model", "/generate", {}, {"prompt": "p", "model": "flux-pro"}, 400, "Bad Request",
     "model is not a known parameter"),
    ("webhook on the sync endpoint", "/generate", {},
     {"prompt": "p", "webhook_url": "https://example.com/h"}, 400, "Bad Request",
     "webhook_url is not a known parameter (only /v1/generate/async takes it)"),
    ("async without webhook_url", "/generate/async", {}, {"prompt": "p"}, 400, "Bad Request",
     "webhook_url is required"),
    ("not JSON", "/generate", {}, None, 400, "Bad Request",
     "malformed request: body is not valid JSON"),
    ("X-API-Key instead of Bearer", "/generate", {"X-API-Key": "KEY"}, {"prompt": "p"}, 401,
     "Unauthorized", "Invalid or missing API key: send Authorization: Bearer <api key>"),
    ("no key", "/generate/async", {"Content-Type": "application/json"},
     {"prompt": "p", "webhook_url": "https://example.com/h"}, 401, "Unauthorized",
     "Invalid or missing API key: send Authorization: Bearer <api key>"),
    ("unknown key", "/generate", {"Authorization": "Bearer gk_nobody_secret"}, {"prompt": "p"},
     401, "Unauthorized", "Invalid API key"),
]  # fmt: skip


async def test_bad_requests_are_refused_in_flux_krea_s_shape_and_cost_nothing(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        for what, path, headers, body, status, kind, message in BAD_REQUESTS:
            sent = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            if headers:
                sent = {k: v.replace("KEY", key) for k, v in headers.items()}
            content = b"{not json" if body is None else orjson.dumps(body)
            r = await gw.http.post(f"{BASE}{path}", content=content, headers=sent)
            answer = r.json()
            assert (r.status_code, answer["error"], answer["message"]) == (status, kind, message)
            assert isinstance(answer["error_code"], str), what
            assert "x-gateway-job-id" not in r.headers, what
        assert await ledger(gw, key) == [("initial", 100)]  # nothing charged, ever
        assert up.fluxkrea.submissions == 0
        jobs = await gw.gql("{ jobs { nodes { id } } }", key=key)
        assert jobs.json()["data"]["jobs"]["nodes"] == []


async def test_no_credits_is_the_guide_s_quota_403_and_rate_limits_429(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        poor = await gw.key(credits=5)
        r = await generate(gw, poor, {"prompt": "p"})
        assert r.status_code == 403
        assert r.json() == {
            "error": "Forbidden",
            "message": "Insufficient credits: 20 required, 5 available",
            "error_code": fluxkrea.QUOTA_EXCEEDED,
            "creditsRequired": 20,
            "creditsAvailable": 5,
        }
        slow = await gw.key(plan="enterprise", credits=100, rpm=1)
        assert (await generate(gw, slow, {"prompt": "p", "width": 512, "height": 512})).is_success
        r = await generate(gw, slow, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 429
        assert (r.json()["error"], r.json()["error_code"]) == ("Rate Limited", "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        assert await ledger(gw, slow) == [("initial", 100), ("charge", -10)]
        assert await ledger(gw, poor) == [("initial", 5)]


async def test_a_seeded_async_request_served_from_the_cache_still_calls_back(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver()
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key(credits=100)
        body = {"prompt": "a fox", "width": 512, "height": 512, "seed": 3}
        first = (await generate(gw, key, body)).json()
        r = await generate_async(
            gw, key, {**body, "webhook_url": f"{hook_base}/hook", "callback_data": {"n": 1}}
        )
        assert r.status_code == 202 and r.json()["status"] == "queued"
        await until(lambda: receiver.calls)
        report = orjson.loads(receiver.calls[0][1])
        assert report["status"] == "completed" and report["callback_data"] == {"n": 1}
        assert report["images"] == first["images"] and report["credits_used"] == 0
        assert await ledger(gw, key) == [("initial", 100), ("charge", -10)]


async def test_refusals_outside_a_handler_take_each_providers_shape(
    redis_url: str, storage_dir: Path
) -> None:
    """A wrong path, a wrong method and a body over the limit, under each provider's
    prefix, answer in that provider's error shape (what its client reads), not ours."""
    shapes = {
        "/compat/krea": {"message", "code"},
        "/compat/fluxkrea": {"error", "message", "error_code"},
        "/compat/segmind": {"error", "code"},
    }
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        auth = {"Authorization": f"Bearer {key}", "x-api-key": key}
        for prefix, fields in shapes.items():
            for r in (
                await gw.http.get(f"{prefix}/nope", headers=auth),
                await gw.http.put(f"{prefix}/v1/generate", headers=auth),
                await gw.http.post(f"{prefix}/v1/generate", content=b"x" * 100_000, headers=auth),
            ):
                assert r.status_code in (404, 405, 413), (prefix, r.status_code)
                body = r.json()
                assert set(body) >= fields and isinstance(body.get("message", ""), str), body
                assert not isinstance(body.get("error"), dict), (prefix, body)
