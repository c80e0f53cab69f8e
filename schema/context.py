"""The per-request context: the gateway, and the caller, authenticated once, lazily.

Over a WebSocket the context is the connection's, and a connection outlives what its
credential may: a key revoked, a client token revoked or expired. There the caller is
looked up once per operation instead (`OPERATION`, set by the view's WebSocket
handlers), so every query, mutation and subscription started on an open connection
checks the credential again.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket

from gateway.auth import Principal, api_key_from
from gateway.errors import Forbidden, GatewayError, Unauthenticated
from gateway.jobs.model import Job
from gateway.origins import page_origin
from gateway.service import Gateway


class Lookup:
    """One request's or operation's key check (and the job read with it, when a poll made
    it first), shared by the fields that resolve concurrently."""

    __slots__ = ("auth",)

    def __init__(self) -> None:
        self.auth: asyncio.Future[tuple[Principal, Job | None]] | None = None


#: the lookup of the WebSocket operation running (None outside one: a new one each time)
OPERATION: ContextVar[Lookup | None] = ContextVar("graphql_operation", default=None)


def _shared(
    check: Coroutine[Any, Any, tuple[Principal, Job | None]],
) -> asyncio.Future[tuple[Principal, Job | None]]:
    """The lookup as a task the fields await through `asyncio.shield`. Its refusal is
    marked seen here: when every field awaiting it was cancelled first (another field's
    error ended the execution), `shield` lets go of the task, and asyncio logged the
    refusal as a "Task exception was never retrieved" traceback."""
    task = asyncio.ensure_future(check)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())
    return task


@dataclass
class Context:
    gateway: Gateway
    request: Request | WebSocket
    response: Response | WebSocket | None
    connection_params: dict[str, Any] | None = None
    principal: Principal | None = field(default=None)
    rate_headers: dict[str, str] = field(default_factory=dict)
    refusal: GatewayError | None = None  # why a WebSocket's connection_init was refused
    _request_lookup: Lookup = field(default_factory=Lookup)  # over HTTP: the request's
    _key_of: tuple[dict[str, Any] | None, str | None] | None = None  # (params, their key)

    def api_key(self) -> str | None:
        """The key or token of the request, or of the WebSocket's `connection_init`: read
        once per connection (its params may be large; each operation asks again)."""
        params = self.connection_params
        if self._key_of is None or self._key_of[0] is not params:
            self._key_of = (params, api_key_from(self.request.headers, params))
        return self._key_of[1]

    def origin(self) -> str:
        """The page's origin (a browser sends it, on the WebSocket upgrade too)."""
        return page_origin(self.request.headers)

    async def caller(self, *, read: bool = False) -> Principal:
        """The authenticated caller (one Redis round trip, once per request or operation)."""
        lookup = self._lookup()
        if lookup.auth is None:  # fields resolve concurrently: share one lookup
            lookup.auth = _shared(self._check(read, ""))
        # Shielded: a field cancelled while it waits (another's error can end the
        # request's execution) must not cancel the lookup the others share.
        principal, _ = await asyncio.shield(lookup.auth)
        return principal

    async def job(self, job_id: str) -> Job | None:
        """The caller's job `job_id`: read with the key check in one round trip when it is
        the request's first lookup (`Gateway.poll`, a polling client's whole request)."""
        lookup = self._lookup()
        first = lookup.auth is None
        if lookup.auth is None:
            lookup.auth = _shared(self._check(True, job_id))
        principal, job = await asyncio.shield(lookup.auth)
        return job if first else await self.gateway.job(principal, job_id)

    def _lookup(self) -> Lookup:
        if isinstance(self.request, WebSocket):
            return OPERATION.get() or Lookup()
        return self._request_lookup

    async def _check(self, read: bool, job_id: str) -> tuple[Principal, Job | None]:
        """The key check, and with `job_id` the job read in the same call."""
        key, origin = self.api_key(), self.origin()
        try:
            if job_id:
                principal, job = await self.gateway.poll(key, job_id, origin)
            else:
                job = None
                principal = await self.gateway.authenticate(key, read=read, origin=origin)
        except GatewayError as exc:
            self.add_headers(exc.headers)
            raise
        self.set_principal(principal)
        return principal, job

    def set_principal(self, principal: Principal) -> None:
        self.principal = principal
        self.rate_headers = principal.rate_headers()
        self.add_headers(self.rate_headers)

    def add_headers(self, headers: dict[str, str]) -> None:
        if isinstance(self.response, Response):
            for name, value in headers.items():
                self.response.headers[name] = value

    def require_admin(self) -> None:
        token = self.gateway.settings.admin_token
        if token is None:
            raise Forbidden("the admin API is off (GATEWAY_ADMIN_TOKEN is not set)")
        given = self.api_key()
        if not given:
            raise Unauthenticated("Missing admin token")
        if not hmac.compare_digest(given.encode(), token.get_secret_value().encode()):
            raise Forbidden("not an admin token")
