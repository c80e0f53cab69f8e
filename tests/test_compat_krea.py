"""/compat/krea: Krea's job API served by the gateway (docs/providers/krea.md, "Served by
the gateway"), over real HTTP on a real Redis, with the emulators of tests/emulators as
upstreams.

Krea's own Python example (tests/seeds/002_*.txt) runs against it as printed, apart
from its base URL and token; its jobs are ordinary gateway jobs (credits, failover,
stored outputs), its statuses Krea's, its webhooks Krea's job object, its refusals Krea's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import httpx
import orjson
import pytest
from PIL import Image
from starlette.requests import Request
from starlette.responses import Response

from gateway.config import DEFAULT_ROUTES
from gateway.jobs.model import Job
from gateway.providers import krea
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import LIFECYCLE, KreaEmulator
from tests.harness import Harness, gateway, until
from tests.servers import serve
from tests.test_webhooks import Receiver

#: the providers' documents the product was specified from, as published, with their
#: own client examples (what docs/providers/*.md describe)
SEEDS = Path(__file__).resolve().parent / "seeds"
BASE = "/compat/krea"
MODEL = "/generate/image/bfl/flux-1-dev"
HOOKS: dict[str, Any] = {"url_allow_cidrs": "127.0.0.0/8", "webhook_retry_delays": [0.05] * 6}


# -- the seeds' client examples, run as printed ----------------------------------------------


def seed_text(number: str) -> str:
    [path] = SEEDS.glob(f"{number}_*.txt")
    return path.read_text()


def example(text: str, after: str, before: str) -> list[str]:
    """The lines of a seed between the first line ending with `after` and the next line
    starting with `before` (both excluded)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(after)) + 1
    end = next(i for i in range(start, len(lines)) if lines[i].startswith(before))
    return lines[start:end]


def indented(lines: list[str], levels: str) -> str:
    """The seeds were saved from web pages that print their examples indented; the saved
    text lost the leading spaces, which Python needs. `levels` gives each line's level
    (one digit per line, spaces ignored): nothing but leading whitespace is added."""
    digits = levels.replace(" ", "")
    assert len(digits) == len(lines), (len(digits), len(lines))
    return "\n".join("    " * int(d) + line for d, line in zip(digits, lines, strict=True))


def substituted(code: str, replacements: dict[str, str]) -> str:
    """The example with only its base URL and key strings replaced (each exactly once)."""
    for printed, ours in replacements.items():
        assert code.count(printed) == 1, printed
        code = code.replace(printed, ours)
    return code


