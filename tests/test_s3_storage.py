"""Outputs in an S3-compatible bucket (`GATEWAY_STORAGE_URL`, gateway/artifacts_s3.py),
proven against moto's real S3 HTTP server (tests/s3server.py): the store's operations,
a gateway that generates into the bucket and hands out URLs that download the image,
the retention sweep, and the durability promise when the bucket's server dies or cuts
uploads mid-way (a job is never completed with a missing object; credits balance)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import subprocess
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from gateway import artifacts_s3
from gateway.artifacts import NAME, StorageUnavailable
from gateway.artifacts_s3 import S3ArtifactStore, open_s3
from gateway.config import load_settings
from gateway.store import keys
from tests.harness import GATEWAY, Harness, gateway, gateway_processes, until
from tests.records import records
from tests.s3server import BUCKET, PREFIX, MotoServer, UploadCutter, fake_credentials
from tests.servers import free_port

TERMINAL = ("completed", "failed", "cancelled")


@contextlib.asynccontextmanager
async def store(endpoint: str, **overrides: Any) -> AsyncIterator[S3ArtifactStore]:
    overrides.setdefault("storage_url", f"s3://{BUCKET}/{PREFIX}")
    settings = load_settings(s3_endpoint_url=endpoint, public_url="http://gw.example", **overrides)
    async with open_s3(settings) as opened:
        yield opened


def png(width: int = 64, height: int = 48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(out, "PNG")
    return out.getvalue()


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the whole image decodes: not a truncated object
        return image.size


async def job_rows(gw: Harness, key: str, ids: list[str]) -> list[dict[str, Any]]:
    account = gw.keys[key]["id"]
    return await records(gw.accounts.redis, [keys.job(account, job_id) for job_id in ids])


async def submit(gw: Harness, key: str, prompt: str = "a red fox", **options: Any) -> str:
    r = await gw.generate(key, prompt, **options)
    assert r.status_code == 200 and r.json().get("data"), r.text
    return str(r.json()["data"]["generate"]["id"])


async def download(url: str) -> httpx.Response:
    """What a client does with `url`: follow the gateway's redirect, if any, to the bytes."""
    async with httpx.AsyncClient(follow_redirects=True, timeout=30) as client:
        return await client.get(url)


async def credits_balance(gw: Harness, key: str, start: int, ids: list[str]) -> None:
    """Every job charged once, each one not completed refunded, and the balance says so."""
    rows = await job_rows(gw, key, ids)
    kept = sum(int(r["cost"]) for r in rows if r["status"] == "completed")
    assert all(int(r.get("refunded", 0)) == int(r["cost"]) for r in rows if r["status"] == "failed")
    reasons = [e["reason"] for e in await gw.accounts.ledger(gw.keys[key]["id"])]
    failed = sum(r["status"] == "failed" for r in rows)
    assert (reasons.count("charge"), reasons.count("refund")) == (len(ids), failed), reasons
    me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
    assert me["credits"] == start - kept


# -- the store on its own ----------------------------------------------------------------


async def test_put_read_delete_against_a_real_s3_server(
    s3: dict[str, str], s3_server: MotoServer
) -> None:
    async with store(s3["s3_endpoint_url"]) as bucket:
        data = png()
        urls = [await bucket.put(data, "png") for _ in range(20)]
        names = [u.rsplit("/", 1)[1] for u in urls]
        assert all(u.startswith("http://gw.example/outputs/") for u in urls)
        # 18 random bytes each (144 bits): the URL is the only secret, so never reused.
        assert all(NAME.fullmatch(n) and len(n) == len("x" * 24 + ".png") for n in names)
        assert len(set(names)) == 20
        assert s3_server.keys() == sorted(f"{PREFIX}/{n}" for n in names)
        head = s3_server.client().head_object(Bucket=BUCKET, Key=f"{PREFIX}/{names[0]}")
        assert head["ContentType"] == "image/png"
        assert head["ContentLength"] == len(data)
        assert "immutable" in head["CacheControl"]

        assert await bucket.read(urls[0]) == data
        # By its name, whatever base the URL was made with (a public URL since changed).
        assert await bucket.read("http://elsewhere.example/outputs/" + names[0]) == data
        assert await bucket.read("http://gw.example/outputs/not-a-name.png") is None
        assert await bucket.read("http://gw.example/outputs/" + "A" * 24 + ".png") is None

        # What DeleteObjects sends: Content-MD5, which every S3-compatible server checks,
        # not botocore's CRC32, which MinIO and others refuse.
        sent: list[dict[str, str]] = []
        bucket.client.meta.events.register(
            "before-send.s3.DeleteObjects", lambda request, **_: sent.append(dict(request.headers))
        )
        await bucket.delete(urls[:19])
        assert sent and all("Content-MD5" in h for h in sent), sent
        assert not any("x-amz-checksum-crc32" in h for h in sent)
        await bucket.delete(urls[:1])  # gone already: no error
        assert await bucket.read(urls[0]) is None
        assert s3_server.keys() == [f"{PREFIX}/{names[19]}"]
        assert await bucket.ready()


