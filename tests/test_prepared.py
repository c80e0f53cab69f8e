"""Prepared documents answer exactly as Strawberry's general path does.

Each document is sent twice to the served gateway: as clients send it (a prepared
document takes `schema.prepared`) and with an `extensions` member, which only the general
path takes. Status, the headers a client reads, and the body must agree (job ids and
times aside). Each case also asserts which path the first request took.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from starlette.routing import Route

from gateway.store import keys
from tests.harness import GENERATE, JOB, Harness, gateway

SEED = """mutation Generate($input: GenerateInput!) {
  generate(input: $input) { id status type provider url metadata creditCost } }"""
EVERY_FIELD = """mutation($input: GenerateInput!) { made: generate(input: $input) {
  __typename id again: id status type provider url urls width height metadata creditCost
  createdAt completedAt webhookUrl error duration id } }"""
FLAT = """mutation($input: ImageGenerationInput!) {
  generateImage(input: $input) { id status provider creditCost width height } }"""
LITERAL = """mutation { generate(input: {type: IMAGE, provider: "local",
  input: {text: "a literal fox"}, options: {width: 512, height: 512}}) { id creditCost } }"""
NAMED_JOB = "query Poll($id: ID!) { job(id: $id) { id status urls metadata } }"


def doitong(provider: str = "local", **options: Any) -> dict[str, Any]:
    return {
        "input": {
            "type": "IMAGE",
            "provider": provider,
            "input": {"text": "a red fox"},
            "options": options,
        }
    }


def normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, str):
        value = re.sub(r"\b[0-9a-f]{24}\b", "<id>", value)
        return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", value)
    return value


async def both(
    gw: Harness,
    query: str,
    variables: dict[str, Any] | None,
    key: str | None,
    *,
    prepared: bool = True,
    operation_name: str | None = None,
) -> tuple[httpx.Response, httpx.Response]:
    """(the answer as sent, the general path's answer), after checking they agree."""
    view = next(r.endpoint for r in gw.app.routes if isinstance(r, Route) and r.path == "/graphql")
    assert (view.prepared.plan(query) is not None) is prepared
    body: dict[str, Any] = {"query": query, "variables": variables}
    if operation_name:
        body["operationName"] = operation_name
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent = await gw.http.post("/graphql", json=body, headers=headers)
    general = await gw.http.post("/graphql", json={**body, "extensions": {}}, headers=headers)
    assert sent.status_code == general.status_code
    for name in ("content-type", "retry-after", "x-ratelimit-limit"):
        assert sent.headers.get(name) == general.headers.get(name), name
    assert normalized(sent.json()) == normalized(general.json())
    return sent, general


async def test_successful_documents_answer_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=10_000)
        sent, _ = await both(gw, SEED, doitong(width=1024, height=1024), key)
        assert sent.json()["data"]["generate"]["creditCost"] == 20
        assert sent.headers["X-RateLimit-Remaining"] == "59"
        sent, _ = await both(gw, EVERY_FIELD, doitong(width=768, height=512), key)
        made = sent.json()["data"]["made"]
        assert list(made) == [
            "__typename",
            "id",
            "again",
            "status",
            "type",
            "provider",
            "url",
            "urls",
            "width",
            "height",
            "metadata",
            "creditCost",
            "createdAt",
            "completedAt",
            "webhookUrl",
            "error",
            "duration",
        ]
        assert made["__typename"] == "Generation" and made["again"] == made["id"]
        await both(gw, GENERATE, doitong(), key)
        flat = {"input": {"service": "local", "prompt": "a fox", "width": 512, "height": 512}}
        sent, _ = await both(gw, FLAT, flat, key)
        assert sent.json()["data"]["generateImage"]["creditCost"] == 10
        await both(gw, LITERAL, None, key)

        job_id = made["id"]
        sent, _ = await both(gw, JOB, {"id": job_id}, key)
        assert sent.json()["data"]["job"]["status"] == "queued"
        await both(gw, NAMED_JOB, {"id": job_id}, key, operation_name="Poll")
        other = await gw.key()
        sent, _ = await both(gw, JOB, {"id": job_id}, other)  # another key's job
        assert sent.json() == {"data": {"job": None}}


async def test_refusals_answer_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=10_000)
        sent, _ = await both(gw, SEED, doitong(), None)
        assert sent.status_code == 401
        sent, _ = await both(gw, SEED, doitong(), "gk_nobody_secret")
        assert sent.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        sent, _ = await both(gw, SEED, doitong("no-such-provider"), key)
        assert sent.status_code == 400
        assert sent.json()["errors"][0]["extensions"]["field"] == "provider"
        assert sent.headers["X-RateLimit-Limit"] == "60"
        sent, _ = await both(gw, SEED, doitong(width=100_000), key)
        assert sent.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        broke = await gw.key("pro", credits=0)
        sent, _ = await both(gw, SEED, doitong(), broke)
        assert sent.status_code == 402

        limited = await gw.key("pro", credits=10_000, rpm=1)
        assert (await gw.generate(limited)).status_code == 200
        sent, _ = await both(gw, SEED, doitong(), limited)
        assert sent.status_code == 429 and int(sent.headers["Retry-After"]) >= 1

        # Variables that do not coerce: nothing runs on the prepared path; the general
        # path reports graphql-core's message, which names the option.
        sent, _ = await both(gw, SEED, doitong(colour="red"), key)
        assert sent.status_code == 400 and "colour" in sent.json()["errors"][0]["message"]
        sent, _ = await both(gw, SEED, {}, key)
        assert sent.status_code == 400
        sent, _ = await both(gw, NAMED_JOB, {"id": "x"}, key, operation_name="Other")
        assert sent.status_code == 400


async def test_unexpected_errors_are_masked_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        job = (await gw.generate(key)).json()["data"]["generate"]
        await gw.accounts.redis.hset(keys.job(gw.keys[key]["id"], job["id"]), "params", "{")
        sent, _ = await both(gw, JOB, {"id": job["id"]}, key)
        assert sent.status_code == 500
        assert sent.json()["errors"] == [
            {
                "message": "Unexpected error.",
                "locations": [{"line": 1, "column": 19}],
                "path": ["job"],
                "extensions": {"code": "INTERNAL_SERVER_ERROR"},
            }
        ]
        assert sent.json()["data"] == {"job": None}


async def test_other_documents_take_the_general_path(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        job_id = (await gw.generate(key)).json()["data"]["generate"]["id"]
        for query in (
            "query($id: ID!) { job(id: $id) { ...F } } fragment F on Generation { id status }",
            "query($id: ID!) { job(id: $id) { id status @include(if: true) } }",
            "query($id: ID!) { job(id: $id) { id } me { plan } }",
            "query($id: ID!) { a: job(id: $id) { id } b: job(id: $id) { id } }",
            "query { me { plan limits { name } } }",
            "query($id: ID!) { job(id: $id) { id nope } }",
            "query($id: ID!) { job(id: $id) { id status ",
        ):
            sent, _ = await both(gw, query, {"id": job_id}, key, prepared=False)
            assert sent.status_code in (200, 400)
            if sent.status_code == 200:
                assert job_id in sent.text or "pro" in sent.text
