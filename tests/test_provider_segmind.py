"""The Segmind adapter against an emulator of its v2 queue, over real loopback HTTP."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from PIL import Image
from structlog.testing import capture_logs

from gateway.errors import ProviderRejected, ProviderTimeout, ProviderUnavailable
from gateway.providers.base import ImageParams, Polled, Provider
from gateway.providers.http import UpstreamClient
from gateway.providers.segmind import SegmindProvider, translate
from tests.emulators.segmind import SegmindEmulator, image_size
from tests.servers import serve


@dataclass
class Rig:
    emu: SegmindEmulator
    provider: SegmindProvider
    base: str


@asynccontextmanager
async def rig(
    emu: SegmindEmulator | None = None,
    *,
    api_key: str | None = "test-key",
    timeout: float = 5.0,
) -> AsyncIterator[Rig]:
    emu = emu or SegmindEmulator(api_key="test-key")
    async with serve(emu.app) as base, UpstreamClient(30.0) as client:
        provider = SegmindProvider(client, base_url=base, api_key=api_key, timeout=timeout)
        yield Rig(emu, provider, base)


async def poll_until_done(provider: SegmindProvider, upstream_id: str) -> list[Polled]:
    """Poll back to back (the emulator advances per poll, so no waiting is needed)."""
    seen: list[Polled] = []
    for _ in range(20):
        polled = await provider.poll(upstream_id)
        seen.append(polled)
        if polled.state != "pending":
            return seen
    raise AssertionError(f"still pending after 20 polls: {[p.upstream_status for p in seen]}")


# -- parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "aspect_ratio", "megapixels"),
    [
        (1024, 1024, "1:1", "1"),
        (512, 512, "1:1", "0.25"),
        (1024, 576, "16:9", "1"),
        (576, 1024, "9:16", "1"),
        (1536, 640, "21:9", "1"),
        (640, 1536, "9:21", "1"),
        (1216, 832, "3:2", "1"),
        (864, 1152, "3:4", "1"),
        (896, 1152, "4:5", "1"),
        (432, 576, "3:4", "0.25"),
    ],
)
def test_size_becomes_nearest_aspect_ratio_and_megapixels(
    width: int, height: int, aspect_ratio: str, megapixels: str
) -> None:
    body = translate(ImageParams("a fox", width=width, height=height))
    assert (body["aspect_ratio"], body["megapixels"]) == (aspect_ratio, megapixels)


async def test_small_square_is_received_as_quarter_megapixel() -> None:
    async with rig() as r:
        submitted = await r.provider.submit(ImageParams("a fox", width=512, height=512))
    received = r.emu.calls("POST")[0].json
    assert received["aspect_ratio"] == "1:1"
    assert received["megapixels"] == "0.25"
    assert submitted.sent == received


async def test_parameters_are_translated_and_clamped() -> None:
    params = ImageParams(
        "a raccoon made of wool",
        width=1024,
        height=576,
        num_images=3,
        seed=7,
        steps=80,
        guidance=15,
        output_format="webp",
        quality="high",
    )
    async with rig() as r:
        submitted = await r.provider.submit(params)
    call = r.emu.calls("POST")[0]
    assert call.path == "/v2/flux-krea-dev"
    assert call.headers["x-api-key"] == "test-key"
    assert call.json == {
        "prompt": "a raccoon made of wool",
        "aspect_ratio": "16:9",
        "megapixels": "1",
        "num_outputs": 3,
        "output_format": "webp",
        "output_quality": 100,
        "guidance": 10.0,
        "num_inference_steps": 50,
        "seed": 7,
        "go_fast": False,
    }
    assert submitted.upstream_id is not None
    assert r.emu.jobs[submitted.upstream_id].params["prompt"] == "a raccoon made of wool"
    assert submitted.metadata["upstream_request_id"] == submitted.upstream_id
    assert submitted.metadata["status_url"].endswith(f"/v2/requests/{submitted.upstream_id}/status")


async def test_unset_optionals_are_left_to_segmind_defaults() -> None:
    async with rig() as r:
        await r.provider.submit(ImageParams("a fox", guidance=-3, steps=0))
    body = r.emu.calls("POST")[0].json
    assert body["guidance"] == 0.0
    assert body["num_inference_steps"] == 1
    assert "seed" not in body
    assert body["output_quality"] == 90  # quality unset -> Segmind's default
    assert body["num_outputs"] == 1  # never Segmind's default of 2


@pytest.mark.parametrize(
    ("asked", "sent"),
    [("4:5", "4:5"), ("9:21", "9:21"), ("7:3", "21:9"), ("2:1", "16:9"), ("nonsense", "1:1")],
)
def test_explicit_aspect_ratio_wins_over_size(asked: str, sent: str) -> None:
    params = ImageParams("a fox", width=1024, height=1024, aspect_ratio=asked)
    assert translate(params)["aspect_ratio"] == sent


@pytest.mark.parametrize(("quality", "expected"), [("low", 75), ("standard", 90), (None, 90)])
def test_quality_maps_to_output_quality(quality: str | None, expected: int) -> None:
    assert translate(ImageParams("a fox", quality=quality))["output_quality"] == expected


# -- the happy path --------------------------------------------------------------------


async def test_request_completes_with_real_images() -> None:
    emu = SegmindEmulator(api_key="test-key", polls_to_complete=3)
    params = ImageParams("a fox", width=1024, height=576, num_images=3, output_format="webp")
    async with rig(emu) as r:
        provider: Provider = r.provider
        submitted = await provider.submit(params)
        assert submitted.upstream_id
        seen = await poll_until_done(r.provider, submitted.upstream_id)
        images = [await provider.fetch(output) for output in seen[-1].outputs]

    assert [p.upstream_status for p in seen] == ["QUEUED", "PROCESSING", "COMPLETED"]
    assert [p.state for p in seen] == ["pending", "pending", "completed"]
    assert seen[0].metadata["upstream_status"] == "QUEUED"
    done = seen[-1]
    assert isinstance(done.metadata["inference_time"], float)
    assert done.metadata["upstream_request_id"] == submitted.upstream_id
    assert len(done.outputs) == 3
    assert all(o.content_type == "image/webp" for o in done.outputs)
    assert len(set(images)) == 3  # three distinct images
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            assert image.format == "WEBP"
            assert image.size == image_size("16:9", 1)
            assert image.width > image.height
    # status polls, then exactly one result fetch, then the images
    assert len(emu.calls("GET", "/status")) == 3
    assert len(emu.calls("GET", f"/v2/requests/{submitted.upstream_id}")) == 1
    assert len(emu.calls("GET", ".webp")) == 3


@pytest.mark.parametrize(
    ("output_format", "pil_format", "output_style"),
    [("png", "PNG", "string"), ("jpg", "JPEG", "objects"), ("webp", "WEBP", "list")],
)
async def test_each_format_and_output_shape(
    output_format: str, pil_format: str, output_style: str
) -> None:
    emu = SegmindEmulator(api_key="test-key", polls_to_complete=1)
    emu.output_style = output_style
    params = ImageParams("a fox", width=512, height=512, output_format=output_format)  # type: ignore[arg-type]
    async with rig(emu) as r:
        submitted = await r.provider.submit(params)
        polled = await r.provider.poll(str(submitted.upstream_id))
        assert polled.state == "completed"
        assert len(polled.outputs) == 1
        data = await r.provider.fetch(polled.outputs[0])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil_format
        assert image.size == (512, 512)


# -- failures of the job ---------------------------------------------------------------


@pytest.mark.parametrize("failed_status_code", [200, 422])
async def test_failed_request_is_a_failed_poll_with_upstream_detail(
    failed_status_code: int,
) -> None:
    emu = SegmindEmulator(api_key="test-key", polls_to_complete=2)
    emu.fail_jobs = True
    emu.failed_status_code = failed_status_code
    emu.failure_detail = "NSFW content detected in the output"
    async with rig(emu) as r:
        submitted = await r.provider.submit(ImageParams("a fox"))
        seen = await poll_until_done(r.provider, str(submitted.upstream_id))
    done = seen[-1]
    assert done.state == "failed"
    assert done.upstream_status == "FAILED"
    assert done.error is not None and "NSFW content detected" in done.error
    assert done.outputs == []


async def test_expired_result_is_unavailable_with_clear_message() -> None:
    async with rig() as r:
        submitted = await r.provider.submit(ImageParams("a fox"))
        assert submitted.upstream_id
        r.emu.expire(submitted.upstream_id)
        with pytest.raises(ProviderUnavailable, match="expired") as excinfo:
            await r.provider.poll(submitted.upstream_id)
        with pytest.raises(ProviderUnavailable, match="unknown"):
            await r.provider.poll("no-such-request")
    assert "404" in excinfo.value.message
    assert len(r.emu.calls("GET", f"{submitted.upstream_id}/status")) == 1  # 404 not retried


# -- failures of the account / the upstream ---------------------------------------------


async def test_no_credits_on_submit_is_unavailable() -> None:
    emu = SegmindEmulator(api_key="test-key")
    emu.no_credits = True
    async with rig(emu) as r:
        with capture_logs() as logged, pytest.raises(ProviderUnavailable) as excinfo:
            await r.provider.submit(ImageParams("a fox"))
    assert excinfo.value.failover
    assert emu.submissions == 1
    # Segmind's own words, and what our account's trouble means, go to the operator's
    # log, not into the job's error.
    assert excinfo.value.message == "segmind answered 406"
    assert "upstream account out of credits" in [line["event"] for line in logged]


async def test_no_credits_on_poll_is_unavailable() -> None:
    async with rig() as r:
        submitted = await r.provider.submit(ImageParams("a fox"))
        r.emu.fail_next(1, status=406)
        with pytest.raises(ProviderUnavailable, match=r"^segmind answered 406$"):
            await r.provider.poll(str(submitted.upstream_id))


async def test_invalid_input_is_rejected_without_failover() -> None:
    async with rig() as r:
        with pytest.raises(ProviderRejected, match="prompt is required") as excinfo:
            await r.provider.submit(ImageParams("   "))
    assert not excinfo.value.failover
    assert r.emu.submissions == 1
    assert r.emu.jobs == {}


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_key_is_unavailable(status: int) -> None:
    emu = SegmindEmulator(api_key="test-key")
    async with rig(emu, api_key="wrong-key") as r:
        if status == 403:
            emu.api_key = "wrong-key"
            emu.fail_next(1, status=403)
        with capture_logs() as logged, pytest.raises(ProviderUnavailable) as excinfo:
            await r.provider.submit(ImageParams("a fox"))
    assert excinfo.value.message == f"segmind answered {status}"
    assert [line.get("setting") for line in logged if "credential" in line["event"]] == [
        "GATEWAY_SEGMIND_API_KEY"
    ]
    assert emu.jobs == {}


async def test_unknown_model_is_unavailable() -> None:
    emu = SegmindEmulator(api_key="test-key", models=("something-else",))
    async with rig(emu) as r:
        with pytest.raises(ProviderUnavailable, match="flux-krea-dev"):
            await r.provider.submit(ImageParams("a fox"))


async def test_rate_limited_submit_honours_retry_after_then_succeeds() -> None:
    async with rig() as r:
        r.emu.rate_limit_next(1, retry_after=1)
        started = time.monotonic()
        submitted = await r.provider.submit(ImageParams("a fox"))
        elapsed = time.monotonic() - started
    assert submitted.upstream_id in r.emu.jobs
    assert r.emu.submissions == 2
    assert elapsed >= 0.9


async def test_server_error_on_submit_is_not_retried() -> None:
    async with rig() as r:
        r.emu.fail_next(1, status=500)
        with pytest.raises(ProviderUnavailable, match="500"):
            await r.provider.submit(ImageParams("a fox"))
    assert r.emu.submissions == 1


async def test_server_error_on_status_poll_is_retried() -> None:
    emu = SegmindEmulator(api_key="test-key", polls_to_complete=1)
    async with rig(emu) as r:
        submitted = await r.provider.submit(ImageParams("a fox"))
        emu.fail_next(1, status=500)
        polled = await r.provider.poll(str(submitted.upstream_id))
    assert polled.state == "completed"
    assert len(emu.calls("GET", "/status")) == 2


async def test_malformed_json_is_unavailable() -> None:
    async with rig() as r:
        r.emu.malformed_next(1)
        with pytest.raises(ProviderUnavailable, match="malformed JSON"):
            await r.provider.submit(ImageParams("a fox"))
        submitted = await r.provider.submit(ImageParams("a fox"))
        r.emu.malformed_next(1)
        with pytest.raises(ProviderUnavailable, match="malformed JSON"):
            await r.provider.poll(str(submitted.upstream_id))


async def test_stall_beyond_timeout_is_a_timeout_and_submit_is_not_resent() -> None:
    async with rig(timeout=0.2) as r:
        r.emu.stall = 1.0
        with pytest.raises(ProviderTimeout):
            await r.provider.submit(ImageParams("a fox"))
    assert r.emu.submissions == 1


# -- configuration and the protocol ------------------------------------------------------


async def test_without_key_the_provider_is_disabled_and_sends_nothing() -> None:
    async with rig(api_key=None) as r:
        assert r.provider.status() == (False, "GATEWAY_SEGMIND_API_KEY is not set")
        with pytest.raises(ProviderUnavailable, match="GATEWAY_SEGMIND_API_KEY"):
            await r.provider.submit(ImageParams("a fox"))
    assert r.emu.requests == []


async def test_with_key_the_provider_is_enabled_and_cancel_is_a_no_op() -> None:
    async with rig() as r:
        assert isinstance(r.provider, Provider)
        assert r.provider.name == "segmind"
        assert r.provider.poll_interval == 1.0
        assert r.provider.status() == (True, "ok")
        submitted = await r.provider.submit(ImageParams("a fox"))
        calls = len(r.emu.requests)
        await r.provider.cancel(str(submitted.upstream_id))
    assert len(r.emu.requests) == calls  # Segmind documents no cancel endpoint
