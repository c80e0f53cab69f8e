"""CORS (docs/api.md#browsers): pages on the configured origins may call the API; the
others' preflights and WebSocket handshakes are refused with a clear answer.

What a browser does with these headers is checked in a real browser in
tests/test_browser_page.py; here, the headers themselves.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import websockets

from tests.harness import gateway

APP = "https://app.example"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type,x-api-key,idempotency-key",
}
RATE_HEADERS = {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}


async def test_a_page_on_an_allowed_origin_may_call_every_browser_route(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, cors_origins=f"{APP}, https://b.example/") as gw:
        key = await gw.key()
        bare = {k: v for k, v in PREFLIGHT.items() if k != "Access-Control-Request-Headers"}
        paths = ("/graphql", "/v1/text_to_image", "/v1/jobs/x", "/v1/client_tokens")
        # Asking for the headers, as browsers do for a JSON POST, or not: either way the
        # answer covers the gateway's own (docs/api.md#cors).
        for path, preflight in itertools.product(paths, (PREFLIGHT, bare)):
            r = await gw.http.options(path, headers=preflight)
            assert r.status_code in (200, 204), (path, r.text)
            assert r.headers["access-control-allow-origin"] == APP
            allowed = {
                h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")
            }
            assert {"authorization", "x-api-key", "content-type", "idempotency-key"} <= allowed
            assert "POST" in r.headers["access-control-allow-methods"]
            assert int(r.headers["access-control-max-age"]) >= 600

        # The answer itself: readable by the page, rate-limit headers exposed to it.
        r = await gw.http.post(
            "/graphql",
            json={"query": "{ me { plan } }"},
            headers={"Origin": "https://b.example", "Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://b.example"
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert RATE_HEADERS | {"retry-after", "x-request-id"} <= exposed
        assert set(r.headers) >= RATE_HEADERS
        assert "origin" in r.headers["vary"].lower()

        made = await gw.generate(key, width=512, height=512)
        job = await gw.wait(key, made.json()["data"]["generate"]["id"])
        r = await gw.http.get(job["url"].removeprefix(gw.base), headers={"Origin": APP})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP


async def test_other_origins_are_refused_clearly(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, cors_origins=APP) as gw:
        key = await gw.key()
        for origin in (
            "https://evil.example",
            "null",
            "https://app.example.evil",
            "x" * 5000,
            "\u00e9".encode(),  # not ASCII
        ):
            headers: dict[str, str | bytes] = {**PREFLIGHT, "Origin": origin}
            r = await gw.http.options("/graphql", headers=headers)
            assert r.status_code == 403, r.text
            assert r.json()["errors"][0]["extensions"]["code"] == "FORBIDDEN"
            r = await gw.http.options("/v1/text_to_image", headers=headers)
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "FORBIDDEN"
            assert "access-control-allow-origin" not in r.headers
            # A simple request is answered (the browser keeps it from the page).
            r = await gw.http.post(
                "/graphql",
                json={"query": "{ me { plan } }"},
                headers={"Origin": origin, "Authorization": f"Bearer {key}"},
            )
            assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # Any header is allowed from an allowed origin (no credentials mode: it opens
        # nothing), never from another one.
        r = await gw.http.options(
            "/graphql",
            headers={
                **PREFLIGHT,
                "Origin": "https://evil.example",
                "Access-Control-Request-Headers": "x-custom",
            },
        )
        assert r.status_code == 403

        url = gw.base.replace("http://", "ws://") + "/graphql"
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                url, subprotocols=["graphql-transport-ws"], origin="https://evil.example"
            ):
                pass
        assert refused.value.response.status_code == 403
        for origin in (APP, None, gw.base):  # allowed, not a browser, the gateway's own page
            async with websockets.connect(
                url, subprotocols=["graphql-transport-ws"], origin=origin
            ) as ws:
                init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
                await ws.send(json.dumps(init))
                assert json.loads(await ws.recv())["type"] == "connection_ack"


async def test_an_origin_configured_with_its_default_port_matches_what_browsers_send(
    redis_url: str, storage_dir: Path
) -> None:
    """Browsers leave out `:443` and `:80` from `Origin`: an origin configured with one
    (in any case, with a slash) is still the page's, for CORS as for WebSockets."""
    async with gateway(redis_url, storage_dir, cors_origins="HTTPS://App.Example:443/") as gw:
        key = await gw.key()
        r = await gw.http.options("/v1/text_to_image", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP
        r = await gw.http.get("/v1/jobs/x", headers={"Origin": APP, "Authorization": key})
        assert r.headers["access-control-allow-origin"] == APP
        url = gw.base.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"], origin=APP) as ws:
            init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
            await ws.send(json.dumps(init))
            assert json.loads(await ws.recv())["type"] == "connection_ack"


def test_a_setting_that_is_not_an_origin_stops_start_up() -> None:
    from pydantic import ValidationError

    from gateway.config import Settings

    for wrong in ("app.example", "https://app.example/path", "ftp://app.example", "*.example"):
        with pytest.raises(ValidationError, match="is not an origin"):
            Settings(cors_origins=f"https://ok.example, {wrong}")


async def test_no_origin_is_allowed_by_default_and_any_in_dev_mode(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        r = await gw.http.options("/graphql", headers=PREFLIGHT)
        assert r.status_code == 403
        assert "GATEWAY_CORS_ORIGINS" in r.json()["errors"][0]["message"]
        r = await gw.http.get("/healthz", headers={"Origin": APP})
        assert "access-control-allow-origin" not in r.headers
    async with gateway(redis_url, storage_dir, dev=True) as gw:
        r = await gw.http.options("/graphql", headers=PREFLIGHT)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"


async def test_what_pages_clients_send_passes_and_even_a_500_is_readable(
    redis_url: str, storage_dir: Path
) -> None:
    """A preflight asking for the headers real clients send (`Prefer: wait`, Apollo
    Client's `apollographql-client-name`) is allowed; an unexpected error's 500 carries
    the CORS headers and X-Request-Id a page needs to read it."""
    from gateway.store import keys
    from tests.test_gateway import change

    async with gateway(redis_url, storage_dir, cors_origins=APP, inprocess_workers=False) as gw:
        asked = "prefer, apollographql-client-name, apollographql-client-version, content-type"
        for path in ("/v1/text_to_image", "/graphql"):
            r = await gw.http.options(
                path, headers={**PREFLIGHT, "Access-Control-Request-Headers": asked}
            )
            assert r.status_code == 200, (path, r.text)
            allowed = {h.strip() for h in r.headers["access-control-allow-headers"].split(",")}
            assert {h.strip() for h in asked.split(",")} <= allowed

        key = await gw.key()
        job = (await gw.generate(key)).json()["data"]["generate"]
        # A record damaged behind the gateway's back: reading it is a bug's 500.
        await change(gw.accounts.redis, keys.job(gw.keys[key]["id"], job["id"]), created_at="{")
        r = await gw.http.get(f"/v1/jobs/{job['id']}", headers={"Origin": APP, "X-API-Key": key})
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "INTERNAL_SERVER_ERROR" and "Traceback" not in r.text
        assert r.headers["access-control-allow-origin"] == APP
        assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
        assert r.headers["x-request-id"]


async def test_a_page_can_read_every_header_the_gateway_answers_with(
    redis_url: str, storage_dir: Path
) -> None:
    """Segmind's v1 accounting headers and OpenAI's `x-should-retry` (the SDK's retry
    decision) reached a page's script as nothing: only CORS-safelisted headers and the
    exposed ones can be read."""
    async with gateway(redis_url, storage_dir, cors_origins=APP) as gw:
        key = await gw.key()
        answers = [
            await gw.http.post(
                "/compat/segmind/v1/local",
                json={"prompt": "a kite", "seed": 1},
                headers={"Origin": APP, "x-api-key": key},
            ),
            await gw.http.post(  # no backend of flux-krea's is set up: 503, final
                "/v1/images/generations",
                json={"model": "flux-krea", "prompt": "a kite"},
                headers={"Origin": APP, "Authorization": f"Bearer {key}"},
            ),
        ]
        assert [r.status_code for r in answers] == [200, 503]
        assert answers[1].headers["x-should-retry"] == "false"
        for r in answers:
            exposed = {
                h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")
            }
            ours = {h for h in r.headers if h.startswith("x-") or h == "content-location"}
            assert ours and ours <= exposed, ours - exposed
