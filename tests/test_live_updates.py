"""Live job updates: GraphQL subscriptions over graphql-transport-ws (the `gql` client), and SSE.

The job runs in a separate `gateway worker` process; updates reach the gateway
process through Redis pub/sub.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets
from gql import Client, GraphQLRequest
from gql.transport.exceptions import TransportQueryError
from gql.transport.websockets import WebsocketsTransport
from redis.asyncio.cluster import RedisCluster

from gateway import rest
from tests.harness import gateway, reads_limited, until
from tests.test_durability import held_krea, start_worker, stop, submit

SUBSCRIBE = "subscription($id: ID!) { jobUpdates(id: $id) { id status metadata url } }"


async def subscribe(base: str, key: str, job_id: str) -> list[dict[str, Any]]:
    """Run one subscription to its end with the `gql` client over graphql-transport-ws;
    the results, or the error."""
    transport = WebsocketsTransport(
        url=base.replace("http://", "ws://") + "/graphql",
        init_payload={"Authorization": f"Bearer {key}"},
        subprotocols=[WebsocketsTransport.GRAPHQLWS_SUBPROTOCOL],
    )
    out: list[dict[str, Any]] = []
    request = GraphQLRequest(SUBSCRIBE, variable_values={"id": job_id})
    try:
        async with Client(transport=transport) as session:
            async for result in session.subscribe(request):
                out.append({"data": result})
    except TransportQueryError as exc:
        out.append({"errors": exc.errors})
    return out


async def test_subscription_and_sse_see_every_status_of_a_job_run_in_another_process(
    redis_url: str, storage_dir: Path
) -> None:
    async with held_krea(redis_url, storage_dir) as (emu, krea, gw):
        key, other = await gw.key(), await gw.key()
        [job_id] = await submit(gw, key, 1)
        worker = start_worker(redis_url, krea, storage_dir)
        try:
            sub = asyncio.create_task(subscribe(gw.base, key, job_id))
            sse_events: list[dict[str, Any]] = []

            async def read_sse() -> None:
                async with gw.http.stream(
                    "GET", f"/v1/jobs/{job_id}/events", headers={"X-API-Key": key}
                ) as r:
                    assert r.status_code == 200
                    assert r.headers["content-type"].startswith("text/event-stream")
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            sse_events.append(json.loads(line[6:]))

            sse = asyncio.create_task(read_sse())
            # Let the upstream job walk its lifecycle, then finish.
            while not any(j.polls >= 3 for j in emu.jobs.values()):
                await asyncio.sleep(0.02)
            emu.steps_to_complete = 6
            updates = await asyncio.wait_for(sub, 60)
            await asyncio.wait_for(sse, 60)
        finally:
            stop(worker)

        statuses = [u["data"]["jobUpdates"]["status"] for u in updates]
        assert statuses[0] in ("queued", "processing")
        assert "processing" in statuses
        assert statuses[-1] == "completed"
        assert updates[-1]["data"]["jobUpdates"]["url"]
        upstream = [u["data"]["jobUpdates"]["metadata"] or {} for u in updates]
        assert any(m.get("upstreamStatus") for m in upstream)  # Krea's own progress

        sse_statuses = [e["status"] for e in sse_events]
        assert sse_statuses[-1] == "completed" and "processing" in sse_statuses

        # Only the owner may follow a job.
        refused = await subscribe(gw.base, other, job_id)
        assert refused[0]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        r = await gw.http.get(f"/v1/jobs/{job_id}/events", headers={"X-API-Key": other})
        assert r.status_code == 404
        assert "x-ratelimit-remaining" in r.headers  # its key is good: its limits, as ever


async def refused_at_init(base: str, credential: str) -> tuple[int, str]:
    """The close code and reason of a graphql-transport-ws connection whose
    `connection_init` carries `credential`, which must be refused."""
    url = base.replace("http://", "ws://") + "/graphql"
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {credential}"}}
        await ws.send(json.dumps(init))
        try:
            await ws.recv()
            raise AssertionError("connection was not closed")
        except websockets.ConnectionClosed as closed:
            assert closed.rcvd is not None
            return closed.rcvd.code, closed.rcvd.reason


async def test_subscription_with_a_bad_key_is_refused_at_connection(
    redis_url: str, storage_dir: Path
) -> None:
    """Refused with the protocol's 4403, and the reason says why: the close is all a
    page's graphql-ws client learns of it."""
    async with gateway(redis_url, storage_dir) as gw:
        code, reason = await refused_at_init(gw.base, "gk_x_y")
        assert code == 4403 and reason.startswith("UNAUTHENTICATED: "), (code, reason)


