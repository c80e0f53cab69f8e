"""The playground at `/` and the GraphQL console at `/graphql`, in a real chromium.

A person's path through the page: paste a key, write a prompt, pick a size, generate,
watch the status change live (the graphql-transport-ws subscription), see the image and
find the job in the gallery with its cost and backend. No page loads anything from
another host. `UPDATE_SCREENSHOT=1` also saves the final page as docs/playground.png.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from tests.browser import browser_page
from tests.harness import Harness, gateway

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = {"completed", "failed", "cancelled"}


async def use_key(page: Page, key: str) -> None:
    await page.fill("#key", key)
    await page.click("#key-use")


async def generate(page: Page, prompt: str, size: str) -> None:
    await page.fill("#prompt", prompt)
    await page.select_option("#service", "local")
    await page.select_option("#size", size)
    await page.click("#generate")


async def timeline(page: Page) -> list[list[str]]:
    """The statuses the page showed, each with where it heard of it (mutation, live)."""
    return await page.locator("#timeline li").evaluate_all(
        "items => items.map(li => [li.dataset.status, li.dataset.source])"
    )


async def finished_live(page: Page, width: int, height: int) -> None:
    """The job ended `completed`, told by the subscription, and its image really loaded."""
    status = page.locator("#status")
    await expect(status).to_have_text("completed")
    await expect(status).to_have_attribute("data-source", "live")
    seen = await timeline(page)
    assert seen[0] in (["queued", "mutation"], ["processing", "mutation"]), seen
    assert seen[-1] == ["completed", "live"], seen
    assert all(s not in TERMINAL for s, _ in seen[:-1]), seen
    await expect(page.locator("#result[data-loaded=true]")).to_be_visible()
    natural = await page.eval_on_selector(
        "#result", "img => [img.complete, img.naturalWidth, img.naturalHeight]"
    )
    assert natural == [True, width, height]


def frames_of(frames: list[str], direction: str) -> list[dict[str, Any]]:
    return [json.loads(f[2:]) for f in frames if f.startswith(direction)]


async def test_playground_generates_live_and_lists_the_job(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw, browser_page(locale="en-US") as (page, seen):
        key = await gw.key(plan="pro", credits=5_000, name="demo")
        for prompt in ("a red fox in the snow", "a harbour at dawn"):  # the gallery's past
            made = (await gw.generate(key, prompt, width=768, height=768)).json()
            await gw.wait(key, made["data"]["generate"]["id"])

        balance = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]["credits"]

        await page.goto(gw.base + "/")
        await expect(page.locator("h1")).to_have_text("Generate an image")
        await use_key(page, key)
        await expect(page.locator("#account [data-field=plan]")).to_have_text("pro")
        await expect(page.locator("#account [data-field=credits]")).to_have_text(f"{balance:,}")
        await expect(page.locator("#gallery .job")).to_have_count(2)
        # The key is kept for the tab (sessionStorage), nowhere else.
        stored = await page.evaluate(
            "[sessionStorage.getItem('gateway.playground.key'), localStorage.length]"
        )
        assert stored == [key, 0]

        await generate(page, "a lighthouse at dusk, oil painting", "1024x768")
        await finished_live(page, 1024, 768)

        [job] = (await gw.gql(GALLERY_JOB, key=key)).json()["data"]["jobs"]["nodes"]
        assert job["status"] == "completed" and job["metadata"]["backend"] == "local"
        card = page.locator(f"#gallery .job[data-id='{job['id']}']")
        await expect(card).to_be_visible()
        await expect(card.locator(".cost")).to_have_text(f"{job['creditCost']} credits")
        await expect(card.locator(".backend")).to_have_text("local")
        await expect(card.locator(".prompt")).to_have_text("a lighthouse at dusk, oil painting")
        await expect(page.locator("#gallery .job")).to_have_count(3)
        balance -= job["creditCost"]
        await expect(page.locator("#account [data-field=credits]")).to_have_text(f"{balance:,}")
        await expect(page.locator("#job-meta")).to_contain_text(job["id"])

        # The status came over graphql-transport-ws, the key in connection_init.
        assert seen.websockets == [gw.base.replace("http://", "ws://") + "/graphql"]
        sent, received = frames_of(seen.frames, ">"), frames_of(seen.frames, "<")
        assert sent[0] == {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
        assert sent[1]["type"] == "subscribe"
        assert sent[1]["payload"]["variables"] == {"id": job["id"]}
        assert received[0]["type"] == "connection_ack"
        nexts = [m["payload"]["data"]["jobUpdates"]["status"] for m in received[1:-1]]
        assert nexts[-1] == "completed", received
        assert received[-1]["type"] == "complete"

        assert any(url.startswith(gw.base + "/outputs/") for url in seen.urls)
        assert seen.foreign(gw.base) == [], seen.foreign(gw.base)
        assert seen.errors == []
        await screenshot(page, tmp_path)


GALLERY_JOB = "{ jobs(first: 1) { nodes { id status creditCost metadata } } }"


async def screenshot(page: Page, tmp_path: Path) -> None:
    await page.locator("#gallery .job img").last.scroll_into_view_if_needed()
    await page.evaluate("window.scrollTo(0, 0)")
    await page.wait_for_function(
        "[...document.images].every(img => img.complete && img.naturalWidth > 0)"
    )
    path = tmp_path / "playground.png"
    await page.screenshot(path=path, full_page=True)
    print(f"screenshot: {path}")
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, ROOT / "docs" / "playground.png")


async def test_errors_are_shown_with_their_code(redis_url: str, storage_dir: Path) -> None:
    """A bad key (UNAUTHENTICATED), too few credits, a plan's limit: each says what."""
    async with gateway(redis_url, storage_dir) as gw, browser_page() as (page, seen):
        await page.goto(gw.base + "/")
        await use_key(page, "gk_000000000000_not-a-key-of-this-gateway")
        banner = page.locator("#error")
        await expect(banner).to_be_visible()
        await expect(banner.locator("[data-field=code]")).to_have_text("UNAUTHENTICATED")
        await expect(banner.locator("[data-field=hint]")).to_contain_text("key or token")
        await expect(page.locator("#account")).to_be_hidden()

        await banner.locator("[data-action=dismiss]").click()
        await expect(banner).to_be_hidden()
        await generate(page, "a red fox", "512x512")
        await expect(banner.locator("[data-field=code]")).to_have_text("UNAUTHENTICATED")
        await expect(page.locator("#status")).to_have_text("idle")
        await expect(page.locator("#result")).to_be_hidden()
        assert seen.websockets == []  # nothing to follow

        await use_key(page, await gw.key(plan="pro", credits=5))
        await expect(banner).to_be_hidden()
        await generate(page, "a red fox", "512x512")
        await expect(banner.locator("[data-field=code]")).to_have_text("INSUFFICIENT_CREDITS")
        await expect(banner.locator("[data-field=hint]")).to_have_text(
            "This needs 10 credits; 5 available."
        )

        await use_key(page, await gw.key(plan="pro", rpm=1))
        await generate(page, "a red fox", "512x512")
        await expect(page.locator("#status")).to_have_text("completed")
        await generate(page, "a grey wolf", "512x512")
        await expect(banner.locator("[data-field=code]")).to_have_text("RATE_LIMITED")
        await expect(banner.locator("[data-field=hint]")).to_contain_text("(minute)")
        await expect(banner.locator("[data-field=hint]")).to_contain_text("try again in")
        assert seen.foreign(gw.base) == []


