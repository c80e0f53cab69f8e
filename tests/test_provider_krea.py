"""The Krea adapter against an emulator of Krea's job API (docs/providers/krea.md), over HTTP."""

from __future__ import annotations

import contextlib
import io
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import (
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from gateway.providers.base import ImageParams, Polled, Provider
from gateway.providers.http import UpstreamClient
from gateway.providers.krea import KreaProvider
from tests.emulators.krea import KreaEmulator, png
from tests.servers import HOOKS_NAME, black_hole, resolving, serve

TOKEN = "test-token"


@dataclass
class Krea:
    emu: KreaEmulator
    base: str
    client: UpstreamClient
    provider: KreaProvider

    def adapter(self, **kwargs: object) -> KreaProvider:
        options: dict = {"base_url": self.base, "token": TOKEN, **kwargs}
        return KreaProvider(self.client, **options)


@pytest.fixture
async def krea() -> AsyncIterator[Krea]:
    emu = KreaEmulator(token=TOKEN)
    async with serve(emu.app) as base, UpstreamClient(30.0) as client:
        yield Krea(emu, base, client, KreaProvider(client, base_url=base, token=TOKEN))


async def poll_until_done(provider: KreaProvider, upstream_id: str, limit: int = 20) -> Polled:
    """Poll without sleeping: the emulator advances one status per poll."""
    for _ in range(limit):
        polled = await provider.poll(upstream_id)
        if polled.state != "pending":
            return polled
    raise AssertionError(f"job still pending after {limit} polls")


# -- submit: what reaches Krea -------------------------------------------------------------


async def test_submit_sends_krea_names_and_bearer_token(krea: Krea) -> None:
    params = ImageParams(
        prompt="a serene mountain landscape at sunset",
        width=1024,
        height=576,
        steps=28,
        guidance=3.5,
        seed=42,
    )
    submitted = await krea.provider.submit(params)

    [post] = krea.emu.received("POST")
    assert post.path == "/generate/image/bfl/flux-1-dev"
    assert post.headers["authorization"] == f"Bearer {TOKEN}"
    assert post.headers["content-type"] == "application/json"
    assert post.json == {
        "prompt": "a serene mountain landscape at sunset",
        "width": 1024,
        "height": 576,
        "steps": 28,
        "guidance_scale_flux": 3.5,
        "seed": 42,
    }
    assert submitted.sent == post.json
    [job_id] = krea.emu.jobs
    assert submitted.upstream_id == job_id
    assert submitted.metadata["upstream_job_ids"] == [job_id]
    assert submitted.metadata["upstream_created_at"] == krea.emu.jobs[job_id].created_at


async def test_submit_clamps_to_krea_ranges_and_omits_unset_options(krea: Krea) -> None:
    await krea.provider.submit(ImageParams(prompt="p", width=3000, height=256, steps=150))
    await krea.provider.submit(ImageParams(prompt="p", width=2368, height=512, guidance=30))
    await krea.provider.submit(ImageParams(prompt="p"))

    bodies = [r.json for r in krea.emu.received("POST")]
    assert bodies == [
        {"prompt": "p", "width": 2368, "height": 512, "steps": 100},
        {"prompt": "p", "width": 2368, "height": 512, "guidance_scale_flux": 24.0},
        {"prompt": "p", "width": 1024, "height": 1024},
    ]
    assert len(krea.emu.jobs) == 3  # every clamped body passed Krea's documented validation


async def test_submit_uses_the_configured_model_path(krea: Krea) -> None:
    krea.emu.models = frozenset({"bfl/flux-1-dev", "bfl/flux-1-schnell"})
    await krea.adapter(model_path="bfl/flux-1-schnell").submit(ImageParams(prompt="p"))
    assert krea.emu.requests[0].path == "/generate/image/bfl/flux-1-schnell"


async def test_prompt_longer_than_krea_allows_is_rejected_without_a_request(krea: Krea) -> None:
    with pytest.raises(ProviderRejected, match="1800"):
        await krea.provider.submit(ImageParams(prompt="x" * 1801))
    assert krea.emu.requests == []
    await krea.provider.submit(ImageParams(prompt="x" * 1800))  # the limit itself is fine
    assert krea.emu.submissions == 1


# -- poll: the job lifecycle -----------------------------------------------------------------


async def test_intermediate_statuses_are_pending_with_the_upstream_status(krea: Krea) -> None:
    submitted = await krea.provider.submit(ImageParams(prompt="p"))
    seen = []
    while (polled := await krea.provider.poll(submitted.upstream_id or "")).state == "pending":
        assert polled.outputs == []
        assert polled.metadata["upstream_status"] == polled.upstream_status
        seen.append(polled.upstream_status)
        assert len(seen) < 10
    assert seen == ["queued", "scheduled", "processing", "sampling", "intermediate-complete"]
    assert polled.state == "completed"
    assert polled.upstream_status == "completed"


async def test_completed_job_gives_a_fetchable_png_of_the_requested_size(krea: Krea) -> None:
    krea.emu.steps_to_complete = 2
    submitted = await krea.provider.submit(ImageParams(prompt="p", width=768, height=640))
    polled = await poll_until_done(krea.provider, submitted.upstream_id or "")

    assert polled.state == "completed"
    assert polled.error is None
    [output] = polled.outputs
    assert output.url is not None
    assert output.url.startswith(krea.base + "/files/")
    data = await krea.provider.fetch(output)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    assert image.size == (768, 640)

    job = krea.emu.jobs[submitted.upstream_id or ""]
    assert polled.metadata["upstream_created_at"] == job.created_at
    assert polled.metadata["upstream_completed_at"] == job.completed_at is not None


async def test_two_images_make_two_jobs_with_consecutive_seeds_and_two_outputs(
    krea: Krea,
) -> None:
    krea.emu.steps_to_complete = 1
    submitted = await krea.provider.submit(
        ImageParams(prompt="p", width=512, height=512, num_images=2, seed=7)
    )

    assert krea.emu.submissions == 2
    assert [r.json["seed"] for r in krea.emu.received("POST")] == [7, 8]
    assert submitted.metadata["upstream_job_ids"] == list(krea.emu.jobs)
    polled = await poll_until_done(krea.provider, submitted.upstream_id or "")
    assert polled.state == "completed"
    assert len(polled.outputs) == 2
    assert len({o.url for o in polled.outputs}) == 2
    for output in polled.outputs:
        assert Image.open(io.BytesIO(await krea.provider.fetch(output))).size == (512, 512)


async def test_several_jobs_are_completed_only_when_all_are(krea: Krea) -> None:
    krea.emu.steps_to_complete = 2
    submitted = await krea.provider.submit(ImageParams(prompt="p", num_images=2))
    first, _ = submitted.metadata["upstream_job_ids"]
    # Someone else's poll advances only the first job: it is now one status ahead.
    await krea.client.get(f"{krea.base}/jobs/{first}", headers={"Authorization": f"Bearer {TOKEN}"})

    polled = await krea.provider.poll(submitted.upstream_id or "")
    assert polled.state == "pending"
    assert polled.upstream_status == "queued"  # the slower job bounds the progress
    assert polled.metadata["upstream_statuses"] == ["completed", "queued"]
    assert polled.outputs == []
    assert (await krea.provider.poll(submitted.upstream_id or "")).state == "completed"


async def test_failed_upstream_job_is_failed_with_an_error(krea: Krea) -> None:
    krea.emu.steps_to_complete = 3
    krea.emu.fail_jobs = True
    submitted = await krea.provider.submit(ImageParams(prompt="p"))
    polled = await poll_until_done(krea.provider, submitted.upstream_id or "")
    assert polled.state == "failed"
    assert polled.upstream_status == "failed"
    assert polled.error and "failed" in polled.error
    assert polled.outputs == []


async def test_one_failed_job_fails_the_whole_request(krea: Krea) -> None:
    krea.emu.steps_to_complete = 1
    submitted = await krea.provider.submit(ImageParams(prompt="p", num_images=2))
    second = submitted.metadata["upstream_job_ids"][1]
    krea.emu.jobs[second].outcome = "failed"
    polled = await krea.provider.poll(submitted.upstream_id or "")
    assert polled.state == "failed"
    assert polled.error and second in polled.error


async def test_cancelled_upstream_job_is_cancelled(krea: Krea) -> None:
    krea.emu.steps_to_complete = 1
    krea.emu.cancel_jobs = True
    submitted = await krea.provider.submit(ImageParams(prompt="p"))
    polled = await krea.provider.poll(submitted.upstream_id or "")
    assert polled.state == "cancelled"
    assert polled.upstream_status == "cancelled"


async def test_unknown_upstream_job_is_unavailable(krea: Krea) -> None:
    with pytest.raises(ProviderUnavailable, match="404"):
        await krea.provider.poll("3c90c3cc-0d44-4b50-8888-8dd25736052a")


async def test_cancel_is_a_no_op_since_krea_documents_no_cancel(krea: Krea) -> None:
    submitted = await krea.provider.submit(ImageParams(prompt="p"))
    await krea.provider.cancel(submitted.upstream_id or "")
    assert [r.method for r in krea.emu.requests] == ["POST"]


# -- errors and retries ----------------------------------------------------------------------


async def test_bad_token_is_our_problem_not_the_users(krea: Krea) -> None:
    with pytest.raises(ProviderUnavailable, match="401") as caught:
        await krea.adapter(token="wrong").submit(ImageParams(prompt="p"))
    assert caught.value.failover is True
    assert krea.emu.submissions == 1
    assert krea.emu.jobs == {}


async def test_upstream_400_is_a_rejection_of_the_users_input(krea: Krea) -> None:
    krea.emu.fail_next(1, status=400, message="prompt: flagged by moderation")
    with pytest.raises(ProviderRejected, match="flagged by moderation") as caught:
        await krea.provider.submit(ImageParams(prompt="p"))
    assert caught.value.failover is False
    assert krea.emu.submissions == 1


async def test_rate_limited_submit_waits_retry_after_then_succeeds(krea: Krea) -> None:
    krea.emu.rate_limit_next(1, retry_after=1)
    submitted = await krea.provider.submit(ImageParams(prompt="p"))

    assert krea.emu.submissions == 2
    assert submitted.upstream_id in krea.emu.jobs
    first, second = krea.emu.received_at
    assert second - first >= 0.95  # the adapter honoured Retry-After: 1


async def test_server_error_on_submit_is_not_resent(krea: Krea) -> None:
    krea.emu.fail_next(1, status=500)
    with pytest.raises(ProviderUnavailable, match="500"):
        await krea.provider.submit(ImageParams(prompt="p"))
    assert krea.emu.submissions == 1  # a resend could pay for the job twice


async def test_server_error_on_poll_is_retried(krea: Krea) -> None:
    krea.emu.steps_to_complete = 1
    submitted = await krea.provider.submit(ImageParams(prompt="p"))
    krea.emu.fail_next(1, status=503)
    polled = await krea.provider.poll(submitted.upstream_id or "")
    assert polled.state == "completed"
    assert len(krea.emu.received("GET", "/jobs/")) == 2


@pytest.mark.parametrize("step", ["submit", "poll"])
async def test_malformed_json_is_unavailable(krea: Krea, step: str) -> None:
    if step == "submit":
        krea.emu.malformed_next(1)
        with pytest.raises(ProviderUnavailable, match="malformed"):
            await krea.provider.submit(ImageParams(prompt="p"))
    else:
        submitted = await krea.provider.submit(ImageParams(prompt="p"))
        krea.emu.malformed_next(1)
        with pytest.raises(ProviderUnavailable, match="malformed"):
            await krea.provider.poll(submitted.upstream_id or "")


@contextlib.asynccontextmanager
async def answering(answer: object) -> AsyncIterator[str]:
    """A server that answers every request with `answer` as JSON (a broken upstream)."""

    async def reply(request: Request) -> JSONResponse:
        return JSONResponse(answer)

    app = Starlette(routes=[Route("/{path:path}", reply, methods=["GET", "POST"])])
    async with serve(app) as base:
        yield base


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "backlogged", "created_at": "2023-11-07T05:31:56Z"},  # no job_id
        {"job_id": "3c90c3cc-0d44-4b50-8888-8dd25736052a", "created_at": "x"},  # no status
        ["not", "an", "object"],
    ],
)
async def test_answer_missing_a_field_is_unavailable(answer: object) -> None:
    async with answering(answer) as base, UpstreamClient(5.0) as client:
        provider = KreaProvider(client, base_url=base, token=TOKEN)
        with pytest.raises(ProviderUnavailable):
            await provider.submit(ImageParams(prompt="p"))


