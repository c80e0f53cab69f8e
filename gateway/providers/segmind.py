"""Segmind serverless API (`flux-krea-dev`), through its v2 asynchronous queue.

Protocol: `POST /v2/{model}` queues a request and answers `request_id`; `GET
/v2/requests/{id}/status` says QUEUED, PROCESSING, COMPLETED or FAILED; `GET
/v2/requests/{id}` is the result (`output`: image URL(s), `metrics`). A FAILED request is
served as HTTP 422 carrying the error detail (content/RAI blocks included); an unknown or
expired id (results are kept one hour) is a 404; 406 means our Segmind account is out of
credits. Segmind documents no cancel endpoint. Auth: header `x-api-key`.

Parameter mapping (ours -> Segmind's):

==================  ======================================================================
ImageParams         Segmind body
==================  ======================================================================
prompt              prompt
aspect_ratio        aspect_ratio, when one of the 11 documented ratios; another "w:h" is
                    snapped to the nearest documented one
width, height       aspect_ratio (when aspect_ratio is not given): the documented ratio
                    nearest to width/height in log-ratio space; and megapixels: "1" or
                    "0.25", whichever is nearer to width*height/1e6 in log space (so
                    1024x576 asks for "1", 512x512 for "0.25"); sent as a string, as in
                    Segmind's own example
num_images          num_outputs (clamped to 1-4)
output_format       output_format (png, jpg, webp: same names)
quality             output_quality: "high" -> 100, "standard" or unset -> 90 (Segmind's
                    default), "low" -> 75
guidance            guidance, clamped to 0-10 (only when set)
steps               num_inference_steps, clamped to 1-50 (only when set)
seed                seed (only when set)
==================  ======================================================================
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, cast
from urllib.parse import quote, urlsplit

from gateway.errors import ProviderError, ProviderUnavailable
from gateway.providers.base import (
    CONTENT_TYPES,
    ImageParams,
    Output,
    Polled,
    Submitted,
)
from gateway.providers.http import (
    Answer,
    UpstreamClient,
    download,
    error_for,
    json_body,
    request,
)

#: The documented values of `aspect_ratio` ("11 total": the page shows ten "+1 more").
ASPECT_RATIOS: tuple[str, ...] = (
    "1:1",
    "16:9",
    "21:9",
    "3:2",
    "2:3",
    "4:5",
    "5:4",
    "3:4",
    "4:3",
    "9:16",
    "9:21",
)
#: The documented values of `megapixels`, as Segmind's example sends them.
MEGAPIXELS: tuple[str, ...] = ("1", "0.25")
QUALITY: dict[str, int] = {"high": 100, "standard": 90, "low": 75}
DEFAULT_QUALITY = 90

PENDING = frozenset({"QUEUED", "PROCESSING"})


def _ratio(value: str) -> float | None:
    """`"16:9"` -> 16/9; None when it is not a positive `w:h`."""
    left, sep, right = value.partition(":")
    if not sep:
        return None
    try:
        w, h = float(left), float(right)
    except ValueError:
        return None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        return None
    return w / h


def nearest_aspect_ratio(ratio: float) -> str:
    """The documented aspect ratio nearest to `ratio`, compared in log-ratio space."""
    target = math.log(ratio)
    return min(ASPECT_RATIOS, key=lambda ar: abs(math.log(cast(float, _ratio(ar))) - target))


def choose_aspect_ratio(params: ImageParams) -> str:
    if params.aspect_ratio:
        if params.aspect_ratio in ASPECT_RATIOS:
            return params.aspect_ratio
        ratio = _ratio(params.aspect_ratio)
        if ratio is not None:
            return nearest_aspect_ratio(ratio)
    return nearest_aspect_ratio(max(params.width, 1) / max(params.height, 1))


def choose_megapixels(width: int, height: int) -> str:
    """ "1" or "0.25", whichever is nearer to width*height/1e6 (log space)."""
    target = math.log(max(width * height, 1) / 1e6)
    return min(MEGAPIXELS, key=lambda mp: abs(math.log(float(mp)) - target))


def _clamp(value: float, low: float, high: float) -> float:
    return max(low, min(high, value))


def translate(params: ImageParams) -> dict[str, Any]:
    """Our normalized parameters -> Segmind's request body (see the module docstring)."""
    body: dict[str, Any] = {
        "prompt": params.prompt,
        "aspect_ratio": choose_aspect_ratio(params),
        "megapixels": choose_megapixels(params.width, params.height),
        "num_outputs": int(_clamp(params.num_images, 1, 4)),
        "output_format": params.output_format,
        "output_quality": QUALITY.get(params.quality or "standard", DEFAULT_QUALITY),
    }
    if params.guidance is not None:
        body["guidance"] = _clamp(float(params.guidance), 0.0, 10.0)
    if params.steps is not None:
        body["num_inference_steps"] = int(_clamp(params.steps, 1, 50))
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def _error_detail(body: Any) -> str:
    if isinstance(body, dict):
        for key in ("error", "message", "detail", "errors"):
            value = body.get(key)
            if value:
                return (value if isinstance(value, str) else str(value))[:1000]
    return ""


