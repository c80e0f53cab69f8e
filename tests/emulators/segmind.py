"""An emulator of Segmind's serverless API (flux-krea-dev), v2 asynchronous queue.

Faithful to the published page: `POST /v2/{model}` validates the body and queues it
(`request_id`, `status_url`, `response_url`, `status: QUEUED`); each
`GET /v2/requests/{id}/status` advances QUEUED -> PROCESSING -> COMPLETED (or FAILED);
`GET /v2/requests/{id}` is the result: `output` (image URLs, served here under
`/files/...`) and `metrics`, or HTTP 422 with the error detail for a FAILED request; an
unknown or expired id is a 404; no credits is a 406; a missing/wrong `x-api-key` a 401.

Knobs (plain attributes and methods), for tests:

- `polls_to_complete`: the status poll that first reports the final state (default 3)
- `fail_jobs` / `failure_detail`: requests submitted while set end FAILED with that detail
- `failed_status_code`: HTTP status of the *status* endpoint for a FAILED request (200,
  with `status: FAILED`; set 422 to serve it like the result endpoint)
- `output_style`: "list" (URL strings), "string" (one URL), "objects" (`{"url": ...}`)
- `no_credits`: submissions answer 406
- `expire(request_id)`: the request (and its images) now answer 404
- `fail_next(n, status=500)`, `rate_limit_next(n, retry_after=1)` (429 + Retry-After),
  `malformed_next(n)` (200 with invalid JSON), `stall` (seconds before answering): apply
  to the next API calls (`/v2/...`), not to image downloads
- records: `requests` (every call: method, path, headers, json), `submissions` (POSTs
  that reached the emulator, whatever their answer), `jobs`
"""

from __future__ import annotations

import asyncio
import io
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import orjson
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
OUTPUT_FORMATS = {
    "webp": ("WEBP", "image/webp"),
    "jpg": ("JPEG", "image/jpeg"),
    "png": ("PNG", "image/png"),
}
DEFAULTS: dict[str, Any] = {
    "aspect_ratio": "16:9",
    "disable_safety_checker": False,
    "go_fast": True,
    "guidance": 7,
    "image": None,
    "megapixels": 1,
    "num_inference_steps": 40,
    "num_outputs": 2,
    "output_format": "jpg",
    "output_quality": 90,
    "prompt_strength": 0.7,
    "seed": 42,
}


class Invalid(Exception):
    pass


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise Invalid(f"{name} must be a number")
    if not low <= value <= high:
        raise Invalid(f"{name} must be between {low:g} and {high:g}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: float, high: float) -> int:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{name} must be an integer")
    if not low <= value <= high:
        raise Invalid(f"{name} must be between {low:g} and {high:g}")
    return value


def validate(body: Any) -> dict[str, Any]:
    """The body with defaults applied, or `Invalid` naming the bad parameter."""
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Invalid("prompt is required")
    params = {**DEFAULTS, **{k: v for k, v in body.items() if v is not None}}
    if params["aspect_ratio"] not in ASPECT_RATIOS:
        raise Invalid(f"aspect_ratio must be one of {', '.join(ASPECT_RATIOS)}")
    mp = params["megapixels"]
    try:
        mp_value = None if isinstance(mp, bool) else float(mp)
    except (TypeError, ValueError):
        mp_value = None
    if mp_value not in (1.0, 0.25):
        raise Invalid("megapixels must be 1 or 0.25")
    params["megapixels"] = mp_value
    _number(params, "guidance", 0, 10)
    _integer(params, "num_inference_steps", 1, 50)
    _integer(params, "num_outputs", 1, 4)
    if params["output_format"] not in OUTPUT_FORMATS:
        raise Invalid("output_format must be one of webp, jpg, png")
    _integer(params, "output_quality", 0, 100)
    _number(params, "prompt_strength", 0, 1)
    if isinstance(params["seed"], bool) or not isinstance(params["seed"], int):
        raise Invalid("seed must be an integer")
    for flag in ("go_fast", "disable_safety_checker"):
        if not isinstance(params[flag], bool):
            raise Invalid(f"{flag} must be a boolean")
    if params["image"] is not None and not (
        isinstance(params["image"], str) and params["image"].startswith(("http://", "https://"))
    ):
        raise Invalid("image must be a URI")
    return params


