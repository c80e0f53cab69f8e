"""One connection per process carries the plain data commands: each command is written as
soon as it is issued, the commands of one event-loop turn in one write, and replies are
matched to commands in order (ioredis's model).

redis-py checks a connection out of its pool for every command (or auto-pipelined
batch), reads its reply under a timer and a retry wrapper, and hands the connection back:
on a lone command that costs more CPU than the round trip itself (BENCHMARKS.md, "one
Redis connection per process"). redis-py has no multiplexed mode, hence this module;
it still parses the errors (its own error classes, NOSCRIPT included) and `Multiplexed`
applies its reply callbacks, so a command's reply or error is the one redis-py gives.
Everything else (blocking reads, transactions, pub/sub, SCRIPT LOAD, INFO) still goes
through redis-py's pool.

Failures, as redis-py's pool connections have them (`retry_on_timeout`: one retry, at
once): a lost connection fails every command awaiting a reply on it with ConnectionError,
and each is sent once more on a new connection; a command unanswered for `socket_timeout`,
with nothing at all heard from Redis meanwhile, drops the connection the same way, with
TimeoutError. A command that carries a once-token
(`scripts.py`) is safe to send twice; the others are as safe as they were with redis-py.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Awaitable
from typing import Any, cast

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import ConnectionPool
from redis.client import EMPTY_RESPONSE, NEVER_DECODE
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, InvalidResponse, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.batching import BATCHED

_MORE = object()  # hiredis: no whole reply buffered yet


def pack(*args: Any) -> bytes:
    """A command as RESP, by hiredis's C packer."""
    try:
        return hiredis.pack_command(args)
    except TypeError as exc:  # an argument of a type Redis has no encoding for
        raise DataError(str(exc)) from None


class Link(asyncio.Protocol):
    """One connection to Redis: commands written in order, replies handed back in order."""

    def __init__(self, name: str, timeout: float | None) -> None:
        self.name = name
        self.timeout = timeout or 0.0  # 0: none
        self.loop = asyncio.get_running_loop()
        self.reader = hiredis.Reader(
            encoding="utf-8",
            replyError=BaseParser.parse_error,  # "NOSCRIPT ...": NoScriptError, and so on
            protocolError=InvalidResponse,
            notEnoughData=_MORE,
        )
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []  # written together at the end of this loop turn
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()  # and when sent
        self.timer: asyncio.TimerHandle | None = None  # looks at the oldest command's wait
        self.lost: RedisError | None = None  # set once: the link is then never used again
        self.heard = self.loop.time()  # when Redis last sent anything

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if self.lost is not None:
            raise type(self.lost)(*self.lost.args)
        future = self.loop.create_future()
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing.append(packed)
        now = self.loop.time()
        self.waiting.append((future, now))
        if self.timer is None and self.timeout:
            self.timer = self.loop.call_at(now + self.timeout, self._look)
        return future

    def _flush(self) -> None:
        outgoing, self.outgoing = self.outgoing, []
        if self.lost is None and self.transport is not None:
            self.transport.write(b"".join(outgoing))

    def data_received(self, data: bytes) -> None:
        self.heard = self.loop.time()
        self.reader.feed(data)
        waiting = self.waiting
        while True:
            try:
                reply = self.reader.gets()
            except UnicodeDecodeError as exc:  # a reply read whole but not UTF-8: its own
                reply = exc
            except InvalidResponse as exc:
                self.fail(RedisConnectionError(f"Protocol error from {self.name}: {exc}"))
                return
            if reply is _MORE:
                return
            if isinstance(reply, hiredis.PushNotification):  # none is asked for here
                continue
            if not waiting:
                self.fail(RedisConnectionError(f"A reply nobody asked for from {self.name}"))
                return
            future = waiting.popleft()[0]
            if future.done():  # its caller stopped waiting
                continue
            if isinstance(reply, (RedisError, UnicodeDecodeError)):  # parsed by redis-py
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self.fail(RedisConnectionError(f"Connection to {self.name} lost{reason}"))

    def _look(self) -> None:
        self.timer = None
        if not self.waiting or self.lost is not None:
            return
        # Overdue: the oldest command waited the timeout, and nothing came meanwhile (a
        # long burst still being answered is not a dead connection).
        due = max(self.waiting[0][1], self.heard) + self.timeout
        if due <= self.loop.time():
            self.fail(RedisTimeoutError(f"Timeout reading from {self.name}"))
        else:
            self.timer = self.loop.call_at(due, self._look)

    def fail(self, error: RedisError) -> None:
        """Close the link: every command awaiting a reply fails with its own copy of
        `error`."""
        if self.lost is None:
            self.lost = error
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        waiting, self.waiting = self.waiting, deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(type(error)(*error.args))
        if self.transport is not None:
            self.transport.abort()


