"""Clients too slow to send their request (Slowloris) do not hold a connection for ever
(gateway/client_deadlines.py); slow but steady ones, kept-alive connections, pipelined
requests and WebSockets are not cut."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import structlog.testing
import websockets

from tests.harness import Harness, gateway, until

TIMEOUT = 0.5  # GATEWAY_CLIENT_TIMEOUT_SECONDS where a client is cut
STEADY = 1.0  # where one must not be: room for a loaded machine
BOUND = 10.0  # how long a test waits for the server to act, at most

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
#: a read of a job that does not exist (404), with the key to put in
READ = b"GET /v1/jobs/0123456789abcdef01234567 HTTP/1.1\r\nHost: gw\r\nX-API-Key: %b\r\n\r\n"


@contextlib.asynccontextmanager
async def connection(gw: Harness) -> AsyncIterator[Connection]:
    url = urlsplit(gw.base)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> None:
    """`data` a byte at a time, `every` seconds apart, until the server stops reading."""
    with contextlib.suppress(OSError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(every)


async def answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer on a kept-alive connection: its head (its body read past)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND)
    (length,) = (
        int(line.partition(b":")[2]) for line in head.lower().split(b"\r\n") if b"length:" in line
    )
    await reader.readexactly(length)
    return head


async def test_a_connection_that_sends_nothing_is_closed(redis_url: str, storage_dir: Path) -> None:
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, _),
    ):
        assert await asyncio.wait_for(reader.read(), BOUND) == b""  # closed, nothing said


async def test_stray_line_ends_do_not_hold_a_connection_either(
    redis_url: str, storage_dir: Path
) -> None:
    """Bytes that begin no request (the parser skips line ends between requests) would
    cancel uvicorn's keep-alive timer and leave nothing to close the connection: on a
    new connection as on a kept-alive one, it is closed all the same."""
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        writer.write(b"\r\n")
        assert await asyncio.wait_for(reader.read(), BOUND) == b""
        key = await gw.key()
        async with connection(gw) as (reader, writer):
            writer.write(READ % key.encode())
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")
            writer.write(b"\n")
            assert await asyncio.wait_for(reader.read(), BOUND) == b""


async def test_headers_trickled_a_byte_at_a_time_are_refused_with_408(
    redis_url: str, storage_dir: Path
) -> None:
    """Each byte comes well within the timeout, but the head never ends: its deadline
    holds from its first byte. The 408 is read whole, though the client is still
    sending (what it sends is read and dropped until the server hangs up)."""
    head = b"POST /v1/text_to_image HTTP/1.1\r\nHost: gw\r\n" + b"X-Slow: a\r\n" * 1000
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        sender = asyncio.create_task(trickle(writer, head, TIMEOUT / 10))
        with structlog.testing.capture_logs() as logged:
            refused = await asyncio.wait_for(reader.read(), BOUND)
        assert refused.startswith(b"HTTP/1.1 408 "), refused
        status, _, body = refused.partition(b"\r\n\r\n")
        assert b"connection: close" in status.lower()
        assert json.loads(body)["error"]["code"] == "REQUEST_TIMEOUT"
        # Its id, as every answer has one, names the server's line about it.
        (rid,) = (
            line.split(b":")[1].strip()
            for line in status.lower().split(b"\r\n")
            if line.startswith(b"x-request-id:")
        )
        said = [e for e in logged if e["event"] == "client too slow"]
        assert [e.get("request_id") for e in said] == [rid.decode()], said
        # While the server lingers on that one (the client still sending), the others
        # are still looked after: a silent connection opened now is closed in its turn.
        async with connection(gw) as (silent, _):
            assert await asyncio.wait_for(silent.read(), BOUND) == b""
        sender.cancel()


async def test_a_body_trickled_past_the_deadline_is_cut_and_admits_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    """The body's bytes come steadily, each within the timeout, but it is not whole
    within the timeout of its head: the connection is closed, no job is made."""
    async with gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw:
        key = await gw.key()
        body = json.dumps({"service": "local", "prompt": "a lighthouse " * 20}).encode()
        head = (
            b"POST /v1/text_to_image HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %b\r\nContent-Length: %d\r\n\r\n" % (key.encode(), len(body))
        )
        async with connection(gw) as (reader, writer):
            writer.write(head)
            sender = asyncio.create_task(trickle(writer, body, TIMEOUT / 10))
            assert await asyncio.wait_for(reader.read(), BOUND) == b""
            assert not sender.done()  # cut before the client was done
            sender.cancel()
        jobs = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
        assert jobs.json()["data"]["jobs"]["nodes"] == []


async def test_slow_but_steady_clients_kept_alive_connections_and_websockets_stay(
    redis_url: str, storage_dir: Path
) -> None:
    """A head sent in pieces, whole within the timeout, is answered; a kept-alive
    connection quiet for longer than the timeout between requests (uvicorn's keep-alive
    governs it) serves the next one; a WebSocket quiet that long stays open."""
    async with gateway(redis_url, storage_dir, client_timeout_seconds=STEADY) as gw:
        key = await gw.key()
        whole = READ % key.encode()
        async with connection(gw) as (reader, writer):
            for piece in (whole[:20], whole[20:40], whole[40:]):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(STEADY / 10)
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")
            await asyncio.sleep(STEADY * 2)  # quiet between requests, longer than the timeout
            writer.write(whole)
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")

        url = gw.base.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
            await ws.send(json.dumps(init))
            assert json.loads(await asyncio.wait_for(ws.recv(), BOUND))["type"] == "connection_ack"
            await asyncio.sleep(STEADY * 2)  # quiet for longer than the timeout
            await ws.send(json.dumps({"type": "ping"}))
            assert json.loads(await asyncio.wait_for(ws.recv(), BOUND))["type"] == "pong"


async def test_a_request_behind_a_slow_answer_is_not_the_clients_delay(
    redis_url: str, storage_dir: Path
) -> None:
    """A client pipelines a request behind one the server answers only after longer than
    the timeout (`Prefer: wait`, a job no worker runs), the second's head cut short, and
    sends the rest once the first answer has come: the server's own delay is not counted
    against it."""
    async with gateway(
        redis_url, storage_dir, client_timeout_seconds=TIMEOUT, inprocess_workers=False
    ) as gw:
        key = await gw.key()
        waits = json.dumps({"service": "local", "prompt": "a lighthouse"}).encode()
        first = (
            b"POST /v1/text_to_image HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"X-API-Key: %b\r\nPrefer: wait=%g\r\nContent-Length: %d\r\n\r\n%b"
            % (key.encode(), TIMEOUT * 4.5, len(waits), waits)
        )
        second = READ % key.encode()
        async with connection(gw) as (reader, writer):
            writer.write(first + second[:25])
            assert (await answer(reader)).startswith(b"HTTP/1.1 202 ")  # after TIMEOUT * 4.5
            writer.write(second[25:])
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")


#: an output bigger than every buffer between the server and a client that reads nothing
#: (on loopback the server's socket grows to 4 MB, the client's to 6 MB): the server's
#: writes come to wait on the client
BIG = 16 * 1024 * 1024


def big_output(storage_dir: Path) -> bytes:
    name = "a" * 24 + ".png"
    (storage_dir / name).write_bytes(b"\0" * BIG)
    return f"GET /outputs/{name} HTTP/1.1\r\nHost: gw\r\n\r\n".encode()


async def drained(reader: asyncio.StreamReader, pause: float = 0.0) -> int:
    """Bytes read until the server closes or drops the connection (at most BIG and a
    head), pausing `pause` seconds after every two megabytes."""
    got = paused_at = 0
    with contextlib.suppress(ConnectionError):
        while got < BIG + 4096:
            chunk = await asyncio.wait_for(reader.read(1 << 20), BOUND)
            if not chunk:
                break
            got += len(chunk)
            if got - paused_at >= 2 << 20:
                paused_at = got
                await asyncio.sleep(pause)
    return got


async def test_a_client_that_stops_reading_an_answer_is_dropped(
    redis_url: str, storage_dir: Path
) -> None:
    """A client asks for a large output and reads none of it: once the server's writes
    have waited on it for the timeout, the connection is dropped with what was unsent (a
    stalled reader held its task, its buffers and its descriptor for ever)."""
    request = big_output(storage_dir)

    async def dropped() -> bool:
        return any(line["event"] == "client not reading" for line in logged)

    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=TIMEOUT) as gw,
        connection(gw) as (reader, writer),
    ):
        with structlog.testing.capture_logs() as logged:
            writer.write(request)
            await until(dropped, timeout=BOUND)  # reading nothing meanwhile
        assert await drained(reader) < BIG  # dropped: the rest never came


async def test_a_client_that_reads_an_answer_slowly_gets_all_of_it(
    redis_url: str, storage_dir: Path
) -> None:
    """Two megabytes at a time, a quarter of the timeout apart: the answer takes longer
    than the timeout to arrive, and arrives whole."""
    request = big_output(storage_dir)
    async with (
        gateway(redis_url, storage_dir, client_timeout_seconds=STEADY) as gw,
        connection(gw) as (reader, writer),
    ):
        writer.write(request)
        started = asyncio.get_running_loop().time()
        assert await drained(reader, pause=STEADY / 4) > BIG
        assert asyncio.get_running_loop().time() - started > STEADY  # it was slow


async def test_a_head_too_large_is_refused_at_once_however_it_comes(
    redis_url: str, storage_dir: Path
) -> None:
    """Neither uvicorn nor httptools bounds a request's headers, and httptools joins
    the pieces of one header's value as they come, copying it all again for each:
    megabytes trickled in held the loop for seconds. A head past 96 KB is refused (413,
    REST's shape) as soon as it is read, its connection closed; a large one within it is
    served, and so is the next request on the same connection."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        async with connection(gw) as (reader, writer):
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\nX-Big: ")
            with contextlib.suppress(OSError):
                for _ in range(800):  # 50 MB in 64 KB pieces, each its own read
                    writer.write(b"a" * 65536)
                    await writer.drain()
                    if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                        break
                    await asyncio.sleep(0.002)
            refused = await asyncio.wait_for(reader.read(), BOUND)
        assert refused.startswith(b"HTTP/1.1 413 "), refused[:200]
        status, _, body = refused.partition(b"\r\n\r\n")
        assert b"connection: close" in status.lower()
        assert json.loads(body)["error"]["code"] == "PAYLOAD_TOO_LARGE"

        big = b"X-Big: " + b"b" * (60 * 1024) + b"\r\n"  # within, sent in pieces too
        request = READ.replace(b"\r\n\r\n", b"\r\n" + big + b"\r\n") % key.encode()
        async with connection(gw) as (reader, writer):
            for piece in (request[i : i + 4096] for i in range(0, len(request), 4096)):
                writer.write(piece)
                await writer.drain()
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")
            writer.write(READ % key.encode())
            assert (await answer(reader)).startswith(b"HTTP/1.1 404 ")
