"""flux-krea.pro: the synchronous REST endpoint `POST {base}/generate` (base includes `/v1`).

Parameter mapping, ours -> flux-krea's, brought into the upstream's documented ranges:

    prompt      -> prompt               1-1000 characters; outside -> ProviderRejected, not sent
    width       -> width                clamped to 512-2048
    height      -> height               clamped to 512-2048
    guidance    -> guidance_scale       clamped to 1.0-20.0     (only when set; upstream: 7.5)
    steps       -> num_inference_steps  clamped to 1-50         (only when set; upstream: 4)
    seed        -> seed                 0-2147483647, taken modulo 2**31 (only when set)
    num_images  -> num_images           clamped to 1-4
    output_format, aspect_ratio, quality: not sent (no such parameters; the upstream
    always answers with JPEG URLs on its CDN).

Upstream answers -> our errors: 400 -> ProviderRejected; 401 (our key) and 403 (our
permissions or quota) -> ProviderUnavailable; 429 -> retried honouring Retry-After, then
ProviderRateLimited; 5xx -> ProviderUnavailable, never re-sent (the upstream may already
be generating, and would charge twice); a 200 that is not `"status": "success"` with
images, or is not JSON -> ProviderUnavailable.

Given a callback inbox (the gateway has a public URL), the adapter uses the guide's
`POST /generate/async` instead: the upstream reports the result to our callback URL
(`/v1/callbacks/fluxkrea/<token>`, the token unguessable) and `poll` reads the inbox, so
no connection is held open during generation. The upstream has no status endpoint: a
callback that never comes ends in the job's deadline. Without an inbox, the
synchronous endpoint is used and `submit` returns the outputs at once.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urljoin, urlsplit

from gateway.errors import ProviderError, ProviderRejected, ProviderUnavailable
from gateway.providers.base import CallbackInbox, ImageParams, Output, Polled, Submitted
from gateway.providers.http import Answer, UpstreamClient, download, json_body, request

UPSTREAM = "flux-krea"
DEFAULT_BASE_URL = "https://api.flux-krea.pro/v1"

PROMPT_MAX = 1000
SIZE_MIN, SIZE_MAX = 512, 2048
GUIDANCE_MIN, GUIDANCE_MAX = 1.0, 20.0
STEPS_MIN, STEPS_MAX = 1, 50
SEED_MODULUS = 2**31  # seeds are 0-2147483647
IMAGES_MIN, IMAGES_MAX = 1, 4

#: by the extension of the image URL (the guide shows `.jpg`)
CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
}


def _clamp(value: Any, low: Any, high: Any) -> Any:
    return max(low, min(high, value))


class FluxKreaProvider:
    name = "fluxkrea"
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
        self.inbox = inbox
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout

    def status(self) -> tuple[bool, str]:
        if not self.api_key:
            return False, "GATEWAY_FLUXKREA_API_KEY is not set"
        return True, "ok"

    def body_for(self, params: ImageParams) -> dict[str, Any]:
        """The JSON body for `POST /generate`; raises ProviderRejected for a bad prompt."""
        if not 1 <= len(params.prompt) <= PROMPT_MAX:
            raise ProviderRejected(
                f"flux-krea accepts prompts of 1-{PROMPT_MAX} characters, "
                f"this one has {len(params.prompt)}"
            )
        body: dict[str, Any] = {
            "prompt": params.prompt,
            "width": _clamp(params.width, SIZE_MIN, SIZE_MAX),
            "height": _clamp(params.height, SIZE_MIN, SIZE_MAX),
        }
        if params.guidance is not None:
            body["guidance_scale"] = float(_clamp(params.guidance, GUIDANCE_MIN, GUIDANCE_MAX))
        if params.steps is not None:
            body["num_inference_steps"] = _clamp(params.steps, STEPS_MIN, STEPS_MAX)
        if params.seed is not None:
            body["seed"] = params.seed % SEED_MODULUS
        body["num_images"] = _clamp(params.num_images, IMAGES_MIN, IMAGES_MAX)
        return body

    async def _post(self, path: str, body: dict[str, Any]) -> Answer:
        if not self.api_key:
            raise ProviderUnavailable("GATEWAY_FLUXKREA_API_KEY is not set")
        try:
            return await request(
                self.client,
                "POST",
                f"{self.base_url}{path}",
                upstream=UPSTREAM,
                idempotent=False,  # a re-sent generate could be charged twice
                timeout=self.timeout,
                json=body,
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
        except ProviderUnavailable as exc:
            refined = _refine(exc, exc.answer)
            if refined is exc:
                raise
            raise refined from exc

    async def submit(self, params: ImageParams) -> Submitted:
        body = self.body_for(params)
        if self.inbox is not None:
            return await self._submit_async(body)
        response = await self._post("/generate", body)
        data = json_body(response, UPSTREAM)
        if not isinstance(data, dict):
            raise ProviderUnavailable("flux-krea answered with something other than an object")
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
        data = json_body(response, UPSTREAM)
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

    async def cancel(self, upstream_id: str) -> None:
        """Nothing to cancel: a flux-krea job is over when `submit` returns."""
        return None

    async def fetch(self, output: Output) -> bytes:
        """Download the image: CDN URLs may expire, so the worker keeps its own copy."""
        if output.data is not None:
            return output.data
        if not output.url:
            raise ProviderUnavailable("flux-krea output has no URL")
        return await download(self.client, output.url, upstream=UPSTREAM)


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
    if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
        raise ProviderUnavailable("flux-krea answered an image without a URL")
    url = urljoin(base, image["url"])  # absolute URLs pass through unchanged

    def integer(key: str) -> int | None:
        value = image.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    suffix = urlsplit(url).path.rsplit("/", 1)[-1]
    extension = suffix[suffix.rfind(".") :].lower() if "." in suffix else ""
    return Output(
        url=url,
        content_type=CONTENT_TYPES.get(extension),
        width=integer("width") or body["width"],
        height=integer("height") or body["height"],
        seed=integer("seed"),
    )
