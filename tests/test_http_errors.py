"""Every answer is JSON in the caller's protocol's error shape: unrouted paths, wrong
methods, a bug, and Redis going away under a request, a callback or an event stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.store import keys
from tests.conftest import RedisServer
from tests.harness import JOB, gateway, until
from tests.records import change


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/jobs/", 404, "NOT_FOUND"),
        ("GET", "/v1/jobs/abc/", 404, "NOT_FOUND"),  # not a redirect to /v1/jobs/abc
        ("POST", "/v1/text_to_image/", 404, "NOT_FOUND"),
        ("GET", "/v1/jobs/abc/nothing", 404, "NOT_FOUND"),
        ("GET", "/v1/nothing", 404, "unsupported_endpoint"),  # not REST's: OpenAI's API
        ("GET", "/compat/nowhere/jobs/x", 404, "NOT_FOUND"),
        ("GET", "/nothing/at/all", 404, "NOT_FOUND"),
        ("GET", "/outputs/no-such-image.png", 404, "NOT_FOUND"),
        ("GET", "/v1/text_to_image", 405, "METHOD_NOT_ALLOWED"),
        ("DELETE", "/v1/jobs/abc", 405, "METHOD_NOT_ALLOWED"),
        ("PUT", "/v1/callbacks/krea/" + "A" * 32, 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_unrouted_rest_paths_answer_json_errors(
    redis_url: str, storage_dir: Path, method: str, path: str, status: int, code: str
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        r = await gw.http.request(method, path)
        assert r.status_code == status
        assert r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == code
        assert error["message"]
        if status == 405:
            assert "Allow" in r.headers


async def test_a_wrong_method_on_graphql_answers_in_graphqls_shape(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        r = await gw.http.put("/graphql", json={"query": "{ __typename }"})
        assert r.status_code == 405
        assert r.json()["errors"][0]["extensions"]["code"] == "METHOD_NOT_ALLOWED"
        assert r.json()["data"] is None
        # HEAD, which the route lets through with GET, is no GraphQL request either.
        r = await gw.http.head("/graphql", params={"query": "{ __typename }"})
        assert (r.status_code, r.headers.get("allow")) == (405, "GET, POST")


async def test_a_bug_under_rest_is_a_json_500_that_says_nothing_internal(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        made = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": key},
            json={"service": "local", "prompt": "a fox"},
        )
        job_id = made.json()["id"]
        # A record damaged behind the gateway's back (by hand, or a bad migration).
        await change(gw.accounts.redis, keys.job(gw.keys[key]["id"], job_id), created_at="{")
        r = await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key})
        assert r.status_code == 500
        assert r.json() == {
            "error": {"code": "INTERNAL_SERVER_ERROR", "message": "internal server error"}
        }
        # The server keeps serving.
        assert (await gw.http.get("/healthz")).status_code == 200
        assert (await gw.gql(JOB, {"id": job_id}, key)).status_code == 500


async def test_redis_away_is_503_with_retry_after_everywhere(
    storage_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False) as gw:
            key = await gw.key(credits=100)
            made = await gw.http.post(
                "/v1/text_to_image",
                headers={"X-API-Key": key},
                json={"service": "local", "prompt": "a fox"},
            )
            job_id = made.json()["id"]
            server.stop()
            answers = {
                "rest generate": await gw.http.post(
                    "/v1/text_to_image",
                    headers={"X-API-Key": key},
                    json={"service": "local", "prompt": "x"},
                ),
                "rest job": await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key}),
                "rest cancel": await gw.http.post(
                    f"/v1/jobs/{job_id}/cancel", headers={"X-API-Key": key}
                ),
                "events": await gw.http.get(
                    f"/v1/jobs/{job_id}/events", headers={"X-API-Key": key}
                ),
                "callback": await gw.http.post("/v1/callbacks/krea/" + "A" * 32, json={}),
            }
            for name, r in answers.items():
                assert r.status_code == 503, name
                assert r.json()["error"]["code"] == "SERVICE_UNAVAILABLE", name
                assert int(r.headers["Retry-After"]) > 0, name
            for r in (await gw.generate(key), await gw.gql("{ me { plan } }", key=key)):
                assert r.status_code == 503
                assert r.json()["errors"][0]["extensions"]["code"] == "SERVICE_UNAVAILABLE"
                assert int(r.headers["Retry-After"]) > 0
    finally:
        server.stop()


async def test_an_upstream_callback_refused_while_redis_is_away_is_taken_when_sent_again(
    storage_dir: Path, tmp_path: Path
) -> None:
    """The upstream is told to retry (503, Retry-After), and its retry is delivered."""
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False, public=True) as gw:
            inbox = gw.app.state.gateway.inbox
            token = "T" * 32
            await inbox.expect(token)  # as a job handing its callback URL to Krea does
            server.stop()
            report = {"id": "upstream-1", "status": "completed"}
            refused = await gw.http.post(f"/v1/callbacks/krea/{token}", json=report)
            assert refused.status_code == 503
            assert int(refused.headers["Retry-After"]) > 0
            assert refused.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            server.start(claim_slots=False)  # the same node, its data back from disk
            for _ in range(500):
                retried = await gw.http.post(f"/v1/callbacks/krea/{token}", json=report)
                if retried.status_code != 503:
                    break
                await asyncio.sleep(0.02)  # the client reconnecting to the restarted Redis
            assert retried.status_code == 200
            assert await inbox.take(token) == report
    finally:
        server.stop()


async def test_an_event_stream_whose_redis_goes_away_ends_with_an_error_event(
    storage_dir: Path, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False) as gw:
            key = await gw.key()
            made = await gw.http.post(
                "/v1/text_to_image",
                headers={"X-API-Key": key},
                json={"service": "local", "prompt": "a fox"},
            )
            job_id = made.json()["id"]
            async with gw.http.stream(
                "GET", f"/v1/jobs/{job_id}/events", headers={"X-API-Key": key}
            ) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                assert await anext(lines) == "id: queued"  # the job as it is: queued
                assert await anext(lines) == "event: update"
                server.stop()
                rest = [line async for line in lines]
            at = rest.index("event: error")
            assert '"code":"SERVICE_UNAVAILABLE"' in rest[at + 1]
            assert any(line.startswith("retry: ") for line in rest)
    finally:
        server.stop()


async def test_an_openai_stream_whose_redis_goes_away_ends_with_an_error_event(
    storage_dir: Path, tmp_path: Path
) -> None:
    """A streamed OpenAI answer whose job's progress can no longer be read ends with a
    503's `error` event at once, rather than waiting (or spinning) out its wait."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False) as gw:
            key = await gw.key()
            body = {"model": "local", "prompt": "a fox", "stream": True}
            auth = {"Authorization": f"Bearer {key}"}
            started = asyncio.get_running_loop().time()
            async with gw.http.stream(
                "POST", "/v1/images/generations", json=body, headers=auth
            ) as stream:
                assert stream.status_code == 200
                server.stop()
                said = (await stream.aread()).decode()
            assert said.count("event: error\n") == 1, said
            assert '"code":"service_unavailable"' in said
            assert said.count(": waiting for the image") <= 1
            assert asyncio.get_running_loop().time() - started < 10
    finally:
        server.stop()


