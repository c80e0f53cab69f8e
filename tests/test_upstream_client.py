"""The upstream client (an aiohttp session) against real sockets: which
failure it reports decides whether a submit may be sent again."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections.abc import AsyncIterator

import pytest

from gateway.errors import ProviderRejected, ProviderTimeout, ProviderUnavailable
from gateway.providers import http as http_module
from gateway.providers.http import UpstreamClient, request
from tests.servers import free_port


@contextlib.asynccontextmanager
async def raw_server(
    reply: bytes | None, hold: float = 0.0, gets: bytes | None = None
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server that reads each request, then answers `reply` (None: hangs up);
    a GET gets `gets` instead when set, on a connection kept open."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            seen.append(head)
            if gets is not None and head.startswith(b"GET"):
                writer.write(gets)
                await writer.drain()
                continue
            if hold:
                await asyncio.sleep(hold)
            if reply is not None:
                writer.write(reply)
                await writer.drain()
            break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        server.close()
        await server.wait_closed()


async def test_a_refused_connection_is_unreachable_and_a_submit_may_be_retried() -> None:
    async with UpstreamClient(5.0) as client:
        with pytest.raises(ProviderUnavailable, match="unreachable"):
            await request(
                client,
                "POST",
                f"http://127.0.0.1:{free_port()}/submit",
                upstream="up",
                idempotent=False,
                attempts=2,
            )


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"


@pytest.mark.parametrize("warm", [False, True], ids=["new connection", "kept-alive one"])
async def test_a_connection_cut_after_the_submit_is_never_sent_again(warm: bool) -> None:
    async with raw_server(None, gets=OK) as (base, seen), UpstreamClient(5.0) as client:
        if warm:  # the submit then goes out on a pooled connection
            await request(client, "GET", f"{base}/poll", upstream="up", idempotent=True)
        with pytest.raises(ProviderUnavailable, match="connection failed"):
            await request(
                client,
                "POST",
                f"{base}/submit",
                upstream="up",
                idempotent=False,
                json={"prompt": "x"},
            )
        # The upstream may have taken it: sending it again could pay for it twice.
        assert [h.split(b" ")[0] for h in seen].count(b"POST") == 1


async def test_a_silent_upstream_is_a_timeout() -> None:
    async with (
        raw_server(b"HTTP/1.1 200 OK\r\n\r\n", hold=2.0) as (base, seen),
        UpstreamClient(0.3) as client,
    ):
        with pytest.raises(ProviderTimeout):
            await request(client, "POST", f"{base}/submit", upstream="up", idempotent=False)
        assert len(seen) == 1


async def test_an_answer_is_read_whole() -> None:
    body = b'{"job_id": "j1", "status": "processing"}'
    reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )
    async with raw_server(reply) as (base, _), UpstreamClient(5.0) as client:
        response = await request(client, "GET", f"{base}/jobs/j1", upstream="up", idempotent=True)
        assert response.json() == {"job_id": "j1", "status": "processing"}


def answer(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (
        status,
        len(body),
        body,
    )


@pytest.mark.parametrize("status", [401, 402, 500, 503])
async def test_what_an_upstream_says_of_its_own_failure_stays_out_of_the_error(
    status: int,
) -> None:
    """The error becomes the job's, which its owner reads, and a backend's circuit
    reason, which `providers` shows anyone: an upstream's words about its own trouble
    (our account, its internals) go to the log only."""
    leaked = b'{"message": "INTERNAL-ONLY db_password=hunter2 account 42 over quota"}'
    async with raw_server(answer(status, leaked)) as (base, _), UpstreamClient(5.0) as client:
        with pytest.raises(ProviderUnavailable) as failed:
            await request(client, "POST", f"{base}/x", upstream="up", idempotent=False, attempts=1)
    assert failed.value.message == f"up answered {status}"


async def test_what_an_upstream_says_of_the_users_input_is_the_users() -> None:
    said = b'{"message": "the prompt was flagged by the safety filter"}'
    async with raw_server(answer(400, said)) as (base, _), UpstreamClient(5.0) as client:
        with pytest.raises(ProviderRejected) as refused:
            await request(client, "POST", f"{base}/x", upstream="up", idempotent=False, attempts=1)
    assert refused.value.message == "up answered 400: the prompt was flagged by the safety filter"


@pytest.mark.parametrize("sent", ["length", "chunked", "gzip", "stalls"])
async def test_an_answer_too_large_is_refused_while_it_is_read(
    sent: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host that sends a gigabyte took it all into the worker's memory (every store
    at once: the worker's end). Past the bound, the answer is refused, whether it says
    its length, streams without one, or says a small one and inflates past it; and as
    soon as it is past (`stalls`: a stream that goes just over, then sends nothing more
    on a connection left open, is refused at once, not read to its end, never)."""
    monkeypatch.setattr(http_module, "ANSWER_MAX", 1 << 20)
    body = b"\0" * (3 << 20)
    if sent == "gzip":
        packed = gzip.compress(body)
        reply = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n%b" % (
            len(packed),
            packed,
        )
    elif sent == "chunked":
        chunks = b"".join(
            b"%x\r\n%b\r\n" % (1 << 16, body[i : i + (1 << 16)])
            for i in range(0, len(body), 1 << 16)
        )
        reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    elif sent == "stalls":
        over = body[: (1 << 20) + (1 << 16)]
        reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
            b"%x\r\n%b\r\n" % (1 << 16, over[i : i + (1 << 16)])
            for i in range(0, len(over), 1 << 16)
        )  # no last chunk: the answer never ends
    else:
        reply = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)
    stalls = reply if sent == "stalls" else None  # sent on a connection kept open
    async with (
        raw_server(None if stalls else reply, gets=stalls) as (base, _),
        UpstreamClient(5.0) as client,
    ):
        with pytest.raises(ProviderUnavailable, match="over 1048576"):
            await request(client, "GET", f"{base}/x.png", upstream="up", idempotent=True)
        small = answer(200, b"\0" * (1 << 20))
    async with raw_server(small) as (base, _), UpstreamClient(5.0) as client:
        got = await request(client, "GET", f"{base}/x.png", upstream="up", idempotent=True)
        assert len(got.content) == 1 << 20
