"""The gateway end to end: Doitong's documented examples (docs/providers/doitong.md),
REST, auth, isolation, bad input."""

from __future__ import annotations

import asyncio
import gc
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import starlette.responses
from PIL import Image

from gateway.jobs import store as store_module
from gateway.store import keys
from tests.conftest import RedisServer
from tests.harness import GENERATE, JOB, gateway
from tests.records import change
from tests.test_client_tokens import mint

SEED_QUERY = """
mutation Generate($input: GenerateInput!) {
  generate(input: $input) {
    id
    status
    type
    provider
    url
    metadata
    creditCost
  }
}
"""
SEED_VARIABLES = {
    "input": {
        "type": "IMAGE",
        "provider": "flux-krea",
        "input": {"text": "A futuristic city with flying cars and neon lights"},
        "options": {"width": 1024, "height": 1024},
    }
}


async def test_seed_python_example_runs_to_a_stored_image_in_dev_mode(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, dev=True) as gw:
        # On a Redis, which keeps every one, dev mode makes no demo key at each start.
        assert await gw.accounts.all() == []
        key = await gw.key("free", credits=100)
        r = await gw.gql(SEED_QUERY, SEED_VARIABLES, key)
        assert r.status_code == 200
        job = r.json()["data"]["generate"]
        assert job["status"] == "queued"
        assert job["type"] == "IMAGE" and job["provider"] == "flux-krea"
        assert job["creditCost"] == 20
        assert r.headers["X-RateLimit-Limit"] == "10"
        assert r.headers["X-RateLimit-Remaining"] == "9"
        assert int(r.headers["X-RateLimit-Reset"]) > 0

        done = await gw.wait(key, job["id"])
        assert done["status"] == "completed", done["error"]
        meta = done["metadata"]
        # No upstream has credentials: dev mode's local preview made it, and says so.
        assert meta["backend"] == "local"
        assert meta["cached"] is False
        assert isinstance(meta["seed"], int) and meta["duration"] >= 0
        assert (meta["width"], meta["height"]) == (1024, 1024)
        assert done["url"].startswith(gw.base + "/outputs/")

        image = await gw.http.get(done["url"])
        assert image.status_code == 200
        assert Image.open(io.BytesIO(image.content)).size == (1024, 1024)
        me = await gw.gql("{ me { credits } }", key=key)
        assert me.json()["data"]["me"]["credits"] == 80


async def test_seed_javascript_example_generate_image(redis_url: str, storage_dir: Path) -> None:
    query = """mutation GenerateImage($input: ImageGenerationInput!) {
        generateImage(input: $input) { id url width height } }"""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        r = await gw.gql(
            query,
            {"input": {"service": "local", "prompt": "a lake", "width": 768, "height": 512}},
            key,
        )
        job = r.json()["data"]["generateImage"]
        done = await gw.wait(key, job["id"])
        assert (done["width"], done["height"]) == (768, 512)
        image = await gw.http.get(done["url"])
        assert Image.open(io.BytesIO(image.content)).size == (768, 512)


