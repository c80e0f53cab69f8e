"""Automatic persisted queries (Apollo's protocol) and queries over GET.

Over real HTTP on the suite's Redis (a one-node Cluster: the store's keys share one
slot): an unknown hash is HTTP 200 `PERSISTED_QUERY_NOT_FOUND`; a document sent with its
hash is stored once it ran for a caller with a key, and from then on its hash alone
runs it, over POST and GET, from another gateway sharing the Redis too; a persisted
document takes the prepared path as its text does; bad input is a clear 4xx; the store
stays bounded; GET answers tell a cache (a CDN) what it may keep.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import httpx
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.routing import Route

from gateway.store import keys
from tests.harness import JOB, Harness, gateway

NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"
ME = "query Me { me { plan credits } }"
GENERATE_IMAGE = """mutation($input: ImageGenerationInput!) {
  generateImage(input: $input) { id status creditCost } }"""
NO_JOB = {"id": "0" * 24}
IMAGE_INPUT = {"input": {"service": "local", "prompt": "a fox", "width": 512, "height": 512}}


def sha(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


def persisted(document: str, version: Any = 1) -> dict[str, Any]:
    return {"persistedQuery": {"version": version, "sha256Hash": sha(document)}}


def auth(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


async def post(
    gw: Harness,
    key: str | None,
    *,
    query: str | None = None,
    variables: dict[str, Any] | None = None,
    extensions: Any = None,
) -> httpx.Response:
    body: dict[str, Any] = {}
    if query is not None:
        body["query"] = query
    if variables is not None:
        body["variables"] = variables
    if extensions is not None:
        body["extensions"] = extensions
    return await gw.http.post("/graphql", json=body, headers=auth(key))


async def get(
    gw: Harness,
    key: str | None,
    *,
    query: str | None = None,
    variables: dict[str, Any] | None = None,
    extensions: Any = None,
    **raw: str,
) -> httpx.Response:
    """A GET as Apollo's HttpLink sends one: each member a query parameter, objects as JSON."""
    params: dict[str, str] = dict(raw)
    if query is not None:
        params["query"] = query
    if variables is not None:
        params["variables"] = json.dumps(variables)
    if extensions is not None:
        params["extensions"] = json.dumps(extensions)
    return await gw.http.get("/graphql", params=params, headers=auth(key))


async def raw_get(gw: Harness, target: str, key: str) -> int:
    """The status of a GET too long for httpx to send (its URLs stop at 64 KiB)."""
    url = httpx.URL(gw.base)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readline()
    finally:
        writer.close()
    return int(head.split()[1])


def code(response: httpx.Response) -> str:
    return str(response.json()["errors"][0]["extensions"]["code"])


async def stored(gw: Harness) -> dict[str, str]:
    """The documents in Redis, by hash; and the order index agrees with them."""
    redis = gw.accounts.redis
    documents = await redis.hgetall(keys.apq_documents())
    assert set(await redis.zrange(keys.apq_used(), 0, -1)) == set(documents)
    return dict(documents)


async def test_unknown_hash_then_registered_then_hash_alone_from_another_gateway(
    redis_url: str, storage_dir: Path
) -> None:
    async with (
        gateway(redis_url, storage_dir, inprocess_workers=False) as one,
        gateway(redis_url, storage_dir, inprocess_workers=False) as two,
    ):
        key = await one.key()
        job_id = (await one.generate(key)).json()["data"]["generate"]["id"]
        variables = {"id": job_id}
        # Unknown: HTTP 200, the code and the message Apollo's link looks for, no cache.
        for send in (post, get):
            r = await send(one, key, variables=variables, extensions=persisted(JOB))
            assert r.status_code == 200, r.text
            assert r.json() == {
                "data": None,
                "errors": [
                    {"message": "PersistedQueryNotFound", "extensions": {"code": NOT_FOUND}}
                ],
            }
            assert r.headers["Cache-Control"] == "no-store"
        assert await stored(one) == {}

        # Sent with its text: answered, and stored in Redis.
        r = await post(one, key, query=JOB, variables=variables, extensions=persisted(JOB))
        assert r.status_code == 200 and r.json()["data"]["job"]["id"] == job_id
        assert await stored(one) == {sha(JOB): JOB}

        # The other gateway knows it from Redis: the hash alone, over GET and POST.
        r = await get(two, key, variables=variables, extensions=persisted(JOB))
        assert r.status_code == 200, r.text
        assert r.json()["data"]["job"]["id"] == job_id and "errors" not in r.json()
        assert r.json() == (await one.gql(JOB, variables, key)).json()
        r = await post(two, key, variables=variables, extensions=persisted(JOB))
        assert r.json()["data"]["job"]["status"] == "queued"
        # An upper-case hash is the same hash.
        upper = {"persistedQuery": {"version": 1, "sha256Hash": sha(JOB).upper()}}
        r = await get(two, key, variables=variables, extensions=upper)
        assert r.json()["data"]["job"]["id"] == job_id
        # Another key runs the same document as itself: the document is shared, the
        # answer is the caller's (another key's job is null).
        other = await one.key()
        r = await get(two, other, variables=variables, extensions=persisted(JOB))
        assert r.status_code == 200 and r.json() == {"data": {"job": None}}

        # A hash that is not the query's: refused, nothing stored under it.
        for send in (post, get):
            r = await send(one, key, query=ME, variables={}, extensions=persisted(JOB))
            assert r.status_code == 400 and code(r) == "BAD_USER_INPUT", r.text
            assert "does not match" in r.json()["errors"][0]["message"]
            assert r.headers["X-RateLimit-Limit"]  # a good key's headers, as any 400's
        assert await stored(one) == {sha(JOB): JOB}


