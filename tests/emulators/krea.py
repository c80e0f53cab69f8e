"""An emulator of Krea's job API, written from its public docs (docs/providers/krea.md).

- `POST /generate/image/{model_path}` (Bearer auth) validates the body against the API reference's
  ranges (prompt required, at most 1800 characters; steps an integer 1-100; width and
  height 512-2368; guidance_scale_flux 0-24), answers 400 with a JSON message when
  invalid, and otherwise answers like the API reference: `job_id` (a uuid), status `backlogged`,
  `created_at`, `completed_at: null`, `result: null`.
- `GET /jobs/{id}` advances the job one documented status per poll: backlogged ->
  queued -> scheduled -> processing -> sampling -> intermediate-complete -> completed.
  The job ends on poll number `steps_to_complete` (so 1 completes at the first poll);
  a finished job carries `completed_at`, and when completed `result.urls` with an
  absolute URL of a real PNG served by the emulator at `/files/{job_id}.png`.
- Unknown job -> 404; bad or missing token -> 401.
- `X-Webhook-URL`: when a job ends, the emulator POSTs the job data (as
  `GET /jobs/{id}` answers it, results included) to that URL. With `job_seconds` set,
  jobs end that many seconds after their submission instead of by polls.

Knobs for tests, plain attributes and methods: `requests` (every request received, as
`(method, path, headers, json)`, with `received_at` holding each one's monotonic time),
`submissions` (POSTs that reached the generate endpoint), `fail_next`,
`rate_limit_next`, `malformed_next`, `stall`, `fail_jobs`, `cancel_jobs`, `job_seconds`,
`drop_webhooks`, `webhooks_sent`, and `jobs` (whose `outcome` a test may set per job).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import httpx
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

LIFECYCLE = (
    "backlogged",
    "queued",
    "scheduled",
    "processing",
    "sampling",
    "intermediate-complete",
)
MODELS = frozenset({"bfl/flux-1-dev"})


class Received(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    json: Any


@dataclass
class Job:
    job_id: str
    model: str
    body: dict[str, Any]
    created_at: str
    polls: int = 0
    status: str = "backlogged"
    completed_at: str | None = None
    #: how the job ends; None means completed (or failed/cancelled per the emulator knobs)
    outcome: str | None = None
    webhook_url: str | None = None
    base_url: str = ""

    @property
    def width(self) -> int:
        return int(self.body.get("width", 1024))

    @property
    def height(self) -> int:
        return int(self.body.get("height", 1024))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate(body: Any) -> str | None:
    """Krea's webhook body schema (tests/seeds/003_*.txt); the first problem found, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return "prompt: required string"
    if len(prompt) > 1800:
        return "prompt: maximum string length is 1800"
    for name in ("strength", "seed"):
        if name in body and not _is_number(body[name]):
            return f"{name}: must be a number"
    if "steps" in body:
        steps = body["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= 100:
            return "steps: must be an integer, 1 <= x <= 100"
    for name in ("width", "height"):
        if name in body and (not _is_number(body[name]) or not 512 <= body[name] <= 2368):
            return f"{name}: must be a number, 512 <= x <= 2368"
    if "guidance_scale_flux" in body:
        value = body["guidance_scale_flux"]
        if not _is_number(value) or not 0 <= value <= 24:
            return "guidance_scale_flux: must be a number, 0 <= x <= 24"
    if "imageUrl" in body and not isinstance(body["imageUrl"], str):
        return "imageUrl: must be a URI"
    if "relaxedModeAccess" in body and not isinstance(body["relaxedModeAccess"], bool):
        return "relaxedModeAccess: must be a boolean"
    for name in ("styleImages", "imageStyleRefs", "styles"):
        if name in body and not isinstance(body[name], list):
            return f"{name}: must be an array"
    return None


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 120, 40)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


Handler = Callable[[Request], Awaitable[Response]]


