"""uvicorn's HTTP protocol (httptools) with deadlines for a client sending its request.

uvicorn times out only a keep-alive connection idle between requests, and any byte
cancels that timeout: a client that opens a connection and sends nothing, sends its
headers a byte at a time, or its body a byte at a time, holds the connection, a file
descriptor and (for the body) a task for ever. A few thousand such clients (Slowloris)
take a server down without completing a request. Here (`GATEWAY_CLIENT_TIMEOUT_SECONDS`,
docs/api.md#slow-clients):

- a request's head (its line and headers) must have arrived whole within the timeout
  of the connection opening, or of the head's first byte on a kept-alive connection,
  however steadily it trickles in; if not, 408 `REQUEST_TIMEOUT` is answered and the
  connection closed (one that sent nothing, or only line ends, is just closed);
- its body likewise, within the timeout of its head: else the connection is closed
  (the request's handler sees the client gone);
- an answer the client stops reading: once the server's writes wait on the client
  (the socket's buffers full) and it has read nothing of what is left for the timeout,
  the connection is dropped (nginx's `send_timeout`); a client that reads, however
  slowly, is not cut.

A deadline only runs while the client is the one to act: not while the server has not
read what came (uvicorn pauses reading while it answers an earlier pipelined request),
owes a `100 Continue`, or is still answering (unless its writes wait on the client);
once it is done, the client has the whole timeout again. The deadlines do nothing per
request: one sweep per server, every quarter of the timeout, reads each connection's
state from uvicorn's own (and its transport's, for what is left to send) and acts on
those that have stayed waiting on their client for the timeout. Overriding the parser's
callbacks to time them cost every request measurably (BENCHMARKS.md: "Slow clients").
A connection upgraded to a WebSocket is uvicorn's no longer (its own protocol reads).

One method is overridden, `data_received`, for the size of a head (two comparisons a
read; BENCHMARKS.md: "a head's size"): httptools refuses a request line past about
64 KB, but neither it nor uvicorn bounds the headers, and httptools joins the pieces of
one header's value as they come, copying all of it again for each: megabytes trickled
in held the loop for seconds, within the deadline. A head still coming after
MAX_HEAD_BYTES more than the read that began it is answered 413 `PAYLOAD_TOO_LARGE` and
closed (aborted, when it is pipelined behind an answer still being sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import sys
import termios
import weakref
from collections.abc import Callable
from typing import Any, Literal

import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway import metrics, rest, telemetry
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout

log = structlog.get_logger("gateway")

#: After a 408, how long what the client still sends is read and dropped before the
#: connection closes: closed with unread bytes, the kernel would answer them with a reset
#: that can destroy the 408 before the client reads it (nginx's lingering close).
LINGER_SECONDS = 1.0

#: The most a request's head (its line and headers) may take: a browser's cookies are a
#: few KB; httptools alone refuses a request line past about 64 KB.
MAX_HEAD_BYTES = 96 * 1024

Waiting = Literal["head", "body"]
#: what a client owes between requests: a head not begun (nothing sent, or stray bytes)
BETWEEN = object()


class ClientDeadlines(HttpToolsProtocol):
    def __init__(
        self,
        *args: Any,
        client_timeout: float,
        count: Callable[[str, int, float], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.client_timeout = client_timeout
        self.count = count  # metrics.HTTP.count, when metrics are on
        # What the client was last seen owing, and since when (the loop's clock): the
        # request's scope is held, not its id, so that a new request is never taken
        # for the last one.
        self._owing: tuple[Waiting | None, object] = (None, None)
        self._since = 0.0
        # While our writes wait on the client: how much was left to send when it last
        # read some of it (None: not looked at since they began to wait), and when.
        self._unsent: int | None = None
        self._unsent_since = 0.0
        self._head_read = 0  # bytes read since the head now coming began (at most)

    def data_received(self, data: bytes) -> None:
        scope = self.scope
        if scope is None or "method" in scope:
            # This read may begin a head (after a body's end, say): parsed whole, one
            # copy; what follows it counts.
            self._head_read = 0
        else:  # a head begun in an earlier read, still coming
            self._head_read += len(data)
            if self._head_read > MAX_HEAD_BYTES and not isinstance(self.parser, _Dropping):
                if self.cycle is not None and not self.cycle.response_complete:
                    # Pipelined behind an answer still being sent: nowhere to answer.
                    self.transport.abort()
                    return
                rid = telemetry.request_id(None)  # as the 408's (`_expired`)
                log.info("request head too large", limit_bytes=MAX_HEAD_BYTES, request_id=rid)
                if self.count is not None:
                    self.count(metrics.UNMATCHED, 413, 0.0)
                self._refuse(_too_large(rid))
                return
        super().data_received(data)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._owing, self._since = ("head", BETWEEN), self.loop.time()  # from the connection
        _Sweep.of(self.server_state, self.loop, self.client_timeout).start()

    def pause_writing(self) -> None:
        # The transport's buffer is full: the client reads slower than we write, or not
        # at all. Called only then, never per request.
        self._unsent = None
        super().pause_writing()

    def _owed(self) -> tuple[Waiting, object] | None:
        """What the client owes now, and of which request (its scope or cycle; BETWEEN:
        none begun), from uvicorn's own state: a request's scope has no method until its
        head is whole (`on_message_begin`, `on_headers_complete`), its cycle wants more
        body until the parser has read it all (`on_message_complete`; a body still coming
        after an early answer too). Between requests, a head when uvicorn's keep-alive
        timer is not running: nothing sent yet on a new connection, or stray bytes (line
        ends the parser skips) that cancelled it. None: the server's turn, or uvicorn's
        keep-alive's."""
        scope, cycle = self.scope, self.cycle
        if scope is not None and "method" not in scope:
            return "head", scope
        if cycle is not None and cycle.more_body:
            return "body", cycle
        if cycle is not None and not cycle.response_complete:
            return None  # being answered
        return None if self.timeout_keep_alive_task is not None else ("head", BETWEEN)

    def _server_owes(self, awaited: Waiting) -> bool:
        """The server, not the client, is the one to act: it has paused reading (an
        earlier pipelined request is being answered, or a body is read faster than it is
        handled), is still answering an earlier request (`head`), owes a `100 Continue`
        or is sending its answer (`body`). (A client that stops reading that answer is
        timed apart: `check`.)"""
        cycle = self.cycle
        if self.flow.read_paused or self.pipeline:
            return True
        if cycle is None:
            return False
        if awaited == "head":
            return not cycle.response_complete
        return cycle.waiting_for_100_continue or (
            cycle.response_started and not cycle.response_complete
        )

    def check(self, now: float) -> None:
        """The sweep's look at this connection: closed when its client has owed the same
        part of a request, or a read of our answer, for the timeout."""
        transport = self.transport
        if transport.get_protocol() is not self:  # a WebSocket's now
            return
        if self.flow.write_paused:
            # Our writes wait on the client: it owes a read, even once the connection
            # is closing (what is left must still be sent before it closes).
            unsent = _left_to_send(transport)
            if unsent != self._unsent:  # it read some since the last look (or the first)
                self._unsent, self._unsent_since = unsent, now
            elif now - self._unsent_since >= self.client_timeout:
                log.info("client not reading", waited_s=round(now - self._unsent_since, 3))
                transport.abort()  # what it has not read is dropped with it
            return
        if transport.is_closing() or isinstance(self.parser, _Dropping):
            return  # closing; or refused already, lingering until closed
        owing = self._owed()
        if owing is None or self._server_owes(owing[0]):
            self._owing = (None, None)  # the whole timeout again once it is the client's
            return
        if owing[0] != self._owing[0] or owing[1] is not self._owing[1]:
            # A new connection's first head counts from the connection, as does the
            # head that follows stray bytes from those.
            if not (owing[0] == "head" and self._owing == ("head", BETWEEN)):
                self._since = now
            self._owing = owing
            return
        if now - self._since >= self.client_timeout:
            self._expired(*owing, waited=now - self._since)

    def _expired(self, awaited: Waiting, whose: object, *, waited: float) -> None:
        if whose is BETWEEN or (awaited == "body" and self.cycle.response_complete):
            # Nothing of a request came (or only stray bytes), or what is left of a body
            # already answered (early, say a 413): nobody waits on it, just closed.
            self.transport.close()
            return
        if awaited == "body":  # its handler, waiting on it, sees the client gone (499)
            log.info("client too slow", awaited=awaited, waited_s=round(waited, 3))
            self.transport.close()
            return
        # No head was read, so none of the client's: an id of its own, in the answer and
        # on the line that says why, as every answer has (gateway/telemetry_http.py).
        rid = telemetry.request_id(None)
        log.info("client too slow", awaited=awaited, waited_s=round(waited, 3), request_id=rid)
        if self.count is not None:
            self.count(metrics.UNMATCHED, 408, waited)
        self._refuse(_too_slow(self.client_timeout, rid))

    def _refuse(self, answer: bytes) -> None:
        """Answer a request whose head was not read, and close: what the client still
        sends is read and dropped meanwhile."""
        self.transport.write(answer)
        # uvicorn feeds what comes next to the parser: dropped.
        self.parser = _Dropping()  # type: ignore[assignment]
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _left_to_send(transport: asyncio.Transport) -> int:
    """Bytes of our answers the client has not taken: in the transport's buffer, and in
    the socket's send queue (SIOCOUTQ, Linux's), which shrinks with every byte the
    client reads (the transport's buffer only moves once the queue has room for a
    large part of it)."""
    size = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):  # no such ioctl here
            queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
            size += int.from_bytes(queued, sys.byteorder, signed=True)
    return size