def _response_detail(response: Answer) -> str:
    try:
        detail = _error_detail(response.json())
    except ValueError:
        detail = ""
    return detail or response.text.strip()[:1000]


def _content_type(url: str) -> str | None:
    path = urlsplit(url).path.lower()
    ext = path.rsplit(".", 1)[-1] if "." in path.rsplit("/", 1)[-1] else ""
    return CONTENT_TYPES.get("jpg" if ext == "jpeg" else ext)


def _output_urls(value: Any) -> list[str]:
    """`output` as a URL string, a list of them, or objects with a `url`."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, dict):
        url = value.get("url") or value.get("uri")
        return [url] if isinstance(url, str) and url else []
    if isinstance(value, list):
        return [url for item in value for url in _output_urls(item)]
    return []


class SegmindProvider:
    name = "segmind"
    #: Segmind's SDK polls every 1.0 s
    poll_interval = 1.0

    def __init__(
        self,
        client: UpstreamClient,
        *,
        base_url: str,
        api_key: str | None,
        model: str = "flux-krea-dev",
        timeout: float = 30.0,
    ) -> None:
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.model = model
        self.timeout = timeout

    def status(self) -> tuple[bool, str]:
        if not self.api_key:
            return False, "GATEWAY_SEGMIND_API_KEY is not set"
        return True, "ok"

    # -- HTTP -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if not self.api_key:
            raise ProviderUnavailable("segmind is disabled: GATEWAY_SEGMIND_API_KEY is not set")
        return {"x-api-key": self.api_key, "accept": "application/json"}

    def _request_url(self, request_id: str, suffix: str = "") -> str:
        return f"{self.base_url}/v2/requests/{quote(request_id, safe='')}{suffix}"

    async def _call(
        self, method: str, url: str, *, idempotent: bool, not_found: str, **kwargs: Any
    ) -> tuple[Answer | None, Answer | None]:
        """(2xx answer, None), or (None, the 422 answer); other failures raise.

        `request()` turns every unsuccessful answer into a generic `ProviderError`;
        Segmind gives 404, 406 and 422 specific meanings (expired result, no credits, a
        FAILED request with its detail), read here from the answer the error carries.
        `not_found` is what a 404 means at this URL.
        """
        try:
            response = await request(
                self.client,
                method,
                url,
                upstream="segmind",
                idempotent=idempotent,
                timeout=self.timeout,
                headers=self._headers(),
                **kwargs,
            )
        except ProviderError as exc:
            answer = exc.answer
            if answer is None:
                raise
            status = answer.status_code
            detail = _response_detail(answer)
            suffix = f": {detail}" if detail else ""
            if status == 422:
                return None, answer
            if status == 404:
                raise ProviderUnavailable(f"segmind answered 404: {not_found}{suffix}") from exc
            if status == 406:
                raise ProviderUnavailable(
                    f"segmind answered 406: upstream account out of credits{suffix}"
                ) from exc
            if status in (401, 403):
                raise ProviderUnavailable(
                    f"segmind refused our API key ({status}): check GATEWAY_SEGMIND_API_KEY{suffix}"
                ) from exc
            raise
        return response, None

    def _json(self, response: Answer) -> dict[str, Any]:
        body = json_body(response, "segmind")
        if not isinstance(body, dict):
            raise ProviderUnavailable("segmind sent an unexpected answer (not a JSON object)")
        return body

    # -- Provider -----------------------------------------------------------------------

    async def submit(self, params: ImageParams) -> Submitted:
        body = translate(params)
        url = f"{self.base_url}/v2/{quote(self.model, safe='')}"
        response, failed = await self._call(
            "POST",
            url,
            idempotent=False,
            not_found=f"unknown model or endpoint {self.model!r}",
            json=body,
        )
        if failed is not None:  # 422 on submit: the upstream refused the input
            raise error_for(failed, "segmind")
        answer = self._json(cast(Answer, response))
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ProviderUnavailable("segmind accepted the request but sent no request_id")
        metadata: dict[str, Any] = {"upstream_request_id": request_id}
        for key in ("status_url", "response_url", "status"):
            if answer.get(key):
                metadata["upstream_status" if key == "status" else key] = answer[key]
        return Submitted(upstream_id=request_id, sent=body, metadata=metadata)

    def callbacks(self, upstream_id: str) -> list[str]:
        return []  # Segmind's v2 API (seed 004) has no webhook: polled at its pace

    async def poll(self, upstream_id: str) -> Polled:
        metadata: dict[str, Any] = {"upstream_request_id": upstream_id}
        response, failed = await self._get(self._request_url(upstream_id, "/status"))
        if failed is not None:
            return self._failed(failed, metadata)
        body = self._json(cast(Answer, response))
        status = str(body.get("status") or "").upper()
        if not status:
            raise ProviderUnavailable("segmind sent a status answer without a status")
        metadata["upstream_status"] = status
        if status in PENDING:
            return Polled(state="pending", upstream_status=status, metadata=metadata)
        if status in ("CANCELLED", "CANCELED"):
            return Polled(state="cancelled", upstream_status=status, metadata=metadata)
        if status == "FAILED":
            detail = _error_detail(body)
            if detail:
                return Polled("failed", status, error=detail, metadata=metadata)
            # The detail is in the result, which Segmind serves as a 422.
            return await self._result(upstream_id, metadata)
        if status == "COMPLETED":
            return await self._result(upstream_id, metadata)
        # An undocumented state: keep polling; the job deadline bounds the wait.
        return Polled(state="pending", upstream_status=status, metadata=metadata)

    async def _get(self, url: str) -> tuple[Answer | None, Answer | None]:
        return await self._call(
            "GET",
            url,
            idempotent=True,
            not_found="the request's result expired (Segmind keeps results one hour) "
            "or its request_id is unknown",
        )

    async def _result(self, upstream_id: str, metadata: dict[str, Any]) -> Polled:
        response, failed = await self._get(self._request_url(upstream_id))
        if failed is not None:
            return self._failed(failed, metadata)
        body = self._json(cast(Answer, response))
        status = str(body.get("status") or metadata.get("upstream_status") or "").upper()
        metadata["upstream_status"] = status
        metrics = body.get("metrics")
        if isinstance(metrics, dict):
            metadata["metrics"] = metrics
            if "inference_time" in metrics:
                metadata["inference_time"] = metrics["inference_time"]
        if status in PENDING:
            return Polled(state="pending", upstream_status=status, metadata=metadata)
        if status == "FAILED":
            detail = _error_detail(body) or "segmind reported the request FAILED"
            return Polled("failed", status, error=detail, metadata=metadata)
        outputs = [self._output(url) for url in _output_urls(body.get("output"))]
        if not outputs:
            raise ProviderUnavailable(
                f"segmind completed request {upstream_id} without any image in its output"
            )
        return Polled("completed", status, outputs=outputs, metadata=metadata)

    @staticmethod
    def _failed(response: Answer, metadata: dict[str, Any]) -> Polled:
        try:
            body = response.json()
        except ValueError:
            body = None
        status = "FAILED"
        if isinstance(body, dict) and isinstance(body.get("status"), str):
            status = body["status"].upper() or status
        metadata["upstream_status"] = status
        detail = _response_detail(response) or "segmind reported the request FAILED (422)"
        return Polled("failed", status, error=detail, metadata=metadata)

    @staticmethod
    def _output(url: str) -> Output:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ProviderUnavailable("segmind sent an undecodable data: URI") from exc
            media_type = header[5:].split(";", 1)[0] or None
            return Output(data=data, content_type=media_type)
        if urlsplit(url).scheme not in ("http", "https"):
            raise ProviderUnavailable(f"segmind sent an unusable output URL: {url[:100]!r}")
        return Output(url=url, content_type=_content_type(url))

    async def cancel(self, upstream_id: str) -> None:
        """No-op: Segmind documents no way to cancel a queued request.

        An abandoned request still runs (and is billed) upstream; its result expires after
        one hour.
        """
        return None

    async def fetch(self, output: Output) -> bytes:
        """Download the image now: Segmind's output URLs expire after an hour."""
        if output.data is not None:
            return output.data
        if not output.url:
            raise ProviderUnavailable("segmind output has neither data nor URL")
        return await download(self.client, output.url, upstream="segmind")
