"""Krea's job API (seeds 002 and 003): submit a job, poll `/jobs/{id}`, download the URLs.

Parameter mapping, ours -> Krea's (`POST /generate/image/{model_path}`):

| ours (ImageParams) | Krea                  | notes                                          |
|--------------------|-----------------------|------------------------------------------------|
| prompt             | prompt                | at most 1800 characters, else ProviderRejected |
| width, height      | width, height         | clamped to 512-2368                            |
| steps              | steps                 | only when set; clamped to 1-100                |
| guidance           | guidance_scale_flux   | only when set; clamped to 0-24                 |
| seed               | seed                  | only when set; image i gets seed + i           |
| num_images         | (one job per image)   | a Krea job makes one image                     |
| output_format, aspect_ratio, quality | -   | not in Krea's API; width/height carry the size |

Several jobs travel as one opaque `upstream_id`: their ids joined with commas. Given a
callback inbox (the gateway has a public URL), each job is submitted with seed 003's
`X-Webhook-URL` header pointing at `/v1/callbacks/krea/<token>` (a token per job, kept
in the id as `<job id>:<token>`): the worker then waits for the callback instead of
polling every 2 s, and polls once when it comes. The callback only wakes; what is true
is still read from `GET /jobs/{id}` with our token, so a forged callback changes
nothing. A lost callback costs a slower poll (`Router`), never the job. Polling
maps every documented status: backlogged, queued, scheduled, processing, sampling and
intermediate-complete are pending (the word is kept in `upstream_status` and
`metadata["upstream_status"]` for progress); completed (once `completed_at` is set, as
seed 002's polling loop checks) is completed with one output per `result.urls`;
failed and cancelled are terminal. A set of jobs is completed only when all are, and
failed as soon as one failed.
"""

from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ProviderError, ProviderRejected, ProviderUnavailable
from gateway.providers.base import (
    CONTENT_TYPES,
    CallbackInbox,
    ImageParams,
    Output,
    Polled,
    Submitted,
)
from gateway.providers.http import UpstreamClient, download, json_body, request

UPSTREAM = "krea"
MAX_PROMPT = 1800
SIZE_RANGE = (512, 2368)
STEPS_RANGE = (1, 100)
GUIDANCE_RANGE = (0.0, 24.0)

# Documented statuses, in lifecycle order (seed 003's enum).
PENDING = ("backlogged", "queued", "scheduled", "processing", "sampling", "intermediate-complete")
TERMINAL = ("completed", "failed", "cancelled")

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def _clamp(value: float, bounds: tuple[float, float]) -> float:
    return max(bounds[0], min(bounds[1], value))


