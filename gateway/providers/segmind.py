"""Segmind serverless API (`flux-krea-dev`), through its v2 asynchronous queue
(Segmind's v2 async API docs).

Protocol: `POST /v2/{model}` queues a request and answers `request_id`; `GET
/v2/requests/{id}/status` says QUEUED, PROCESSING, COMPLETED or FAILED; `GET
/v2/requests/{id}` is the result (`output`: image URL(s), `metrics`). A FAILED request is
served as HTTP 422 carrying the error detail (content/RAI blocks included); an unknown or
expired id (results are kept one hour) is a 404; 406 means our Segmind account is out of
credits. Auth: header `x-api-key`. Segmind documents no webhook (requests are polled at
its pace) and no cancel endpoint: an abandoned request still runs, and is billed,
upstream.

Parameters, ours -> Segmind's: see `translate`. Segmind's answer -> ours: `output`, a URL,
a list of them or objects with a `url` (see `_output_urls`), each an `Output`.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, cast
from urllib.parse import quote, urlsplit

from gateway.errors import ProviderError, ProviderUnavailable
from gateway.formats import content_type_of_url
from gateway.params import ASPECT_RATIOS, ratio_sides
from gateway.providers.base import ImageParams, Output, Polled, Submitted, clamp, only_set
from gateway.providers.http import Answer, HTTPBackend, UpstreamClient, error_for

#: The documented values of `megapixels`, as Segmind's example sends them.
MEGAPIXELS: tuple[str, ...] = ("1", "0.25")
QUALITY: dict[str, int] = {"high": 100, "standard": 90, "low": 75}
DEFAULT_QUALITY = 90

PENDING = frozenset({"QUEUED", "PROCESSING"})


def translate(params: ImageParams) -> dict[str, Any]:
    """Our normalized parameters -> Segmind's request body; unset optionals are left to
    Segmind's defaults."""
    return only_set(
        {
            "prompt": params.prompt,
            # One of the documented ratios (ours are the same eleven); the size says
            # which when no ratio is given.
            "aspect_ratio": choose_aspect_ratio(params),
            # "1" or "0.25", whichever is nearer to the size's area (as a string, as in
            # Segmind's own example): 1024x576 asks for "1", 512x512 for "0.25".
            "megapixels": choose_megapixels(params.width, params.height),
            "num_outputs": clamp(params.num_images, 1, 4, int),  # never Segmind's default 2
            "output_format": params.output_format,  # png, jpg, webp: the same names
            # high 100, standard or unset 90 (Segmind's default), low 75
            "output_quality": QUALITY.get(params.quality or "standard", DEFAULT_QUALITY),
            "guidance": clamp(params.guidance, 0.0, 10.0, float),
            "num_inference_steps": clamp(params.steps, 1, 50, int),
            "seed": params.seed,
        }
    )


def _ratio(value: str) -> float | None:
    """`"16:9"` -> 16/9; None when it is not a positive `w:h`."""
    sides = ratio_sides(value)
    return None if sides is None else sides[0] / sides[1]


def nearest_aspect_ratio(ratio: float) -> str:
    """The documented aspect ratio nearest to `ratio`, compared in log-ratio space."""
    target = math.log(ratio)
    return min(ASPECT_RATIOS, key=lambda ar: abs(math.log(cast(float, _ratio(ar))) - target))


def choose_aspect_ratio(params: ImageParams) -> str:
    """The ratio asked for when documented, else the documented one nearest to it (or,
    without a usable ratio, to width/height), in log-ratio space."""
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


class SegmindProvider(HTTPBackend):
    name = upstream = "segmind"
    credential_setting = "GATEWAY_SEGMIND_API_KEY"
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
        super().__init__(client, base_url=base_url, credential=api_key, timeout=timeout)
        self.model = model

    def auth(self, credential: str) -> dict[str, str]:
        return {"x-api-key": credential, "accept": "application/json"}

    # -- HTTP -------------------------------------------------------------------------

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
            response = await self.send(method, url, idempotent=idempotent, **kwargs)
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
            raise error_for(failed, self.upstream)
        answer = self.json_object(cast(Answer, response))
        request_id = answer.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise ProviderUnavailable("segmind accepted the request but sent no request_id")
        metadata: dict[str, Any] = {"upstream_request_id": request_id}
        for key in ("status_url", "response_url", "status"):
            if answer.get(key):
                metadata["upstream_status" if key == "status" else key] = answer[key]
        return Submitted(upstream_id=request_id, sent=body, metadata=metadata)

    async def poll(self, upstream_id: str) -> Polled:
        metadata: dict[str, Any] = {"upstream_request_id": upstream_id}
        response, failed = await self._get(self._request_url(upstream_id, "/status"))
        if failed is not None:
            return self._failed(failed, metadata)
        body = self.json_object(cast(Answer, response))
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
        body = self.json_object(cast(Answer, response))
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
        return Output(url=url, content_type=content_type_of_url(url))