async def test_a_known_hash_costs_no_round_trip(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        store = gw.app.state.persisted
        fetched: list[str] = []
        real = store.scripts.apq_get

        async def counting(**kwargs: Any) -> Any:
            fetched.append(kwargs["sha"])
            return await real(**kwargs)

        store.scripts.apq_get = counting
        assert code(await get(gw, key, extensions=persisted(ME))) == NOT_FOUND
        assert fetched == [sha(ME)]  # unknown here: asked Redis
        assert (await post(gw, key, query=ME, extensions=persisted(ME))).status_code == 200
        for _ in range(3):
            r = await get(gw, key, extensions=persisted(ME))
            assert r.json()["data"]["me"]["plan"] == "pro"
        assert fetched == [sha(ME)]  # stored by this process: known without Redis
        # Evicted from Redis, this process still answers it.
        await gw.accounts.redis.delete(keys.apq_documents(), keys.apq_used())
        assert (await get(gw, key, extensions=persisted(ME))).json()["data"]["me"]


def graphql_view(gw: Harness) -> Any:
    return next(r.endpoint for r in gw.app.routes if isinstance(r, Route) and r.path == "/graphql")


async def test_a_persisted_document_takes_the_prepared_path(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        job_id = (await gw.generate(key)).json()["data"]["generate"]["id"]
        view = graphql_view(gw)
        prepared: list[str] = []  # documents the prepared path answered
        general: list[str] = []  # requests Strawberry's path answered

        real_execute = view.prepared.execute

        async def execute(query: str, *args: Any, **kwargs: Any) -> Any:
            result = await real_execute(query, *args, **kwargs)
            if result is not None:
                prepared.append(query)
            return result

        real_run: Callable[..., Awaitable[Any]] = view.run

        async def run(request: Any, *args: Any, **kwargs: Any) -> Any:
            general.append(request.method)
            return await real_run(request, *args, **kwargs)

        monkeypatch.setattr(view.prepared, "execute", execute)
        monkeypatch.setattr(view, "run", run)
        variables = {"id": job_id}

        # The text, over POST and over GET: prepared.
        await post(gw, key, query=JOB, variables=variables)
        r = await get(gw, key, query=JOB, variables=variables)
        assert r.json()["data"]["job"]["id"] == job_id
        assert (prepared, general) == ([JOB, JOB], [])
        # Registered, then the hash alone, over POST and GET: prepared, never Strawberry's.
        await post(gw, key, query=JOB, variables=variables, extensions=persisted(JOB))
        for send in (post, get):
            r = await send(gw, key, variables=variables, extensions=persisted(JOB))
            assert r.json()["data"]["job"]["id"] == job_id
        assert (prepared, general) == ([JOB] * 5, [])
        # The control: a document the prepared path does not run (two root fields) goes
        # to Strawberry's path, persisted or not, and is answered the same.
        both = "query($id: ID!) { job(id: $id) { id } me { plan } }"
        await post(gw, key, query=both, variables=variables, extensions=persisted(both))
        r = await get(gw, key, variables=variables, extensions=persisted(both))
        assert r.json()["data"] == {"job": {"id": job_id}, "me": {"plan": "pro"}}
        assert (len(prepared), general) == (5, ["POST", "GET"])


async def test_bad_input_is_a_clear_4xx_and_stores_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        good = sha(ME)
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"extensions": persisted(ME, version=2)}, "version"),
            ({"extensions": persisted(ME, version="1")}, "version"),
            ({"extensions": persisted(ME, version=True)}, "version"),
            ({"extensions": {"persistedQuery": {"sha256Hash": good}}}, "version"),
            ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "z" * 64}}}, "sha"),
            ({"extensions": {"persistedQuery": {"version": 1, "sha256Hash": good[:-1]}}}, "sha"),
            ({"extensions": {"persistedQuery": {"version": 1}}}, "sha"),
            ({"extensions": {"persistedQuery": "yes"}}, "persistedQuery"),
            ({"extensions": "persisted"}, "extensions"),
            ({"extensions": [1, 2]}, "extensions"),
        ]
        for body, word in refusals:
            for send in (post, get):
                for query in (None, ME):
                    r = await send(gw, key, query=query, **body)
                    assert r.status_code == 400, (send, body, r.text)
                    assert code(r) == "BAD_USER_INPUT"
                    error = r.json()["errors"][0]
                    assert word in error["message"] + error["extensions"].get("field", "")
        # GET's JSON members malformed.
        for raw in ({"variables": "{"}, {"extensions": "{nope"}, {"variables": "[1"}):
            r = await gw.http.get("/graphql", params={"query": ME, **raw}, headers=auth(key))
            assert r.status_code == 400 and code(r) == "BAD_USER_INPUT", r.text
            assert "not valid JSON" in r.json()["errors"][0]["message"]
        r = await get(gw, key, query=ME, v="x")
        assert r.status_code == 200  # an unknown parameter (a cache buster) is ignored

        # A document over the stored size (16 KiB): 413, whether or not it would parse.
        padding = "# " + "x" * 20_000 + "\n"
        long = padding + ME
        r = await post(gw, key, query=long, extensions=persisted(long))
        assert r.status_code == 413 and code(r) == "PAYLOAD_TOO_LARGE", r.text
        # Over GET (60 KB of query string): the same.
        long = "# " + "x" * 60_000 + "\n" + ME
        r = await get(gw, key, query=long, extensions=persisted(long))
        assert r.status_code == 413 and code(r) == "PAYLOAD_TOO_LARGE", r.text[:300]
        # 100 KB: over the body limit (POST); a URL that long the HTTP server itself
        # refuses (uvicorn, 400) before the gateway sees it.
        huge = "# " + "x" * 100_000 + "\n" + ME
        r = await post(gw, key, query=huge, extensions=persisted(huge))
        assert r.status_code == 413 and code(r) == "PAYLOAD_TOO_LARGE"
        params = {"query": huge, "extensions": json.dumps(persisted(huge))}
        assert await raw_get(gw, "/graphql?" + urlencode(params), key) == 400
        # Without a key, or with a bad one, a document is answered (401) and not stored.
        for caller in (None, "gk_nobody_secret"):
            r = await post(gw, caller, query=ME, extensions=persisted(ME))
            assert r.status_code == 401
        # Refused documents run nothing, so their callers' requests store nothing either.
        r = await post(gw, key, query="{ nope }", extensions=persisted("{ nope }"))
        assert r.status_code == 400
        assert await stored(gw) == {}
        # Still serving.
        assert (await post(gw, key, query=ME, extensions=persisted(ME))).status_code == 200
        assert await stored(gw) == {sha(ME): ME}


