"""The WebSocket protocols held to their shape (docs/api.md#subscriptions): a malformed
message closes the connection with a reason instead of dropping it; every error carries
its code; a message is no larger than an HTTP body; a large `connection_init` is read
once, not at each operation; the older protocol must be initialised in time too."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import websockets

import schema.context
from gateway.store import keys
from tests.harness import gateway
from tests.records import change
from tests.test_ws_credentials import Socket, ws_message

PROTOCOLS = ("graphql-transport-ws", "graphql-ws")


def url_of(base: str) -> str:
    return base.replace("http://", "ws://") + "/graphql"


async def closed_with(ws: websockets.ClientConnection) -> tuple[int, str]:
    """The close frame the server sent (code, reason), messages before it skipped."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(ws.recv(), 15)
    frame = closed.value.rcvd
    assert frame is not None, "dropped without a close frame"
    return frame.code, frame.reason


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_malformed_message_closes_the_connection_with_a_reason(
    redis_url: str, storage_dir: Path, protocol: str
) -> None:
    start = "subscribe" if protocol == "graphql-transport-ws" else "start"
    stop = "complete" if protocol == "graphql-transport-ws" else "stop"
    malformed: list[Any] = [
        [],
        "x",
        None,
        1,
        {"id": "1"},  # no type
        {"type": start, "payload": {"query": "{ me { plan } }"}},  # no id
        {"type": start, "id": ["1"], "payload": {"query": "{ me { plan } }"}},
        {"type": start, "id": "1", "payload": "{ me { plan } }"},
        {"type": start, "id": "1", "payload": {"query": 5}},
        {"type": start, "id": "1", "payload": {"query": "{ me { plan } }", "variables": []}},
        {"type": stop, "id": {"a": 1}},
    ]
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        for message in malformed:
            socket = await Socket.open(gw.base, key, protocol)
            await socket.ws.send(json.dumps(message))
            code, reason = await closed_with(socket.ws)
            assert (code, reason.startswith("Invalid message")) == (4400, True), message


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_errors_over_a_websocket_carry_their_codes(
    redis_url: str, storage_dir: Path, protocol: str
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        socket = await Socket.open(gw.base, key, protocol)
        errors = []
        for query in ("{ me { nosuchfield } }", "query A { me { plan } } query B { me { plan } }"):
            op = await socket.start(query)
            while (message := await ws_message(socket.ws)).get("id") != op:
                pass
            payload = message["payload"]
            found = payload if isinstance(payload, list) else payload.get("errors") or [payload]
            errors.extend(found)
        assert errors and all(e["extensions"]["code"] == "BAD_USER_INPUT" for e in errors), errors
        await socket.ws.close()


async def test_a_message_is_no_larger_than_an_http_body(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        socket = await Socket.open(gw.base, key, "graphql-transport-ws")
        prompt = "x" * (gw.settings.max_body_bytes + 1)
        await socket.start("query($p: String) { me { plan } }", {"p": prompt})
        assert (await closed_with(socket.ws))[0] == 1009  # message too big
        # Within it, the same connection's work goes on.
        socket = await Socket.open(gw.base, key, "graphql-transport-ws")
        op = await socket.start("{ me { plan } }")
        assert await socket.next_result(op) == {"data": {"me": {"plan": "pro"}}}


async def test_a_large_connection_init_is_read_once_not_at_each_operation(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[int] = []
    real = schema.context.api_key_from

    def counting(headers: Any, params: dict[str, Any] | None = None) -> str | None:
        read.append(len(params or ()))
        return real(headers, params)

    monkeypatch.setattr(schema.context, "api_key_from", counting)
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        async with websockets.connect(url_of(gw.base), subprotocols=["graphql-transport-ws"]) as ws:
            params = {"Authorization": f"Bearer {key}", **{f"k{i}": i for i in range(3_000)}}
            await ws.send(json.dumps({"type": "connection_init", "payload": params}))
            assert (await ws_message(ws))["type"] == "connection_ack"
            socket = Socket(ws, "graphql-transport-ws")
            for _ in range(20):
                op = await socket.start("{ me { plan } }")
                assert await socket.next_result(op) == {"data": {"me": {"plan": "pro"}}}
    assert read.count(len(params)) == 1, read


async def test_the_older_protocol_closes_a_connection_never_initialised(
    redis_url: str, storage_dir: Path
) -> None:
    """As graphql-transport-ws does (4408), after the same 10 s."""
    async with (
        gateway(redis_url, storage_dir) as gw,
        websockets.connect(url_of(gw.base), subprotocols=["graphql-ws"]) as ws,
    ):
        assert await closed_with(ws) == (4408, "Connection initialisation timeout")


async def test_a_connection_init_with_a_null_payload_is_one_without_a_key(
    redis_url: str, storage_dir: Path
) -> None:
    """The protocol allows `payload: null` (graphql-ws sends it when `connectionParams`
    gives null, a page whose token has not loaded yet): refused for its missing key, with
    the 4403 a client retries, not closed as malformed; a key on the upgrade is enough."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        null_init = json.dumps({"type": "connection_init", "payload": None})
        async with websockets.connect(url_of(gw.base), subprotocols=[PROTOCOLS[0]]) as ws:
            await ws.send(null_init)
            code, reason = await closed_with(ws)
            assert (code, reason.startswith("UNAUTHENTICATED")) == (4403, True), reason
        async with websockets.connect(
            url_of(gw.base),
            subprotocols=[PROTOCOLS[0]],
            additional_headers={"Authorization": f"Bearer {key}"},
        ) as ws:
            await ws.send(null_init)
            assert (await ws_message(ws))["type"] == "connection_ack"


async def test_one_connection_follows_a_hundred_jobs(redis_url: str, storage_dir: Path) -> None:
    """A gallery page follows every job it shows over its one socket (Apollo Client opens
    one): a hundred at once; the next operation is refused while they run, with a code."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False, read_rpm=10_000) as gw:
        key = await gw.key(plan="enterprise")
        body = {"service": "local", "prompt": "x"}
        r = await gw.http.post("/v1/text_to_image", json=body, headers={"X-API-Key": key})
        job_id = r.json()["id"]  # queued: no worker runs it, so no update ends a stream
        socket = await Socket.open(gw.base, key, PROTOCOLS[0])
        query = "subscription($id: ID!) { jobUpdates(id: $id) { status } }"
        ops = {await socket.start(query, {"id": job_id}) for _ in range(100)}
        following: set[str] = set()
        while following != ops:  # each one's first update, in whatever order they come
            message = await ws_message(socket.ws)
            assert message["type"] == "next", message
            assert message["payload"] == {"data": {"jobUpdates": {"status": "queued"}}}
            following.add(message["id"])
        refused = await socket.next_result(await socket.start(query, {"id": job_id}))
        assert refused is not None
        [error] = refused["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT", error
        assert "limit" in error["message"].lower()
        await socket.ws.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_unexpected_error_in_a_subscription_is_masked(
    redis_url: str, storage_dir: Path, protocol: str
) -> None:
    """As over HTTP (test_gateway.py): a subscription's stream failing on a record damaged
    behind the gateway's back says "Unexpected error." with the server's code, not the
    exception's text as the client's own error."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        r = await gw.http.post(
            "/v1/text_to_image",
            json={"service": "local", "prompt": "x"},
            headers={"X-API-Key": key},
        )
        job_id = r.json()["id"]
        await change(gw.accounts.redis, keys.job(gw.keys[key]["id"], job_id), created_at="{")
        socket = await Socket.open(gw.base, key, protocol)
        query = "subscription($id: ID!) { jobUpdates(id: $id) { status } }"
        failed = await socket.next_result(await socket.start(query, {"id": job_id}))
        assert failed is not None
        [error] = failed["errors"]
        assert error["message"] == "Unexpected error."
        assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
        assert "literal" not in json.dumps(failed)
        await socket.ws.close()
