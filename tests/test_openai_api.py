"""OpenAI's Images API (docs/api.md#openai), driven by the official `openai` SDK with its
base URL at the gateway: what a backend that calls OpenAI sees when it switches."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import ImageGenCompletedEvent, ImagesResponse
from PIL import Image

from gateway import rest
from tests.harness import Harness, gateway, until
from tests.test_client_tokens import mint
from tests.test_waiting import left, slow_flux_krea


@contextlib.asynccontextmanager
async def sdks(gw: Harness) -> AsyncIterator[Callable[[str], AsyncOpenAI]]:
    """Makes SDK clients for keys, closed at the end."""
    async with contextlib.AsyncExitStack() as stack:

        def sdk(key: str) -> AsyncOpenAI:
            # No retries: each refusal is seen as the SDK raises it (it retries 429, 5xx).
            client = AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=key, max_retries=0)
            stack.push_async_callback(client.close)
            return client

        yield sdk


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_the_sdk_generates_with_urls_and_base64_at_the_size_asked(
    redis_url: str, storage_dir: Path
) -> None:
    krea = {"krea_api_base": "http://127.0.0.1:9", "krea_api_token": "t"}  # never called
    async with gateway(redis_url, storage_dir, **krea) as gw, sdks(gw) as sdk:
        key = await gw.key(credits=1000)
        client = sdk(key)
        answer = await client.images.generate(
            model="local",
            prompt="a lighthouse at dusk",
            size="768x512",  # type: ignore[arg-type]
        )
        assert len(answer.data or []) == 1
        image = (answer.data or [])[0]
        assert image.url and image.url.startswith(f"{gw.base}/outputs/")
        assert image.revised_prompt == "a lighthouse at dusk"
        assert size_of((await gw.http.get(image.url)).content) == (768, 512)

        answer = await client.images.generate(
            model="local",
            prompt="two foxes",
            n=2,
            response_format="b64_json",
            size="512x640",  # type: ignore[arg-type]
        )
        assert [size_of(base64.b64decode(d.b64_json or "")) for d in answer.data or []] == [
            (512, 640),
            (512, 640),
        ]
        assert answer.size == "512x640"
        balance = (await gw.accounts.get(gw.keys[key]["id"])).credits
        assert balance < 1000  # charged as any job

        # The raw answer names the job, readable over REST.
        raw = await client.images.with_raw_response.generate(model="local", prompt="a boat")
        job_id = raw.headers["x-gateway-job-id"]
        job = await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key})
        assert job.json()["status"] == "completed"
        assert raw.headers["x-ratelimit-limit"] == "60"
        # OpenAI's names for the same limit, which tools written for OpenAI read.
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        remaining = raw.headers["x-ratelimit-remaining-requests"]
        assert remaining == raw.headers["x-ratelimit-remaining"] and int(remaining) < 60
        reset = raw.headers["x-ratelimit-reset-requests"]
        assert reset.endswith("s") and 0 <= int(reset[:-1]) <= 60

        listed = await client.models.list()
        names = {m.id for m in listed.data}
        assert {"flux-krea", "flux-dev", "local", "krea"} <= names
        # A backend not configured here (no credentials) is not offered to a model picker;
        # asked for by name, it is still known, and says why it cannot run.
        assert not {"fluxkrea", "segmind"} & names
        assert (await client.models.retrieve("local")).id == "local"
        assert (await client.models.retrieve("segmind")).id == "segmind"
        with pytest.raises(openai.InternalServerError, match="no backend of 'segmind'"):
            await client.images.generate(model="segmind", prompt="a boat")


async def test_code_written_for_openais_models_keeps_its_model_name(
    redis_url: str, storage_dir: Path
) -> None:
    """OpenAI's model names are served as GATEWAY_OPENAI_MODELS maps them: an exact name
    first, then the longest prefix; a GPT image model answers `b64_json` unless asked
    otherwise, as OpenAI's does, and DALL·E's `url`."""
    mapped = {"gpt-image-*": "local", "dall-e-*": "local", "dall-e-2": "nowhere"}
    async with (
        gateway(redis_url, storage_dir, openai_models=mapped) as gw,
        sdks(gw) as sdk,
    ):
        key = await gw.key(credits=1000)
        client = sdk(key)
        gpt = await client.images.generate(model="gpt-image-2.5-flare", prompt="a quay")
        image = (gpt.data or [])[0]
        assert image.url is None and size_of(base64.b64decode(image.b64_json or "")) == (
            1024,
            1024,
        )
        asked_url = await client.images.generate(
            model="gpt-image-1", prompt="a quay", response_format="url"
        )
        assert ((asked_url.data or [])[0].url or "").startswith(f"{gw.base}/outputs/")
        dalle = await client.images.with_raw_response.generate(
            model="dall-e-3",
            prompt="a pier",
            size="1792x1024",
        )
        assert ((dalle.parse().data or [])[0].url or "").startswith(f"{gw.base}/outputs/")
        job = await gw.http.get(
            f"/v1/jobs/{dalle.headers['x-gateway-job-id']}", headers={"X-API-Key": key}
        )
        assert (job.json()["provider"], job.json()["width"]) == ("local", 1792)

        # An exact name mapped to nothing served is unknown, its prefix notwithstanding.
        with pytest.raises(openai.NotFoundError):
            await client.images.generate(model="dall-e-2", prompt="x")
        retrieved = await client.models.retrieve("gpt-image-1.5")
        assert (retrieved.id, retrieved.owned_by) == ("gpt-image-1.5", "gateway (alias of local)")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("dall-e-2")
        assert "gpt-image-1" not in {m.id for m in (await client.models.list()).data}
        with pytest.raises(openai.NotFoundError):  # a name past 100 characters: none
            await client.models.retrieve("gpt-image-" + "2" * 100)
        # What the SDK offers for GPT image models (quality xhigh, complexity) is taken.
        best = await client.images.generate(
            model="gpt-image-2", prompt="a quay", quality="xhigh", complexity="high"
        )
        assert (best.data or [])[0].b64_json

    # By default every OpenAI image model is the default service's (here none is set up:
    # the 503 says so, where an unknown model would be 404).
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        client = sdk(await gw.key(credits=1000))
        for name in ("dall-e-3", "gpt-image-1", "chatgpt-image-latest"):
            with pytest.raises(openai.InternalServerError) as unset:
                await client.images.generate(model=name, prompt="x")
            assert "'flux-krea'" in unset.value.message


async def test_idempotency_key_and_the_cache_charge_once(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        client = sdk(key)
        ids = set()
        for _ in range(2):
            raw = await client.images.with_raw_response.generate(
                model="local", prompt="a kite", extra_headers={"Idempotency-Key": "order-7"}
            )
            ids.add(raw.headers["x-gateway-job-id"])
        assert len(ids) == 1
        assert (await gw.accounts.get(account)).credits == 1000 - 20

        first = await client.images.generate(
            model="local", prompt="a seeded kite", extra_body={"seed": 42}
        )
        second = await client.images.generate(
            model="local", prompt="a seeded kite", extra_body={"seed": 42}
        )
        assert [d.url for d in first.data or []] == [d.url for d in second.data or []]
        assert (await gw.accounts.get(account)).credits == 1000 - 40  # the hit cost nothing


async def test_an_image_stored_under_another_public_url_still_reads_as_bytes(
    redis_url: str, storage_dir: Path
) -> None:
    """`GATEWAY_PUBLIC_URL` changed (or a worker ran with another): an image stored under
    the old base is still read back by its name, for b64_json and Segmind's bytes, not
    answered as gone."""
    ask = {"model": "local", "prompt": "a lighthouse", "extra_body": {"seed": 5}}
    segmind = {"prompt": "a lighthouse", "seed": 5, "output_format": "png"}
    async with gateway(redis_url, storage_dir, public_url="https://old.example") as gw:
        key = await gw.key(credits=1000)
        async with sdks(gw) as sdk:
            made = await sdk(key).images.generate(**ask)  # type: ignore[arg-type]
        url = (made.data or [])[0].url or ""
        assert url.startswith("https://old.example/outputs/")
        stored = (storage_dir / url.rsplit("/", 1)[-1]).read_bytes()
        first = await gw.http.post(
            "/compat/segmind/v1/local", json=segmind, headers={"x-api-key": key}
        )
        assert first.status_code == 200, first.text
    async with gateway(redis_url, storage_dir, public_url="https://new.example") as gw:
        async with sdks(gw) as sdk:
            again = await sdk(key).images.generate(**ask, response_format="b64_json")  # type: ignore[arg-type]
        assert base64.b64decode((again.data or [])[0].b64_json or "") == stored
        hit = await gw.http.post(
            "/compat/segmind/v1/local", json=segmind, headers={"x-api-key": key}
        )
        assert hit.status_code == 200, hit.text
        assert hit.headers["x-cost"] == "0" and hit.content == first.content  # the cache's


async def test_an_image_the_disk_cannot_read_now_is_a_503_to_try_again(
    redis_url: str, storage_dir: Path
) -> None:
    """The stored file cannot be opened (here a link that loops, as a volume in trouble
    would fail): the answer says so with a 503, not a 500, and the same request answers
    once the file reads again."""
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        client = sdk(await gw.key(credits=1000))

        async def ask(response_format: Literal["url", "b64_json"] = "url") -> ImagesResponse:
            return await client.images.generate(
                model="local",
                prompt="a lighthouse",
                extra_body={"seed": 3},
                response_format=response_format,
            )

        first = await ask()
        url = (first.data or [])[0].url or ""
        (stored,) = storage_dir.rglob(url.rsplit("/", 1)[-1])
        data = stored.read_bytes()
        stored.unlink()
        stored.symlink_to(stored.name)  # ELOOP on open: an OSError, not a missing file
        with pytest.raises(openai.InternalServerError) as failed:
            await ask("b64_json")
        assert failed.value.status_code == 503
        assert "cannot be read now" in str(failed.value)
        stored.unlink()
        stored.write_bytes(data)
        again = await ask("b64_json")
        assert base64.b64decode((again.data or [])[0].b64_json or "") == data


async def test_refusals_raise_the_sdks_own_exceptions(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        key = await gw.key(credits=1000)
        client = sdk(key)
        with pytest.raises(openai.AuthenticationError) as auth:
            await sdk("gk_nobody_x").images.generate(model="local", prompt="x")
        assert auth.value.code == "invalid_api_key"

        with pytest.raises(openai.NotFoundError) as missing:
            await client.images.generate(model="nope-3", prompt="x")
        assert (missing.value.code, missing.value.param) == ("model_not_found", "model")

        for size in ("100x100", "4096x4096", "big", "512x"):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.images.generate(model="local", prompt="x", size=size)  # type: ignore[arg-type]
            assert bad.value.param == "size", size
        for args, param in [
            ({"prompt": ""}, "prompt"),
            ({"prompt": "x", "n": 9}, "n"),
            ({"prompt": "x", "response_format": "gif"}, "response_format"),
            ({"prompt": "x", "extra_body": {"complexity": "banana"}}, "complexity"),
            ({"prompt": "x", "user": 123}, "user"),
            ({"prompt": "x", "extra_body": {"frame_count": "zz"}}, "frame_count"),
        ]:
            with pytest.raises(openai.BadRequestError) as bad:
                await client.images.generate(model="local", **args)  # type: ignore[arg-type]
            assert bad.value.param == param
            assert bad.value.type == "invalid_request_error"
        # A field OpenAI does not take, in its words and code, named as sent: the
        # gateway's own names too (numImages is not OpenAI's `n`).
        for name in ("colour", "numImages", "width"):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.images.generate(model="local", prompt="x", extra_body={name: 2})
            assert (bad.value.code, bad.value.param) == ("unknown_parameter", name)
            assert bad.value.message.endswith(f"Unknown parameter: '{name}'.")
        # The rest of OpenAI's API: refused in OpenAI's shape, not REST's.
        with pytest.raises(openai.NotFoundError) as other:
            await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
            )
        assert (other.value.code, other.value.type) == (
            "unsupported_endpoint",
            "invalid_request_error",
        )
        assert "Invalid URL (POST /v1/chat/completions)" in other.value.message
        with pytest.raises(openai.NotFoundError) as other:
            await client.embeddings.create(model="text-embedding-3-small", input="hi")
        assert other.value.code == "unsupported_endpoint"
        rest_typo = await gw.http.get("/v1/jobs/x/y", headers={"X-API-Key": key})
        assert rest_typo.status_code == 404 and rest_typo.json()["error"]["code"] == "NOT_FOUND"

        poor = sdk(await gw.key(credits=5))
        with pytest.raises(openai.APIStatusError) as broke:
            await poor.images.generate(model="local", prompt="x")
        assert broke.value.status_code == 402
        assert broke.value.code == "insufficient_credits"

        slow = sdk(await gw.key(rpm=1))
        await slow.images.generate(model="local", prompt="x")
        with pytest.raises(openai.RateLimitError) as limited:
            await slow.images.generate(model="local", prompt="y")
        refused = limited.value.response.headers
        assert int(refused["retry-after"]) > 0
        assert refused["x-ratelimit-remaining-requests"] == "0"
        assert refused["x-ratelimit-reset-requests"] == f"{refused['retry-after']}s"
        assert "x-should-retry" not in refused  # a minute's wait: the SDK may wait it out
        # A day's limit says hours: the SDK is told not to wait them out (OpenAI's Node
        # SDK would, then send it again: tests/test_js_openai.py).
        gw.clock.advance((12 * 3600 - gw.clock() % 86_400) % 86_400)  # noon UTC
        daily = sdk(await gw.key(daily=1))
        await daily.images.generate(model="local", prompt="x")
        with pytest.raises(openai.RateLimitError) as limited:
            await daily.images.generate(model="local", prompt="y")
        refused = limited.value.response.headers
        assert int(refused["retry-after"]) > 3600 and refused["x-should-retry"] == "false"
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000  # none charged

        # A service its operator has not set up: said so, once (the SDK, which retries a
        # 503 twice by default, is told not to), naming nothing of the configuration.
        sent: list[httpx.Request] = []

        async def note(request: httpx.Request) -> None:
            sent.append(request)

        async with httpx.AsyncClient(event_hooks={"request": [note]}) as http:
            retrying = AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=key, http_client=http)
            with pytest.raises(openai.InternalServerError) as unset:
                await retrying.images.generate(model="flux-krea", prompt="x")
        assert unset.value.status_code == 503 and len(sent) == 1
        assert "retry-after" not in unset.value.response.headers
        said = "no backend of 'flux-krea' is configured on this gateway"
        assert unset.value.message.endswith(said)


async def test_a_wait_that_runs_out_is_a_504_naming_the_job(
    redis_url: str, storage_dir: Path
) -> None:
    async with (
        gateway(redis_url, storage_dir, inprocess_workers=False, sync_wait_seconds=0.3) as gw,
        sdks(gw) as sdk,
    ):
        key = await gw.key()
        with pytest.raises(openai.APIStatusError) as late:
            await sdk(key).images.generate(model="local", prompt="patience")
        assert late.value.status_code == 504
        job_id = late.value.response.headers["x-gateway-job-id"]
        assert job_id in late.value.message
        r = await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key})
        assert r.json()["status"] == "queued"  # it goes on


async def test_plain_http_errors_have_openais_shape(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        for body in (b"{", b"[]", b'"x"'):
            r = await gw.http.post(
                "/v1/images/generations",
                content=body,
                headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            )
            assert r.status_code == 400
            assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
        r = await gw.http.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await gw.http.get("/v1/models/nope", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 404
        assert isinstance(r, httpx.Response)


@pytest.mark.parametrize(
    ("sync_wait", "sdk_timeout"),
    [(0.2, 600.0), (300.0, 2.0)],
    ids=["the gateway's wait runs out", "the SDK's read timeout would run out"],
)
async def test_the_sdks_own_retries_never_start_a_second_job(
    redis_url: str, storage_dir: Path, sync_wait: float, sdk_timeout: float
) -> None:
    """The SDK retries a 5xx, and a read timeout, twice on its own (no idempotency key).
    A wait that runs out, GATEWAY_SYNC_WAIT_SECONDS or just under the read timeout the
    SDK says it has, is a 504 it may retry (`x-should-retry: true`): each retry joins
    the job still running, so one call is one job, charged once, going on and readable
    by its id."""
    async with gateway(
        redis_url, storage_dir, inprocess_workers=False, sync_wait_seconds=sync_wait
    ) as gw:
        key = await gw.key(credits=1000)
        answered: list[str] = []

        async def seen(response: httpx.Response) -> None:
            answered.append(response.headers.get("x-gateway-job-id", ""))

        http = httpx.AsyncClient(event_hooks={"response": [seen]})
        client = AsyncOpenAI(
            base_url=f"{gw.base}/v1", api_key=key, timeout=sdk_timeout, http_client=http
        )
        try:
            with pytest.raises(openai.InternalServerError) as late:
                await client.images.generate(model="local", prompt="patience")
        finally:
            await client.close()
        assert late.value.status_code == 504
        assert late.value.response.headers["x-should-retry"] == "true"
        job_id = late.value.response.headers["x-gateway-job-id"]
        assert answered == [job_id] * 3  # the call and the SDK's two retries: one job
        jobs = (await gw.gql("{ jobs(first: 10) { nodes { id status } } }", key=key)).json()
        assert jobs["data"]["jobs"]["nodes"] == [{"id": job_id, "status": "queued"}]
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 980


async def test_what_the_sdk_may_send_gets_openais_answers(
    redis_url: str, storage_dir: Path
) -> None:
    """Hostile or merely unusual input is a 400 in OpenAI's shape and names (never a
    500), `stream=False` is accepted, and the image routes the gateway does not offer
    say so in OpenAI's shape, whatever the upload."""
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        key = await gw.key(credits=1000)
        client = sdk(key)
        for extra, param in [
            ({"size": "²x²"}, "size"),
            ({"size": "\u0661\u0660\u0662\u0664x1024"}, "size"),  # Arabic-Indic digits
            ({"size": 1024}, "size"),
            ({"quality": {}}, "quality"),
            ({"quality": ["hd"]}, "quality"),
            # Taken though no backend uses them, and checked as OpenAI checks them.
            ({"style": "vvid"}, "style"),
            ({"moderation": "none"}, "moderation"),
            ({"output_compression": 101}, "output_compression"),
            ({"output_compression": 50.5}, "output_compression"),
            ({"partial_images": True}, "partial_images"),
        ]:
            with pytest.raises(openai.BadRequestError) as bad:
                await client.images.generate(model="local", prompt="x", extra_body=extra)
            assert (bad.value.param, bad.value.type) == (param, "invalid_request_error"), extra
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model="local", prompt="x", n=9)
        assert bad.value.message == "Error code: 400 - n: Input should be less than or equal to 4"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model="local", prompt="x", size="256x256")
        assert bad.value.message.startswith("Error code: 400 - size (width): ")
        answer = await client.images.generate(model="local", prompt="x", stream=False, svg=None)
        assert answer.data and answer.data[0].url
        assert (answer.background, answer.quality) == ("opaque", None)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model="local", prompt="x", svg={"model": "gpt-5"})
        assert bad.value.param == "svg"
        answer = await client.images.generate(model="local", prompt="x", quality="medium")
        assert answer.quality == "medium"
        # The SDK's own advice (`user` is deprecated for it) is accepted; a transparent
        # background, which no backend draws, is refused rather than made opaque.
        answer = await client.images.generate(
            model="local",
            prompt="x",
            safety_identifier="end-user-7",
            background="opaque",
            style="natural",
            moderation="low",
            output_compression=80,
        )
        assert answer.data and answer.data[0].url
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model="local", prompt="x", background="transparent")
        assert bad.value.param == "background"

        # The same Idempotency-Key with another body: named as the header it came in.
        first = {"Idempotency-Key": "k-1"}
        await client.images.generate(model="local", prompt="x", extra_headers=first)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.images.generate(model="local", prompt="y", extra_headers=first)
        assert bad.value.param is None and "Idempotency-Key" in bad.value.message

        png = io.BytesIO()
        Image.new("RGB", (700, 700), (1, 2, 3)).save(png, "PNG", compress_level=0)
        assert png.tell() > 1_000_000  # far over the body limit
        with pytest.raises(openai.NotFoundError) as missing:
            await client.images.edit(image=("a.png", png.getvalue()), prompt="hat")
        assert missing.value.code == "unsupported_endpoint"
        assert "images.generate" in missing.value.message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the SDK's, on this method
            with pytest.raises(openai.NotFoundError) as missing:
                await client.images.create_variation(image=("a.png", png.getvalue()))
        assert missing.value.code == "unsupported_endpoint"
        answer = await client.images.generate(model="local", prompt="x")  # the same client
        assert answer.data

        # Routing's and the body limit's refusals, in OpenAI's shape too.
        auth = {"Authorization": f"Bearer {key}"}
        for r in (
            await gw.http.get("/v1/images/generations", headers=auth),
            await gw.http.post("/v1/images/nope", headers=auth),
            await gw.http.post("/v1/images/generations", content=b"x" * 100_000, headers=auth),
        ):
            assert r.status_code in (404, 405, 413)
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text

        # An authenticated 404 carries the key's rate-limit headers.
        r = await gw.http.get("/v1/models/nope", headers=auth)
        assert r.status_code == 404 and "x-ratelimit-limit" in r.headers