async def test_mutations_over_get_are_refused_and_charge_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=1000)
        r = await get(gw, key, query=GENERATE_IMAGE, variables=IMAGE_INPUT)
        assert r.status_code == 400 and code(r) == "BAD_USER_INPUT", r.text
        assert "GET" in r.json()["errors"][0]["message"] and r.json()["data"] is None
        assert r.headers["Cache-Control"] == "no-store"
        # Registered by POST (which runs it), then its hash alone over GET: refused too.
        r = await post(gw, key, query=GENERATE_IMAGE, variables=IMAGE_INPUT)
        r = await post(
            gw,
            key,
            query=GENERATE_IMAGE,
            variables=IMAGE_INPUT,
            extensions=persisted(GENERATE_IMAGE),
        )
        assert r.json()["data"]["generateImage"]["creditCost"] == 10
        assert sha(GENERATE_IMAGE) in await stored(gw)
        r = await get(gw, key, variables=IMAGE_INPUT, extensions=persisted(GENERATE_IMAGE))
        assert r.status_code == 400 and "GET" in r.json()["errors"][0]["message"], r.text
        me = await post(gw, key, query=ME)
        assert me.json()["data"]["me"]["credits"] == 980  # the two POSTs only
        # Over POST, the hash alone runs it.
        r = await post(gw, key, variables=IMAGE_INPUT, extensions=persisted(GENERATE_IMAGE))
        assert r.json()["data"]["generateImage"]["status"] == "queued"