class Multiplexer:
    """The link of one client: connected when first needed, replaced when lost."""

    def __init__(self, connection_class: type[Any], connection_kwargs: dict[str, Any]) -> None:
        self.path: str | None = connection_kwargs.get("path")
        self.host = str(connection_kwargs.get("host", "localhost"))
        self.port = int(connection_kwargs.get("port", 6379))
        self.name = self.path or f"{self.host}:{self.port}"
        self.username: str | None = connection_kwargs.get("username")
        self.password: str | None = connection_kwargs.get("password")
        self.db = int(connection_kwargs.get("db") or 0)
        self.client_name: str | None = connection_kwargs.get("client_name")
        # TCP keep-alive as the pool's own connections have it, read off one made (not
        # connected) from the same arguments: redis-py turns it on by default, with its
        # own timings (idle links through a NAT or a load balancer).
        made = connection_class(**connection_kwargs)
        self.keepalive = bool(getattr(made, "socket_keepalive", False))
        self.keepalive_options: dict[int, int | bytes] = dict(
            getattr(made, "socket_keepalive_options", None) or {}
        )
        self.timeout: float | None = connection_kwargs.get("socket_timeout")
        self.connect_timeout: float | None = (
            connection_kwargs.get("socket_connect_timeout") or self.timeout
        )
        self.link: Link | None = None
        self.connecting: asyncio.Task[Link] | None = None
        self.closed = False

    async def execute(self, packed: bytes) -> Any:
        """Send one packed command, once more on a new link if the first was lost."""
        try:
            return await self._send(packed)
        except (RedisConnectionError, RedisTimeoutError):
            return await self._send(packed)

    def _send(self, packed: bytes) -> Awaitable[Any]:
        """The reply's future; on a live link no coroutine of its own (the hot path)."""
        link = self.link
        if link is not None and link.lost is None:
            return link.send(packed)
        return self._send_connected(packed)

    async def _send_connected(self, packed: bytes) -> Any:
        return await (await self._connected()).send(packed)

    async def _connected(self) -> Link:
        """The live link, or one being made: one connection attempt at a time."""
        if self.closed:
            raise RedisConnectionError(f"The client of {self.name} is closed")
        if self.link is not None and self.link.lost is None:
            return self.link
        if self.connecting is None:
            self.connecting = asyncio.get_running_loop().create_task(self._connect())
            self.connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self.connecting)  # a caller cancelled stops no other

    def _connect_done(self, task: asyncio.Task[Link]) -> None:
        self.connecting = None
        if not task.cancelled():
            task.exception()  # read: never logged as unretrieved when nobody waited

    async def _connect(self) -> Link:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path:
                    _, link = await loop.create_unix_connection(
                        lambda: Link(self.name, self.timeout), self.path
                    )
                else:
                    _, link = await loop.create_connection(
                        lambda: Link(self.name, self.timeout), self.host, self.port
                    )
        except TimeoutError:
            raise RedisTimeoutError(f"Timeout connecting to {self.name}") from None
        except OSError as exc:
            raise RedisConnectionError(
                f"Error {exc.errno} connecting to {self.name}. {exc.strerror}."
            ) from None
        if self.keepalive and not self.path and link.transport is not None:
            sock = link.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                for option, value in self.keepalive_options.items():
                    sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except (OSError, TypeError) as exc:  # an option this system does not take
                refused = f"keep-alive options refused for {self.name}: {exc}"
                link.fail(RedisConnectionError(refused))
                raise RedisConnectionError(refused) from None
        # RESP3, as redis-py's own connections speak it: its reply callbacks expect it.
        # The name (`client_name` in the URL) is what CLIENT LIST shows for the link.
        auth = ("AUTH", self.username or "default", self.password) if self.password else ()
        name = ("SETNAME", self.client_name) if self.client_name else ()
        try:
            await link.send(pack("HELLO", 3, *auth, *name))
            if self.db:
                await link.send(pack("SELECT", self.db))
        except ResponseError as exc:  # not a Redis this client can speak to (RESP3)
            refused = f"{self.name} refused the connection: {exc}"
            link.fail(RedisConnectionError(refused))
            raise RedisConnectionError(refused) from None
        except BaseException:
            link.fail(RedisConnectionError(f"Connection to {self.name} closed"))
            raise
        if self.closed:  # closed while connecting
            link.fail(RedisConnectionError(f"The client of {self.name} is closed"))
            raise RedisConnectionError(f"The client of {self.name} is closed")
        self.link = link
        return link

    async def aclose(self) -> None:
        """Close the link; commands awaiting replies fail, and none is sent again. A
        connection being made is let finish (`socket_connect_timeout` at most), then
        closed: cancelling it would cancel every caller waiting on it."""
        self.closed = True
        if self.connecting is not None:
            await asyncio.wait([self.connecting])
        if self.link is not None:
            self.link.fail(RedisConnectionError(f"The client of {self.name} is closed"))
            self.link = None


class Multiplexed(Redis):
    """redis-py's client with the commands of `BATCHED` sent through a `Multiplexer`."""

    multiplexer: Multiplexer

    @classmethod
    def over(cls, pool: ConnectionPool) -> Multiplexed:
        """A client of `pool` (which it owns) whose data commands take one link."""
        client = cast(Multiplexed, cls.from_pool(pool))
        client.multiplexer = Multiplexer(pool.connection_class, pool.connection_kwargs)
        return client

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = args[0]
        if name not in BATCHED or (
            options and (NEVER_DECODE in options or EMPTY_RESPONSE in options)
        ):  # replies undecoded, or an error read as a value: redis-py's own path
            return await super().execute_command(*args, **options)
        reply = await self.multiplexer.execute(pack(*args))
        # As redis-py's `parse_response` reads a reply: its callback (none of those of
        # BATCHED is a coroutine), without the `keys` option of its client-side cache.
        callback = self.response_callbacks.get(name)
        if callback is None:
            return reply
        options.pop("keys", None)
        return callback(reply, **options)

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await self.multiplexer.aclose()
        await super().aclose(close_connection_pool)