async def test_sweep_deletes_our_old_objects_a_page_at_a_time_and_nothing_else(
    s3: dict[str, str], s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts_s3, "DELETE_BATCH", 2)  # several batches of deletes
    client = s3_server.client()
    for foreign in (f"{PREFIX}/README.txt", f"{PREFIX}/sub/{'B' * 24}.png", f"{'C' * 24}.png"):
        client.put_object(Bucket=BUCKET, Key=foreign, Body=b"not ours")
    async with store(s3["s3_endpoint_url"]) as bucket:
        for _ in range(5):
            await bucket.put(b"x", "png")
        assert await bucket.sweep(time.time() - 3600) == 0  # nothing is that old
        assert len(s3_server.keys()) == 8
        assert await bucket.sweep(time.time() + 3600) == 5
    assert s3_server.keys() == sorted(
        [f"{PREFIX}/README.txt", f"{PREFIX}/sub/{'B' * 24}.png", f"{'C' * 24}.png"]
    )


async def test_ready_checks_the_bucket(s3: dict[str, str]) -> None:
    async with store(s3["s3_endpoint_url"]) as bucket:
        assert await bucket.ready()
    async with store(s3["s3_endpoint_url"], storage_url="s3://no-such-bucket/x") as bucket:
        assert not await bucket.ready()
    async with store(f"http://127.0.0.1:{free_port()}") as bucket:  # nothing listens
        assert not await bucket.ready()
        with pytest.raises(StorageUnavailable):
            await bucket.put(b"x", "png")


async def test_an_upload_streams_from_the_callers_buffer(s3: dict[str, str]) -> None:
    """The image is never held twice: only chunks are copied on the way out."""
    data = os.urandom(16 * 1024 * 1024)
    async with store(s3["s3_endpoint_url"]) as bucket:
        await bucket.put(b"warm", "png")  # the connection pool, the loaded models
        tracemalloc.start()
        try:
            before, _ = tracemalloc.get_traced_memory()
            url = await bucket.put(data, "png")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - before < len(data) // 4, f"{(peak - before) / 2**20:.1f} MiB held"
        assert await bucket.read(url) == data


async def test_an_upload_cut_midway_stores_nothing_and_raises(
    s3: dict[str, str], s3_server: MotoServer
) -> None:
    cutter = UploadCutter(s3_server.port)
    async with cutter.running() as proxied, store(proxied) as bucket:
        cutter.cutting = True
        with pytest.raises(StorageUnavailable):
            await bucket.put(os.urandom(256 * 1024), "png")
        assert cutter.cut_uploads >= 1  # cut inside the body, botocore's retries too
        assert s3_server.keys() == []
        cutter.cutting = False
        url = await bucket.put(png(), "png")
        assert await bucket.read(url) == png()


async def test_readiness_asks_the_bucket_once_a_second_however_often_asked(
    s3: dict[str, str], s3_server: MotoServer
) -> None:
    """/readyz is open to anyone; each HeadBucket is a request the bucket's owner pays."""
    counter = UploadCutter(s3_server.port)
    async with counter.running() as proxied, store(proxied) as bucket:
        assert all(await asyncio.gather(*(bucket.ready() for _ in range(20))))
        for _ in range(20):
            assert await bucket.ready()
        assert counter.heads == 1

        async def asked_again() -> bool:
            return await bucket.ready() and counter.heads == 2

        await until(asked_again, what="a second HeadBucket, a second on")


async def test_presigned_locations_and_the_public_base(
    s3: dict[str, str], s3_server: MotoServer
) -> None:
    async with store(s3["s3_endpoint_url"], storage_presign_seconds=120) as bucket:
        url = await bucket.put(png(), "png")
        name = url.rsplit("/", 1)[1]
        location = await bucket.location(name)
        assert location and location.startswith(f"{s3_server.url}/{BUCKET}/{PREFIX}/{name}?")
        assert "X-Amz-Signature=" in location and "X-Amz-Expires=120" in location
        assert size_of((await download(location)).content) == (64, 48)
        assert await bucket.location("../../etc/passwd") is None
        assert await bucket.location("x.png") is None
    public = f"{s3_server.url}/{BUCKET}/{PREFIX}"
    async with store(s3["s3_endpoint_url"], storage_public_url=public) as bucket:
        url = await bucket.put(png(), "png")
        assert url.startswith(public + "/")
        assert await bucket.location(url.rsplit("/", 1)[1]) == url
        assert await bucket.read(url) == png()
        assert await bucket.read(f"http://gw.example/outputs/{url.rsplit('/', 1)[1]}") == png()