def image_size(aspect_ratio: str, megapixels: float) -> tuple[int, int]:
    """Pixels for a ratio at "1" (1024x1024) or "0.25" (512x512) megapixels, by 16s."""
    w, h = (int(x) for x in aspect_ratio.split(":"))
    area = megapixels * 1024 * 1024
    width = math.sqrt(area * w / h)
    height = width * h / w
    return max(16, round(width / 16) * 16), max(16, round(height / 16) * 16)


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class Job:
    id: str
    model: str
    params: dict[str, Any]
    fail: bool
    failure_detail: str
    submitted: float = field(default_factory=time.monotonic)
    polls: int = 0
    status: str = "QUEUED"
    images: dict[int, bytes] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status in ("COMPLETED", "FAILED")


class SegmindEmulator:
    def __init__(
        self,
        api_key: str = "test-key",
        *,
        models: tuple[str, ...] = ("flux-krea-dev",),
        polls_to_complete: int = 3,
    ) -> None:
        self.api_key = api_key
        self.models = set(models)
        self.polls_to_complete = polls_to_complete
        self.fail_jobs = False
        self.failure_detail = "Image blocked by the content safety filter (RAI)"
        self.failed_status_code = 200
        self.output_style = "list"
        self.no_credits = False
        self.stall = 0.0
        self.jobs: dict[str, Job] = {}
        self.requests: list[Recorded] = []
        self.submissions = 0
        self._fail: list[int] = []
        self._rate_limited = 0
        self._retry_after: float | str = 1
        self._malformed = 0
        self.app = Starlette(
            routes=[
                Route("/v2/requests/{request_id}/status", self._api(self._status), name="status"),
                Route("/v2/requests/{request_id}", self._api(self._result), name="result"),
                Route("/v2/{model}", self._api(self._submit), methods=["POST"]),
                Route("/files/{request_id}/{index:int}.{ext}", self._file, name="file"),
            ]
        )

    # -- knobs ------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500) -> None:
        self._fail.extend([status] * n)

    def rate_limit_next(self, n: int, retry_after: float | str = 1) -> None:
        self._rate_limited = n
        self._retry_after = retry_after

    def malformed_next(self, n: int) -> None:
        self._malformed = n

    def expire(self, request_id: str) -> None:
        self.jobs.pop(request_id, None)

    def calls(self, method: str, suffix: str = "") -> list[Recorded]:
        """Recorded calls of `method` whose path ends with `suffix`."""
        return [r for r in self.requests if r.method == method and r.path.endswith(suffix)]

    # -- plumbing ---------------------------------------------------------------------

    def _api(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                payload = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                payload = raw
            self.requests.append(
                Recorded(request.method, request.url.path, dict(request.headers), payload)
            )
            if request.method == "POST":
                self.submissions += 1
            if self.stall:
                await self._stall(request)
            if self._fail:
                status = self._fail.pop(0)
                return JSONResponse({"error": f"injected failure {status}"}, status)
            if self._rate_limited > 0:
                self._rate_limited -= 1
                return JSONResponse(
                    {"error": "Too many requests"},
                    429,
                    headers={"Retry-After": str(self._retry_after)},
                )
            if self._malformed > 0:
                self._malformed -= 1
                return Response(b'{"request_id": "abc", "stat', media_type="application/json")
            if request.headers.get("x-api-key") != self.api_key:
                return JSONResponse({"error": "Unauthorized: missing or invalid API key"}, 401)
            return await handler(request, payload)

        return endpoint

    async def _stall(self, request: Request) -> None:
        """Wait `stall` seconds, or until the client hangs up (the work still happens)."""
        deadline = time.monotonic() + self.stall
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.01)

    # -- endpoints --------------------------------------------------------------------

    async def _submit(self, request: Request, payload: Any) -> Response:
        model = request.path_params["model"]
        if model not in self.models:
            return JSONResponse({"error": f"Model {model} not found"}, 404)
        if self.no_credits:
            return JSONResponse({"error": "Insufficient credits"}, 406)
        try:
            params = validate(payload)
        except Invalid as exc:
            return JSONResponse({"error": str(exc)}, 400)
        job = Job(uuid.uuid4().hex, model, params, self.fail_jobs, self.failure_detail)
        self.jobs[job.id] = job
        return JSONResponse(
            {
                "request_id": job.id,
                "status_url": str(request.url_for("status", request_id=job.id)),
                "response_url": str(request.url_for("result", request_id=job.id)),
                "status": "QUEUED",
            }
        )

    def _not_found(self) -> Response:
        return JSONResponse({"error": "Request not found or expired"}, 404)

    async def _status(self, request: Request, payload: Any) -> Response:
        job = self.jobs.get(request.path_params["request_id"])
        if job is None:
            return self._not_found()
        if not job.done:
            job.polls += 1
            if job.polls >= self.polls_to_complete:
                job.status = "FAILED" if job.fail else "COMPLETED"
            elif job.polls > 1:
                job.status = "PROCESSING"
        if job.status == "FAILED" and self.failed_status_code == 422:
            return self._failed(job)
        return JSONResponse({"request_id": job.id, "status": job.status})

    def _failed(self, job: Job) -> Response:
        body = {"request_id": job.id, "status": "FAILED", "error": job.failure_detail}
        return JSONResponse(body, 422)

    async def _result(self, request: Request, payload: Any) -> Response:
        job = self.jobs.get(request.path_params["request_id"])
        if job is None:
            return self._not_found()
        if job.status == "FAILED":
            return self._failed(job)
        if job.status != "COMPLETED":
            return JSONResponse({"request_id": job.id, "status": job.status})
        ext = job.params["output_format"]
        urls = [
            str(request.url_for("file", request_id=job.id, index=i, ext=ext))
            for i in range(job.params["num_outputs"])
        ]
        output: Any = urls
        if self.output_style == "string":
            output = urls[0]
        elif self.output_style == "objects":
            output = [{"url": url} for url in urls]
        return JSONResponse(
            {
                "request_id": job.id,
                "status": "COMPLETED",
                "output": output,
                "metrics": {"inference_time": round(time.monotonic() - job.submitted, 3)},
            }
        )

    async def _file(self, request: Request) -> Response:
        self.requests.append(
            Recorded(request.method, request.url.path, dict(request.headers), None)
        )
        job = self.jobs.get(request.path_params["request_id"])
        index = request.path_params["index"]
        if (
            job is None
            or job.status != "COMPLETED"
            or request.path_params["ext"] != job.params["output_format"]
            or not 0 <= index < job.params["num_outputs"]
        ):
            return Response(b"Not Found", 404, media_type="text/plain")
        pil_format, media_type = OUTPUT_FORMATS[job.params["output_format"]]
        if index not in job.images:
            job.images[index] = render(job.params, index, pil_format)
        return Response(job.images[index], media_type=media_type)


def render(params: dict[str, Any], index: int, pil_format: str) -> bytes:
    """A solid-colour image at the size implied by aspect_ratio and megapixels."""
    size = image_size(params["aspect_ratio"], params["megapixels"])
    seed = params["seed"] + index
    colour = (seed * 67 % 256, seed * 131 % 256, seed * 199 % 256)
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = max(1, params["output_quality"])
    Image.new("RGB", size, colour).save(buffer, pil_format, **options)
    return buffer.getvalue()