async def test_the_store_stays_bounded_and_unstored_documents_are_answered(
    redis_url: str, storage_dir: Path
) -> None:
    """One key registers 10,000 distinct documents: at most `apq_max_documents` stay,
    the least recently used evicted; each request is answered all the same."""
    limit, count = 50, 10_000
    async with gateway(
        redis_url, storage_dir, inprocess_workers=False, apq_max_documents=limit, read_rpm=10**6
    ) as gw:
        key = await gw.key()
        # Distinct texts, hashes and documents of one operation (a comment of the same
        # length each: graphql-core's validation, the costly part, is cached for all).
        documents = [f"query($id: ID!) {{ job(id: $id) {{ id }} }}\n# {n:05}" for n in range(count)]
        # aiohttp: httpx's pool costs more CPU than the gateway's requests themselves.
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(gw.base, connector=connector, headers=auth(key)) as http:

            async def register(document: str) -> None:
                body = {"query": document, "variables": NO_JOB, "extensions": persisted(document)}
                async with http.post("/graphql", json=body) as r:
                    assert r.status == 200 and await r.json() == {"data": {"job": None}}

            await asyncio.gather(*(register(d) for d in documents[: count - 10]))
            for document in documents[count - 10 :]:  # in order: the most recent last
                await register(document)
        kept = await stored(gw)
        assert len(kept) == limit
        assert set(documents[count - 10 :]) <= set(kept.values())
        assert all(sha(d) == h for h, d in kept.items())

    # A fresh gateway (nothing known locally): the latest run by hash; the first is gone,
    # and sent with its text it is answered and stored again.
    async with gateway(redis_url, storage_dir, inprocess_workers=False, read_rpm=10**6) as fresh:
        first, last = documents[0], documents[-1]
        r = await get(fresh, key, variables=NO_JOB, extensions=persisted(last))
        assert r.status_code == 200 and r.json() == {"data": {"job": None}}
        r = await get(fresh, key, variables=NO_JOB, extensions=persisted(first))
        assert code(r) == NOT_FOUND
        r = await post(fresh, key, query=first, variables=NO_JOB, extensions=persisted(first))
        assert r.json() == {"data": {"job": None}}
        r = await get(fresh, key, variables=NO_JOB, extensions=persisted(first))
        assert r.json() == {"data": {"job": None}}


async def test_get_answers_tell_caches_what_they_may_keep(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        providers = "{ providers { name } }"
        # Anonymous and without errors: any cache, briefly.
        r = await get(gw, None, query=providers)
        assert r.status_code == 200 and "errors" not in r.json()
        assert r.headers["Cache-Control"] == "public, max-age=10"
        assert "Authorization" in r.headers["Vary"] and "X-API-Key" in r.headers["Vary"]
        # With a key: the caller's cache only, checked again each time.
        for headers in (auth(key), {"X-API-Key": key}):
            r = await gw.http.get("/graphql", params={"query": ME}, headers=headers)
            assert r.json()["data"]["me"]["plan"] == "pro"
            assert r.headers["Cache-Control"] == "private, no-cache"
            assert "Authorization" in r.headers["Vary"]
        # Errors: no cache.
        r = await get(gw, None, query=ME)
        assert r.status_code == 401 and r.headers["Cache-Control"] == "no-store"
        r = await get(gw, key, query="{ me { plan } nope }")
        assert r.status_code == 400 and r.headers["Cache-Control"] == "no-store"
        # POST answers are none of a cache's business: unchanged.
        r = await post(gw, key, query=ME)
        assert "Cache-Control" not in r.headers and "Vary" not in r.headers
        # A browser's GET without a query still gets the GraphiQL page.
        r = await gw.http.get("/graphql", headers={"Accept": "text/html"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        # ... but a persisted query's GET, even accepting anything, is answered as one.
        r = await gw.http.get(
            "/graphql",
            params={"extensions": json.dumps(persisted(ME))},
            headers={**auth(key), "Accept": "*/*"},
        )
        assert r.headers["content-type"] == "application/json" and code(r) == NOT_FOUND


async def test_the_store_away_is_a_503_for_a_hash_and_costs_nothing_for_a_text(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        store = gw.app.state.persisted

        async def away(**_: Any) -> Any:
            raise RedisConnectionError("Connection refused")

        store.scripts.apq_get = away
        store.scripts.apq_put = away
        r = await get(gw, key, extensions=persisted(ME))
        assert r.status_code == 503 and code(r) == "SERVICE_UNAVAILABLE", r.text
        assert int(r.headers["Retry-After"]) > 0
        # Sent with its text, the query is answered; only its storing is lost.
        r = await post(gw, key, query=ME, extensions=persisted(ME))
        assert r.status_code == 200 and r.json()["data"]["me"]["plan"] == "pro"
        assert await stored(gw) == {}