async def test_a_live_connection_refused_says_why(redis_url: str, storage_dir: Path) -> None:
    """The subscription's connection refused at `connection_init` closes with the
    refusal's code and message in its reason (4403, or 1013 for one that passes): the
    page shows them as it shows an error over HTTP, not a bare "refused"."""
    async with gateway(redis_url, storage_dir) as gw, browser_page() as (page, _):
        await page.goto(gw.base + "/")
        url = gw.base.replace("http://", "ws://") + "/graphql"
        # The gateway's own close, as the page's WebSocket receives it.
        closed = await page.evaluate(
            """url => new Promise(done => {
                const ws = new WebSocket(url, "graphql-transport-ws");
                ws.onopen = () => ws.send(JSON.stringify(
                    {type: "connection_init", payload: {Authorization: "Bearer gk_x_y"}}));
                ws.onclose = (event) => {
                    const err = closeError(event, false);
                    done([event.code, err.code, err.message]);
                };
            })""",
            url,
        )
        assert closed[:2] == [4403, "UNAUTHENTICATED"], closed
        assert closed[2] and "refused" not in closed[2], closed
        # One that passes (a limit, the store away), and a server that says nothing.
        said = await page.evaluate(
            """() => [
                closeError({code: 1013, reason: "RATE_LIMITED: over (retry after 5 s)"}, false),
                closeError({code: 4403, reason: "Forbidden"}, false),
            ].map(err => [err.code, err.message])"""
        )
        assert said == [
            ["RATE_LIMITED", "over (retry after 5 s)"],
            ["CONNECTION_REJECTED", "The live connection was refused."],
        ]


