"""An emulator of the flux-krea.pro REST API, faithful to its guide (the seed).

Serves `POST /v1/generate` (Bearer auth, the guide's parameter table, its success format)
and the generated JPEGs themselves, at absolute URLs under `/images/generated/`, the way
the upstream's CDN does. Knobs for tests are plain attributes and methods:

    requests                  every request received: method, path, headers, json, at
    submissions               how many `POST /v1/generate` arrived
    fail_next(n, status=500)  answer the next n generates with `status` and a JSON error
    rate_limit_next(n, retry_after=1)   answer 429 with `Retry-After`
    quota_exceeded            answer 403 `{"error_code": "quota_exceeded", ...}`
    malformed_next(n)         answer 200 with a body that is not JSON
    answer_next(n, body)      answer 200 with this JSON instead of a generation
    stall                     seconds to hang before answering (ends if the client leaves)
    delay                     seconds the generation takes (default 0)

The guide's `POST /v1/generate/async` (webhook only, nothing to poll) is not emulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import random
import time
import uuid
from typing import Any

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

SEED_MAX = 2147483647
ERROR_NAMES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Rate Limited",
    500: "Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    body = {"error": ERROR_NAMES.get(status, "Error"), "message": message, **extra}
    return JSONResponse(body, status_code=status)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(payload: Any) -> str | None:
    """The guide's parameter table; returns what is wrong, or None."""
    if not isinstance(payload, dict):
        return "request body must be a JSON object"
    prompt = payload.get("prompt")
    if not isinstance(prompt, str) or not 1 <= len(prompt) <= 1000:
        return "prompt is required and must be 1-1000 characters"
    for key in ("width", "height"):
        if key in payload and not (_integer(payload[key]) and 512 <= payload[key] <= 2048):
            return f"{key} must be an integer between 512 and 2048"
    guidance = payload.get("guidance_scale", 7.5)
    if not (_number(guidance) and 1.0 <= guidance <= 20.0):
        return "guidance_scale must be a number between 1.0 and 20.0"
    steps = payload.get("num_inference_steps", 4)
    if not (_integer(steps) and 1 <= steps <= 50):
        return "num_inference_steps must be an integer between 1 and 50"
    if "seed" in payload and payload["seed"] is not None:
        seed = payload["seed"]
        if not (_integer(seed) and 0 <= seed <= SEED_MAX):
            return f"seed must be an integer between 0 and {SEED_MAX}"
    images = payload.get("num_images", 1)
    if not (_integer(images) and 1 <= images <= 4):
        return "num_images must be an integer between 1 and 4"
    return None