class KreaProvider:
    name = "krea"
    poll_interval = 2.0  # seed 002: "Poll /jobs/{job_id} every 2 seconds"

    def __init__(
        self,
        client: UpstreamClient,
        *,
        base_url: str,
        token: str | None,
        model_path: str = "bfl/flux-1-dev",
        timeout: float = 30.0,
        inbox: CallbackInbox | None = None,
    ) -> None:
        self.inbox = inbox
        self.client = client
        self.base_url = base_url.rstrip("/")
        self.token = token
        self._auth = {"Authorization": f"Bearer {token}"} if token else None
        self.model_path = model_path.strip("/")
        self.timeout = timeout

    def status(self) -> tuple[bool, str]:
        if not self.token:
            return False, "GATEWAY_KREA_API_TOKEN is not set"
        return True, "ok"

    def _headers(self) -> dict[str, str]:
        if self._auth is None:
            raise ProviderUnavailable("krea is not configured: GATEWAY_KREA_API_TOKEN is not set")
        return self._auth  # one dict for every call: nothing changes it

    def translate(self, params: ImageParams) -> dict[str, Any]:
        """The body of one job, in Krea's names and ranges (without the per-image seed)."""
        if len(params.prompt) > MAX_PROMPT:
            raise ProviderRejected(
                f"krea accepts prompts of at most {MAX_PROMPT} characters "
                f"(got {len(params.prompt)})"
            )
        body: dict[str, Any] = {
            "prompt": params.prompt,
            "width": int(_clamp(params.width, SIZE_RANGE)),
            "height": int(_clamp(params.height, SIZE_RANGE)),
        }
        if params.steps is not None:
            body["steps"] = int(_clamp(params.steps, STEPS_RANGE))
        if params.guidance is not None:
            body["guidance_scale_flux"] = float(_clamp(params.guidance, GUIDANCE_RANGE))
        return body

    async def submit(self, params: ImageParams) -> Submitted:
        body = self.translate(params)
        headers = self._headers()
        count = max(1, params.num_images)
        url = f"{self.base_url}/generate/image/{self.model_path}"
        job_ids: list[str] = []
        tokens: list[str] = []
        created: list[str] = []
        sent: list[dict[str, Any]] = []
        for i in range(count):
            job_body = dict(body)
            if params.seed is not None:
                job_body["seed"] = params.seed + i
            token = ""
            job_headers = headers
            try:
                if self.inbox is not None:
                    token = secrets.token_urlsafe(24)
                    await self.inbox.expect(token)
                    job_headers = {**headers, "X-Webhook-URL": self.inbox.url_for(self.name, token)}
                # Not idempotent: a 5xx or a timeout may hide an accepted (paid) job.
                response = await request(
                    self.client,
                    "POST",
                    url,
                    upstream=UPSTREAM,
                    idempotent=False,
                    timeout=self.timeout,
                    headers=job_headers,
                    json=job_body,
                )
                job = _job(json_body(response, UPSTREAM))
            except ProviderError as exc:
                if not job_ids:
                    raise
                # Krea has no cancel endpoint: say which accepted jobs are left running.
                message = f"{exc.message} (accepted krea jobs left running: {job_ids})"
                raise type(exc)(message, retry_after=exc.retry_after) from exc
            job_ids.append(job["job_id"])
            tokens.append(token)
            created.append(job["created_at"])
            sent.append(job_body)
        metadata: dict[str, Any] = {
            "upstream_job_ids": job_ids,
            "upstream_created_at": created[0],
        }
        if params.seed is not None:
            metadata["seeds"] = [params.seed + i for i in range(count)]
        return Submitted(
            upstream_id=",".join(
                f"{job_id}:{token}" if token else job_id
                for job_id, token in zip(job_ids, tokens, strict=True)
            ),
            sent=sent[0] if count == 1 else {**sent[0], "num_jobs": count},
            metadata=metadata,
        )

    def callbacks(self, upstream_id: str) -> list[str]:
        return [token for _, token in _parts(upstream_id) if token]

    async def poll(self, upstream_id: str) -> Polled:
        job_ids = [job_id for job_id, _ in _parts(upstream_id)]
        headers = self._headers()
        jobs = []
        for job_id in job_ids:
            response = await request(
                self.client,
                "GET",
                f"{self.base_url}/jobs/{job_id}",
                upstream=UPSTREAM,
                idempotent=True,
                timeout=self.timeout,
                headers=headers,
            )
            jobs.append(_job(json_body(response, UPSTREAM)))
        return _combine(jobs)

    async def cancel(self, upstream_id: str) -> None:
        """No-op: seeds 002 and 003 document no way to cancel a Krea job.

        The job runs to its end upstream; the worker simply stops polling it.
        """

    async def fetch(self, output: Output) -> bytes:
        if output.data is not None:
            return output.data
        if not output.url:
            raise ProviderUnavailable("krea output has no URL")
        return await download(self.client, output.url, upstream=UPSTREAM)


def _parts(upstream_id: str) -> list[tuple[str, str]]:
    """(job id, callback token or "") for each job of an upstream id."""
    parts = []
    for part in upstream_id.split(","):
        job_id, _, token = part.strip().partition(":")
        if not _JOB_ID.match(job_id) or (token and not _JOB_ID.match(token)):
            raise ProviderUnavailable(f"not a krea upstream id: {upstream_id!r}")
        parts.append((job_id, token))
    return parts