async def test_a_connection_refused_for_a_while_is_told_to_try_again_later(
    redis_url: str, storage_dir: Path
) -> None:
    """Over its read limit, a key's connection is refused with 1013 (Try Again Later),
    which a client retries, and the reason names the limit's code and when to retry
    (where a bad key's is 4403, above: not a matter of waiting)."""
    async with reads_limited(redis_url, storage_dir, 2) as gw:
        key = await gw.key("free", credits=100)
        for _ in range(2):
            assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200
        code, reason = await refused_at_init(gw.base, key)
        assert code == 1013 and reason.startswith("RATE_LIMITED: "), (code, reason)
        assert reason.count("retry after") == 1 and len(reason.encode()) <= 123


async def test_a_hundred_streams_hold_one_redis_connection(
    redis_url: str, storage_dir: Path
) -> None:
    """Open event streams and subscriptions share the process's one pub/sub connection:
    a caller opening streams by the hundred cannot take the connections every other
    request needs. Each still sees the job's every change."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        made = await gw.generate(key, "x", provider="local", width=512, height=512)
        job_id = made.json()["data"]["generate"]["id"]
        opened = 0

        async def read_sse() -> list[str]:
            nonlocal opened
            statuses = []
            async with gw.http.stream(
                "GET", f"/v1/jobs/{job_id}/events", headers={"X-API-Key": key}
            ) as r:
                assert r.status_code == 200
                opened += 1
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        statuses.append(json.loads(line[6:])["status"])
            return statuses

        streams = [asyncio.create_task(read_sse()) for _ in range(90)]  # httpx's pool: 100
        subs = [asyncio.create_task(subscribe(gw.base, key, job_id)) for _ in range(5)]

        async def all_open() -> bool:
            return opened == len(streams)

        await until(all_open, timeout=60.0)
        redis = gw.accounts.redis
        if isinstance(redis, RedisCluster):  # each node's own clients
            clients = await redis.client_list("pubsub", target_nodes=RedisCluster.ALL_NODES)
        else:
            clients = await redis.client_list("pubsub")
        assert len(clients) == 1, clients
        r = await gw.gql(
            "mutation($id: ID!) { cancelJob(id: $id) { status } }", {"id": job_id}, key
        )
        assert r.json()["data"]["cancelJob"]["status"] == "cancelled"
        for statuses in await asyncio.wait_for(asyncio.gather(*streams), 60):
            assert statuses == ["queued", "cancelled"]
        for updates in await asyncio.wait_for(asyncio.gather(*subs), 60):
            assert [u["data"]["jobUpdates"]["status"] for u in updates] == ["queued", "cancelled"]


async def test_an_event_stream_that_ended_tells_its_eventsource_to_stop(
    redis_url: str, storage_dir: Path
) -> None:
    """Each update carries the job's status as its event id; an EventSource reconnecting
    (as it does after any close) with the ended status it was sent gets 204, which makes
    it stop, instead of the end again every three seconds."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        made = await gw.generate(key, "x", provider="local", width=512, height=512)
        job_id = made.json()["data"]["generate"]["id"]
        await gw.wait(key, job_id)
        auth = {"X-API-Key": key}
        async with gw.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as r:
            lines = [line async for line in r.aiter_lines()]
        assert lines[:2] == ["id: completed", "event: update"], lines
        again = await gw.http.get(
            f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": "completed"}
        )
        assert again.status_code == 204 and again.content == b""
        resumed = await gw.http.get(
            f"/v1/jobs/{job_id}/events", headers={**auth, "Last-Event-ID": "processing"}
        )
        assert resumed.status_code == 200 and "id: completed" in resumed.text


async def test_a_quiet_event_stream_is_kept_alive_then_ends_with_its_job(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job queued for minutes: the stream says nothing new, and a proxy in front
    (nginx closes a connection idle for 60 s) would cut it. A comment every while keeps
    it open; EventSource ignores comments; the update still comes when the job moves."""
    monkeypatch.setattr(rest, "KEEP_ALIVE_SECONDS", 0.2)
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        made = await gw.generate(key, "x", provider="local", width=512, height=512)
        job_id = made.json()["data"]["generate"]["id"]
        auth = {"X-API-Key": key}
        async with gw.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth) as r:
            lines = r.aiter_lines()
            assert await anext(lines) == "id: queued"
            seen = []
            while (line := await asyncio.wait_for(anext(lines), 5)) != ": keep-alive":
                seen.append(line)
            assert seen == ["event: update", seen[1], ""] and seen[1].startswith("data: ")
            cancel = "mutation($id: ID!) { cancelJob(id: $id) { status } }"
            await gw.gql(cancel, {"id": job_id}, key)
            # The cancel reaches the stream (keep-alives alone would go on for ever).
            async with asyncio.timeout(10):
                while await anext(lines) != "id: cancelled":
                    pass
