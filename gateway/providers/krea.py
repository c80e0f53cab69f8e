"""Krea's job API: submit a job, poll `/jobs/{id}`, download the URLs (Krea's API
reference and its getting-started guide).

Parameters, ours -> Krea's (`POST /generate/image/{model_path}`): see `translate`. A Krea
job makes one image, so `num_images` becomes that many jobs, image i with seed + i; our
output_format, aspect_ratio and quality have no Krea counterpart (width and height carry
the size, and the worker converts the format). Krea's answer -> ours: see `_combine`.

Several jobs travel as one opaque `upstream_id`: their ids joined with commas. Given a
callback inbox (the gateway has a public URL), each job is submitted with the
`X-Webhook-URL` header of Krea's API reference pointing at `/v1/callbacks/krea/<token>`
(a token per job, kept in the id as `<job id>:<token>`): the worker then waits for the
callback instead of polling every 2 s, and polls once when it comes. The callback only
wakes; what is true is still read from `GET /jobs/{id}` with our token, so a forged
callback changes nothing. A lost callback costs a slower poll (`Router`), never the job.
Polling maps every documented status: backlogged, queued, scheduled, processing, sampling
and intermediate-complete are pending (the word is kept in `upstream_status` and
`metadata["upstream_status"]` for progress); completed (once `completed_at` is set, as
the guide's polling loop checks) is completed with one output per `result.urls`; failed
and cancelled are terminal. A set of jobs is completed only when all are, and failed as
soon as one failed. Krea documents no way to cancel a job.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

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
from gateway.providers.http import HTTPBackend, UpstreamClient

MAX_PROMPT = 1800

# Documented statuses, in lifecycle order (the job status enum of Krea's API reference).
PENDING = ("backlogged", "queued", "scheduled", "processing", "sampling", "intermediate-complete")
TERMINAL = ("completed", "failed", "cancelled")

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def translate(params: ImageParams) -> dict[str, Any]:
    """The body of one job, in Krea's names and ranges (without the per-image seed)."""
    if len(params.prompt) > MAX_PROMPT:
        raise ProviderRejected(
            f"krea accepts prompts of at most {MAX_PROMPT} characters (got {len(params.prompt)})"
        )
    return only_set(
        {
            "prompt": params.prompt,
            "width": clamp(params.width, 512, 2368, int),
            "height": clamp(params.height, 512, 2368, int),
            "steps": clamp(params.steps, 1, 100, int),
            "guidance_scale_flux": clamp(params.guidance, 0.0, 24.0, float),
        }
    )


class KreaProvider(HTTPBackend):
    name = upstream = "krea"
    credential_setting = "GATEWAY_KREA_API_TOKEN"
    poll_interval = 2.0  # Krea's guide: "Poll /jobs/{job_id} every 2 seconds"

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
        super().__init__(client, base_url=base_url, credential=token, timeout=timeout)
        self.inbox = inbox
        self.model_path = model_path.strip("/")

    async def submit(self, params: ImageParams) -> Submitted:
        body = translate(params)
        headers = self.headers()
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
                response = await self.send(
                    "POST", url, idempotent=False, headers=job_headers, json=job_body
                )
                job = _job(self.json_object(response))
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
        jobs = []
        for job_id in job_ids:
            response = await self.send("GET", f"{self.base_url}/jobs/{job_id}", idempotent=True)
            jobs.append(_job(self.json_object(response)))
        return _combine(jobs)


def _parts(upstream_id: str) -> list[tuple[str, str]]:
    """(job id, callback token or "") for each job of an upstream id."""
    parts = []
    for part in upstream_id.split(","):
        job_id, _, token = part.strip().partition(":")
        if not _JOB_ID.match(job_id) or (token and not _JOB_ID.match(token)):
            raise ProviderUnavailable(f"not a krea upstream id: {upstream_id!r}")
        parts.append((job_id, token))
    return parts


def _job(body: dict[str, Any]) -> dict[str, Any]:
    """Check the fields every job answer carries (Krea's API reference); malformed ->
    unavailable."""
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


def _state(job: dict[str, Any]) -> str:
    """Our state for one job. The guide's loop: a job is over once `completed_at` is set."""
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
            Output(url=url, content_type=content_type_of_url(url))
            for job in jobs
            for url in _urls(job)
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