async def test_same_seed_same_picture_different_seed_different_picture(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        urls = []
        for seed in (7, 7, 8):
            r = await gw.generate(key, "a quiet harbour", seed=seed, width=512, height=512)
            done = await gw.wait(key, r.json()["data"]["generate"]["id"])
            assert done["metadata"]["seed"] == seed
            urls.append((await gw.http.get(done["url"])).content)
        assert urls[0] == urls[1]
        assert urls[0] != urls[2]


async def test_output_formats_and_several_images(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        r = await gw.generate(key, "tiles", width=512, height=512, numImages=3, outputFormat="webp")
        job = r.json()["data"]["generate"]
        assert job["creditCost"] == 30
        done = await gw.wait(key, job["id"])
        assert len(done["urls"]) == 3 and done["url"] == done["urls"][0]
        for url in done["urls"]:
            assert url.endswith(".webp")
            assert Image.open(io.BytesIO((await gw.http.get(url)).content)).format == "WEBP"


async def test_no_cache_between_may_keep_a_callers_read(redis_url: str, storage_dir: Path) -> None:
    """A shared cache keyed by the URL (a CDN, Varnish) would serve one caller's job, or
    a 404, to another: every read on the REST, compatible and OpenAI routes says
    `no-store`, found or not; the stored outputs stay cacheable for ever."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        made = await gw.generate(key, width=512, height=512)
        job = await gw.wait(key, made.json()["data"]["generate"]["id"])
        bearer, x_api_key = {"Authorization": f"Bearer {key}"}, {"X-API-Key": key}
        reads = [
            (f"/v1/jobs/{job['id']}", bearer, 200),
            (f"/v1/jobs/{job['id']}", x_api_key, 200),
            ("/v1/jobs/0123456789abcdef01234567", x_api_key, 404),
            (f"/compat/segmind/v2/requests/{job['id']}/status", x_api_key, 200),
            (f"/compat/segmind/v2/requests/{job['id']}", x_api_key, 200),
            ("/compat/krea/jobs/00000000-0000-0000-0000-000000000000", bearer, 404),
            ("/v1/models", bearer, 200),
        ]
        for path, auth, status in reads:
            r = await gw.http.get(path, headers=auth)
            assert r.status_code == status, (path, r.text)
            assert r.headers.get_list("cache-control") == ["no-store"], path
        output = await gw.http.get(job["url"])
        assert output.headers["cache-control"] == "public, max-age=31536000, immutable"


async def test_rest_text_to_image_and_job(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key, other = await gw.key(), await gw.key()
        r = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": key},
            json={
                "service": "local",
                "prompt": "a kite",
                "width": 512,
                "height": 640,
                "outputFormat": "jpg",
            },
        )
        assert r.status_code == 202
        assert r.headers["X-RateLimit-Remaining"] == "59"
        job = r.json()
        assert job["status"] == "queued" and job["creditCost"] == 11
        done = await gw.wait(key, job["id"])
        got = await gw.http.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": key})
        assert got.status_code == 200
        assert got.json()["status"] == "completed" == done["status"]
        assert got.json()["url"].endswith(".jpg")

        # Another key's job does not exist for this key: 404 over REST, null over GraphQL.
        hidden = await gw.http.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": other})
        assert hidden.status_code == 404
        assert hidden.json()["error"]["code"] == "NOT_FOUND"
        assert await gw.job(other, job["id"]) is None
        assert await gw.job(key, "nope") is None

        # The Idempotency-Key header works here as on OpenAI's and the providers' routes:
        # the same request again is the same job, charged once.
        body = {"service": "local", "prompt": "a gull", "width": 512, "height": 512}
        again = [
            await gw.http.post(
                "/v1/text_to_image", headers={"X-API-Key": key, "Idempotency-Key": "k1"}, json=body
            )
            for _ in range(2)
        ]
        assert again[0].json()["id"] == again[1].json()["id"]
        assert again[1].json()["creditCost"] == 10
        # The same bytes under another key are another request: a body is parsed once
        # (gateway/bodies.py), the header applied to it each time.
        other_key = await gw.http.post(
            "/v1/text_to_image", headers={"X-API-Key": key, "Idempotency-Key": "k2"}, json=body
        )
        assert other_key.status_code == 202 and other_key.json()["id"] != again[0].json()["id"]
        # Named in the body and the header, it is one key, or a refusal: not one ignored.
        both = {"X-API-Key": key, "Idempotency-Key": "k1"}
        same = await gw.http.post(
            "/v1/text_to_image", headers=both, json={**body, "idempotencyKey": "k1"}
        )
        assert same.json()["id"] == again[0].json()["id"]
        differ = await gw.http.post(
            "/v1/text_to_image", headers=both, json={**body, "idempotencyKey": "k3"}
        )
        assert differ.status_code == 400 and differ.json()["error"]["field"] == "idempotencyKey"

        # A cursor that is no job id is a bad request, not an empty page.
        r = await gw.gql('{ jobs(after: "zzz") { nodes { id } } }', key=key)
        assert r.json()["errors"][0]["extensions"]["field"] == "after"


async def test_rest_lists_the_callers_jobs_and_says_its_balance_and_limits(
    redis_url: str, storage_dir: Path
) -> None:
    """A backend that speaks only REST reads what GraphQL's `jobs` and `me` give: its own
    jobs a page at a time, newest first, narrowed by status, in GraphQL's shape; its
    balance and each limit's use. A client token sees its budget, not the account's."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key, other = await gw.key(credits=1000), await gw.key()
        headers = {"X-API-Key": key}
        ids = []
        for i in range(3):
            body = {"service": "local", "prompt": f"a gull {i}"}
            r = await gw.http.post("/v1/text_to_image", json=body, headers=headers)
            ids.append(r.json()["id"])
            gw.clock.advance(0.01)  # each created in a millisecond of its own
        theirs = await gw.http.post("/v1/text_to_image", json=body, headers={"X-API-Key": other})
        await gw.http.post(f"/v1/jobs/{ids[1]}/cancel", headers=headers)

        first = await gw.http.get("/v1/jobs", params={"first": 2}, headers=headers)
        assert first.status_code == 200 and first.headers["X-RateLimit-Limit"]
        assert first.headers["Cache-Control"] == "no-store"  # the caller's own
        page = first.json()
        assert [n["id"] for n in page["nodes"]] == [ids[2], ids[1]]
        assert page["nodes"][1]["status"] == "cancelled"
        assert page["pageInfo"] == {"hasNextPage": True, "endCursor": ids[1]}
        graphql = await gw.gql("{ jobs(first: 2) { nodes { id } } }", key=key)
        assert [n["id"] for n in graphql.json()["data"]["jobs"]["nodes"]] == [ids[2], ids[1]]
        rest = await gw.http.get("/v1/jobs", params={"after": ids[1]}, headers=headers)
        assert [n["id"] for n in rest.json()["nodes"]] == [ids[0]]
        assert rest.json()["pageInfo"]["hasNextPage"] is False
        rest = await gw.http.get("/v1/jobs", params={"status": "cancelled"}, headers=headers)
        assert [n["id"] for n in rest.json()["nodes"]] == [ids[1]]
        for bad, field in (
            ({"first": "0"}, "first"),
            ({"first": "ten"}, "first"),
            ({"after": "zzz"}, "after"),
            ({"status": "done"}, "status"),
            # a job id, but none of the caller's (another key's; or expired since): not
            # an empty page, which would read as the end of the list
            ({"after": theirs.json()["id"]}, "after"),
        ):
            r = await gw.http.get("/v1/jobs", params=bad, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
        assert (await gw.http.get("/v1/jobs")).status_code == 401

        r = await gw.http.get("/v1/me", headers=headers)
        assert r.status_code == 200, r.text
        me = r.json()
        assert (me["plan"], me["credits"]) == ("pro", 960)  # three of 20 charged, one refunded
        assert me["id"] == gw.keys[key]["id"] and me["webhookSecret"].startswith("whsec_")
        limits = {limit["name"]: limit for limit in me["limits"]}
        assert set(limits) == {"minute", "day", "concurrency", "read"}
        assert (limits["concurrency"]["used"], limits["concurrency"]["limit"]) == (2, 10)
        assert me["clientToken"] is None
        graphql = await gw.gql(
            "{ me { credits cache { hits misses coalesced creditsSaved } } }", key=key
        )
        assert graphql.json()["data"]["me"] == {"credits": me["credits"], "cache": me["cache"]}

        token = await mint(gw, key, maxCredits=50, origins=["https://app.example"])
        bearer = {"Authorization": f"Bearer {token}", "Origin": "https://app.example"}
        mine = (await gw.http.get("/v1/me", headers=bearer)).json()
        assert (mine["credits"], mine["webhookSecret"], mine["name"]) == (50, None, "")
        assert mine["clientToken"]["maxCredits"] == 50 and mine["clientToken"]["spent"] == 0
        assert mine["clientToken"]["origins"] == ["https://app.example"]
        assert (await gw.http.get("/v1/jobs", headers=bearer)).json()["nodes"] == []


async def test_an_authorization_header_without_a_key_leaves_x_api_key_to_name_it(
    redis_url: str, storage_dir: Path
) -> None:
    """`Authorization: Bearer ` with nothing after it (as a client with an unset variable
    sends it) beside a good `X-API-Key`: the key is the one named."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        host, port = urlsplit(gw.base).hostname, urlsplit(gw.base).port
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"GET /v1/jobs/0123456789abcdef01234567 HTTP/1.1\r\nHost: gw\r\n"
            b"Authorization: Bearer \r\nX-API-Key: %b\r\nConnection: close\r\n\r\n" % key.encode()
        )
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404"), answer  # past the key check: no such job


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer gk_abc_notarealsecret"},
        {"X-API-Key": "garbage"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
    ],
)
async def test_missing_or_bad_key_is_401(
    redis_url: str, storage_dir: Path, headers: dict[str, str]
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        r = await gw.http.post("/graphql", headers=headers, json={"query": "{ me { plan } }"})
        assert r.status_code == 401
        assert r.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        rest = await gw.http.post(
            "/v1/text_to_image", headers=headers, json={"service": "local", "prompt": "x"}
        )
        assert rest.status_code == 401
        assert rest.json()["error"]["code"] == "UNAUTHENTICATED"
        for answer in (r, rest):  # RFC 9110: a 401 names the scheme it asks for
            assert answer.headers["www-authenticate"] == "Bearer"


async def test_revoked_key_is_refused_and_its_secret_is_not_stored(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        account = gw.keys[key]["id"]
        raw = await gw.accounts.redis.hgetall(keys.account(account))
        secret = key.split("_", 2)[2]
        assert raw["key_hash"] and secret not in str(raw)  # only its hash is kept
        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200
        await gw.accounts.revoke(account)
        r = await gw.gql("{ me { plan } }", key=key)
        assert r.status_code == 401
        assert (await gw.generate(key)).status_code == 401
        rest = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": key},
            json={"service": "local", "prompt": "x"},
        )
        assert rest.status_code == 401


async def test_generation_checks_the_secret_with_admission_and_refusals_take_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=100)
        account = gw.keys[key]["id"]
        forged = f"gk_{account}_{'A' * 43}"  # the real account id, a wrong secret
        for attempt in (forged, key[:-1] + ("B" if key[-1] != "B" else "C"), f"gk_{account}_"):
            assert (await gw.generate(attempt)).status_code == 401
            rest = await gw.http.post(
                "/v1/text_to_image",
                headers={"X-API-Key": attempt},
                json={"service": "local", "prompt": "x"},
            )
            assert rest.status_code == 401 and "X-RateLimit-Limit" not in rest.headers
        # Bad input from a bad key is still a 401; from the real key a 400 with its headers.
        bad = {"service": "local", "prompt": "x", "width": 4096}
        rest = await gw.http.post("/v1/text_to_image", headers={"X-API-Key": forged}, json=bad)
        assert rest.status_code == 401
        rest = await gw.http.post("/v1/text_to_image", headers={"X-API-Key": key}, json=bad)
        assert rest.status_code == 400 and rest.headers["X-RateLimit-Remaining"] == "10"
        r = await gw.generate(key, provider="dall-e")
        assert r.status_code == 400 and r.headers["X-RateLimit-Limit"] == "10"
        # Refused by the GraphQL layer itself, before any field ran: the same headers.
        auth = {"Authorization": f"Bearer {key}"}
        for refused in (
            await gw.http.get(
                "/graphql", params={"query": "mutation { __typename }"}, headers=auth
            ),
            await gw.http.post(
                "/graphql", json={"query": "{ me { plan } }", "operationName": "N"}, headers=auth
            ),
            await gw.http.post("/graphql", json=[{"query": "{ me { plan } }"}], headers=auth),
        ):
            assert refused.status_code in (400, 405), refused.text
            assert refused.headers["X-RateLimit-Limit"] == "10", refused.request.url
        # Nothing above was charged or counted; the real key is admitted at once.
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 100
        ok = await gw.generate(key)
        assert ok.status_code == 200 and ok.headers["X-RateLimit-Remaining"] == "9"
        assert [e["reason"] for e in await gw.accounts.ledger(account)] == ["initial", "charge"]


BAD_INPUTS = [
    ({"options": {"width": 4096, "height": 1024}}, "options.width"),
    ({"options": {"height": 100}}, "options.height"),
    ({"input": {"text": ""}}, "input.text"),
    ({"input": {"text": "x" * 1001}}, "input.text"),
    ({"options": {"numImages": 5}}, "options.numImages"),
    ({"options": {"outputFormat": "gif"}}, "options.outputFormat"),
    ({"options": {"aspectRatio": "7:5"}}, "options.aspectRatio"),
    ({"options": {"steps": 0}}, "options.steps"),
    ({"options": {"seed": -1}}, "options.seed"),
    ({"provider": "dall-e"}, "provider"),
    ({"webhookUrl": "http://127.0.0.1:9/hook"}, "webhookUrl"),
    ({"webhookUrl": "http://169.254.169.254/latest"}, "webhookUrl"),
    ({"webhookUrl": "ftp://example.com/x"}, "webhookUrl"),
]


async def test_bad_input_is_400_naming_the_field_and_charges_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key("free", credits=100)
        for change, field in BAD_INPUTS:
            variables = {
                "input": {
                    "type": "IMAGE",
                    "provider": "local",
                    "input": {"text": "ok"},
                    "options": {},
                    **change,
                }
            }
            r = await gw.gql(GENERATE, variables, key)
            assert r.status_code == 400, (change, r.text)
            error = r.json()["errors"][0]
            assert error["extensions"]["code"] == "BAD_USER_INPUT", error
            assert error["extensions"]["field"] == field, error
        me = (await gw.gql("{ me { credits limits { name used } } }", key=key)).json()
        assert me["data"]["me"]["credits"] == 100
        assert me["data"]["me"]["limits"][0] == {"name": "minute", "used": 0}


async def test_malformed_requests_get_clear_errors_and_the_server_keeps_serving(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        auth = {"Authorization": f"Bearer {key}"}
        cases: list[tuple[dict[str, object], int, str]] = [
            (
                {"content": b"{not json", "headers": {"content-type": "application/json"}},
                400,
                "BAD_USER_INPUT",
            ),
            ({"json": {"query": "{ me { plan "}}, 400, "BAD_USER_INPUT"),
            ({"json": {"query": "{ nope }"}}, 400, "BAD_USER_INPUT"),
            (
                {"json": {"query": GENERATE, "variables": {"input": {"provider": 3}}}},
                400,
                "BAD_USER_INPUT",
            ),
            ({"json": {"query": GENERATE, "variables": "x"}}, 400, "BAD_USER_INPUT"),
            (
                {
                    "json": {
                        "query": "{ " + " ".join(f"a{i}: me {{ plan }}" for i in range(40)) + " }"
                    }
                },
                400,
                "BAD_USER_INPUT",
            ),
            (
                {
                    "json": {
                        "query": "{ jobs { nodes { metadata } pageInfo { endCursor } } }",
                        "variables": None,
                    }
                },
                200,
                "",
            ),
            (
                {"content": b"x" * 70_000, "headers": {"content-type": "application/json"}},
                413,
                "PAYLOAD_TOO_LARGE",
            ),
        ]
        for kwargs, status, code in cases:
            headers = {**auth, **kwargs.pop("headers", {})}  # type: ignore[dict-item]
            r = await gw.http.post("/graphql", headers=headers, **kwargs)  # type: ignore[arg-type]
            assert r.status_code == status, (kwargs, r.text)
            if code:
                assert r.json()["errors"][0]["extensions"]["code"] == code, r.text

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            for _ in range(3):
                yield b"x" * 30_000

        r = await gw.http.post(
            "/graphql", content=chunked(), headers={**auth, "content-type": "application/json"}
        )
        assert r.status_code == 413 and "content-length" not in r.request.headers
        rest = await gw.http.post("/v1/text_to_image", headers=auth, content=b"[1,2")
        assert rest.status_code == 400 and rest.json()["error"]["code"] == "BAD_USER_INPUT"
        rest = await gw.http.post(
            "/v1/text_to_image",
            headers=auth,
            json={"service": "local", "prompt": "x", "width": "big"},
        )
        assert rest.status_code == 400 and rest.json()["error"]["field"] == "width"
        # Still serving.
        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200


async def test_alias_limit_holds_through_fragments(redis_url: str, storage_dir: Path) -> None:
    fragment_bomb = (
        "query { ...A } fragment A on Query { "
        + " ".join(f"m{i}: me {{ plan }}" for i in range(30))
        + " }"
    )
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        r = await gw.gql(fragment_bomb, key=key)
        assert r.status_code == 400
        assert "aliases" in r.json()["errors"][0]["message"].lower()


async def test_cancel_a_queued_job_refunds_and_frees_its_slot(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("free", credits=40)
        first = (await gw.generate(key, width=1024, height=1024)).json()["data"]["generate"]
        refused = await gw.generate(key)
        assert refused.status_code == 429
        assert refused.json()["errors"][0]["extensions"]["limit"] == "concurrency"
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status creditCost } }",
            {"id": first["id"]},
            key,
        )
        assert r.json()["data"]["cancelJob"] == {"status": "cancelled", "creditCost": 0}
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 40
        again = await gw.generate(key)
        assert again.status_code == 200, again.text
        ledger = await gw.accounts.ledger(gw.keys[key]["id"])
        assert [e["reason"] for e in ledger] == ["initial", "charge", "refund", "charge"]
        assert sum(int(e["delta"]) for e in ledger) == 20


async def test_providers_lists_services_and_why_backends_are_off(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        r = await gw.gql("{ providers { name kind enabled reason backends circuit } }")
        rows = {p["name"]: p for p in r.json()["data"]["providers"]}
        assert rows["krea"]["enabled"] is False
        assert "GATEWAY_KREA_API_TOKEN" in rows["krea"]["reason"]
        assert rows["local"]["enabled"] is True
        assert rows["flux-krea"]["backends"] == ["fluxkrea", "segmind", "krea"]
        assert rows["flux-krea"]["enabled"] is False
        key = await gw.key()
        # No backend of flux-krea is configured and this is not dev mode: 503, no charge.
        r = await gw.generate(key, provider="flux-krea")
        assert r.status_code == 503
        error = r.json()["errors"][0]
        assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE"}  # no retryAfter
        assert error["message"] == "no backend of 'flux-krea' is configured on this gateway"
        assert "retry-after" not in r.headers


async def test_health_and_readiness(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        assert (await gw.http.get("/healthz")).json() == {"status": "ok"}
        ready = await gw.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] is True
        assert (await gw.http.get("/outputs/../../etc/passwd")).status_code == 404
        assert (await gw.http.get("/outputs/")).status_code == 404


async def test_outputs_are_served_for_caches_to_keep_and_nothing_else_of_the_directory(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        made = await gw.generate(key, width=512, height=512)
        job = await gw.wait(key, made.json()["data"]["generate"]["id"])
        r = await gw.http.get(job["url"].removeprefix(gw.base))
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
        name = job["url"].rsplit("/", 1)[1]
        for other in ("notes.txt", f".{name}.tmp"):  # not an output: another's, half-written
            (storage_dir / other).write_bytes(b"private")
            r = await gw.http.get(f"/outputs/{other}")
            assert r.status_code == 404, other
            assert r.json()["error"]["code"] == "NOT_FOUND"

        # A system whose type table does not know .webp (python:3.11-slim has none):
        # served as what it is all the same, and never sniffed as something else.
        monkeypatch.setattr(starlette.responses, "guess_type", lambda _: (None, None))
        made = await gw.generate(key, width=512, height=512, outputFormat="WEBP")
        job = await gw.wait(key, made.json()["data"]["generate"]["id"])
        r = await gw.http.get(job["url"].removeprefix(gw.base))
        assert r.headers["content-type"] == "image/webp"
        assert r.headers["x-content-type-options"] == "nosniff"


async def test_embedded_store_serves_without_a_redis_server(storage_dir: Path) -> None:
    async with gateway(None, storage_dir, dev=True) as gw:
        key = await gw.key()
        r = await gw.gql(SEED_QUERY, SEED_VARIABLES, key)
        done = await gw.wait(key, r.json()["data"]["generate"]["id"])
        assert done["status"] == "completed"
        assert (await gw.http.get(done["url"])).status_code == 200


async def test_an_unexpected_error_is_a_masked_500_and_the_server_keeps_serving(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        job = (await gw.generate(key)).json()["data"]["generate"]
        # A record damaged behind the gateway's back (by hand, or a bad migration).
        await change(gw.accounts.redis, keys.job(gw.keys[key]["id"], job["id"]), created_at="{")
        r = await gw.gql(JOB, {"id": job["id"]}, key)
        assert r.status_code == 500
        error = r.json()["errors"][0]
        assert error["message"] == "Unexpected error."
        assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
        assert "orjson" not in r.text and "Traceback" not in r.text
        # A variable the client got wrong is its own error, and says what is wrong.
        variables = {
            "input": {
                "type": "IMAGE",
                "provider": "local",
                "input": {"text": "x"},
                "options": {"colour": "red"},
            }
        }
        r = await gw.gql(GENERATE, variables, key)
        assert r.status_code == 400
        assert r.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        assert "colour" in r.json()["errors"][0]["message"]
        # A value its type refuses names the field, as a value out of range does.
        for options, field in (
            ({"width": "big"}, "options.width"),
            ({"seed": 2**32}, "options.seed"),
        ):
            variables["input"]["options"] = options
            r = await gw.gql(GENERATE, variables, key)
            assert r.status_code == 400
            assert r.json()["errors"][0]["extensions"] == {"code": "BAD_USER_INPUT", "field": field}
        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200


async def test_redis_going_away_fails_closed_with_503_then_recovers(
    storage_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir) as gw:
            key = await gw.key(credits=100)
            assert (await gw.generate(key)).status_code == 200
            server.stop()
            r = await gw.generate(key)
            assert r.status_code == 503
            assert r.json()["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
            rest = await gw.http.post(
                "/v1/text_to_image",
                headers={"X-API-Key": key},
                json={"service": "local", "prompt": "x"},
            )
            assert rest.status_code == 503
            assert (await gw.http.get("/readyz")).status_code == 503
            assert (await gw.http.get("/healthz")).status_code == 200
    finally:
        server.stop()


async def test_depth_and_token_limits_refuse_before_anything_runs(
    redis_url: str, storage_dir: Path
) -> None:
    deep = "{ " + "".join(f"f{i} {{ " for i in range(12)) + "x" + " }" * 13
    huge = "{ me { " + " ".join("plan" for _ in range(2_100)) + " } }"
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        for query, words in ((deep, "depth"), (huge, "tokens")):
            for _ in range(2):  # the second time from the parse and validation caches
                r = await gw.gql(query, key=key)
                assert r.status_code == 400, r.text
                errors = r.json()["errors"]
                assert any(words in e["message"].lower() for e in errors), errors
                assert all(e["extensions"]["code"] == "BAD_USER_INPUT" for e in errors)


async def test_requests_leave_no_reference_cycles(redis_url: str, storage_dir: Path) -> None:
    """The served process collects garbage rarely (`gateway/cli.py:_tune_gc`), which holds
    only while requests make no reference cycles: everything a request made is freed by
    reference counting when it is answered."""
    ours = ("gateway", "schema", "starlette", "strawberry", "uvicorn", "graphql", "redis")

    async def requests(key: str) -> None:
        job = (await gw.generate(key)).json()["data"]["generate"]
        assert (await gw.job(key, job["id"]))["id"] == job["id"]
        r = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": key},
            json={"service": "local", "prompt": "a red fox"},
        )
        assert r.status_code == 202
        assert (
            await gw.http.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": key})
        ).status_code == 200

    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=10**6)
        await requests(key)  # each document parsed, validated and planned once
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(20):
                await requests(key)
            gc.collect()
            cyclic = [type(o) for o in gc.garbage if type(o).__module__.startswith(ours)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        assert cyclic == []


async def test_readiness_says_a_hung_redis_is_unavailable_in_time(
    storage_dir: Path, tmp_path: Path
) -> None:
    """A Redis that accepts connections and answers nothing (hung, or paused): /readyz
    says 503 within its own 5 s bound, not after the client's long timeouts."""
    import signal

    from tests.conftest import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False) as gw:
            assert (await gw.http.get("/readyz")).status_code == 200
            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            try:  # as a probe with a 10 s timeout asks (a timeout fails the test)
                ready = await gw.http.get("/readyz", timeout=10)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert ready.status_code == 503 and ready.json()["redis"] is False
    finally:
        server.stop()


async def test_jobs_pages_newest_first_and_a_status_filter_reads_a_bounded_number(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A status rare in a long history: each page reads at most SCAN_MOST records (it
    read the whole index, one call per 20 records, holding Redis for every tenant),
    then says where to go on from."""
    monkeypatch.setattr(store_module, "SCAN_MOST", 30)
    monkeypatch.setattr(store_module, "SCAN_BATCH", 10)
    query = """query($after: String, $status: String) {
      jobs(first: 5, after: $after, status: $status) {
        nodes { id status } pageInfo { hasNextPage endCursor } } }"""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=10_000)
        made = []
        for seed in range(45):
            r = await gw.generate(key, seed=seed)
            made.append(r.json()["data"]["generate"]["id"])
        oldest = made[0]
        cancel = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
        assert (await gw.gql(cancel, {"id": oldest}, key)).status_code == 200

        async def page(after: str | None, status: str | None) -> dict[str, Any]:
            r = await gw.gql(query, {"after": after, "status": status}, key)
            return dict(r.json()["data"]["jobs"])

        first = await page(None, None)
        assert [n["id"] for n in first["nodes"]] == made[::-1][:5]
        assert first["pageInfo"] == {"hasNextPage": True, "endCursor": made[-5]}

        seen, after, pages = [], None, 0
        while True:
            got = await page(after, "cancelled")
            pages += 1
            seen += [n["id"] for n in got["nodes"]]
            if not got["pageInfo"]["hasNextPage"]:
                break
            after = got["pageInfo"]["endCursor"]
            assert after is not None
        assert seen == [oldest]
        assert pages == 2  # 30 read without a match, then the other 15
