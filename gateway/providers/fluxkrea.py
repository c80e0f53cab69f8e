"""flux-krea.pro: the synchronous REST endpoint `POST {base}/generate` (base includes `/v1`).

Parameters, ours -> flux-krea's: see `translate`; output_format, aspect_ratio and
quality are not sent (no such parameters; the upstream always answers with JPEG URLs on
its CDN, and the worker converts). flux-krea's images -> ours: see `_output`.

Upstream answers -> our errors: 400 -> ProviderRejected; 401 (our key) and 403 (our
permissions or quota) -> ProviderUnavailable; 429 -> retried honouring Retry-After, then
ProviderRateLimited; 5xx -> ProviderUnavailable, never re-sent (the upstream may already
be generating, and would charge twice); a 200 that is not `"status": "success"` with
images, or is not JSON -> ProviderUnavailable.

Given a callback inbox (the gateway has a public URL), the adapter uses the `POST
/generate/async` of flux-krea's API guide instead: the upstream reports the result to our
callback URL (`/v1/callbacks/fluxkrea/<token>`, the token unguessable) and `poll` reads
the inbox, so no connection is held open during generation. The upstream has no status endpoint: a
callback that never comes ends in the job's deadline. Without an inbox, the
synchronous endpoint is used and `submit` returns the outputs at once.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urljoin

from gateway.errors import ProviderError, ProviderRejected, ProviderUnavailable
from gateway.formats import content_type_of_url
from gateway.providers.base import (
    CallbackInbox,
    ImageParams,
    Output,
    Polled,
    Submitted,
    clamp,
    only_set,
)
from gateway.providers.http import Answer, HTTPBackend, UpstreamClient, json_body

DEFAULT_BASE_URL = "https://api.flux-krea.pro/v1"

PROMPT_MAX = 1000
SEED_MODULUS = 2**31  # seeds are 0-2147483647


def translate(params: ImageParams) -> dict[str, Any]:
    """The JSON body for `POST /generate`, in flux-krea's ranges (unset optionals are left
    to its defaults); raises ProviderRejected for a prompt it would refuse."""
    if not 1 <= len(params.prompt) <= PROMPT_MAX:
        raise ProviderRejected(
            f"flux-krea accepts prompts of 1-{PROMPT_MAX} characters, "
            f"this one has {len(params.prompt)}"
        )
    return only_set(
        {
            "prompt": params.prompt,
            "width": clamp(params.width, 512, 2048, int),
            "height": clamp(params.height, 512, 2048, int),
            "guidance_scale": clamp(params.guidance, 1.0, 20.0, float),  # upstream: 7.5
            "num_inference_steps": clamp(params.steps, 1, 50, int),  # upstream: 4
            "seed": None if params.seed is None else params.seed % SEED_MODULUS,
            "num_images": clamp(params.num_images, 1, 4, int),
        }
    )


class FluxKreaProvider(HTTPBackend):
    name = "fluxkrea"
    upstream = "flux-krea"
    credential_setting = "GATEWAY_FLUXKREA_API_KEY"
    poll_interval = 1.0

    def __init__(
        self,
        client: UpstreamClient,
        *,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None,
        timeout: float = 30.0,
        inbox: CallbackInbox | None = None,
    ) -> None:
        super().__init__(client, base_url=base_url, credential=api_key, timeout=timeout)
        self.inbox = inbox

    body_for = staticmethod(translate)

    async def _post(self, path: str, body: dict[str, Any]) -> Answer:
        try:
            # Not idempotent: a re-sent generate could be charged twice.
            return await self.send("POST", f"{self.base_url}{path}", idempotent=False, json=body)
        except ProviderUnavailable as exc:
            refined = _refine(exc, exc.answer)
            if refined is exc:
                raise
            raise refined from exc

    async def submit(self, params: ImageParams) -> Submitted:
        body = translate(params)
        if self.inbox is not None:
            return await self._submit_async(body)
        response = await self._post("/generate", body)
        data = self.json_object(response)
        if data.get("status") != "success":
            detail = data.get("message") or data.get("error") or ""
            raise ProviderUnavailable(
                f"flux-krea answered status {data.get('status')!r}"
                + (f": {str(detail)[:200]}" if detail else "")
            )
        images = data.get("images")
        if not isinstance(images, list) or not images:
            raise ProviderUnavailable("flux-krea answered success without images")
        outputs = [_output(image, body, response.url) for image in images]
        return Submitted(
            upstream_id=None,
            outputs=outputs,
            sent=body,
            metadata={
                "upstream_request_id": data.get("request_id"),
                "generation_time": data.get("generation_time"),
                "upstream_credits_used": data.get("credits_used"),
            },
        )

    async def _submit_async(self, body: dict[str, Any]) -> Submitted:
        assert self.inbox is not None
        token = secrets.token_urlsafe(24)
        await self.inbox.expect(token)
        sent = {
            **body,
            "webhook_url": self.inbox.url_for(self.name, token),
            "callback_data": {"token": token},
        }
        response = await self._post("/generate/async", sent)
        data = json_body(response, self.upstream)
        request_id = data.get("request_id") if isinstance(data, dict) else None
        return Submitted(
            upstream_id=token,
            sent={**body, "async": True},
            metadata={"upstream_request_id": request_id},
        )

    def callbacks(self, upstream_id: str) -> list[str]:
        return [upstream_id] if self.inbox is not None else []  # async mode: the token

    async def poll(self, upstream_id: str) -> Polled:
        """Async mode: what the upstream reported to our callback URL, if it has."""
        if self.inbox is None:
            raise ProviderUnavailable("flux-krea jobs complete synchronously")
        report = await self.inbox.take(upstream_id)
        if not report:
            return Polled(state="pending", upstream_status="queued")
        status = report.get("status")
        meta = {"upstream_request_id": report.get("request_id")}
        if status == "failed":
            return Polled(
                state="failed",
                upstream_status="failed",
                metadata=meta,
                error=f"flux-krea: {str(report.get('error') or 'failed')[:200]}",
            )
        images = report.get("images")
        if status != "completed" or not isinstance(images, list) or not images:
            return Polled(
                state="failed",
                upstream_status=str(status),
                metadata=meta,
                error="flux-krea reported an unusable result",
            )
        base = self.base_url + "/"
        defaults = {"width": None, "height": None}
        return Polled(
            state="completed",
            upstream_status="completed",
            metadata=meta,
            outputs=[_output(image, defaults, base) for image in images],
        )


def _refine(exc: ProviderUnavailable, response: Answer | None) -> ProviderError:
    """A clearer message for our own credential and quota trouble (401, 403)."""
    if response is None or response.status_code not in (401, 403):
        return exc
    if response.status_code == 401:
        return ProviderUnavailable(
            f"flux-krea refused our API key (check GATEWAY_FLUXKREA_API_KEY): {exc.message}"
        )
    try:
        payload = response.json()
    except ValueError:
        return exc
    code = payload.get("error_code") if isinstance(payload, dict) else None
    if isinstance(code, str) and "quota_exceeded" in code:
        return ProviderUnavailable(f"flux-krea quota exceeded on our account: {exc.message}")
    return exc


def _output(image: Any, body: dict[str, Any], base: str) -> Output:
    """One of flux-krea's `images` as ours: its URL resolved against `base`, its size
    (else the size `body` asked for) and its seed."""
    if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
        raise ProviderUnavailable("flux-krea answered an image without a URL")
    url = urljoin(base, image["url"])  # absolute URLs pass through unchanged

    def integer(key: str) -> int | None:
        value = image.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return Output(
        url=url,
        content_type=content_type_of_url(url),
        width=integer("width") or body["width"],
        height=integer("height") or body["height"],
        seed=integer("seed"),
    )
