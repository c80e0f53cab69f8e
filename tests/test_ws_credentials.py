"""A credential lapses while its connection lasts: a WebSocket or an event stream opened
with a key or a client token reads nothing more once it is revoked or expired."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import websockets

from tests.harness import Harness, gateway
from tests.test_client_tokens import CANCEL, REVOKE, mint
from tests.test_live_updates import SUBSCRIBE

ME_QUERY = "{ me { plan } }"
JOB_QUERY = "query($id: ID!) { job(id: $id) { id status } }"


class Socket:
    """A raw GraphQL WebSocket in either protocol Strawberry speaks: `graphql-transport-ws`
    (graphql-ws, Apollo Client's) or the older `graphql-ws` (subscriptions-transport-ws)."""

    def __init__(self, ws: websockets.ClientConnection, protocol: str) -> None:
        self.ws, self.protocol, self.ids = ws, protocol, 0

    @classmethod
    async def open(cls, base: str, credential: str, protocol: str) -> Socket:
        url = base.replace("http://", "ws://") + "/graphql"
        ws = await websockets.connect(url, subprotocols=[protocol])  # type: ignore[list-item]
        await ws.send(
            json.dumps(
                {"type": "connection_init", "payload": {"Authorization": f"Bearer {credential}"}}
            )
        )
        while (await ws_message(ws))["type"] != "connection_ack":
            pass
        return cls(ws, protocol)

    async def start(self, query: str, variables: dict[str, Any] | None = None) -> str:
        self.ids += 1
        kind = "subscribe" if self.protocol == "graphql-transport-ws" else "start"
        payload = {"query": query, "variables": variables or {}}
        await self.ws.send(json.dumps({"id": str(self.ids), "type": kind, "payload": payload}))
        return str(self.ids)

    async def stop(self, op: str) -> None:
        kind = "complete" if self.protocol == "graphql-transport-ws" else "stop"
        await self.ws.send(json.dumps({"id": op, "type": kind}))

    async def next_result(self, op: str) -> dict[str, Any] | None:
        """The operation's next result (data or errors), None once it has completed."""
        while True:
            message = await ws_message(self.ws)
            if message.get("id") != op:
                continue
            if message["type"] in ("next", "data"):
                return dict(message["payload"])
            if message["type"] == "error":  # before execution: a list, or one (graphql-ws)
                payload = message["payload"]
                return {"errors": payload if isinstance(payload, list) else [payload]}
            return None

    async def first(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The first result of an operation (a query's only one), which is then stopped."""
        op = await self.start(query, variables)
        result = await self.next_result(op)
        assert result is not None, "completed without a result"
        await self.stop(op)
        return result


async def reads(socket: Socket, job_id: str) -> list[dict[str, Any]]:
    """A subscription's first update, and (where the protocol runs queries) `me` and `job`."""
    out = [await socket.first(SUBSCRIBE, {"id": job_id})]
    if socket.protocol == "graphql-transport-ws":
        out += [await socket.first(ME_QUERY), await socket.first(JOB_QUERY, {"id": job_id})]
    return out


async def ws_message(ws: websockets.ClientConnection) -> dict[str, Any]:
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
        if message["type"] not in ("ka", "ping", "pong"):
            return message


def error_code(result: dict[str, Any]) -> str:
    errors = result.get("errors") or []
    return str(errors[0]["extensions"]["code"]) if errors else "none"


async def test_each_operation_on_an_open_websocket_checks_its_credential_again(
    redis_url: str, storage_dir: Path
) -> None:
    """A key revoked, or a client token revoked or expired, after a page opened its
    WebSocket reads nothing more over it: every operation checks the credential again,
    in both protocols (the older one runs subscriptions only)."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        for protocol in ("graphql-transport-ws", "graphql-ws"):
            key = await gw.key()
            token, expiring = await mint(gw, key), await mint(gw, key, ttlSeconds=60)
            credentials = (key, token, expiring)
            jobs = {c: await generate_local(gw, c) for c in credentials}
            sockets = {c: await Socket.open(gw.base, c, protocol) for c in credentials}

            for credential in credentials:
                for result in await reads(sockets[credential], jobs[credential]):
                    assert "errors" not in result, result

            revoked = await gw.gql(REVOKE, {"t": token}, key)
            assert revoked.json()["data"]["revokeClientToken"] is True
            gw.clock.advance(61)
            for credential in (token, expiring):
                refused = [
                    error_code(r) for r in await reads(sockets[credential], jobs[credential])
                ]
                assert set(refused) == {"UNAUTHENTICATED"}, (protocol, refused)
            assert all("errors" not in r for r in await reads(sockets[key], jobs[key]))

            await gw.accounts.revoke(gw.keys[key]["id"])
            refused = [error_code(r) for r in await reads(sockets[key], jobs[key])]
            assert set(refused) == {"UNAUTHENTICATED"}, (protocol, refused)
            for socket in sockets.values():
                await socket.ws.close()


async def test_a_followed_job_stops_at_its_next_update_once_the_credential_is_revoked(
    redis_url: str, storage_dir: Path
) -> None:
    """A subscription (WebSocket) or an event stream (SSE) opened with a client token
    that is then revoked ends at its next update with UNAUTHENTICATED, instead of going
    on showing the job."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        token = await mint(gw, key)
        job_id = await generate_local(gw, token)
        socket = await Socket.open(gw.base, token, "graphql-transport-ws")
        op = await socket.start(SUBSCRIBE, {"id": job_id})
        first = await ws_message(socket.ws)
        assert first["payload"]["data"]["jobUpdates"]["status"] == "queued"
        sse_lines: list[str] = []
        async with gw.http.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"X-API-Key": token}
        ) as stream:
            lines = stream.aiter_lines()
            while not (line := await anext(lines)).startswith("data: "):
                pass
            assert json.loads(line[6:])["status"] == "queued"

            assert (await gw.gql(REVOKE, {"t": token}, key)).json()["data"]["revokeClientToken"]
            cancelled = await gw.gql(CANCEL, {"id": job_id}, key)  # an update to send
            assert cancelled.json()["data"]["cancelJob"]["status"] == "cancelled"

            refused = await socket.next_result(op)
            assert refused is not None and error_code(refused) == "UNAUTHENTICATED", refused
            assert await socket.next_result(op) is None  # and nothing after it
            async for line in lines:
                sse_lines.append(line)
        assert "event: error" in sse_lines, sse_lines
        [data] = [json.loads(line[6:]) for line in sse_lines if line.startswith("data: ")]
        assert data["error"]["code"] == "UNAUTHENTICATED"
        await socket.ws.close()


async def generate_local(gw: Harness, credential: str) -> str:
    """A job that stays queued (no worker runs), made with `credential`."""
    r = await gw.generate(credential, "a lighthouse", provider="local", width=512, height=512)
    assert r.status_code == 200, r.text
    return str(r.json()["data"]["generate"]["id"])