async def test_a_prompt_the_provider_refuses_is_a_bad_request_not_retried(
    redis_url: str, storage_dir: Path
) -> None:
    """The upstream refusing the prompt itself (400 on submission) is the caller's to
    change: OpenAI's BadRequestError (as OpenAI answers a refused prompt), sent once,
    refunded; an upstream failure is a 502 the SDK is told not to retry."""
    async with slow_flux_krea(redis_url, storage_dir, 0.0) as (gw, emu):
        key = await gw.key(credits=1000)
        client = AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=key)  # the SDK's own retries
        try:
            emu.fail_next(1, 400)
            with pytest.raises(openai.BadRequestError) as refused:
                await client.images.generate(model="fluxkrea", prompt="something refused")
            assert refused.value.code == "rejected_by_provider"
            assert len(emu.requests) == 1  # sent once

            emu.fail_next(1, 500)
            with pytest.raises(openai.InternalServerError) as failed:
                await client.images.generate(model="fluxkrea", prompt="an outage")
            assert failed.value.status_code == 502
            assert failed.value.response.headers["x-should-retry"] == "false"
            assert len(emu.requests) == 2  # not retried by the SDK
        finally:
            await client.close()
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000  # both refunded


async def test_an_idempotency_key_too_long_is_refused_not_cut(
    redis_url: str, storage_dir: Path
) -> None:
    """Two keys sharing their first 128 characters are two requests: a longer key is a
    400 on the OpenAI and Segmind routes (as on the others), not cut to a shared prefix."""
    async with gateway(redis_url, storage_dir) as gw, sdks(gw) as sdk:
        key = await gw.key(credits=1000)
        long = "k" * 128
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk(key).images.generate(
                model="local", prompt="x", extra_headers={"Idempotency-Key": long + "a"}
            )
        assert "Idempotency-Key" in bad.value.message and bad.value.param is None
        r = await gw.http.post(
            "/compat/segmind/v2/flux-krea-dev",
            json={"prompt": "x"},
            headers={"x-api-key": key, "Idempotency-Key": long + "b"},
        )
        assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000