async def test_completed_job_without_urls_is_unavailable() -> None:
    answer = {
        "job_id": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
        "status": "completed",
        "created_at": "2025-01-15T10:30:00.000Z",
        "completed_at": "2025-01-15T10:30:25.000Z",
        "result": None,
    }
    async with answering(answer) as base, UpstreamClient(5.0) as client:
        provider = KreaProvider(client, base_url=base, token=TOKEN)
        with pytest.raises(ProviderUnavailable, match=r"result\.urls"):
            await provider.poll(answer["job_id"])


async def test_stalled_submit_times_out_without_a_resend(krea: Krea) -> None:
    krea.emu.stall = 0.5
    with pytest.raises(ProviderTimeout):
        await krea.adapter(timeout=0.1).submit(ImageParams(prompt="p"))
    assert krea.emu.submissions == 1


# -- configuration ---------------------------------------------------------------------------


async def test_without_a_token_the_backend_is_disabled_and_says_why(krea: Krea) -> None:
    provider = krea.adapter(token=None)
    assert isinstance(provider, Provider)
    assert provider.status() == (False, "GATEWAY_KREA_API_TOKEN is not set")
    with pytest.raises(ProviderUnavailable):
        await provider.submit(ImageParams(prompt="p"))
    assert krea.emu.requests == []
    assert krea.provider.status() == (True, "ok")