async def test_an_openai_wait_cut_short_by_redis_is_not_retried_into_a_second_job(
    storage_dir: Path, tmp_path: Path
) -> None:
    """Redis going away while OpenAI's route waits ends the wait (504), and nothing could
    be noted for a retry to join: the SDK is told not to retry (`x-should-retry:
    false`), or its retry, Redis back, would be a second job, charged again."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        async with gateway(server.url, storage_dir, inprocess_workers=False) as gw:
            key = await gw.key()
            asked = asyncio.create_task(
                gw.http.post(
                    "/v1/images/generations",
                    json={"model": "local", "prompt": "a fox"},
                    headers={"Authorization": f"Bearer {key}"},
                )
            )
            watch = gw.app.state.gateway.watch
            await until(lambda: watch.waiting)  # admitted, and waiting for its end
            server.stop()
            answer = await asked
            assert answer.status_code == 504, answer.text
            assert answer.headers["x-should-retry"] == "false"
    finally:
        server.stop()


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [40, 300, 1000])
async def test_json_nested_deep_is_a_400_in_each_protocols_shape(
    redis_url: str, storage_dir: Path, levels: int
) -> None:
    """JSON nested past any shape the gateway reads (`bodies.MAX_DEPTH`) is refused as
    bad input wherever a request carries it, before a key is checked too: echoing such a
    value recursed, and orjson writes none nested past 254 levels back (a stored
    callback, a job's `callback_data`), both 500s."""
    deep = nested(levels)
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        bearer = {"Authorization": f"Bearer {key}"}
        sends = {
            "REST": ("/v1/text_to_image", {"X-API-Key": key}, f'{{"prompt": {deep}}}'),
            "OpenAI": ("/v1/images/generations", bearer, f'{{"prompt": "x", "model": {deep}}}'),
            "a callback, no key": ("/v1/callbacks/fluxkrea/" + "A" * 16, {}, f'{{"a": {deep}}}'),
            "flux-krea callback_data": (
                "/compat/fluxkrea/v1/generate/async",
                bearer,
                f'{{"prompt": "x", "webhook_url": "https://1.1.1.1/h", "callback_data": {deep}}}',
            ),
            "Krea": ("/compat/krea/generate/image/bfl/flux-1-dev", bearer, f'{{"prompt": {deep}}}'),
            "Segmind": (
                "/compat/segmind/v2/flux-krea-dev",
                {"x-api-key": key},
                f'{{"prompt": {deep}}}',
            ),
        }
        for name, (path, headers, body) in sends.items():
            r = await gw.http.post(
                path, content=body, headers={**headers, "Content-Type": "application/json"}
            )
            assert r.status_code == 400, (name, r.status_code, r.text[:300])
            said = r.json()  # each route's own shape: never a bare 500
            assert said.get("error") or said.get("code") == "BAD_USER_INPUT", (name, r.text)
            if name in ("REST", "OpenAI", "a callback, no key"):  # they say why
                assert "nested deeper than 32 levels" in r.text, (name, r.text)

        query = '{"query": "{ providers { name } }", '
        for body in (
            query + '"extensions": {"persistedQuery": {"version": ' + deep + "}}}",
            query + '"variables": {"a": ' + deep + "}}",
        ):
            r = await gw.http.post(
                "/graphql", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 400, r.text[:300]
            assert r.json()["errors"][0]["message"], r.text[:300]
        r = await gw.http.get(
            "/graphql",
            params={"query": "{ providers { name } }", "variables": f'{{"a": {deep}}}'},
        )
        assert r.status_code == 400 and r.json()["errors"], r.text[:300]
