"""uvicorn's HTTP protocol (httptools) with deadlines for a client sending its request.

uvicorn times out only a keep-alive connection idle between requests, and any byte
cancels that timeout: a client that opens a connection and sends nothing, sends its
headers a byte at a time, or stops halfway through its body, holds the connection, a
file descriptor and (for the body) a task for ever. A few thousand such clients
(Slowloris) take a server down without sending a request. Here, as nginx's
`client_header_timeout` and `client_body_timeout` do (`GATEWAY_CLIENT_TIMEOUT_SECONDS`,
docs/api.md#limits):

- a request's head (its line and headers) must have arrived whole within the timeout
  of the connection opening, or of the request's first byte on a kept-alive one; if not,
  408 `REQUEST_TIMEOUT` is answered and the connection closed;
- its body may pause no longer than the timeout between two reads; if it does, the
  connection is closed (the request's handler sees the client gone).

A request that arrives whole in one read (nearly all of them) arms no timer at all. A
connection upgraded to a WebSocket is left alone (its own protocol takes over).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import RequestTimeout


class ClientDeadlines(HttpToolsProtocol):
    def __init__(self, *args: Any, client_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_timeout = client_timeout
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline = self.loop.call_later(self.client_timeout, self._expired)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        reading = self._reading()
        if reading is None:  # the request came whole, as nearly all do
            if self._deadline is not None:
                self._disarm()
        elif self.transport.is_closing() or self.transport.get_protocol() is not self:
            self._disarm()  # refused (400), or upgraded to a WebSocket
        elif reading == "body":  # a body may pause only so long between two reads
            self._disarm()
            self._deadline = self.loop.call_later(self.client_timeout, self._expired)
        elif self._deadline is None:  # a head's deadline holds from its first byte
            self._deadline = self.loop.call_later(self.client_timeout, self._expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _reading(self) -> Literal["head", "body"] | None:
        """What of a request is still awaited, read from uvicorn's own state (overriding
        the parser's callbacks instead cost every request ~2 µs): a request's scope
        has no method until its head is whole (`on_message_begin`, `on_headers_complete`),
        its cycle wants more body until the parser has read it all
        (`on_message_complete`; even once answered: a body still coming after an early
        413 is timed too). None: nothing (or, before any byte, no request yet)."""
        if self.scope is not None and "method" not in self.scope:
            return "head"
        if self.cycle is not None and self.cycle.more_body:
            return "body"
        return None

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._reading() == "head":  # a connection that sent nothing is just closed
            self.transport.write(_too_slow(self.client_timeout))
        self.transport.close()


def _too_slow(seconds: float) -> bytes:
    refused = RequestTimeout(f"the request's headers did not arrive within {seconds:g} s")
    body = orjson.dumps({"error": {"code": refused.code, "message": refused.message}})
    return (
        b"HTTP/1.1 %d Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%b" % (refused.status, len(body), body)
    )