async def test_the_region_comes_from_aws_region_when_no_setting_names_one(
    s3: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS_REGION, as the AWS SDKs and CLI read it (botocore alone reads only
    AWS_DEFAULT_REGION): the presigned URLs are signed for it; GATEWAY_S3_REGION wins."""
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    for overrides, region in (({}, "eu-west-3"), ({"s3_region": "ap-south-1"}, "ap-south-1")):
        async with store(s3["s3_endpoint_url"], **overrides) as bucket:
            name = (await bucket.put(png(), "png")).rsplit("/", 1)[1]
            location = await bucket.location(name)
            assert location and f"%2F{region}%2Fs3%2Faws4_request" in location


# -- a gateway storing into the bucket ---------------------------------------------------


async def test_generate_stores_in_the_bucket_and_the_url_downloads_the_image(
    redis_url: str, storage_dir: Path, s3: dict[str, str], s3_server: MotoServer
) -> None:
    async with gateway(redis_url, storage_dir, **s3) as gw:
        key = await gw.key()
        job = await gw.wait(key, await submit(gw, key, "a fox in snow", width=640, height=512))
        assert job["status"] == "completed", job
        url = job["url"]
        name = url.rsplit("/", 1)[1]
        # The shape the local directory hands out, on the gateway: it never expires.
        assert url == f"{gw.base}/outputs/{name}"
        assert s3_server.keys() == [f"{PREFIX}/{name}"]
        assert list(storage_dir.iterdir()) == []  # nothing written locally

        redirect = await gw.http.get(url)
        assert redirect.status_code == 302
        assert redirect.headers["cache-control"] == "no-store"
        location = redirect.headers["location"]
        assert location.startswith(f"{s3_server.url}/{BUCKET}/{PREFIX}/{name}?")
        assert "X-Amz-Signature=" in location
        image = await download(url)
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert size_of(image.content) == (640, 512)

        missing = await gw.http.get("/outputs/not-a-name.png")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200, ready.text

        # The stored bytes read back where the API answers with them (OpenAI's b64_json).
        answer = await gw.http.post(
            "/v1/images/generations",
            json={
                "model": "local",
                "prompt": "a boat",
                "size": "512x640",
                "response_format": "b64_json",
            },
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 200, answer.text
        stored = base64.b64decode(answer.json()["data"][0]["b64_json"])
        assert size_of(stored) == (512, 640)


async def test_a_public_base_is_handed_out_and_the_gateway_redirects_to_it(
    redis_url: str, storage_dir: Path, s3: dict[str, str], s3_server: MotoServer
) -> None:
    s3_server.allow_public_reads()
    public = f"{s3_server.url}/{BUCKET}/{PREFIX}"
    async with gateway(redis_url, storage_dir, storage_public_url=public, **s3) as gw:
        key = await gw.key()
        job = await gw.wait(key, await submit(gw, key, width=512, height=768, outputFormat="WEBP"))
        assert job["status"] == "completed", job
        name = job["url"].rsplit("/", 1)[1]
        assert job["url"] == f"{public}/{name}" and name.endswith(".webp")
        image = await download(job["url"])
        assert image.headers["content-type"] == "image/webp"
        assert size_of(image.content) == (512, 768)
        # A URL handed out before the public base was set still leads to the object.
        redirect = await gw.http.get(f"/outputs/{name}")
        assert (redirect.status_code, redirect.headers["location"]) == (302, job["url"])


async def test_retention_deletes_the_objects_too(
    redis_url: str, storage_dir: Path, s3: dict[str, str], s3_server: MotoServer
) -> None:
    async with gateway(redis_url, storage_dir, job_lease_seconds=0.6, **s3) as gw:
        key = await gw.key()
        job = await gw.wait(key, await submit(gw, key, width=512, height=512))
        assert job["status"] == "completed"
        assert len(s3_server.keys()) == 1
        gw.clock.advance(8 * 86400)  # past the 7 days' retention (and the hour after)

        async def swept() -> bool:
            return s3_server.keys() == []

        await until(swept, timeout=30)


def test_two_gateway_processes_on_one_redis_and_one_bucket(
    redis_url: str, storage_dir: Path, tmp_path: Path, s3: dict[str, str], s3_server: MotoServer
) -> None:
    """Real `gateway serve` processes (as on two hosts), no shared directory: the image
    one of them stored is served through the other, and `gateway generate` saves it."""
    env = {
        "GATEWAY_STORAGE_URL": s3["storage_url"],
        "GATEWAY_S3_ENDPOINT_URL": s3["s3_endpoint_url"],
        "GATEWAY_INPROCESS_WORKERS": "1",
    }
    with gateway_processes(redis_url, storage_dir, tmp_path, count=2, **env) as bases:
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        made = subprocess.run(
            [GATEWAY, "keys", "create", "--plan", "pro", "--credits", "100", "--json"],
            env={**base_env, "GATEWAY_REDIS_URL": redis_url},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        key = json.loads(made.stdout)["key"]
        out = tmp_path / "fox.png"
        size = ["--width", "512", "--height", "640"]
        generated = subprocess.run(
            [GATEWAY, "generate", "a fox", "--provider", "local", *size, "--out", str(out)],
            env={**base_env, "GATEWAY_URL": bases[0], "GATEWAY_API_KEY": key},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert generated.returncode == 0, generated.stderr
        assert size_of(out.read_bytes()) == (512, 640)
        [stored] = s3_server.keys()
        other = httpx.get(f"{bases[1]}/outputs/{stored.rsplit('/', 1)[1]}", timeout=10)
        assert other.status_code == 302
        fetched = httpx.get(other.headers["location"], timeout=10)
        assert fetched.content == out.read_bytes()
        assert list(storage_dir.iterdir()) == []


# -- the bucket's server failing ---------------------------------------------------------


async def test_bucket_server_killed_jobs_are_retried_and_complete_once_it_is_back(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_credentials(monkeypatch)
    server = MotoServer()
    server.start()
    try:
        server.create_bucket()
        settings = {"storage_url": f"s3://{BUCKET}/{PREFIX}", "s3_endpoint_url": server.url}
        async with gateway(
            redis_url, storage_dir, job_lease_seconds=1, job_max_tries=20, **settings
        ) as gw:
            key = await gw.key("enterprise", credits=10_000)
            server.kill()  # gone before the jobs store their images
            ids = []
            for i in range(3):
                ids.append(await submit(gw, key, f"kept {i}", width=576, height=512))

            async def retried() -> bool:
                return all(int(r.get("attempts", 0)) >= 2 for r in await job_rows(gw, key, ids))

            await until(retried, timeout=60.0)
            rows = await job_rows(gw, key, ids)
            assert not [r for r in rows if r["status"] in TERMINAL or r.get("urls")]
            assert (await gw.http.get("/readyz")).status_code == 503

            # Back (empty, as moto keeps nothing: the bucket made again).
            server = MotoServer(server.port)
            server.start()
            server.create_bucket()

            async def ended() -> bool:
                return all(r["status"] in TERMINAL for r in await job_rows(gw, key, ids))

            await until(ended, timeout=60.0)
            jobs = [await gw.job(key, job_id) for job_id in ids]
            assert [j["status"] for j in jobs if j] == ["completed"] * 3
            for job in jobs:
                assert job is not None
                assert size_of((await download(job["url"])).content) == (576, 512)
            assert len(server.keys()) == 3  # one object per job, no strays
            await credits_balance(gw, key, 10_000, ids)
    finally:
        server.stop()


async def test_uploads_cut_midway_fail_the_job_refunded_then_work_again(
    redis_url: str, storage_dir: Path, s3: dict[str, str], s3_server: MotoServer
) -> None:
    cutter = UploadCutter(s3_server.port)
    async with cutter.running() as proxied:
        settings = {**s3, "s3_endpoint_url": proxied}
        async with gateway(
            redis_url, storage_dir, job_lease_seconds=1, job_max_tries=2, **settings
        ) as gw:
            key = await gw.key("pro", credits=1_000)
            cutter.cutting = True
            ids = [await submit(gw, key, "never stored", width=768, height=768)]
            lost = await gw.wait(key, ids[0], timeout=60)
            assert lost["status"] == "failed", lost
            assert "gave up after 2 attempts" in lost["error"]
            assert lost["url"] is None and lost["creditCost"] == 0
            assert cutter.cut_uploads >= 2  # each attempt's upload was cut mid-body
            assert s3_server.keys() == []
            await credits_balance(gw, key, 1_000, ids)

            cutter.cutting = False
            ids.append(await submit(gw, key, "stored", width=512, height=512))
            kept = await gw.wait(key, ids[1])
            assert kept["status"] == "completed", kept
            assert size_of((await download(kept["url"])).content) == (512, 512)
            assert s3_server.keys() == [f"{PREFIX}/{kept['url'].rsplit('/', 1)[1]}"]
            await credits_balance(gw, key, 1_000, ids)