class _Dropping:
    """Stands in for the parser once a 408 is sent: uvicorn's `data_received` feeds it."""

    def feed_data(self, data: bytes) -> None:
        pass


class _Sweep:
    """One per server: looks at its connections every quarter of the timeout, and stops
    when it has none (the next connection starts it again)."""

    _of: weakref.WeakKeyDictionary[ServerState, _Sweep] = weakref.WeakKeyDictionary()

    @classmethod
    def of(cls, state: ServerState, loop: asyncio.AbstractEventLoop, timeout: float) -> _Sweep:
        sweep = cls._of.get(state)
        if sweep is None:
            sweep = cls._of[state] = cls(state, loop, timeout)
        return sweep

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.connections = state.connections
        self.loop = loop
        self.every = timeout / 4
        # Whether a look is scheduled; not its handle, which holds `run` and so this
        # sweep: a cycle, garbage once the server is gone that only a full collection
        # frees (a served process collects rarely: `gateway/cli.py:_tune_gc`).
        self.scheduled = False

    def start(self) -> None:
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_later(self.every, self.run)

    def run(self) -> None:
        self.scheduled = False
        now = self.loop.time()
        try:
            for connection in list(self.connections):
                if isinstance(connection, ClientDeadlines):
                    connection.check(now)
        finally:  # whatever one connection raised, the others are still looked at
            if self.connections:
                self.start()


def _too_slow(seconds: float, rid: str) -> bytes:
    refused = RequestTimeout(f"the request's headers did not arrive within {seconds:g} s")
    return _answer(refused, b"408 Request Timeout", rid)


def _too_large(rid: str) -> bytes:
    refused = PayloadTooLarge(f"the request's headers are over {MAX_HEAD_BYTES // 1024} KB")
    return _answer(refused, b"413 Content Too Large", rid)


def _answer(refused: GatewayError, status: bytes, rid: str) -> bytes:
    """REST's error answer (no path was read to pick another API's shape), as bytes."""
    answer = rest.error_response(refused, {"X-Request-Id": rid})
    head = b"".join(b"%s: %s\r\n" % header for header in answer.raw_headers)
    return b"HTTP/1.1 %b\r\n%bconnection: close\r\n\r\n%b" % (status, head, bytes(answer.body))
