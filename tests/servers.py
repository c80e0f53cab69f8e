"""Serve ASGI apps over real loopback HTTP from inside a test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import pytest
import uvicorn

#: a name no real resolver answers: the tests' resolver (`resolving`) does
HOOKS_NAME = "hooks.example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose Redis Cluster bus port (the port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@contextlib.asynccontextmanager
async def serve(app: object, port: int | None = None, **options: Any) -> AsyncIterator[str]:
    """Run `app` with uvicorn on 127.0.0.1; yield its base URL (no trailing slash).
    `options`: uvicorn's, more (the gateway's `server_limits`)."""
    port = port or free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        loop="asyncio",
        # As `gateway serve` does: a request still running at shutdown cannot hold it up
        # forever (uvicorn would otherwise wait for it before the lifespan ends).
        timeout_graceful_shutdown=5,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server stopped before it started")
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def relay(
    requests: Coroutine[Any, Any, None],
    replies: Coroutine[Any, Any, None],
    writers: tuple[asyncio.StreamWriter, ...],
) -> None:
    """Run a proxied connection's two directions until either ends; then close both ends."""
    tasks = [asyncio.create_task(requests), asyncio.create_task(replies)]
    with contextlib.suppress(Exception):
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    for writer in writers:
        writer.close()


class ReplyCutter:
    """A TCP proxy in front of a real server that, when armed, lets the next request
    carrying `marker` through and then cuts the connection instead of relaying the reply:
    the server did the work, the client never hears of it (a reply lost to the network)."""

    def __init__(self, port: int, marker: bytes) -> None:
        self.port, self.marker = port, marker
        self.armed = False
        self.cut = 0
        #: after a cut, connections made for this long are closed at once, unanswered (as
        #: a Redis restarting after it ran the command refuses them)
        self.down_after_cut = 0.0
        self.down_until = 0.0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.down_until:
            client_w.close()
            return
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)
        cutting = asyncio.Event()

        async def requests() -> None:
            while data := await client_r.read(65536):
                if self.armed and self.marker in data:
                    self.armed = False
                    cutting.set()
                server_w.write(data)
                await server_w.drain()

        async def replies() -> None:
            while data := await server_r.read(65536):
                if cutting.is_set():
                    self.cut += 1
                    self.down_until = time.monotonic() + self.down_after_cut
                    break
                client_w.write(data)
                await client_w.drain()

        await relay(requests(), replies(), (client_w, server_w))


def resolving(
    monkeypatch: pytest.MonkeyPatch, answers: list[str], name: str = HOOKS_NAME
) -> list[str]:
    """`name` resolves, on this event loop, to `answers[0]` the first time, then to
    `answers[1]`, and so on (the last one again once they run out): a DNS rebinding.
    An answer may be several addresses, comma-separated, in that order. Returns the
    answers given so far."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    given: list[str] = []

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(host, str) or host.removesuffix(".").lower() != name:
            return await real(host, port, *args, **kwargs)
        answer = answers[min(len(given), len(answers) - 1)]
        given.append(answer)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, port))
            for address in answer.split(",")
        ]

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return given


def hanging(monkeypatch: pytest.MonkeyPatch, suffix: str) -> dict[str, asyncio.Event]:
    """Names ending in `suffix` resolve, on this event loop, only once their event in the
    returned table (made at their first lookup) is set, then to nothing: name servers
    that do not answer until the system resolver gives up. Other names as before (a
    `resolving` already in place included)."""
    loop = asyncio.get_running_loop()
    before = loop.getaddrinfo
    answers: dict[str, asyncio.Event] = {}

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(host, str) or not host.endswith(suffix):
            return await before(host, port, *args, **kwargs)
        await answers.setdefault(host, asyncio.Event()).wait()
        return []

    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return answers


@contextlib.contextmanager
def black_hole(host: str, port: int) -> Iterator[None]:
    """`host:port` takes no connection and refuses none: a connect there hangs until the
    caller gives up, as at a host that is down behind a firewall. (A listening socket
    with no room in its accept queue, once one connection fills it: the kernel drops the
    SYNs of the next ones.)"""
    with socket.socket() as server, socket.socket() as filler:
        server.bind((host, port))
        server.listen(0)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect((host, port))
        _, connected, _ = select.select([], [filler], [], 10)
        assert connected, "the filling connection was not made"
        yield