async def test_a_token_bound_to_an_origin_lists_models_from_it(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, cors_origins="https://app.example") as gw:
        key = await gw.key()
        token = await mint(gw, key, origins=["https://app.example"])
        page = {"Authorization": f"Bearer {token}", "Origin": "https://app.example"}
        for path in ("/v1/models", "/v1/models/local"):
            r = await gw.http.get(path, headers=page)
            assert r.status_code == 200, (path, r.text)
        elsewhere = {**page, "Origin": "https://evil.example"}
        assert (await gw.http.get("/v1/models", headers=elsewhere)).status_code == 403


async def test_a_stream_sends_the_image_as_openais_event_and_says_it_waits(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stream=True`, as code streaming OpenAI's images sends it: the SDK's events, one
    `image_generation.completed` with the image in base64; while the job runs, a comment
    every `rest.KEEP_ALIVE_SECONDS` (a read timeout counts from the last byte); a failure is an
    `error` event, which the SDK raises, refunded."""
    monkeypatch.setattr(rest, "KEEP_ALIVE_SECONDS", 0.2)
    async with slow_flux_krea(redis_url, storage_dir, 0.7) as (gw, emu):
        key = await gw.key(credits=1000)
        client = AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=key)
        try:
            stream = await client.images.generate(
                model="dall-e-3", prompt="a kite", size="1024x1024", stream=True
            )
            events = [event async for event in stream]
            assert [event.type for event in events] == ["image_generation.completed"]
            [done] = events
            assert isinstance(done, ImageGenCompletedEvent)
            image = Image.open(io.BytesIO(base64.b64decode(done.b64_json)))
            assert (image.size, done.size) == ((1024, 1024), "1024x1024")
            assert (done.output_format, done.background) == ("png", "opaque")

            emu.fail_next(1, 500)
            with pytest.raises(openai.APIError) as failed:
                async for _ in await client.images.generate(
                    model="fluxkrea", prompt="an outage", stream=True
                ):
                    pass
            assert "failed" in failed.value.message
        finally:
            await client.close()

        body = {"model": "fluxkrea", "prompt": "a slow kite", "stream": True}
        auth = {"Authorization": f"Bearer {key}"}
        async with gw.http.stream("POST", "/v1/images/generations", json=body, headers=auth) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-gateway-job-id"]
            said = (await r.aread()).decode()
        assert ": waiting for the image\n\n" in said
        assert said.endswith("\n\n") and "event: image_generation.completed\ndata: " in said
        charged = 1000 - (await gw.accounts.get(gw.keys[key]["id"])).credits
        assert charged == 40  # two images of 20; the outage refunded

        # A client leaving the stream is a waiting client that left: its job, started,
        # goes on, and the same request sent again joins it.
        body["prompt"] = "a kite left behind"
        submitted = emu.submissions
        async with gw.http.stream("POST", "/v1/images/generations", json=body, headers=auth) as r:
            job_id = r.headers["x-gateway-job-id"]
            await until(lambda: emu.submissions > submitted)  # started upstream: paid for
        await until(lambda: left(gw), what="the job noted for the retry")
        async with gw.http.stream("POST", "/v1/images/generations", json=body, headers=auth) as r:
            assert r.headers["x-gateway-job-id"] == job_id
            assert "event: image_generation.completed" in (await r.aread()).decode()
        assert emu.submissions == submitted + 1  # one generation


async def cut_short(base: str, key: str, body: dict[str, object], after: bytes) -> str:
    """Send `body` to the images route and leave once the answer has said `after`, with
    most of it unread (as an SDK whose timeout ran out leaves); the job id it named."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the rest stays with the server
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = json.dumps(body).encode()
    writer.write(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
        b"Authorization: Bearer %b\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (key.encode(), len(raw), raw)
    )
    said = b""
    while after not in said:
        chunk = await asyncio.wait_for(reader.read(4096), 30)
        assert chunk, said
        said += chunk
    writer.close()
    await writer.wait_closed()
    head = said.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200"), head
    length = [line for line in head.split("\r\n") if line.startswith("content-length")]
    # Far more than the sockets' buffers hold: the answer was cut short, not sent whole.
    assert not length or int(length[0].split(": ")[1]) > 8_000_000, length
    [job_id] = [line.split(": ")[1] for line in head.split("\r\n") if line.startswith("x-gateway")]
    return job_id


@pytest.mark.parametrize("stream", [False, True])
async def test_images_cut_short_on_their_way_are_the_retrys_charged_once(
    redis_url: str, storage_dir: Path, stream: bool
) -> None:
    """A client that leaves while its job's images are sent to it (its SDK's timeout ran
    out as they were read or sent, and it retries) has not got them: the same request
    sent again gets that job's images, not another job's, and is charged once."""
    async with slow_flux_krea(redis_url, storage_dir, 0) as (gw, flux):
        flux.noisy = True  # megabytes more than the sockets' buffers hold
        key = await gw.key(credits=1000)
        body: dict[str, object] = {
            "prompt": "a harbour in the rain",
            "size": "1536x1536",
            "response_format": "b64_json",
            "stream": stream,
        }
        after = b"event: image_generation.completed" if stream else b"\r\n\r\n"
        job_id = await cut_short(gw.base, key, body, after)
        await until(lambda: left(gw), what="the job noted for the retry")
        again = await gw.http.post(
            "/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert again.status_code == 200, again.text
        assert again.headers["x-gateway-job-id"] == job_id
        assert "b64_json" in again.text
        jobs = (await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)).json()
        assert jobs["data"]["jobs"]["nodes"] == [{"id": job_id}]
        assert flux.submissions == 1
        cost = (await gw.job(key, job_id) or {})["creditCost"]
        assert cost > 0 and (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000 - cost


async def test_a_stream_keeps_an_sdk_with_a_short_read_timeout_reading(
    redis_url: str, storage_dir: Path
) -> None:
    """An SDK whose read timeout is shorter than the stream's keep-alive (and than the
    job) still gets its image: the stream says it waits every half of the timeout the
    SDK says it has."""
    async with slow_flux_krea(redis_url, storage_dir, 5.0) as (gw, _):
        key = await gw.key(credits=1000)
        client = AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=key, timeout=3, max_retries=0)
        try:
            stream = await client.images.generate(
                model="fluxkrea", prompt="a slow lighthouse", stream=True
            )
            events = [event.type async for event in stream]
        finally:
            await client.close()
        assert events == ["image_generation.completed"]