async def test_a_client_token_works_like_a_key(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw, browser_page(locale="en-US") as (page, seen):
        key = await gw.key(plan="pro", credits=5_000)
        token = await mint_token(gw, key, max_credits=100)
        await page.goto(gw.base + "/")
        await use_key(page, token)
        await expect(page.locator("#account [data-field=kind]")).to_have_text("Client token")
        await expect(page.locator("#account [data-field=credits]")).to_have_text("100")
        await generate(page, "a paper boat", "512x512")
        await finished_live(page, 512, 512)
        await expect(page.locator("#gallery .job")).to_have_count(1)
        await expect(page.locator("#gallery .job .cost")).to_have_text("10 credits")
        await expect(page.locator("#account [data-field=credits]")).to_have_text("90")
        assert seen.foreign(gw.base) == []
        assert seen.errors == []


async def mint_token(gw: Harness, key: str, max_credits: int) -> str:
    response = await gw.gql(
        "mutation($input: ClientTokenInput!) { createClientToken(input: $input) { token } }",
        {"input": {"maxCredits": max_credits}},
        key,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["createClientToken"]["token"])


async def test_graphql_ide_is_served_from_the_gateway_alone(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw, browser_page() as (page, seen):
        key = await gw.key(plan="starter")
        response = await page.goto(gw.base + "/graphql")
        assert response is not None and response.status == 200
        assert "default-src 'none'" in response.headers["content-security-policy"]
        await expect(page.locator("#view-console")).to_be_visible()
        await expect(page.locator("#view-generate")).to_be_hidden()
        # The schema, read by introspection, is browsable.
        docs = page.locator("#docs")
        await expect(docs).to_contain_text("generateImage")
        await docs.locator("button.type", has_text="Generation").first.click()
        await expect(docs).to_contain_text("creditCost")

        await use_key(page, key)
        await page.select_option("#examples", label="Me: plan, credits, limits")
        await page.click("#run")
        await expect(page.locator("#response")).to_contain_text('"plan": "starter"')
        await expect(page.locator("#run-meta")).to_contain_text("HTTP 200")
        # A subscription goes over the WebSocket though a fragment comes first.
        made = await gw.generate(key, width=512, height=512)
        job_id = made.json()["data"]["generate"]["id"]
        await gw.wait(key, job_id)
        await page.fill(
            "#query",
            "fragment F on Generation { id status }\n"
            "subscription S($id: ID!) { jobUpdates(id: $id) { ...F } }",
        )
        await page.fill("#variables", json.dumps({"id": job_id}))
        await page.click("#run")
        await expect(page.locator("#run-meta")).to_contain_text("complete · 1 result(s)")
        await expect(page.locator("#response")).to_contain_text('"status": "completed"')
        assert seen.foreign(gw.base) == [], seen.foreign(gw.base)
        assert seen.errors == []

    # Clients that ask for JSON still get GraphQL over GET, not the page.
    async with gateway(redis_url, storage_dir) as gw:
        answer = await gw.http.get("/graphql", params={"query": "{ providers { name } }"})
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["data"]["providers"]


async def test_page_and_assets_are_served_with_types_and_caching(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        page = await gw.http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["cache-control"] == "no-cache"
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and f"img-src 'self' data: blob: {gw.base}" in policy
    # Outputs in a bucket: the page may show them where they are served from.
    for extra in (
        {"storage_public_url": "https://cdn.example/outputs"},
        {"s3_endpoint_url": "http://127.0.0.1:9000"},
    ):
        async with gateway(
            redis_url, storage_dir, storage_url="s3://gateway/outputs", **extra
        ) as gw:
            policy = (await gw.http.get("/")).headers["content-security-policy"]
            origin = next(iter(extra.values())).removesuffix("/outputs")
            assert origin in policy.split("img-src ")[1].split(";")[0], policy
    async with gateway(redis_url, storage_dir) as gw:
        assets = {
            "playground.js": "text/javascript; charset=utf-8",
            "playground.css": "text/css; charset=utf-8",
            "favicon.svg": "image/svg+xml",
        }
        for name, media_type in assets.items():
            linked = re.search(rf'"/static/{re.escape(name)}\?v=([0-9a-f]+)"', page.text)
            assert linked, f"{name} is not linked from the page"
            asset = await gw.http.get(f"/static/{name}", params={"v": linked[1]})
            assert asset.status_code == 200
            assert asset.headers["content-type"] == media_type
            assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
            again = await gw.http.get(
                f"/static/{name}", headers={"If-None-Match": asset.headers["etag"]}
            )
            assert again.status_code == 304 and again.headers["cache-control"] == "no-cache"
        missing = await gw.http.get("/static/nope.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