def _job(body: Any) -> dict[str, Any]:
    """Check the fields every job answer carries (seed 003); malformed -> unavailable."""
    if not isinstance(body, dict):
        raise ProviderUnavailable("krea answered with something other than a job object")
    job_id, status, created_at = body.get("job_id"), body.get("status"), body.get("created_at")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ProviderUnavailable(f"krea answered without a usable job_id: {job_id!r}")
    if not isinstance(status, str) or not status:
        raise ProviderUnavailable(f"krea job {job_id} has no status")
    if not isinstance(created_at, str):
        raise ProviderUnavailable(f"krea job {job_id} has no created_at")
    completed_at = body.get("completed_at")
    if completed_at is not None and not isinstance(completed_at, str):
        raise ProviderUnavailable(f"krea job {job_id} has a malformed completed_at")
    return body


def _urls(job: dict[str, Any]) -> list[str]:
    result = job.get("result")
    urls = result.get("urls") if isinstance(result, dict) else None
    if not isinstance(urls, list):
        raise ProviderUnavailable(f"krea job {job['job_id']} completed without result.urls")
    for url in urls:
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise ProviderUnavailable(f"krea job {job['job_id']} gave a malformed URL: {url!r}")
    return urls


def _content_type(url: str) -> str | None:
    path = urlsplit(url).path.lower()
    suffix = path.rsplit(".", 1)[-1] if "." in path else ""
    return CONTENT_TYPES.get("jpg" if suffix == "jpeg" else suffix)


def _state(job: dict[str, Any]) -> str:
    """Our state for one job. Seed 002's loop: a job is over once `completed_at` is set."""
    status = job["status"]
    if status in ("failed", "cancelled"):
        return status
    if job.get("completed_at"):
        return "completed" if status == "completed" else "failed"
    return "pending"  # the documented pending words, and completed without completed_at


def _combine(jobs: list[dict[str, Any]]) -> Polled:
    statuses = [job["status"] for job in jobs]
    states = [_state(job) for job in jobs]
    completed_ats = [job["completed_at"] for job in jobs if job.get("completed_at")]
    metadata: dict[str, Any] = {
        "upstream_job_ids": [job["job_id"] for job in jobs],
        "upstream_statuses": statuses,
        "upstream_created_at": min(job["created_at"] for job in jobs),
        "upstream_completed_at": max(completed_ats) if len(completed_ats) == len(jobs) else None,
    }

    if "failed" in states:
        index = states.index("failed")
        job = jobs[index]
        detail = next(
            (job[k] for k in ("error", "message", "detail") if isinstance(job.get(k), str)), None
        )
        error = f"krea job {job['job_id']} ended with status {job['status']!r}"
        if detail:
            error += f": {detail}"
        metadata["upstream_status"] = job["status"]
        return Polled(state="failed", upstream_status=job["status"], error=error, metadata=metadata)
    if "cancelled" in states:
        metadata["upstream_status"] = "cancelled"
        return Polled(
            state="cancelled",
            upstream_status="cancelled",
            error=f"krea job {jobs[states.index('cancelled')]['job_id']} was cancelled upstream",
            metadata=metadata,
        )
    if all(state == "completed" for state in states):
        outputs = [
            Output(url=url, content_type=_content_type(url)) for job in jobs for url in _urls(job)
        ]
        if not outputs:
            metadata["upstream_status"] = "completed"
            return Polled(
                state="failed",
                upstream_status="completed",
                error="krea completed without any image",
                metadata=metadata,
            )
        metadata["upstream_status"] = "completed"
        return Polled(
            state="completed", upstream_status="completed", outputs=outputs, metadata=metadata
        )
    # Pending: report the least advanced job, which bounds the progress of the whole set.
    pending = [job["status"] for job, state in zip(jobs, states, strict=True) if state == "pending"]
    upstream_status = min(pending, key=lambda s: PENDING.index(s) if s in PENDING else -1)
    metadata["upstream_status"] = upstream_status
    return Polled(state="pending", upstream_status=upstream_status, metadata=metadata)
