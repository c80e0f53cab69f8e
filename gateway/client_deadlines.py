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
  (the request's handler sees the client gone).

A deadline only runs while the client is the one to act: not while the server has not
read what came (uvicorn pauses reading while it answers an earlier pipelined request),
owes a `100 Continue`, or is still answering; once it is done, the client has the whole
timeout again. The state is read from uvicorn's own after
each read, not kept by overriding the parser's callbacks, which cost every request
measurably (BENCHMARKS.md: "Slow clients"); a request that arrives whole in one read
costs one check. A connection upgraded to a WebSocket is left alone (its own protocol
reads).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Literal

import orjson
import structlog
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway import metrics
from gateway.errors import RequestTimeout

log = structlog.get_logger("gateway")

#: After a 408, how long what the client still sends is read and dropped before the
#: connection closes: closed with unread bytes, the kernel would answer them with a reset
#: that can destroy the 408 before the client reads it (nginx's lingering close).
LINGER_SECONDS = 1.0

Phase = Literal["head", "body"]


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
        self._deadline: asyncio.TimerHandle | None = None
        self._timed: Phase | None = None  # what the deadline is for
        self._of: object = None  # whose (the request's scope; None: the connection's)
        self._since = 0.0  # when that phase began (perf_counter)
        self._owed = False  # the server held it up: a whole timeout once it no longer does
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("head")  # the first request's head, from the connection

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: dropped until the connection closes
        super().data_received(data)
        reading = self._reading()
        if reading is None:
            cycle = self.cycle
            if cycle is not None and not cycle.response_complete:
                if self._deadline is not None:  # the request came whole, as nearly all do:
                    self._disarm()  # the server's turn
            elif self.transport.get_protocol() is not self:
                self._disarm()  # upgraded to a WebSocket: its own protocol reads now
            elif self._deadline is None:  # bytes that begin no request (a stray CR LF):
                self._arm("head")  # as the start of a head, or uvicorn's keep-alive,
                # which any byte cancels, would never close the connection
        elif self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._disarm()  # refused (400), or upgraded with a request still coming
        elif reading != self._timed or self.scope is not self._of:  # a new phase: from now
            self._disarm()
            self._arm(reading)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _reading(self) -> Phase | None:
        """What of a request is still awaited, from uvicorn's own state: a request's scope
        has no method until its head is whole (`on_message_begin`, `on_headers_complete`),
        its cycle wants more body until the parser has read it all (`on_message_complete`;
        a body still coming after an early answer too). None: nothing (or, before a
        connection's first byte, no request yet)."""
        if self.scope is not None and "method" not in self.scope:
            return "head"
        if self.cycle is not None and self.cycle.more_body:
            return "body"
        return None

    def _server_owes(self, phase: Phase | None) -> bool:
        """The server, not the client, is the one to act: it has paused reading (an
        earlier pipelined request is being answered, or a body is read faster than it is
        handled), is still answering an earlier request (`head`), owes a `100 Continue`
        or is sending its answer (`body`). A client that stops reading an answer is not
        timed here."""
        cycle = self.cycle
        if self.flow.read_paused or self.pipeline:
            return True
        if cycle is None:
            return False
        if phase != "body":
            return not cycle.response_complete
        return cycle.waiting_for_100_continue or (
            cycle.response_started and not cycle.response_complete
        )

    def _arm(self, phase: Phase) -> None:
        if phase != self._timed or self.scope is not self._of:
            self._timed, self._of, self._since = phase, self.scope, time.perf_counter()
        self._deadline = self.loop.call_later(self.client_timeout, self._expired)

    def _disarm(self) -> None:
        self._timed, self._owed = None, False
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        phase = self._reading()
        if self._server_owes(phase):  # not the client's delay: looked at again later
            self._owed = True
            self._arm(self._timed or "head")
            return
        if self._owed:  # the server held it up until now: a whole timeout from now
            self._owed = False
            self._arm(self._timed or "head")
            return
        cycle = self.cycle
        if phase is None or (phase == "body" and cycle is not None and cycle.response_complete):
            # Nothing of a request came (or only stray bytes), or what is left of a body
            # already answered (early, say a 413): no one is waiting on it, just closed.
            self.transport.close()
            return
        waited = round(time.perf_counter() - self._since, 3)
        log.info("client too slow", awaited=phase, waited_s=waited)
        if phase == "body":  # its handler, waiting on it, sees the client gone (499)
            self.transport.close()
            return
        if self.count is not None:
            self.count(metrics.UNMATCHED, 408, waited)
        self.transport.write(_too_slow(self.client_timeout))
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._deadline = self.loop.call_later(LINGER_SECONDS, self.transport.close)


def _too_slow(seconds: float) -> bytes:
    refused = RequestTimeout(f"the request's headers did not arrive within {seconds:g} s")
    body = orjson.dumps({"error": {"code": refused.code, "message": refused.message}})
    return (
        b"HTTP/1.1 %d Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (refused.status, len(body), body)
    )
