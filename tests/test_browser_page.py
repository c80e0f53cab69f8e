"""A page of another site calls the gateway itself, in a real browser (Chromium).

The site (another loopback port: another origin) serves `tests/pages/cross_origin.html`
and, as its backend, mints a client token with its API key; the page only ever holds
the token. It sends `generateImage` with `fetch`, follows `jobUpdates` over a WebSocket
and shows the image. The same page from an origin the gateway does not list fails
visibly, and costs nothing.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from gateway import pricing
from tests.browser import chromium, record_requests
from tests.harness import gateway
from tests.servers import free_port, serve

PAGE = Path(__file__).parent / "pages" / "cross_origin.html"
STATUS = "document.getElementById('status').textContent"
ERROR = "document.getElementById('error').textContent"


async def test_a_page_on_another_origin_generates_follows_and_shows_the_image(
    redis_url: str, storage_dir: Path
) -> None:
    site_port, stranger_port = free_port(), free_port()
    site = f"http://127.0.0.1:{site_port}"
    async with gateway(redis_url, storage_dir, cors_origins=site) as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        minted: list[str] = []

        async def token(request: Request) -> Response:
            """The site's backend: it holds the key and hands the page a token."""
            r = await gw.http.post(
                "/v1/client_tokens",
                json={"maxCredits": 50, "ttlSeconds": 300, "origins": [site]},
                headers={"X-API-Key": key},
            )
            assert r.status_code == 201, r.text
            minted.append(r.json()["token"])
            return PlainTextResponse(minted[-1])

        async def page(request: Request) -> Response:
            return FileResponse(PAGE)

        app = Starlette(routes=[Route("/", page), Route("/token", token)])
        query = f"?gateway={gw.base}&width=768&height=512"
        async with (
            serve(app, port=site_port),
            serve(app, port=stranger_port) as stranger,
            chromium() as browser,
        ):
            context = await browser.new_context()
            seen = record_requests(context)
            tab = await context.new_page()
            await tab.goto(f"{site}/{query}")
            await tab.wait_for_function(
                f"{STATUS} === 'completed' || {ERROR} !== ''", timeout=30_000
            )
            assert await tab.evaluate(ERROR) == "", seen.errors
            assert await tab.evaluate(STATUS) == "completed"
            size = await tab.evaluate(
                "[document.getElementById('image').naturalWidth,"
                " document.getElementById('image').naturalHeight]"
            )
            assert size == [768, 512]  # the image really loaded, at the size asked
            # The page could read the rate-limit headers (exposed by CORS).
            assert (await tab.evaluate("document.body.dataset.remaining")).isdigit()
            assert "completed" in await tab.evaluate("document.body.dataset.seen")
            assert any(url.startswith(gw.base.replace("http", "ws")) for url in seen.websockets)
            assert all(key not in frame for frame in seen.frames)  # only the token
            cost = pricing.cost(768, 512, 1)
            assert (await gw.accounts.get(account)).credits == 1000 - cost

            # The same page from an origin the gateway does not list.
            refused = await context.new_page()
            await refused.goto(f"{stranger}/{query}")
            await refused.wait_for_function(f"{ERROR} !== ''", timeout=30_000)
            assert "Failed to fetch" in await refused.evaluate(ERROR)
            assert await refused.evaluate(STATUS) == "starting"
            assert (await gw.accounts.get(account)).credits == 1000 - cost
            await context.close()
        assert len(minted) == 2