# -- the emulator keeps to Krea's API reference ------------------------------------------


async def test_emulator_enforces_seed_003(krea: Krea) -> None:
    url = f"{krea.base}/generate/image/bfl/flux-1-dev"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    unauthorized = await krea.client.post(url, json={"prompt": "p"})
    assert unauthorized.status_code == 401
    for body in (
        {},
        {"prompt": "x" * 1801},
        {"prompt": "p", "width": 4000},
        {"prompt": "p", "steps": 0},
        {"prompt": "p", "guidance_scale_flux": 25},
    ):
        response = await krea.client.post(url, json=body, headers=auth)
        assert response.status_code == 400, body
        assert response.json()["message"]
    created = (await krea.client.post(url, json={"prompt": "p"}, headers=auth)).json()
    assert created["status"] == "backlogged"
    assert created["completed_at"] is None
    assert created["result"] is None


def completed_at(url: str) -> dict[str, Any]:
    """Krea's answer for a completed job whose one output is at `url`."""
    return {
        "job_id": "3c90c3cc-0d44-4b50-8888-8dd25736052a",
        "status": "completed",
        "created_at": "2025-01-15T10:30:00.000Z",
        "completed_at": "2025-01-15T10:30:25.000Z",
        "result": {"urls": [url]},
    }


