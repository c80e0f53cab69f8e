"""Real JavaScript clients, in Node, against a served gateway: Apollo Client with Apollo's
persisted-query link (`useGETForHashedQueries`) over its HttpLink, and graphql-ws for
`jobUpdates` (`tests/js/apollo_client.mjs`; versions pinned by tests/js/package-lock.json,
installed by `make test`, i.e. `make js-clients`: `npm ci`).

Node is required: without it, or without the packages, these tests fail saying how to
get them, rather than skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from starlette.routing import Route

from tests.harness import gateway

JS = Path(__file__).parent / "js"
TIMEOUT = 90


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed: these tests run real JavaScript clients (Node 20)")
    if not (JS / "node_modules" / "@apollo" / "client").is_dir():
        pytest.fail(f"the JavaScript clients are not installed: run `make js-clients` ({JS})")
    return found


async def run_script(script: str, env: dict[str, str]) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        node(),
        str(JS / script),
        cwd=JS,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{err.decode()}"
    seen: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return seen


async def test_apollo_client_persisted_queries_over_get_and_graphql_ws(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key("pro", credits=1_000)
        view = next(
            r.endpoint for r in gw.app.routes if isinstance(r, Route) and r.path == "/graphql"
        )
        general: list[str] = []  # the HTTP requests Strawberry's path answered
        real_run = view.run

        async def run(request: Any, *args: Any, **kwargs: Any) -> Any:
            if request.scope["type"] == "http":  # the subscription's WebSocket goes there
                general.append(f"{request.method} {request.url}")
            return await real_run(request, *args, **kwargs)

        monkeypatch.setattr(view, "run", run)
        seen = await run_script("apollo_client.mjs", {"GATEWAY_URL": gw.base, "GATEWAY_KEY": key})
        # Every document Apollo sent, by hash or with its text (and Apollo's `clientLibrary`
        # extension), ran on the prepared path.
        assert general == []

        job = seen["job"]
        assert seen["generated"]["creditCost"] == 10
        assert job["status"] == "completed", seen
        assert (job["width"], job["height"]) == (512, 512)
        # The subscription followed the job to its end.
        assert seen["statuses"] and seen["statuses"][-1] == "completed", seen["statuses"]
        assert set(seen["statuses"]) <= {"queued", "processing", "completed"}
        # The image, fetched by the client and by us.
        assert seen["image"]["status"] == 200 and seen["image"]["bytes"] > 0
        assert seen["image"]["contentType"] == "image/png"
        image = await gw.http.get(job["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")

        requests = seen["requests"]
        graphql = [r for r in requests if urlsplit(r["url"]).path == "/graphql"]
        assert graphql == requests  # every request of Apollo's went to /graphql
        # The mutation: its hash alone by POST (unknown), then with its text by POST;
        # charged once.
        first, second = graphql[:2]
        assert (first["method"], first["members"], first["code"]) == (
            "POST",
            ["operationName", "variables", "extensions"],
            "PERSISTED_QUERY_NOT_FOUND",
        )
        assert first["status"] == 200
        assert second["method"] == "POST" and "query" in second["members"]
        assert second["status"] == 200 and second["code"] is None
        me = await gw.gql("{ me { credits } }", key=key)
        assert me.json()["data"]["me"]["credits"] == 990
        # The job reads: a GET of the hash alone (unknown), its text by POST (stored),
        # then only GETs carrying the hash alone, each answered.
        reads = graphql[2:]
        assert len(reads) == len(seen["polls"]) + 1 >= 4, reads
        assert (reads[0]["method"], reads[0]["code"]) == ("GET", "PERSISTED_QUERY_NOT_FOUND")
        assert reads[1]["method"] == "POST" and "query" in reads[1]["members"]
        for read in reads[2:]:
            assert read["method"] == "GET", read
            params = parse_qs(urlsplit(read["url"]).query)
            assert "query" not in params and "extensions" in params, read
            persisted = json.loads(params["extensions"][0])["persistedQuery"]
            assert persisted["version"] == 1 and len(persisted["sha256Hash"]) == 64
            assert (read["status"], read["code"]) == (200, None), read
