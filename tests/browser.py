"""A real browser for tests: Debian's chromium driven by Playwright's async API.

Playwright's own browser download is not reachable here, so the browser is the
`chromium` that `make chromium` installs; each launch gets a fresh profile (Playwright
makes a temporary user-data dir and removes it on close).

    async with chromium() as browser:              # one browser, several pages or origins
        page = await browser.new_page()
        seen = record_requests(page)                # every URL the page asks for
        await page.goto(base + "/")
        assert not seen.foreign(base)               # nothing from another host

    async with browser_page(base) as (page, seen):  # the same in one step
        ...

`seen.foreign(*origins)` lists the requests (WebSockets included) to any origin but
the ones given; `seen.errors` holds the page's uncaught exceptions and console errors.

A page on another origin than the gateway's (a frontend calling it cross-origin):

    async with site({"/": "<script>…</script>"}) as app_base, chromium() as browser:
        page = await browser.new_page()
        await page.goto(app_base + "/")
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.servers import serve

# Tests wait on conditions (expect, wait_for_*), never sleep: a longer bound than the
# default 5 s costs nothing when they pass and spares a busy 2-core machine a false failure.
expect.set_options(timeout=15_000)

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextlib.asynccontextmanager
async def chromium(**launch: Any) -> AsyncIterator[Browser]:
    """A headless chromium (`launch`: more of Playwright's launch options)."""
    binary = shutil.which("chromium")
    if binary is None:
        raise RuntimeError("chromium is not installed: run `make chromium`")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=binary, args=ARGS, **launch)
        try:
            yield browser
        finally:
            await browser.close()


def origin(url: str) -> str:
    """`scheme://host:port` of a URL, ws(s) counted as http(s) (the same server)."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{parts.hostname}:{port}"


@dataclass
class Requests:
    """What a page (or a whole context) asked for, in order."""

    urls: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    frames: list[str] = field(default_factory=list)  # WebSocket frames, sent `>` and received `<`
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, console errors

    def foreign(self, *allowed: str) -> list[str]:
        """Every request whose origin is none of `allowed` (data: and about: are local)."""
        mine = {origin(url) for url in allowed}
        return [
            url
            for url in [*self.urls, *self.websockets]
            if urlsplit(url).scheme not in ("data", "about", "blob") and origin(url) not in mine
        ]


def record_requests(target: Page | BrowserContext) -> Requests:
    """Start recording every request a page (or every page of a context) makes."""
    seen = Requests()
    target.on("request", lambda request: seen.urls.append(request.url))

    def on_page(page: Page) -> None:
        def on_websocket(ws: Any) -> None:
            seen.websockets.append(ws.url)
            ws.on("framesent", lambda payload: seen.frames.append(f"> {payload}"))
            ws.on("framereceived", lambda payload: seen.frames.append(f"< {payload}"))

        page.on("websocket", on_websocket)
        page.on("pageerror", lambda exc: seen.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: seen.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )

    if isinstance(target, Page):
        on_page(target)
    else:
        for page in target.pages:
            on_page(page)
        target.on("page", on_page)
    return seen


@contextlib.asynccontextmanager
async def browser_page(
    *, viewport: tuple[int, int] = (1280, 900), **context: Any
) -> AsyncIterator[tuple[Page, Requests]]:
    """A page in a fresh browser context, and the record of its requests.
    `context`: Playwright's new_context options (locale, color_scheme, extra_http_headers, …)."""
    async with chromium() as browser:
        ctx = await browser.new_context(
            viewport={"width": viewport[0], "height": viewport[1]}, **context
        )
        seen = record_requests(ctx)
        page = await ctx.new_page()
        try:
            yield page, seen
        finally:
            await ctx.close()


@contextlib.asynccontextmanager
async def site(pages: dict[str, str]) -> AsyncIterator[str]:
    """Serve `pages` (path: HTML) on a loopback port of its own, an origin other than the
    gateway's; its base URL."""

    def page(html: str) -> Any:
        async def endpoint(request: Request) -> HTMLResponse:
            return HTMLResponse(html)

        return endpoint

    app = Starlette(routes=[Route(path, page(html)) for path, html in pages.items()])
    async with serve(app) as base:
        yield base
