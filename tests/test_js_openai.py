"""OpenAI's own Node SDK (`openai`, pinned by tests/js/package-lock.json, installed by
`make js-clients`) against a served gateway: `tests/js/openai_images.mjs` generates with
the offline `local` backend (a URL, then base64), lists the models, and makes two calls
the gateway refuses (docs/api.md#openai).

Node is required: without it, or without the package, this fails saying how to get them,
rather than skip.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.harness import gateway
from tests.test_js_clients import JS, run_script

SIZE = (768, 512)


def size_of(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the whole picture decodes, not only its header
        return image.size


async def test_the_openai_node_sdk_generates_lists_models_and_raises_its_errors(
    redis_url: str, storage_dir: Path
) -> None:
    if not (JS / "node_modules" / "openai").is_dir():
        pytest.fail(f"the openai npm package is not installed: run `make js-clients` ({JS})")
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key("pro", credits=1_000)
        gw.clock.advance((12 * 3600 - gw.clock() % 86_400) % 86_400)  # noon UTC: hours to go
        spent = await gw.key("pro", credits=1_000, daily=1)
        assert (await gw.generate(spent, "the day's one")).status_code == 200
        env = {"GATEWAY_URL": gw.base, "GATEWAY_KEY": key, "GATEWAY_SPENT_KEY": spent}
        seen = await run_script("openai_images.mjs", env)

        # A URL to the gateway's stored copy: fetched, a real picture of the size asked.
        (by_url,) = seen["url"]["data"]
        assert by_url["url"].startswith(f"{gw.base}/outputs/"), by_url
        assert by_url["revised_prompt"] == "a lighthouse at dusk"
        fetched = await gw.http.get(by_url["url"])
        assert fetched.status_code == 200
        assert fetched.content.startswith(b"\x89PNG")
        assert size_of(fetched.content) == SIZE
        assert seen["url"]["size"] == "768x512" and seen["url"]["created"] > 0

        # base64 in the answer: decodes to a picture of the size asked.
        (inline,) = seen["b64"]["data"]
        assert inline["revised_prompt"] == "two foxes in the snow"
        assert size_of(base64.b64decode(inline["b64_json"], validate=True)) == SIZE
        assert seen["b64"]["size"] == "768x512"
        credits = (await gw.accounts.get(gw.keys[key]["id"])).credits
        assert credits < 1_000  # charged as any job (the refusals below cost nothing)

        # The model list names every service, and the backends configured here, as
        # OpenAI lists models (none of the upstreams has credentials here).
        services = set(gw.app.state.gateway.router.routes)
        names = {m["id"] for m in seen["models"]}
        assert services and services <= names, (services, names)
        assert {"local", "flux-krea"} <= names and not {"krea", "segmind", "fluxkrea"} & names
        assert {m["object"] for m in seen["models"]} == {"model"}
        owners = {m["id"]: m["owned_by"] for m in seen["models"]}
        assert {owners[s] for s in services} == {"gateway (service)"}

        # Refusals, as the SDK's own exception classes.
        errors = seen["errors"]
        assert errors["badKey"] is not None and errors["badKey"]["isAPIError"], errors
        assert (errors["badKey"]["class"], errors["badKey"]["status"]) == (
            "AuthenticationError",
            401,
        )
        assert errors["badKey"]["code"] == "invalid_api_key"
        assert errors["unknownModel"] is not None and errors["unknownModel"]["isAPIError"]
        assert (errors["unknownModel"]["class"], errors["unknownModel"]["status"]) == (
            "NotFoundError",
            404,
        )
        assert (errors["unknownModel"]["code"], errors["unknownModel"]["param"]) == (
            "model_not_found",
            "model",
        )
        # A day's limit, with the SDK's retries on: raised at once (the script's deadline
        # is a minute), not slept on until midnight and then sent and charged.
        daily = errors["dailyLimit"]
        assert daily is not None and (daily["class"], daily["status"]) == ("RateLimitError", 429)
        assert daily["code"] == "rate_limit_exceeded"
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == credits
