"""A 32-bit unsigned seed (0-4294967295, the range clients commonly draw seeds from) on
the JSON routes: Krea and Segmind receive it as sent; flux-krea, whose range is
0-2147483647, receives its remainder by 2**31, and its own route refuses it as flux-krea
does; GraphQL reads the job back (docs/api.md, "Seed"). Real HTTP, a real Redis, the
providers' emulators as upstreams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import KreaEmulator
from tests.emulators.segmind import SegmindEmulator
from tests.harness import Harness, gateway
from tests.servers import serve

WIDE = 3_000_000_000  # above GraphQL's Int, within 32 bits unsigned
TOP = 2**32 - 1


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, Any]]:
    emulators = {
        "krea": KreaEmulator(token="t"),
        "segmind": SegmindEmulator(api_key="t"),
        "fluxkrea": FluxKreaEmulator(api_key="t"),
    }
    async with (
        serve(emulators["krea"].app) as kb,
        serve(emulators["segmind"].app) as sb,
        serve(emulators["fluxkrea"].app) as fb,
    ):
        yield {
            "emulators": emulators,
            "settings": {
                "krea_api_base": kb, "krea_api_token": "t",
                "segmind_api_base": sb, "segmind_api_key": "t",
                "fluxkrea_api_base": f"{fb}/v1", "fluxkrea_api_key": "t",
            },
        }  # fmt: skip


async def ended(gw: Harness, key: str, job_id: str) -> dict[str, Any]:
    """The job read back over GraphQL once it ended: no error, whatever its seed."""
    job = await gw.wait(key, job_id)
    assert job["status"] == "completed", job
    return job


async def test_krea_receives_a_32_bit_seed_as_sent_and_graphql_reads_it_back(
    upstreams: dict[str, Any], redis_url: str, storage_dir: Path
) -> None:
    krea: KreaEmulator = upstreams["emulators"]["krea"]
    async with gateway(redis_url, storage_dir, **upstreams["settings"]) as gw:
        key = await gw.key()
        auth = {"Authorization": f"Bearer {key}"}
        route = "/compat/krea/generate/image/bfl/flux-1-dev"
        r = await gw.http.post(route, json={"prompt": "a kite", "seed": WIDE}, headers=auth)
        assert r.status_code == 200, r.text
        job = await ended(gw, key, r.headers["x-gateway-job-id"])
        assert job["metadata"]["seed"] == WIDE
        [sent] = [r.json for r in krea.received("POST", "/generate/")]
        assert sent["seed"] == WIDE

        # One past 32 bits is refused in Krea's shape, naming the field.
        r = await gw.http.post(route, json={"prompt": "a kite", "seed": TOP + 1}, headers=auth)
        assert r.status_code == 400
        assert r.json()["message"] == f"seed: Input should be less than or equal to {TOP}"


async def test_segmind_receives_it_as_sent_and_flux_krea_its_remainder(
    upstreams: dict[str, Any], redis_url: str, storage_dir: Path
) -> None:
    emulators = upstreams["emulators"]
    async with gateway(redis_url, storage_dir, **upstreams["settings"]) as gw:
        key = await gw.key()
        auth = {"x-api-key": key}
        for backend in ("segmind", "fluxkrea"):  # each pinned by its model slug
            body = {"prompt": "a kite", "seed": TOP, "num_outputs": 1}
            r = await gw.http.post(f"/compat/segmind/v2/{backend}", json=body, headers=auth)
            assert r.status_code == 200, r.text
            job_id = r.json()["request_id"]
            await ended(gw, key, job_id)
            r = await gw.http.get(f"/compat/segmind/v2/requests/{job_id}", headers=auth)
            assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
        [segmind_sent] = [r.json for r in emulators["segmind"].requests if r.method == "POST"]
        assert segmind_sent["seed"] == TOP
        [fluxkrea_sent] = [
            r["json"] for r in emulators["fluxkrea"].requests if r["method"] == "POST"
        ]
        assert fluxkrea_sent["seed"] == TOP % 2**31

        # Krea makes one image a job, image i with seed + i: within 32 bits still.
        body = {"prompt": "a kite", "seed": TOP, "num_outputs": 2}
        r = await gw.http.post("/compat/segmind/v2/krea", json=body, headers=auth)
        assert r.status_code == 200, r.text
        await ended(gw, key, r.json()["request_id"])
        krea_sent = [r.json["seed"] for r in emulators["krea"].received("POST", "/generate/")]
        assert krea_sent == [TOP, 0]


async def test_flux_krea_s_own_route_keeps_flux_krea_s_range(
    upstreams: dict[str, Any], redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, **upstreams["settings"]) as gw:
        key = await gw.key()
        auth = {"Authorization": f"Bearer {key}"}
        top = 2**31 - 1
        for seed, status in ((top + 1, 400), (TOP + 1, 400), (top, 200)):
            body = {"prompt": "a kite", "seed": seed}
            r = await gw.http.post("/compat/fluxkrea/v1/generate", json=body, headers=auth)
            assert r.status_code == status, r.text
            if status == 400:  # flux-krea's limit, not the gateway's wider one
                assert r.json()["message"].endswith(f"less than or equal to {top}"), r.text
        assert r.json()["images"][0]["seed"] == top


async def test_a_drawn_seed_can_be_sent_back_over_graphql(
    redis_url: str, storage_dir: Path
) -> None:
    """Seeds the gateway draws stay within GraphQL's Int: twenty draws from 32 bits would
    all fit by chance once in a million."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        for _ in range(20):
            r = await gw.http.post(
                "/v1/text_to_image",
                json={"service": "local", "prompt": "a kite", "width": 512, "height": 512},
                headers={"Authorization": f"Bearer {key}"},
            )
            assert r.status_code in (200, 202), r.text
            job = await ended(gw, key, r.json()["id"])
            seed = job["metadata"]["seed"]
            assert 0 <= seed <= 2**31 - 1
            again = await gw.generate(key, "a kite", seed=seed, width=512, height=512)
            assert "errors" not in again.json(), again.text
