"""The flux-krea adapter against the emulator of its upstream, over real loopback HTTP."""

from __future__ import annotations

import io
import uuid
from collections.abc import AsyncIterator

import pytest
from PIL import Image
from structlog.testing import capture_logs

from gateway.errors import (
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from gateway.providers.base import ImageParams, Provider
from gateway.providers.fluxkrea import FluxKreaProvider
from gateway.providers.http import UpstreamClient
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.servers import serve


@pytest.fixture
def emu() -> FluxKreaEmulator:
    return FluxKreaEmulator(api_key="test-key")


@pytest.fixture
async def base(emu: FluxKreaEmulator) -> AsyncIterator[str]:
    async with serve(emu.app) as served:
        yield served


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with UpstreamClient(30.0) as c:
        yield c


def make(
    client: UpstreamClient, base: str, *, api_key: str | None = "test-key", timeout: float = 5.0
) -> FluxKreaProvider:
    return FluxKreaProvider(client, base_url=f"{base}/v1", api_key=api_key, timeout=timeout)


async def test_sends_translated_parameters_with_bearer_auth(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    provider = make(client, base)
    params = ImageParams(
        prompt="a lighthouse at dusk", width=640, height=512, guidance=25, steps=80, seed=42,
        num_images=2,
    )  # fmt: skip
    submitted = await provider.submit(params)

    expected = {
        "prompt": "a lighthouse at dusk",
        "width": 640,
        "height": 512,
        "guidance_scale": 20.0,
        "num_inference_steps": 50,
        "seed": 42,
        "num_images": 2,
    }
    received = emu.requests[0]
    assert received["method"] == "POST"
    assert received["path"] == "/v1/generate"
    assert received["headers"]["authorization"] == "Bearer test-key"
    assert received["json"] == expected
    assert submitted.sent == expected
    assert submitted.upstream_id is None
    assert [o.seed for o in submitted.outputs or []] == [42, 43]


async def test_out_of_range_values_are_brought_into_flux_krea_ranges(
    client: UpstreamClient,
) -> None:
    provider = FluxKreaProvider(client, base_url="http://127.0.0.1:9/v1", api_key="k")
    body = provider.body_for(
        ImageParams(prompt="p", width=256, height=4096, guidance=0.2, steps=0, seed=-1,
                    num_images=9)
    )  # fmt: skip
    assert body == {
        "prompt": "p",
        "width": 512,
        "height": 2048,
        "guidance_scale": 1.0,
        "num_inference_steps": 1,
        "seed": 2147483647,
        "num_images": 4,
    }
    # unset optional parameters are left to the upstream's defaults
    assert provider.body_for(ImageParams(prompt="p")) == {
        "prompt": "p",
        "width": 1024,
        "height": 1024,
        "num_images": 1,
    }


async def test_outputs_are_real_jpegs_of_the_requested_size(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    provider = make(client, base)
    submitted = await provider.submit(ImageParams(prompt="a red fox", width=768, height=576))

    (output,) = submitted.outputs or []
    assert (output.width, output.height, output.content_type) == (768, 576, "image/jpeg")
    data = await provider.fetch(output)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG"
    assert image.size == (768, 576)
    assert uuid.UUID(submitted.metadata["upstream_request_id"])
    assert submitted.metadata["upstream_credits_used"] == 1
    assert isinstance(submitted.metadata["generation_time"], float)
    # the CDN download carries no credentials
    download = emu.requests[-1]
    assert download["method"] == "GET"
    assert "authorization" not in download["headers"]


async def test_num_images_three_gives_three_fetchable_outputs(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    provider = make(client, base)
    submitted = await provider.submit(ImageParams(prompt="tiles", width=512, height=512,
                                                  num_images=3))  # fmt: skip
    outputs = submitted.outputs or []
    assert len(outputs) == 3
    assert len({o.url for o in outputs}) == 3
    for output in outputs:
        assert Image.open(io.BytesIO(await provider.fetch(output))).size == (512, 512)
    assert emu.submissions == 1


async def test_generation_delay_is_awaited(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.delay = 0.2
    submitted = await make(client, base).submit(ImageParams(prompt="slow", width=512, height=512))
    assert submitted.metadata["generation_time"] >= 0.2


async def test_upstream_400_is_the_users_fault(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.fail_next(1, status=400)
    with pytest.raises(ProviderRejected, match="injected failure") as info:
        await make(client, base).submit(ImageParams(prompt="x"))
    assert info.value.failover is False
    assert emu.submissions == 1


@pytest.mark.parametrize("prompt", ["", "x" * 1001])
async def test_out_of_range_prompt_is_rejected_without_a_request(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient, prompt: str
) -> None:
    with pytest.raises(ProviderRejected, match="1-1000 characters"):
        await make(client, base).submit(ImageParams(prompt=prompt))
    assert emu.requests == []


async def test_longest_allowed_prompt_is_sent(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    await make(client, base).submit(ImageParams(prompt="x" * 1000, width=512, height=512))
    assert emu.submissions == 1


async def test_bad_key_is_our_problem(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    with capture_logs() as logged, pytest.raises(ProviderUnavailable) as info:
        await make(client, base, api_key="wrong").submit(ImageParams(prompt="x"))
    assert emu.requests[0]["headers"]["authorization"] == "Bearer wrong"
    assert emu.submissions == 1
    # The job's owner (and `providers`) reads the status; the operator, what to fix.
    assert info.value.message == "flux-krea answered 401"
    assert any(
        line["event"] == "upstream refused our credential"
        and line["setting"] == "GATEWAY_FLUXKREA_API_KEY"
        for line in logged
    )


async def test_quota_exceeded_is_unavailable_and_the_operator_is_told(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.quota_exceeded = True
    with capture_logs() as logged, pytest.raises(ProviderUnavailable) as info:
        await make(client, base).submit(ImageParams(prompt="x"))
    assert info.value.failover is True
    assert emu.submissions == 1
    assert info.value.message == "flux-krea answered 403"  # our account's: the operator's
    told = [line["event"] for line in logged if "our" in line["event"]]
    assert told == ["upstream quota exceeded on our account"]  # not a key to rotate


async def test_other_403_is_unavailable_without_blaming_quota(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.fail_next(1, status=403)
    with capture_logs() as logged, pytest.raises(ProviderUnavailable) as info:
        await make(client, base).submit(ImageParams(prompt="x"))
    assert info.value.message == "flux-krea answered 403"
    told = [line["event"] for line in logged if "our" in line["event"]]
    assert told == ["upstream refused our credential"]


async def test_429_waits_for_retry_after_then_succeeds(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.rate_limit_next(1, retry_after=1)
    submitted = await make(client, base).submit(ImageParams(prompt="x", width=512, height=512))
    assert len(submitted.outputs or []) == 1
    assert emu.submissions == 2
    first, second = emu.requests[:2]
    assert second["at"] - first["at"] >= 0.9


async def test_429_that_persists_is_rate_limited(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.rate_limit_next(10, retry_after=0)
    with pytest.raises(ProviderRateLimited):
        await make(client, base).submit(ImageParams(prompt="x"))
    assert emu.submissions == 3


async def test_500_on_submit_is_not_retried(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.fail_next(1, status=500)
    with pytest.raises(ProviderUnavailable, match="500"):
        await make(client, base).submit(ImageParams(prompt="x"))
    assert emu.submissions == 1


async def test_malformed_json_is_unavailable(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.malformed_next(1)
    with pytest.raises(ProviderUnavailable, match="malformed"):
        await make(client, base).submit(ImageParams(prompt="x"))
    assert emu.submissions == 1


@pytest.mark.parametrize(
    "body",
    [
        {"status": "failed", "error": "content policy"},
        {"status": "failed", "images": [{"url": "http://127.0.0.1:9/a.jpg"}]},
        {"status": "success", "request_id": "r", "images": []},
        {"status": "success", "request_id": "r", "images": [{"seed": 1}]},
        ["not", "an", "object"],
    ],
)
async def test_answer_without_images_is_unavailable(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient, body: object
) -> None:
    emu.answer_next(1, body)
    with pytest.raises(ProviderUnavailable):
        await make(client, base).submit(ImageParams(prompt="x"))
    assert emu.submissions == 1


async def test_what_flux_krea_says_of_a_failure_is_not_in_the_reason(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    """The reason is shown in the job's `error` and the public `providers` list: it
    names the status, never the upstream's own words (those go to our log)."""
    emu.answer_next(1, {"status": "error", "message": "account acct_42 suspended: " + "x" * 999})
    with pytest.raises(ProviderUnavailable) as raised:
        await make(client, base).submit(ImageParams(prompt="x"))
    assert raised.value.message == "flux-krea answered status 'error'"


async def test_stall_beyond_timeout_is_a_timeout_and_not_resent(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    emu.stall = 30
    with pytest.raises(ProviderTimeout):
        await make(client, base, timeout=0.3).submit(ImageParams(prompt="x"))
    assert emu.submissions == 1


async def test_without_key_the_backend_is_disabled(
    emu: FluxKreaEmulator, base: str, client: UpstreamClient
) -> None:
    provider = make(client, base, api_key=None)
    assert provider.status() == (False, "GATEWAY_FLUXKREA_API_KEY is not set")
    with pytest.raises(ProviderUnavailable):
        await provider.submit(ImageParams(prompt="x"))
    assert emu.requests == []
    assert make(client, base).status() == (True, "ok")


async def test_is_a_provider_that_never_polls(client: UpstreamClient) -> None:
    provider = FluxKreaProvider(client, base_url="http://127.0.0.1:9/v1", api_key="k")
    assert isinstance(provider, Provider)
    assert provider.name == "fluxkrea"
    with pytest.raises(ProviderUnavailable, match="synchronously"):
        await provider.poll("anything")
    await provider.cancel("anything")  # a no-op, no request made
