"""CORS for pages on other origins (docs/api.md#browsers), around the whole app.

Starlette's `CORSMiddleware` answers preflights and adds the CORS headers. Around it:
- only the browser-facing paths get it (`/graphql`, `/v1/`, `/compat/`, `/outputs/`);
- a request without `Origin` (a backend's, not a page's) skips it, but for GETs, whose
  answers a cache may keep and must vary by `Origin`;
- a refused preflight is a JSON error in the path's API shape, not plain text.
A WebSocket upgrade, which CORS does not cover, is checked by Strawberry's view against
the same origins (`allowed_origins`, in `gateway/app.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import Forbidden, GatewayError

PATHS = ("/graphql", "/v1/", "/compat/", "/outputs/")
# Any header a page's client sends (`Prefer: wait`, Apollo Client's
# `apollographql-client-*`, an SDK's own): no credentials mode (no cookies), so allowing
# them opens nothing; the origin and the key or token are what is checked.
ALLOW_HEADERS = ("*",)
# Named to a preflight that lists none in Access-Control-Request-Headers (Starlette's "*"
# echoes only the headers asked for): the gateway's own (docs/api.md#cors).
NAMED_HEADERS = "Authorization, X-API-Key, Content-Type, Idempotency-Key, Prefer"
EXPOSE_HEADERS = (
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "Retry-After",
    "X-Request-Id",
    "X-Gateway-Job-Id",
    "Preference-Applied",
    # OpenAI's SDK reads this to retry or not; Segmind's v1 answer carries the rest
    "X-Should-Retry",
    "X-Cost",
    "X-Remaining-Credits",
    "X-Generation-Time",
    "X-Seed-Value",
    "Content-Location",
)
MAX_AGE = 3600  # seconds a browser may keep a preflight's answer (Chromium keeps <= 2 h)


class CORS:
    def __init__(
        self,
        app: ASGIApp,
        origins: tuple[str, ...],
        refuse: Callable[[str, GatewayError], Response],
    ) -> None:
        """`origins`: allowed origins, ("*",) for any, () for none (the gateway's own
        pages still work: they are not cross-origin). `refuse`: an error as a response
        in the shape of the path's API."""
        self.app = app
        self.refuse = refuse
        self.origins = origins
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=("GET", "POST", "DELETE", "OPTIONS"),
            allow_headers=ALLOW_HEADERS,
            expose_headers=EXPOSE_HEADERS,
            max_age=MAX_AGE,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PATHS):
            origin = None
            for name, value in scope["headers"]:  # a request without Origin is the usual
                if name == b"origin":
                    origin = value
                    break
            if origin is not None and scope["method"] == "OPTIONS":
                headers = Headers(scope=scope)
                if "access-control-request-method" in headers:
                    await self._preflight(scope, receive, send, headers)
                    return
            if self.origins and (origin is not None or scope["method"] == "GET"):
                await self.cors(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _preflight(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers
    ) -> None:
        response = self.cors.preflight_response(request_headers=headers)
        if "access-control-allow-headers" not in response.headers:
            response.headers["Access-Control-Allow-Headers"] = NAMED_HEADERS
        if response.status_code != 200:
            refused = bytes(response.body).decode().removeprefix("Disallowed CORS ")
            error = Forbidden(
                f"CORS preflight refused: this {refused} is not allowed "
                "(the gateway's GATEWAY_CORS_ORIGINS lists the origins it serves)"
            )
            error.headers = {"Vary": response.headers.get("vary", "Origin")}
            response = self.refuse(scope["path"], error)
        await response(scope, receive, send)
