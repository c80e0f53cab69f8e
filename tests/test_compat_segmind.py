"""/compat/segmind (docs/providers/segmind.md#compat): Segmind's own protocol served by the
gateway, driven by Segmind's official `segmind` SDK with its base URL at the gateway, as
code written against Segmind sees it when it switches. Every request is a gateway job:
real HTTP, real Redis, the offline `local` backend or the upstream emulators."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from segmind import (  # type: ignore[import-untyped]
    InferenceFailed,
    SegmindClient,
    SegmindError,
)

from gateway import metrics
from gateway.config import DEFAULT_ROUTES
from gateway.params import ASPECT_RATIOS, ImageParams
from gateway.providers.segmind import MEGAPIXELS, QUALITY, request_from, translate
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.segmind import SegmindEmulator
from tests.harness import Harness, gateway
from tests.servers import serve

#: the example payload of Segmind's guide (tests/seeds/004_*.txt), as its client examples send it
PAYLOAD: dict[str, Any] = {
    "seed": 42,
    "prompt": "A miniature raccoon explorer made of wool wearing all kinds of equipment, the "
    "whole world is made of felt textile, holding a signboard which says 'Flux krea dev on "
    "Segmind'",
    "go_fast": True,
    "guidance": 3,
    "megapixels": "1",
    "num_outputs": 2,
    "aspect_ratio": "16:9",
    "output_format": "jpg",
    "output_quality": 90,
    "prompt_strength": 0.7,
    "num_inference_steps": 40,
    "disable_safety_checker": False,
}
#: 16:9 at one megapixel, as the gateway (and Segmind's emulator) draw it
SIZE_16_9 = (1360, 768)
#: credits for one 1360x768 image (docs/api.md#credits)
COST_16_9 = 20
#: `flux-krea-dev` is the flux-krea service; offline, the local backend runs it
LOCAL: dict[str, Any] = {"routes": {**DEFAULT_ROUTES, "flux-krea": ["local"]}}


@contextlib.contextmanager
def sdks(gw: Harness) -> Iterator[Callable[..., SegmindClient]]:
    """Makes Segmind SDK clients pointed at the gateway, closed at the end."""
    made: list[SegmindClient] = []

    def sdk(key: str, base_url: str | None = None) -> SegmindClient:
        client = SegmindClient(api_key=key, base_url=base_url or f"{gw.base}/compat/segmind/v1")
        made.append(client)
        return client

    try:
        yield sdk
    finally:
        for client in made:
            client._client.close()


def picture(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.size


async def fetched(gw: Harness, url: str) -> tuple[str | None, tuple[int, int]]:
    """A stored output, fetched as a client would: the gateway's copy, not an upstream's."""
    assert url.startswith(f"{gw.base}/outputs/"), url
    r = await gw.http.get(url)
    assert r.status_code == 200
    return picture(r.content)


async def balance(gw: Harness, key: str) -> int:
    return (await gw.accounts.get(gw.keys[key]["id"])).credits


async def charges(gw: Harness, key: str) -> list[dict[str, str]]:
    return [e for e in await gw.accounts.ledger(gw.keys[key]["id"]) if e["reason"] != "initial"]


async def job_of(gw: Harness, key: str, job_id: str) -> dict[str, Any]:
    r = await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- the mapping: Segmind's request -> ours -> Segmind's is the same request ----------------


@pytest.mark.parametrize("megapixels", MEGAPIXELS)
@pytest.mark.parametrize("aspect_ratio", ASPECT_RATIOS)
def test_a_segmind_request_comes_back_the_same_through_the_segmind_backend(
    aspect_ratio: str, megapixels: str
) -> None:
    """What /compat/segmind makes of a body (`request_from`) is what the Segmind backend
    sends upstream (`translate`) for it: one table, read both ways."""
    for quality, output_quality in QUALITY.items():
        body = {
            **PAYLOAD,
            "aspect_ratio": aspect_ratio,
            "megapixels": megapixels,
            "output_quality": output_quality,
            "num_outputs": 3,
        }
        wanted = request_from(body, "flux-krea")
        assert wanted.quality == quality
        sent = translate(ImageParams(**wanted.image_fields()))
        assert sent.pop("go_fast") is False  # whatever was asked: the same seed, the same picture
        assert sent == {k: v for k, v in body.items() if k in sent}, (
            f"{aspect_ratio} at {megapixels}"
        )
        assert set(body) - set(sent) == {"go_fast", "prompt_strength", "disable_safety_checker"}


# -- the SDK, as the guide's own examples use it -----------------------------------------


async def test_the_seeds_example_through_submit_async_and_run(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        key = await gw.key(credits=1000)
        with sdks(gw) as sdk:
            client = sdk(key)
            job = await asyncio.to_thread(client.submit_async, "flux-krea-dev", **PAYLOAD)
            base = f"{gw.base}/compat/segmind/v2/requests/{job.request_id}"
            assert (job.status_url, job.response_url) == (f"{base}/status", base)
            assert job.submit_response["status"] in ("QUEUED", "PROCESSING", "COMPLETED")
            result = await asyncio.to_thread(job.wait, timeout=60, interval=0.05)

            assert result["status"] == "COMPLETED"
            assert result["request_id"] == job.request_id
            assert result["metrics"]["inference_time"] >= 0
            assert result["metrics"]["cost"] == 2 * COST_16_9
            urls = result["output"]
            assert isinstance(urls, list) and len(urls) == 2  # Segmind's default of two
            assert [i["url"] for i in result["images"]] == urls
            assert {i["content_type"] for i in result["images"]} == {"image/jpeg"}
            for url in urls:
                assert await fetched(gw, url) == ("JPEG", SIZE_16_9)

            # The request id is the gateway job's: readable, priced, and made as asked.
            made = await job_of(gw, key, job.request_id)
            assert made["status"] == "completed" and made["urls"] == urls
            assert made["metadata"]["backend"] == "local"
            assert made["metadata"]["seed"] == 42 == result["seed"]
            assert (made["width"], made["height"]) == SIZE_16_9
            assert made["creditCost"] == 2 * COST_16_9
            assert await balance(gw, key) == 1000 - 2 * COST_16_9

            # run(): the same request (seeded) is the cache's: the same images, for nothing.
            again = await asyncio.to_thread(client.run, "flux-krea-dev", **PAYLOAD)
            assert again["status"] == "COMPLETED" and again["output"] == urls
            assert again["request_id"] != job.request_id
            assert again["metrics"]["cost"] == 0
            # ...and another seed is a new picture, charged as any.
            other = await asyncio.to_thread(
                client.run, "flux-krea-dev", **{**PAYLOAD, "seed": 7, "num_outputs": 1}
            )
            assert isinstance(other["output"], str)  # one image: its URL
            assert await fetched(gw, other["output"]) == ("JPEG", SIZE_16_9)
            assert await balance(gw, key) == 1000 - 3 * COST_16_9
            assert [e["reason"] for e in await charges(gw, key)] == ["charge", "charge"]


async def test_the_sync_route_answers_the_image_bytes(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        key = await gw.key(credits=1000)
        with sdks(gw) as sdk:
            answer = await asyncio.to_thread(sdk(key).run_sync, "flux-krea-dev", **PAYLOAD)
            assert answer.status_code == 200
            assert answer.headers["content-type"] == "image/jpeg"
            assert picture(answer.content) == ("JPEG", SIZE_16_9)
            job_id = answer.headers["x-gateway-job-id"]
            assert answer.headers["x-seed-value"] == "42"
            # v1 answers one image: it makes, and charges, one (num_outputs: 2 or not)
            assert answer.headers["x-cost"] == str(COST_16_9)
            made = await job_of(gw, key, job_id)
            assert len(made["urls"]) == 1 and made["creditCost"] == COST_16_9
            assert answer.headers["content-location"] == made["url"]
            assert await balance(gw, key) == 1000 - COST_16_9

            # The SDK's base URL without `/v1` works too, for both paths.
            bare = sdk(key, f"{gw.base}/compat/segmind")
            small = {"prompt": "a felt fox", "megapixels": 0.25, "aspect_ratio": "1:1"}
            answer = await asyncio.to_thread(
                bare.run_sync, "flux-krea-dev", output_format="png", **small
            )
            assert answer.headers["content-type"] == "image/png"
            assert picture(answer.content) == ("PNG", (512, 512))
            job = await asyncio.to_thread(bare.submit_async, "flux-krea-dev", **small)
            assert job.status_url.startswith(f"{gw.base}/compat/segmind/v2/requests/")
            done = await asyncio.to_thread(job.wait, timeout=60, interval=0.05)
            assert [await fetched(gw, url) for url in done["output"]] == [("JPEG", (512, 512))] * 2

        # 0.25 megapixels at a ratio whose short side would fall below 512: raised to 512.
        r = await gw.http.post(
            "/compat/segmind/v1/flux-krea-dev",
            json={"prompt": "a wide felt valley", "megapixels": "0.25", "output_format": "webp"},
            headers={"x-api-key": key},
        )
        assert r.status_code == 200, r.text
        assert picture(r.content) == ("WEBP", (912, 512))  # 16:9, Segmind's default ratio


async def test_idempotency_key_gives_the_same_request(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        key = await gw.key(credits=1000)
        headers = {"x-api-key": key, "Idempotency-Key": "order-42"}
        body = {"prompt": "a wool lighthouse", "num_outputs": 1}
        ids = set()
        for _ in range(2):
            r = await gw.http.post("/compat/segmind/v2/flux-krea-dev", json=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-gateway-job-id"] == r.json()["request_id"]
            ids.add(r.json()["request_id"])
        assert len(ids) == 1
        assert await balance(gw, key) == 1000 - COST_16_9


# -- failover and failure ----------------------------------------------------------------


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[FluxKreaEmulator, SegmindEmulator, dict[str, Any]]]:
    fluxkrea = FluxKreaEmulator(api_key="test-key")
    segmind = SegmindEmulator(api_key="test-key")
    async with serve(fluxkrea.app) as fb, serve(segmind.app) as sb:
        yield fluxkrea, segmind, {
            "fluxkrea_api_base": f"{fb}/v1", "fluxkrea_api_key": "test-key",
            "segmind_api_base": sb, "segmind_api_key": "test-key",
        }  # fmt: skip


async def test_what_a_request_leaves_out_is_segminds_default_on_any_backend(
    upstreams: tuple[FluxKreaEmulator, SegmindEmulator, dict[str, Any]],
    redis_url: str,
    storage_dir: Path,
) -> None:
    """A prompt alone, run by flux-krea (the service's first backend), is asked for with
    Segmind's documented guidance (7) and steps (40), not flux-krea's own (7.5, 4)."""
    fluxkrea, _, settings = upstreams
    async with gateway(redis_url, storage_dir, **settings) as gw:
        key = await gw.key(credits=1000)
        with sdks(gw) as sdk:
            job = await asyncio.to_thread(sdk(key).submit_async, "flux-krea-dev", prompt="x")
            result = await asyncio.to_thread(job.wait, timeout=60, interval=0.05)
        assert result["status"] == "COMPLETED"
        [sent] = [r["json"] for r in fluxkrea.requests if r["method"] == "POST"]
        assert (sent["guidance_scale"], sent["num_inference_steps"]) == (7.0, 40)


async def test_a_failing_first_backend_fails_over_and_charges_once(
    upstreams: tuple[FluxKreaEmulator, SegmindEmulator, dict[str, Any]],
    redis_url: str,
    storage_dir: Path,
) -> None:
    fluxkrea, segmind, settings = upstreams
    fluxkrea.fail_next(5, 500)  # flux-krea-dev -> flux-krea: fluxkrea first, then segmind
    async with gateway(redis_url, storage_dir, **settings) as gw:
        key = await gw.key(credits=1000)
        with sdks(gw) as sdk:
            job = await asyncio.to_thread(sdk(key).submit_async, "flux-krea-dev", **PAYLOAD)
            result = await asyncio.to_thread(job.wait, timeout=60, interval=0.05)
        assert result["status"] == "COMPLETED"
        assert len(result["output"]) == 2
        for url in result["output"]:  # the gateway's copies of Segmind's images
            assert await fetched(gw, url) == ("JPEG", SIZE_16_9)
        assert (fluxkrea.submissions, segmind.submissions) == (1, 1)
        sent = segmind.calls("POST")[0].json
        assert (sent["aspect_ratio"], sent["megapixels"], sent["num_outputs"]) == ("16:9", "1", 2)
        assert (sent["seed"], sent["guidance"], sent["num_inference_steps"]) == (42, 3.0, 40)
        assert (sent["output_format"], sent["output_quality"]) == ("jpg", 90)
        made = await job_of(gw, key, job.request_id)
        assert made["metadata"]["backend"] == "segmind"
        # Charged exactly once, for the request, whatever happened upstream.
        assert await balance(gw, key) == 1000 - 2 * COST_16_9
        ledger = await charges(gw, key)
        assert [(e["reason"], e["delta"], e["job"]) for e in ledger] == [
            ("charge", str(-2 * COST_16_9), job.request_id)
        ]


async def test_a_failed_request_is_segminds_failed_and_refunded(
    upstreams: tuple[FluxKreaEmulator, SegmindEmulator, dict[str, Any]],
    redis_url: str,
    storage_dir: Path,
) -> None:
    _, segmind, settings = upstreams
    segmind.fail_jobs = True  # ends FAILED, a content block
    routes = {**DEFAULT_ROUTES, "flux-krea": ["segmind"]}
    async with gateway(redis_url, storage_dir, routes=routes, **settings) as gw:
        key = await gw.key(credits=1000)
        with sdks(gw) as sdk:
            client = sdk(key)
            job = await asyncio.to_thread(client.submit_async, "flux-krea-dev", **PAYLOAD)
            with pytest.raises(InferenceFailed) as failed:
                await asyncio.to_thread(job.wait, timeout=60, interval=0.05)
            assert "RAI" in (failed.value.detail or "")
            assert failed.value.status_body["status"] == "FAILED"
            with pytest.raises(SegmindError) as sync_failed:
                await asyncio.to_thread(client.run_sync, "flux-krea-dev", prompt="x")
            assert sync_failed.value.status == 422
        for path in (f"{job.request_id}/status", job.request_id):
            r = await gw.http.get(f"/compat/segmind/v2/requests/{path}", headers={"x-api-key": key})
            assert r.status_code == 422
            assert r.json()["status"] == "FAILED" and "RAI" in r.json()["error"]
        assert await balance(gw, key) == 1000  # both refunded


async def test_a_sync_wait_that_runs_out_is_a_504_and_the_request_goes_on(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(
        redis_url, storage_dir, inprocess_workers=False, sync_wait_seconds=0.3, **LOCAL
    ) as gw:
        key = await gw.key()
        headers = {"x-api-key": key}
        r = await gw.http.post(
            "/compat/segmind/v1/flux-krea-dev", json={"prompt": "patience"}, headers=headers
        )
        assert r.status_code == 504
        job_id = r.headers["x-gateway-job-id"]
        assert r.json()["request_id"] == job_id and job_id in r.json()["error"]
        status = await gw.http.get(f"/compat/segmind/v2/requests/{job_id}/status", headers=headers)
        assert (status.status_code, status.json()["status"]) == (200, "QUEUED")
        pending = await gw.http.get(f"/compat/segmind/v2/requests/{job_id}", headers=headers)
        assert (pending.status_code, pending.json()["status"]) == (200, "QUEUED")
        assert "output" not in pending.json()
        # Segmind has no cancelled state: a request cancelled here reads FAILED.
        await gw.http.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
        status = await gw.http.get(f"/compat/segmind/v2/requests/{job_id}/status", headers=headers)
        assert (status.status_code, status.json()["status"]) == (422, "FAILED")


# -- refusals: Segmind's shape and statuses, nothing charged, never a 500 -----------------


async def test_refusals_take_segminds_shape_and_charge_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        key = await gw.key(credits=1000)
        good = {"prompt": "a felt owl", "num_outputs": 1}

        async def post(body: Any, headers: dict[str, str], path: str = "v2/flux-krea-dev") -> Any:
            kwargs: dict[str, Any] = (
                {"content": body} if isinstance(body, bytes) else {"json": body}
            )
            r = await gw.http.post(f"/compat/segmind/{path}", headers=headers, **kwargs)
            assert r.status_code < 500, r.text
            assert isinstance(r.json()["error"], str), r.text  # Segmind's {"error": "..."}
            return r

        auth = {"x-api-key": key}
        cases: list[tuple[Any, dict[str, str], str, int, str | None]] = [
            (good, {}, "v2/flux-krea-dev", 401, None),
            (good, {"Authorization": f"Bearer {key}"}, "v2/flux-krea-dev", 401, None),
            (good, {"Authorization": f"Bearer {key}"}, "v1/flux-krea-dev", 401, None),
            (good, {"x-api-key": "gk_nobody_x"}, "v2/flux-krea-dev", 401, None),
            (good, auth, "v2/sdxl1.0-txt2img", 404, "model"),
            (good, auth, "v1/sdxl1.0-txt2img", 404, "model"),
            ({"num_outputs": 1}, auth, "v2/flux-krea-dev", 400, "prompt"),
            ({"prompt": "   "}, auth, "v1/flux-krea-dev", 400, "prompt"),
            ({"prompt": "x" * 1001}, auth, "v2/flux-krea-dev", 400, "prompt"),
            ({**good, "megapixels": 4}, auth, "v2/flux-krea-dev", 400, "megapixels"),
            ({**good, "megapixels": "big"}, auth, "v1/flux-krea-dev", 400, "megapixels"),
            ({**good, "aspect_ratio": "5:1"}, auth, "v2/flux-krea-dev", 400, "aspect_ratio"),
            ({**good, "num_outputs": 5}, auth, "v2/flux-krea-dev", 400, "num_outputs"),
            ({**good, "guidance": 11}, auth, "v2/flux-krea-dev", 400, "guidance"),
            ({**good, "num_inference_steps": 0}, auth, "v2/flux-krea-dev", 400,
             "num_inference_steps"),
            ({**good, "steps": 99}, auth, "v2/flux-krea-dev", 400, "steps"),
            ({**good, "output_format": "gif"}, auth, "v2/flux-krea-dev", 400, "output_format"),
            ({**good, "output_quality": 101}, auth, "v2/flux-krea-dev", 400, "output_quality"),
            ({**good, "seed": -5}, auth, "v2/flux-krea-dev", 400, "seed"),
            ({**good, "seed": 2**40}, auth, "v2/flux-krea-dev", 400, "seed"),
            ({**good, "go_fast": "yes"}, auth, "v2/flux-krea-dev", 400, "go_fast"),
            ({**good, "image": "https://example.com/a.png"}, auth, "v2/flux-krea-dev", 400,
             "image"),
            (b"{", auth, "v2/flux-krea-dev", 400, None),
            (b"[1]", auth, "v1/flux-krea-dev", 400, None),
        ]  # fmt: skip
        for body, headers, path, expected, field in cases:
            r = await post(body, headers, path)
            assert r.status_code == expected, (body, headers, path, r.text)
            if field:
                assert r.json()["field"] == field, r.text
            if expected != 401:
                assert "x-ratelimit-limit" in r.headers  # a good key's refusal
            else:  # no scheme this route does not take (Bearer)
                assert "www-authenticate" not in r.headers
        assert await balance(gw, key) == 1000
        assert await charges(gw, key) == []

        # Credits: Segmind's 406; a limit: 429 with Retry-After. Neither charged.
        poor = await gw.key(credits=5)
        r = await post(good, {"x-api-key": poor})
        assert r.status_code == 406
        assert (r.json()["creditsRequired"], r.json()["creditsAvailable"]) == (COST_16_9, 5)
        assert await balance(gw, poor) == 5
        slow = await gw.key(credits=1000, rpm=1)
        ok = await gw.http.post(
            "/compat/segmind/v2/flux-krea-dev", json=good, headers={"x-api-key": slow}
        )
        assert ok.status_code == 200
        r = await post(good, {"x-api-key": slow})
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
        assert await balance(gw, slow) == 1000 - COST_16_9

        # Unknown requests, and another key's, are 404s; other paths are Segmind's too.
        theirs = ok.json()["request_id"]
        for path in ("nope/status", "nope", f"{theirs}/status", theirs):
            r = await gw.http.get(f"/compat/segmind/v2/requests/{path}", headers=auth)
            assert r.status_code == 404 and "not found" in r.json()["error"]
        r = await gw.http.get(f"/compat/segmind/v2/requests/{theirs}/status")
        assert r.status_code == 401
        r = await gw.http.get("/compat/segmind/v1/flux-krea-dev", headers=auth)
        assert r.status_code == 405 and "error" in r.json()
        r = await gw.http.get("/compat/segmind/v1/files/upload", headers=auth)
        assert r.status_code == 404 and "error" in r.json()

        # The SDK raises its own error, with Segmind's status and our message.
        with sdks(gw) as sdk:
            with pytest.raises(SegmindError) as unknown:
                await asyncio.to_thread(sdk(key).submit_async, "sdxl1.0-txt2img", prompt="x")
            assert unknown.value.status == 404 and "sdxl1.0-txt2img" in (unknown.value.detail or "")
            with pytest.raises(SegmindError) as bad_key:
                await asyncio.to_thread(sdk("gk_nobody_x").run_sync, "flux-krea-dev", prompt="x")
            assert bad_key.value.status == 401
            with pytest.raises(SegmindError) as bad_size:
                await asyncio.to_thread(sdk(key).run, "flux-krea-dev", prompt="x", megapixels=2)
            assert bad_size.value.status == 400 and "megapixels" in (bad_size.value.detail or "")
        assert await balance(gw, key) == 1000


# -- client tokens -----------------------------------------------------------------------


async def test_a_client_token_is_a_key_here_too(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        key = await gw.key(credits=1000)
        minted = await gw.http.post(
            "/v1/client_tokens",
            json={"maxCredits": 2 * COST_16_9, "services": ["flux-krea"]},
            headers={"X-API-Key": key},
        )
        assert minted.status_code == 201, minted.text
        token = minted.json()["token"]
        mine = await gw.http.post(
            "/compat/segmind/v2/flux-krea-dev",
            json={"prompt": "the key's own", "num_outputs": 1},
            headers={"x-api-key": key},
        )
        with sdks(gw) as sdk:
            client = sdk(token)
            job = await asyncio.to_thread(
                client.submit_async, "flux-krea-dev", prompt="a felt badger", num_outputs=1
            )
            result = await asyncio.to_thread(job.wait, timeout=60, interval=0.05)
            assert result["status"] == "COMPLETED"
            assert await fetched(gw, result["output"]) == ("JPEG", SIZE_16_9)
            answer = await asyncio.to_thread(client.run_sync, "flux-krea-dev", prompt="a vole")
            assert picture(answer.content) == ("JPEG", SIZE_16_9)
            # Its budget is spent: Segmind's 406. A service outside its list: 403.
            with pytest.raises(SegmindError) as spent:
                await asyncio.to_thread(client.run_sync, "flux-krea-dev", prompt="one more")
            assert spent.value.status == 406
            with pytest.raises(SegmindError) as outside:
                await asyncio.to_thread(client.run_sync, "local", prompt="elsewhere")
            assert outside.value.status == 403
        # It sees the requests made with it, not its key's.
        headers = {"x-api-key": token}
        r = await gw.http.get(f"/compat/segmind/v2/requests/{job.request_id}", headers=headers)
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED"
        r = await gw.http.get(
            f"/compat/segmind/v2/requests/{mine.json()['request_id']}/status", headers=headers
        )
        assert r.status_code == 404
        assert await balance(gw, key) == 1000 - 3 * COST_16_9  # the key's and the token's two


async def test_a_generation_without_a_key_is_counted_as_every_routes_is(
    redis_url: str, storage_dir: Path
) -> None:
    """A generation refused on a provider's route for its missing key (or, on Segmind's, a
    bearer-only one), in that protocol's words before `Gateway.generate` is called, is
    counted in `gateway_admissions_total{outcome="unauthenticated"}`, as on every other
    route. Krea's and flux-krea's were not."""
    counted = metrics.ADMITTED["unauthenticated"]
    async with gateway(redis_url, storage_dir, **LOCAL) as gw:
        before = counted._value.get()
        refused = (
            ("/compat/segmind/v2/flux-krea-dev", {}),
            ("/compat/segmind/v1/flux-krea-dev", {"Authorization": "Bearer gk_x_y"}),
            ("/compat/krea/generate/image/bfl/flux-1-dev", {}),
            ("/compat/fluxkrea/v1/generate", {}),
            ("/compat/fluxkrea/v1/generate/async", {"X-API-Key": "gk_x_y"}),
        )
        for path, headers in refused:
            r = await gw.http.post(path, json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401, (path, r.text)
        assert counted._value.get() == before + len(refused)