async def test_an_output_on_another_host_is_fetched_only_through_the_url_guard() -> None:
    """Krea's answer names its outputs' URLs: one on another host (its CDN) goes through
    the guard that webhooks do, so an answer (or a callback) naming a private address
    makes the gateway fetch nothing from its own network."""
    fetched: list[str] = []

    async def internal(request: Request) -> Response:
        fetched.append(request.headers["host"])
        sent.append((request.scope["raw_path"], request.scope["query_string"]))
        return Response(png(8, 8), media_type="image/png")

    sent: list[tuple[bytes, bytes]] = []
    # A signed CDN URL: longer than a webhook URL may be, escapes and `..` as signed.
    path, query = "/meta/../iam%2Fx.png", "sig=%41%2F" + "a" * 3000

    inside = Starlette(routes=[Route("/{path:path}", internal, methods=["GET"])])
    async with serve(inside) as private:
        answer = completed_at(f"{private}{path}?{query}")
        async with answering(answer) as base:
            async with UpstreamClient(5.0) as client:
                provider = KreaProvider(client, base_url=base, token=TOKEN)
                [output] = (await provider.poll(answer["job_id"])).outputs
                with pytest.raises(ProviderUnavailable, match="will not fetch"):
                    await provider.fetch(output)
                assert fetched == []
            # A network the operator trusts (GATEWAY_URL_ALLOW_CIDRS) is fetched, at the
            # address the guard checked, with the URL's own Host.
            loopback = [ipaddress.ip_network("127.0.0.0/8")]
            async with UpstreamClient(5.0, allow=loopback) as client:
                provider = KreaProvider(client, base_url=base, token=TOKEN)
                [output] = (await provider.poll(answer["job_id"])).outputs
                assert await provider.fetch(output) == png(8, 8)
                assert fetched == [private.removeprefix("http://")]
                assert sent == [(path.encode(), query.encode())]  # byte for byte