class KreaEmulator:
    def __init__(
        self,
        token: str = "test-token",
        *,
        steps_to_complete: int = len(LIFECYCLE),
        models: frozenset[str] = MODELS,
    ) -> None:
        self.token = token
        #: the job ends on this poll (1 = the first poll already answers completed)
        self.steps_to_complete = steps_to_complete
        self.models = models
        self.requests: list[Received] = []
        self.received_at: list[float] = []
        self.submissions = 0
        self.jobs: dict[str, Job] = {}
        #: seconds to sleep before answering any request
        self.stall = 0.0
        #: jobs end in status failed (or cancelled) instead of completed
        self.fail_jobs = False
        self.cancel_jobs = False
        #: when set, jobs end this many seconds after submission (polls do not advance them)
        self.job_seconds: float | None = None
        #: per submitted job in turn, its own `job_seconds` (then `job_seconds` again)
        self.job_delays: list[float] = []
        #: webhooks are not sent (lost on the way)
        self.drop_webhooks = False
        #: (url, body) of every webhook sent
        self.webhooks_sent: list[tuple[str, dict[str, Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._fail: list[tuple[int, str]] = []
        self._rate_limit: list[int] = []
        self._malformed = 0
        self.app = Starlette(
            routes=[
                Route(
                    "/generate/image/{model:path}",
                    self._wrap(self._generate, auth=True),
                    methods=["POST"],
                ),
                Route("/jobs/{job_id}", self._wrap(self._job, auth=True), methods=["GET"]),
                Route("/files/{name}", self._wrap(self._file, auth=False), methods=["GET"]),
            ]
        )

    # -- knobs -------------------------------------------------------------------------
    def fail_next(self, n: int, status: int = 500, message: str = "emulated failure") -> None:
        """Answer the next `n` requests with `status` and a JSON message."""
        self._fail += [(status, message)] * n

    def rate_limit_next(self, n: int, retry_after: int = 1) -> None:
        """Answer the next `n` requests with 429 and `Retry-After: retry_after`."""
        self._rate_limit += [retry_after] * n

    def malformed_next(self, n: int) -> None:
        """Answer the next `n` requests with 200 and a body that is not valid JSON."""
        self._malformed += n

    def received(self, method: str, path_prefix: str = "") -> list[Received]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    # -- plumbing ----------------------------------------------------------------------
    def _wrap(self, handler: Handler, *, auth: bool) -> Handler:
        async def endpoint(request: Request) -> Response:
            raw = await request.body()
            try:
                payload = await request.json() if raw else None
            except ValueError:
                payload = None
            self.requests.append(
                Received(request.method, request.url.path, dict(request.headers), payload)
            )
            self.received_at.append(time.monotonic())
            if request.method == "POST" and request.url.path.startswith("/generate/"):
                self.submissions += 1
            if self.stall:
                await asyncio.sleep(self.stall)
            if self._fail:
                status, message = self._fail.pop(0)
                return JSONResponse({"message": message}, status_code=status)
            if self._rate_limit:
                retry_after = self._rate_limit.pop(0)
                return JSONResponse(
                    {"message": "Too many requests"},
                    status_code=429,
                    headers={"Retry-After": str(retry_after)},
                )
            if self._malformed:
                self._malformed -= 1
                return Response(b'{"job_id": "', media_type="application/json")
            if auth and request.headers.get("authorization") != f"Bearer {self.token}":
                return JSONResponse({"message": "Unauthorized"}, status_code=401)
            if raw and payload is None:
                return JSONResponse({"message": "body is not valid JSON"}, status_code=400)
            return await handler(request)

        return endpoint

    def _view(self, job: Job, base_url: str) -> dict[str, Any]:
        result = None
        if job.status == "completed":
            result = {"urls": [f"{base_url}files/{job.job_id}.png"]}
        return {
            "job_id": job.job_id,
            "status": job.status,
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "result": result,
        }

    # -- endpoints ---------------------------------------------------------------------
    async def _generate(self, request: Request) -> Response:
        model = request.path_params["model"]
        if model not in self.models:
            return JSONResponse({"message": f"Unknown model {model}"}, status_code=404)
        body = await request.json()
        problem = validate(body)
        if problem:
            return JSONResponse({"message": problem}, status_code=400)
        job = Job(
            job_id=str(uuid.uuid4()),
            model=model,
            body=body,
            created_at=_now(),
            webhook_url=request.headers.get("x-webhook-url"),
            base_url=str(request.base_url),
        )
        self.jobs[job.job_id] = job
        if self.job_seconds is not None:
            delay = self.job_delays.pop(0) if self.job_delays else self.job_seconds
            asyncio.get_running_loop().call_later(delay, self._end_soon, job)
        return JSONResponse(self._view(job, job.base_url))

    async def _job(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["job_id"])
        if job is None:
            return JSONResponse({"message": "Job not found"}, status_code=404)
        job.polls += 1
        if job.completed_at is None and self.job_seconds is not None:
            job.status = "processing"
        elif job.completed_at is None:
            if job.polls >= self.steps_to_complete:
                self._end(job)
            else:
                job.status = LIFECYCLE[min(job.polls, len(LIFECYCLE) - 1)]
        return JSONResponse(self._view(job, str(request.base_url)))

    def _end(self, job: Job) -> None:
        if job.outcome:
            job.status = job.outcome
        elif self.fail_jobs:
            job.status = "failed"
        elif self.cancel_jobs:
            job.status = "cancelled"
        else:
            job.status = "completed"
        job.completed_at = _now()
        if job.webhook_url and not self.drop_webhooks:
            task = asyncio.get_running_loop().create_task(self._call_back(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _end_soon(self, job: Job) -> None:
        if job.completed_at is None:
            self._end(job)

    async def _call_back(self, job: Job) -> None:
        assert job.webhook_url is not None
        body = self._view(job, job.base_url)
        self.webhooks_sent.append((job.webhook_url, body))
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient(timeout=10) as client:
                await client.post(job.webhook_url, json=body)

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        job = self.jobs.get(name.removesuffix(".png"))
        if job is None or not name.endswith(".png") or job.status != "completed":
            return JSONResponse({"message": "Not found"}, status_code=404)
        return Response(png(job.width, job.height), media_type="image/png")