async def run_example(code: str, timeout: float = 60) -> str:
    """Run an example in a child Python (the gateway keeps serving in this process's
    event loop meanwhile); its stdout. Fails with its stderr if it fails."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode == 0, err.decode()
    return out.decode()


#: Krea's Python example (tests/seeds/002_*.txt): one line a digit (see `indented`)
KREA_EXAMPLE_LEVELS = "000000 11221 122221 00000 122111 233323 11"


def krea_example(base: str, token: str) -> str:
    lines = example(seed_text("002"), "a complete example in different languages:", "Replace with")
    assert lines[0] == "import requests" and lines[-1] == "time.sleep(2)"
    code = indented(lines, KREA_EXAMPLE_LEVELS)
    return substituted(code, {"https://api.krea.ai": base, "your-token-secret": token})


# -- upstreams -----------------------------------------------------------------------------


class HoldingKrea(KreaEmulator):
    """Krea's emulator, able to hold pending jobs at one lifecycle status while a test
    looks (`hold_at`); clearing it lets them go on."""

    def __init__(self, **kwargs: Any) -> None:
        self.hold_at: str | None = None
        super().__init__(**kwargs)

    async def _job(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        if self.hold_at is not None and job is not None and job.completed_at is None:
            index = LIFECYCLE.index(self.hold_at)
            if job.polls >= index:
                job.polls = index - 1  # the emulator adds one: the same status again
        return await super()._job(request)


@dataclass
class Upstreams:
    krea: HoldingKrea
    fluxkrea: FluxKreaEmulator
    settings: dict[str, Any]


@pytest.fixture
async def up() -> AsyncIterator[Upstreams]:
    """Krea (the `flux-dev` service's backend) and flux-krea emulators, both enabled."""
    krea_emu = HoldingKrea(token="test-token")
    flux = FluxKreaEmulator(api_key="test-key")
    async with serve(krea_emu.app) as kb, serve(flux.app) as fb:
        yield Upstreams(krea_emu, flux, {
            "krea_api_base": kb, "krea_api_token": "test-token",
            "fluxkrea_api_base": f"{fb}/v1", "fluxkrea_api_key": "test-key",
        })  # fmt: skip


# -- helpers -------------------------------------------------------------------------------


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(gw: Harness, key: str, body: Any, **headers: str) -> httpx.Response:
    return await gw.http.post(f"{BASE}{MODEL}", json=body, headers={**auth(key), **headers})


async def job_of(gw: Harness, key: str, job_id: str) -> httpx.Response:
    return await gw.http.get(f"{BASE}/jobs/{job_id}", headers=auth(key))


async def until_ended(gw: Harness, key: str, job_id: str) -> dict[str, Any]:
    async def ended() -> bool:
        return (await job_of(gw, key, job_id)).json()["completed_at"] is not None

    await until(ended)
    return dict((await job_of(gw, key, job_id)).json())


async def balance(gw: Harness, key: str) -> int:
    return (await gw.accounts.get(gw.keys[key]["id"])).credits


async def ledger(gw: Harness, key: str) -> list[tuple[str, int]]:
    entries = await gw.accounts.ledger(gw.keys[key]["id"])
    return [(e["reason"], int(e["delta"])) for e in entries]


async def image_size(gw: Harness, url: str) -> tuple[int, int]:
    assert url.startswith(gw.base + "/outputs/"), url  # the gateway's stored copy
    r = await gw.http.get(url)
    assert r.status_code == 200
    return Image.open(io.BytesIO(r.content)).size


# -- Krea's example -------------------------------------------------------------------------


async def test_seed_002s_python_example_gets_an_image_from_the_gateway(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        out = await run_example(krea_example(f"{gw.base}{BASE}", key))

        url = out.strip().splitlines()[-1].removeprefix("Image ready: ")
        assert await image_size(gw, url) == (1024, 576)
        [sent] = [r.json for r in up.krea.received("POST", "/generate/")]
        assert sent["prompt"] == "a serene mountain landscape at sunset"
        assert (sent["width"], sent["height"], sent["steps"]) == (1024, 576, 28)
        # An ordinary gateway job: charged once (1024x576 = 14 credits), ours to read.
        assert await ledger(gw, key) == [("initial", 100), ("charge", -14)]
        [job] = (await gw.gql("{ jobs { nodes { id url metadata } } }", key=key)).json()["data"][
            "jobs"
        ]["nodes"]
        assert job["url"] == url and job["metadata"]["backend"] == "krea"


# -- the job object and its statuses -----------------------------------------------------------


async def test_a_job_reads_as_krea_s_job_object_through_its_statuses(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.hold_at = "sampling"
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key()
        r = await post(gw, key, {"prompt": "Swiss chalets, balconies embroidered with Edelweiss."})
        assert r.status_code == 200, r.text
        created = r.json()
        job_id = created["job_id"]
        assert str(uuid.UUID(job_id, version=4)) == job_id  # Krea's `string<uuid>`
        assert krea.as_uuid(r.headers["x-gateway-job-id"]) == job_id  # the gateway's id
        assert "x-ratelimit-limit" in r.headers
        assert created == {
            "job_id": job_id,
            "status": "queued",
            "created_at": created["created_at"],
            "completed_at": None,
            "result": None,
        }
        assert created["created_at"].endswith("Z")

        async def sampling() -> bool:
            return (await job_of(gw, key, job_id)).json()["status"] == "sampling"

        await until(sampling)  # Krea's own word while the job samples on Krea
        r = await job_of(gw, key, job_id)
        assert r.headers["x-gateway-job-id"] == krea.job_id_of(job_id)
        assert r.json()["completed_at"] is None and r.json()["result"] is None

        up.krea.hold_at = None
        done = await until_ended(gw, key, job_id)
        assert done["status"] == "completed"
        assert done["created_at"] == created["created_at"] and done["completed_at"]
        [url] = done["result"]["urls"]
        assert await image_size(gw, url) == (1024, 1024)
        # Krea's job id upstream is not the one the client sees: ours is.
        assert job_id not in up.krea.jobs


def test_the_status_table_reads_both_ways() -> None:
    """Krea's nine words map onto our five, which are Krea's words meaning themselves;
    a job shows Krea's finer word only while it runs on Krea, never a step back."""
    assert list(krea.STATUSES) == [*LIFECYCLE, "completed", "failed", "cancelled"]
    ours = ("queued", "processing", "completed", "failed", "cancelled")
    assert set(krea.STATUSES.values()) == set(ours)
    on_krea = {"backend": "krea", "id": "x"}

    def shown(status: str, word: str | None = None, backend: dict[str, Any] | None = None) -> str:
        meta = {"upstreamStatus": word} if word else {}
        job = Job(
            id="j", account="a", status=status, provider="flux-dev", params={}, cost=20,
            created_at=1, metadata=meta, upstream=backend,
        )  # fmt: skip
        return krea.status_of(job)

    for status in ours:
        assert shown(status) == status
    assert shown("processing", "sampling", on_krea) == "sampling"
    assert shown("processing", "intermediate-complete", on_krea) == "intermediate-complete"
    assert shown("processing", "queued", on_krea) == "processing"  # no step back
    assert shown("processing", "sampling", {"backend": "segmind"}) == "processing"
    assert shown("completed", "sampling", on_krea) == "completed"


async def test_delete_cancels_the_job_and_refunds_it(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.hold_at = "processing"
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        job_id = (await post(gw, key, {"prompt": "a fox", "width": 512, "height": 512})).json()[
            "job_id"
        ]
        await until(lambda: up.krea.jobs)  # the worker has it on Krea
        r = await gw.http.delete(f"{BASE}/jobs/{job_id}", headers=auth(key))
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-job-id"] == krea.job_id_of(job_id)
        assert r.json()["status"] == "cancelled"
        assert r.json()["completed_at"] is not None and r.json()["result"] is None
        assert (await job_of(gw, key, job_id)).json()["status"] == "cancelled"
        assert await ledger(gw, key) == [("initial", 100), ("charge", -10), ("refund", 10)]
        assert await balance(gw, key) == 100

        # Another key's job, or none: Krea's 404.
        other = await gw.key()
        for who, job in ((other, job_id), (key, "0" * 24)):
            for r in (
                await job_of(gw, who, job),
                await gw.http.delete(f"{BASE}/jobs/{job}", headers=auth(who)),
            ):
                assert r.status_code == 404 and r.json()["message"] == "Job not found"


# -- webhooks ----------------------------------------------------------------------------------


async def test_x_webhook_url_receives_krea_s_job_object_signed(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver(failures=1)  # answered 500 once: retried like any gateway webhook
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key()
        r = await post(
            gw, key, {"prompt": "a lighthouse"}, **{"X-Webhook-URL": f"{hook_base}/hook"}
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["job_id"]
        done = await until_ended(gw, key, job_id)

        async def delivered() -> bool:
            return any(status == 200 for _, _, status in receiver.calls)

        await until(delivered)
        assert [status for _, _, status in receiver.calls] == [500, 200]
        headers, body, _ = receiver.calls[-1]
        assert orjson.loads(body) == done  # what GET /jobs/{id} answers
        assert done["status"] == "completed" and done["result"]["urls"][0].startswith(gw.base)
        secret = gw.keys[key]["webhookSecret"]
        expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-doitong-signature"] == f"sha256={expected}"
        assert headers["webhook-id"] == f"msg_{krea.job_id_of(job_id)}"


async def test_a_failed_job_calls_back_with_result_error(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.fail_jobs = True
    receiver = Receiver()
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key(credits=100)
        r = await post(gw, key, {"prompt": "p"}, **{"X-Webhook-URL": f"{hook_base}/hook"})
        done = await until_ended(gw, key, r.json()["job_id"])
        assert done["status"] == "failed" and done["completed_at"]
        assert "failed" in done["result"]["error"]
        await until(lambda: receiver.calls)
        assert orjson.loads(receiver.calls[0][1]) == done
        assert await balance(gw, key) == 100  # refunded


async def test_private_webhook_urls_and_tokens_setting_one_are_refused_in_krea_s_shape(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw:
        key = await gw.key(credits=100)
        r = await post(gw, key, {"prompt": "p"}, **{"X-Webhook-URL": "http://10.1.2.3/hook"})
        assert r.status_code == 400
        assert r.json() == {
            "message": "X-Webhook-URL points at a private, loopback or metadata address",
            "code": "BAD_USER_INPUT",
        }

        minted = await gw.http.post("/v1/client_tokens", json={"maxCredits": 50}, headers=auth(key))
        token = minted.json()["token"]
        r = await post(gw, token, {"prompt": "p"}, **{"X-Webhook-URL": "https://example.com/h"})
        assert r.status_code == 403
        assert r.json()["message"] == "a client token cannot set X-Webhook-URL"
        assert await ledger(gw, key) == [("initial", 100)]  # nothing charged
        assert up.krea.submissions == 0

        # Without a webhook the token works as a key does, and sees its own job.
        r = await post(gw, token, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 200, r.text
        assert (await job_of(gw, token, r.json()["job_id"])).status_code == 200


# -- failover ----------------------------------------------------------------------------------


async def test_krea_answering_500_fails_over_and_is_charged_once(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    up.krea.fail_next(1, 500)
    routes = {**DEFAULT_ROUTES, "flux-dev": ["krea", "fluxkrea"]}
    async with gateway(redis_url, storage_dir, routes=routes, **up.settings) as gw:
        key = await gw.key(credits=100)
        r = await post(gw, key, {"prompt": "a red fox", "width": 1024, "height": 1024})
        assert r.status_code == 200, r.text
        done = await until_ended(gw, key, r.json()["job_id"])

        assert done["status"] == "completed"
        assert await image_size(gw, done["result"]["urls"][0]) == (1024, 1024)
        assert up.krea.submissions == 1 and up.fluxkrea.submissions == 1
        job = (await gw.gql(
            "query($id: ID!) { job(id: $id) { metadata } }",
            {"id": krea.job_id_of(done["job_id"])},
            key,
        )).json()["data"]["job"]  # fmt: skip
        assert job["metadata"]["backend"] == "fluxkrea"
        assert await ledger(gw, key) == [("initial", 100), ("charge", -20)]
        assert await balance(gw, key) == 80


# -- refusals: Krea's shape, the right status, nothing charged ----------------------------------


BAD_REQUESTS = [
    # (what, path, headers (KEY: the key), body, status, message)
    ("width over Krea's range", MODEL, {}, {"prompt": "p", "width": 4000}, 400,
     "width: must be a number, 512 <= x <= 2368"),
    ("width over the gateway's", MODEL, {}, {"prompt": "p", "width": 2300}, 400,
     "width: Input should be less than or equal to 2048"),
    ("height under", MODEL, {}, {"prompt": "p", "height": 100}, 400,
     "height: must be a number, 512 <= x <= 2368"),
    ("steps not an integer", MODEL, {}, {"prompt": "p", "steps": 2.5}, 400,
     "steps: Input should be a valid integer, got a number with a fractional part"),
    ("guidance out of range", MODEL, {}, {"prompt": "p", "guidance_scale_flux": 30}, 400,
     "guidance_scale_flux: must be a number, 0 <= x <= 24"),
    ("seed as a string", MODEL, {}, {"prompt": "p", "seed": "42"}, 400, "seed: must be a number"),
    ("missing prompt", MODEL, {}, {"width": 1024}, 400, "prompt is required"),
    ("blank prompt", MODEL, {}, {"prompt": "   "}, 400, "prompt: Value error, must not be blank"),
    ("styles", MODEL, {}, {"prompt": "p", "styles": [{"id": "x"}]}, 400,
     "styles: not supported by this gateway"),
    ("unknown field", MODEL, {}, {"prompt": "p", "model": "x"}, 400,
     "model: not a known parameter"),
    ("not JSON", MODEL, {}, None, 400, "body is not valid JSON"),
    ("unknown model", "/generate/image/bfl/flux-9-ultra", {}, {"prompt": "p"}, 404,
     "Unknown model 'bfl/flux-9-ultra': this gateway serves bfl/flux-1-dev"),
    ("X-API-Key instead of Bearer", MODEL, {"X-API-Key": "KEY"}, {"prompt": "p"}, 401,
     "Missing API token: send Authorization: Bearer <token>"),
    ("Token scheme", MODEL, {"Authorization": "Token KEY"}, {"prompt": "p"}, 401,
     "Missing API token: send Authorization: Bearer <token>"),
    ("unknown key", MODEL, {"Authorization": "Bearer gk_nobody_secret"}, {"prompt": "p"}, 401,
     "Invalid API key"),
]  # fmt: skip


async def test_bad_requests_are_refused_in_krea_s_shape_and_cost_nothing(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        key = await gw.key(credits=100)
        for what, path, headers, body, status, message in BAD_REQUESTS:
            sent = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            if headers:
                sent = {k: v.replace("KEY", key) for k, v in headers.items()}
            content = b"{not json" if body is None else orjson.dumps(body)
            r = await gw.http.post(f"{BASE}{path}", content=content, headers=sent)
            assert (r.status_code, r.json()) == (status, {"message": message, "code": ANY}), what
            assert "x-gateway-job-id" not in r.headers, what
        assert await ledger(gw, key) == [("initial", 100)]  # nothing charged, ever
        assert up.krea.submissions == 0
        jobs = await gw.gql("{ jobs { nodes { id } } }", key=key)
        assert jobs.json()["data"]["jobs"]["nodes"] == []


async def test_credits_and_rate_limits_refuse_in_krea_s_shape(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **up.settings) as gw:
        poor = await gw.key(credits=5)
        r = await post(gw, poor, {"prompt": "p"})
        assert r.status_code == 402
        assert r.json() == {
            "message": "Insufficient credits: 20 required, 5 available",
            "code": "INSUFFICIENT_CREDITS",
        }
        slow = await gw.key(plan="enterprise", credits=100, rpm=1)
        assert (await post(gw, slow, {"prompt": "p", "width": 512, "height": 512})).is_success
        r = await post(gw, slow, {"prompt": "p", "width": 512, "height": 512})
        assert r.status_code == 429 and r.json()["code"] == "RATE_LIMITED"
        assert int(r.headers["retry-after"]) >= 1
        assert await ledger(gw, slow) == [("initial", 100), ("charge", -10)]
        assert await ledger(gw, poor) == [("initial", 5)]


async def test_the_same_request_with_a_seed_is_a_free_cache_hit_that_still_calls_back(
    up: Upstreams, redis_url: str, storage_dir: Path
) -> None:
    receiver = Receiver()
    async with (
        serve(receiver.app) as hook_base,
        gateway(redis_url, storage_dir, **up.settings, **HOOKS) as gw,
    ):
        key = await gw.key(credits=100)
        body = {"prompt": "a fox", "width": 512, "height": 512, "seed": 7}
        first = await until_ended(gw, key, (await post(gw, key, body)).json()["job_id"])
        r = await post(gw, key, body, **{"X-Webhook-URL": f"{hook_base}/hook"})
        answered = r.json()  # pending, as Krea's reference has every POST answer
        assert answered["job_id"] != first["job_id"]
        assert (answered["completed_at"], answered["result"]) == (None, None)
        hit = (await job_of(gw, key, answered["job_id"])).json()
        assert hit["status"] == "completed" and hit["result"] == first["result"]  # same image
        assert await ledger(gw, key) == [("initial", 100), ("charge", -10)]
        await until(lambda: receiver.calls)
        assert orjson.loads(receiver.calls[0][1]) == hit


def test_job_ids_read_as_krea_s_uuids_and_back() -> None:
    """Krea's `job_id` is a `string<uuid>`: the gateway's 24-hex id is shown as a version 4
    UUID that names it again, and the plain id is taken too."""
    for _ in range(200):
        ours = os.urandom(12).hex()
        shown = krea.as_uuid(ours)
        parsed = uuid.UUID(shown)
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122) and str(parsed) == shown
        assert krea.job_id_of(shown) == krea.job_id_of(shown.upper()) == ours
        assert krea.job_id_of(ours) == ours
    for other in ("", "x", str(uuid.uuid4()), "0" * 31, "ec5c5b20-e62f-46da-8d44-f9b9fa000001"):
        assert krea.job_id_of(other) == ""