async def test_an_output_host_address_that_refuses_passes_the_download_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CDN's name has two addresses and nothing listens on the first (one of its
    hosts down): the image is fetched from the second, with the URL's Host, and
    the job does not fail. With every address down, the download fails as before."""
    hosts: list[str] = []

    async def cdn(request: Request) -> Response:
        hosts.append(request.headers["host"])
        return Response(png(8, 8), media_type="image/png")

    app = Starlette(routes=[Route("/{path:path}", cdn, methods=["GET"])])
    async with serve(app) as cdn_base:
        port = cdn_base.rsplit(":", 1)[1]
        answer = completed_at(f"http://{HOOKS_NAME}:{port}/out.png")
        loopback = [ipaddress.ip_network("127.0.0.0/8")]
        async with answering(answer) as base, UpstreamClient(5.0, allow=loopback) as client:
            provider = KreaProvider(client, base_url=base, token=TOKEN)
            [output] = (await provider.poll(answer["job_id"])).outputs
            resolving(monkeypatch, ["127.0.0.3,127.0.0.1"])
            assert await provider.fetch(output) == png(8, 8)
            assert hosts == [f"{HOOKS_NAME}:{port}"]

            resolving(monkeypatch, ["127.0.0.3,127.0.0.4"])
            with pytest.raises(ProviderUnavailable, match="unreachable"):
                await provider.fetch(output)
            assert len(hosts) == 1

        # One that never answers (a host down behind a firewall) holds the download for
        # its time limit, then passes it to the next.
        async with answering(answer) as base, UpstreamClient(1.0, allow=loopback) as client:
            provider = KreaProvider(client, base_url=base, token=TOKEN)
            [output] = (await provider.poll(answer["job_id"])).outputs
            with black_hole("127.0.0.5", int(port)):
                resolving(monkeypatch, ["127.0.0.5,127.0.0.1"])
                assert await provider.fetch(output) == png(8, 8)
            assert len(hosts) == 2