class FluxKreaEmulator:
    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.requests: list[dict[str, Any]] = []
        self.submissions = 0
        self.quota_exceeded = False
        self.stall = 0.0
        self.delay = 0.0
        self._fail_count = 0
        self._fail_status = 500
        self._rate_limit_count = 0
        self._retry_after: float = 1
        self._malformed_count = 0
        self._answer_count = 0
        self._answer: Any = None
        #: image id -> (width, height, RGB colour)
        self.images: dict[str, tuple[int, int, tuple[int, int, int]]] = {}
        #: images of noise, as large as a photograph's (a solid colour's are a few KB)
        self.noisy = False
        #: async jobs report `failed` to their webhook instead of `completed`
        self.fail_async = False
        #: (webhook URL, body, our answer's status) of every report sent
        self.callbacks: list[tuple[str, dict[str, Any], int]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.app = Starlette(
            routes=[
                Route("/v1/generate", self._generate, methods=["POST"]),
                Route("/v1/generate/async", self._generate_async, methods=["POST"]),
                Route("/images/generated/{image_id}.jpg", self._image, methods=["GET"]),
            ]
        )

    # -- knobs -------------------------------------------------------------------------

    def fail_next(self, n: int, status: int = 500) -> None:
        self._fail_count, self._fail_status = n, status

    def rate_limit_next(self, n: int, retry_after: float = 1) -> None:
        self._rate_limit_count, self._retry_after = n, retry_after

    def malformed_next(self, n: int) -> None:
        self._malformed_count = n

    def answer_next(self, n: int, body: Any) -> None:
        self._answer_count, self._answer = n, body

    # -- routes ------------------------------------------------------------------------

    async def _generate(self, request: Request) -> Response:
        raw = await request.body()
        try:
            payload: Any = json.loads(raw) if raw else None
            parsed = True
        except ValueError:
            payload, parsed = None, False
        self._record(request, payload)
        self.submissions += 1

        if self.stall and await self._wait(request, self.stall):
            return Response(status_code=499)  # the client has gone; nobody reads this

        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Invalid or missing API key")
        if self._fail_count:
            self._fail_count -= 1
            return _error(self._fail_status, "injected failure")
        if self._rate_limit_count:
            self._rate_limit_count -= 1
            retry_after = self._retry_after
            text = str(int(retry_after)) if float(retry_after).is_integer() else str(retry_after)
            return JSONResponse(
                {"error": "Rate Limited", "message": "Too many requests"},
                status_code=429,
                headers={"Retry-After": text},
            )
        if self.quota_exceeded:
            return _error(
                403,
                "Monthly credit allowance used up for this account",
                error_code="quota_exceeded",
            )
        if not parsed:
            return _error(400, "malformed request: body is not valid JSON")
        problem = validate(payload)
        if problem:
            return _error(400, problem)

        started = time.monotonic()
        if self.delay and await self._wait(request, self.delay):
            return Response(status_code=499)
        if self._malformed_count:
            self._malformed_count -= 1
            return Response(b'{"status": "success", "images": [', media_type="application/json")
        if self._answer_count:
            self._answer_count -= 1
            return JSONResponse(self._answer)

        images = self._make_images(payload, str(request.base_url).rstrip("/"))
        return JSONResponse(
            {
                "status": "success",
                "request_id": str(uuid.uuid4()),
                "images": images,
                "generation_time": round(time.monotonic() - started, 3),
                "credits_used": len(images),
            }
        )

    def _make_images(self, payload: dict[str, Any], base: str) -> list[dict[str, Any]]:
        width = payload.get("width", 1024)
        height = payload.get("height", 1024)
        seed = payload.get("seed")
        if seed is None:
            seed = random.randint(0, SEED_MAX)
        images = []
        for i in range(payload.get("num_images", 1)):
            image_seed = (seed + i) % (SEED_MAX + 1)
            image_id = uuid.uuid4().hex
            rng = random.Random(image_seed)
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            self.images[image_id] = (width, height, colour)
            images.append(
                {
                    "url": f"{base}/images/generated/{image_id}.jpg",
                    "seed": image_seed,
                    "width": width,
                    "height": height,
                }
            )
        return images

    async def _generate_async(self, request: Request) -> Response:
        """`POST /generate/async`: accepted now, reported later to `webhook_url` only."""
        try:
            payload: Any = json.loads(await request.body())
        except ValueError:
            payload = None
        self._record(request, payload)
        self.submissions += 1
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Invalid or missing API key")
        if not isinstance(payload, dict) or not isinstance(payload.get("webhook_url"), str):
            return _error(400, "webhook_url is required")
        params = {k: v for k, v in payload.items() if k not in ("webhook_url", "callback_data")}
        problem = validate(params)
        if problem:
            return _error(400, problem)
        request_id = str(uuid.uuid4())
        base = str(request.base_url).rstrip("/")
        task = asyncio.create_task(self._report(request_id, payload, params, base))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return JSONResponse({"status": "queued", "request_id": request_id}, status_code=202)

    async def _report(
        self, request_id: str, payload: dict[str, Any], params: dict[str, Any], base: str
    ) -> None:
        await asyncio.sleep(self.delay)
        body: dict[str, Any] = {
            "request_id": request_id,
            "callback_data": payload.get("callback_data", {}),
        }
        if self.fail_async:
            body.update(status="failed", error="generation failed (emulated)")
        else:
            body.update(status="completed", images=self._make_images(params, base))
        async with httpx.AsyncClient() as client:
            response = await client.post(payload["webhook_url"], json=body, timeout=10)
        self.callbacks.append((payload["webhook_url"], body, response.status_code))

    async def _image(self, request: Request) -> Response:
        self._record(request, None)
        spec = self.images.get(request.path_params["image_id"])
        if spec is None:
            return _error(404, "image not found")
        width, height, colour = spec
        buffer = io.BytesIO()
        if self.noisy:
            noise = random.Random(request.path_params["image_id"]).randbytes(width * height * 3)
            image = Image.frombytes("RGB", (width, height), noise)
        else:
            image = Image.new("RGB", (width, height), colour)
        image.save(buffer, "JPEG", quality=80)
        return Response(buffer.getvalue(), media_type="image/jpeg")

    # -- helpers -----------------------------------------------------------------------

    def _record(self, request: Request, payload: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.url.path,
                "headers": dict(request.headers),
                "json": payload,
                "at": time.monotonic(),
            }
        )

    @staticmethod
    async def _wait(request: Request, seconds: float) -> bool:
        """Sleep `seconds`, or less if the client disconnects; True if it did.

        Ending with the client keeps uvicorn's shutdown (which waits for handlers) quick.
        Call only once the body has been read, so `receive` yields nothing but disconnect.
        """

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(disconnected(), seconds)
            return True
        return False
