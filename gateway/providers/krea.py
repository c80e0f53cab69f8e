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
callback changes nothing. A lost callback costs a later poll (the fallback polls of
`gateway/upstream_wait.py`), never the job.
Polling maps every documented status: backlogged, queued, scheduled, processing, sampling
and intermediate-complete are pending (the word is kept in `upstream_status` and
`metadata["upstream_status"]` for progress); completed (once `completed_at` is set, as
the guide's polling loop checks) is completed with one output per `result.urls`; failed
and cancelled are terminal. A set of jobs is completed only when all are, and failed as
soon as one failed. Krea documents no way to cancel a job.

The other direction, Krea's protocol spoken by the gateway (`/compat/krea`, plumbing in
`gateway/compat/krea.py`), lives here too, on the same tables: `MODELS`, `FIELDS` and
`RANGES` read a Krea request into a `GenerationRequest` (`request_from`), `STATUSES`
shows a gateway job as Krea's job object (`job_view`: the answers and the webhook body),
and `error_body` writes an error as the adapter reads one.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from gateway.errors import (
    BadUserInput,
    GatewayError,
    NotFound,
    ProviderError,
    ProviderRejected,
    ProviderUnavailable,
    renamed,
)
from gateway.formats import content_type_of_url
from gateway.jobs.model import TERMINAL as JOB_TERMINAL
from gateway.jobs.model import Job, iso
from gateway.params import CAMEL_NAMES, SEED_MAX, GenerationRequest, from_image_input
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
DEFAULT_MODEL_PATH = "bfl/flux-1-dev"

#: Krea's job statuses (its API reference's enum, in lifecycle order), each with the
#: gateway job status it means. Read both ways: a Krea job's words as our states
#: (`_state`), and a gateway job's status as Krea's word (`status_of`). Ours are five of
#: Krea's own words, each meaning itself.
STATUSES: dict[str, str] = {
    "backlogged": "queued",
    "queued": "queued",
    "scheduled": "queued",
    "processing": "processing",
    "sampling": "processing",
    "intermediate-complete": "processing",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
PENDING = tuple(word for word, ours in STATUSES.items() if ours not in JOB_TERMINAL)
TERMINAL = tuple(word for word, ours in STATUSES.items() if ours in JOB_TERMINAL)

#: Our parameter -> Krea's field of `POST /generate/image/{model}` (the seed is set per
#: job in `submit`), and Krea's documented range of each ranged field.
FIELDS = {
    "prompt": "prompt",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "guidance": "guidance_scale_flux",
    "seed": "seed",
}
RANGES: dict[str, tuple[float, float]] = {
    "width": (512, 2368),
    "height": (512, 2368),
    "steps": (1, 100),
    "guidance_scale_flux": (0, 24),
}

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def translate(params: ImageParams) -> dict[str, Any]:
    """The body of one job, in Krea's names and ranges (without the per-image seed)."""
    if len(params.prompt) > MAX_PROMPT:
        raise ProviderRejected(
            f"krea accepts prompts of at most {MAX_PROMPT} characters (got {len(params.prompt)})"
        )
    guidance = FIELDS["guidance"]
    return only_set(
        {
            FIELDS["prompt"]: params.prompt,
            FIELDS["width"]: clamp(params.width, *RANGES[FIELDS["width"]], int),
            FIELDS["height"]: clamp(params.height, *RANGES[FIELDS["height"]], int),
            FIELDS["steps"]: clamp(params.steps, *RANGES[FIELDS["steps"]], int),
            guidance: clamp(params.guidance, *RANGES[guidance], float),
        }
    )


def _seed(seed: int, i: int) -> int:
    """Image i's seed: seed + i, within the 32 bits a seed has (`params.SEED_MAX`)."""
    return (seed + i) % (SEED_MAX + 1)


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
        model_path: str = DEFAULT_MODEL_PATH,
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
                job_body["seed"] = _seed(params.seed, i)
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
            metadata["seeds"] = [_seed(params.seed, i) for i in range(count)]
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

    def shown_id(self, upstream_id: str) -> str | None:
        return ",".join(job_id for job_id, _ in _parts(upstream_id))

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
            raise ProviderUnavailable("not a krea upstream id")  # it holds callback tokens
        parts.append((job_id, token))
    return parts


def _job(body: dict[str, Any]) -> dict[str, Any]:
    """Check the fields every job answer carries (Krea's API reference); malformed ->
    unavailable."""
    job_id, status, created_at = body.get("job_id"), body.get("status"), body.get("created_at")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ProviderUnavailable("krea answered without a usable job_id")
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
            raise ProviderUnavailable(f"krea job {job['job_id']} gave a malformed URL")
    return urls


def _failure(job: dict[str, Any]) -> str | None:
    """Why a job failed, when it says: `result.error` (where `job_view` writes it), or a
    top-level error, message or detail."""
    result = job.get("result")
    places = [result if isinstance(result, dict) else {}, job]
    keys = ("error", "message", "detail")
    return next((p[k] for p in places for k in keys if isinstance(p.get(k), str)), None)


def _state(job: dict[str, Any]) -> str:
    """Our state for one job. The guide's loop: a job is over once `completed_at` is set."""
    status = job["status"]
    if STATUSES.get(status) in ("failed", "cancelled"):
        return str(STATUSES[status])
    if job.get("completed_at"):
        return "completed" if STATUSES.get(status) == "completed" else "failed"
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
        detail = _failure(job)
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


# -- served: Krea's protocol spoken by the gateway (/compat/krea) ------------------------------

#: Krea's model paths served under /compat/krea, each with the gateway service it runs
#: on (the seeds show one: the path this adapter submits to by default).
MODELS = {DEFAULT_MODEL_PATH: "flux-dev"}
#: Krea's body fields the gateway takes and has no use for: `strength` weighs an input
#: image it has none of, `relaxedModeAccess` is a Krea billing option.
IGNORED = ("strength", "relaxedModeAccess")
#: Krea's inputs the gateway cannot honour (image prompts, style references, LoRAs):
#: refused when given, rather than silently left out of the picture.
UNSUPPORTED = ("styleImages", "imageStyleRefs", "styles", "imageUrl")
#: the header of a Krea request that becomes our `webhookUrl`
WEBHOOK_HEADER = "X-Webhook-URL"
#: Krea's words for a job further on than `processing` that still mean processing
_PAST_PROCESSING = tuple(
    word for word in PENDING[PENDING.index("processing") + 1 :] if STATUSES[word] == "processing"
)
#: how our errors name a field (`params.CAMEL_NAMES`, the REST spelling) -> Krea's name
_THEIR_NAME = {CAMEL_NAMES[ours]: theirs for ours, theirs in FIELDS.items()}
_THEIR_NAME |= {"webhookUrl": WEBHOOK_HEADER, "idempotencyKey": "Idempotency-Key"}


class UnknownModel(NotFound):
    def __init__(self, model: str) -> None:
        super().__init__(
            f"Unknown model {model[:100]!r}: this gateway serves {', '.join(sorted(MODELS))}",
            field="model",
        )


def request_from(
    model: str,
    body: Any,
    *,
    webhook_url: str | None = None,
    idempotency_key: str | None = None,
) -> GenerationRequest:
    """A Krea generation request (model path, JSON body, `X-Webhook-URL`) as the gateway's
    one parameter model. A value outside Krea's own range is refused as Krea would;
    width and height outside the gateway's 512-2048 are refused; steps and guidance
    within Krea's range but beyond ours are brought into ours. Errors name Krea's field."""
    service = MODELS.get(model.strip("/"))
    if service is None:
        raise UnknownModel(model)
    if not isinstance(body, dict):
        raise BadUserInput("body must be a JSON object")
    known = {*FIELDS.values(), *IGNORED, *UNSUPPORTED}
    unknown = sorted(body.keys() - known)
    if unknown:
        raise BadUserInput(f"{unknown[0]}: not a known parameter", field=unknown[0])
    for name in UNSUPPORTED:
        if body.get(name) not in (None, [], ""):
            raise BadUserInput(f"{name}: not supported by this gateway", field=name)
    for name in ("strength", "seed"):  # numbers in Krea's reference, as width is
        if body.get(name) is not None and not _number(body[name]):
            raise BadUserInput(f"{name}: must be a number", field=name)
    if body.get("relaxedModeAccess") not in (None, True, False):
        raise BadUserInput("relaxedModeAccess: must be a boolean", field="relaxedModeAccess")
    fields: dict[str, Any] = {"service": service}
    for ours, theirs in FIELDS.items():
        value = body.get(theirs)
        if value is None:
            continue
        if theirs in RANGES:
            low, high = RANGES[theirs]
            if not _number(value) or not low <= value <= high:
                raise BadUserInput(f"{theirs}: must be a number, {low} <= x <= {high}", theirs)
            if ours in ("steps", "guidance"):  # in Krea's range, beyond ours: our nearest
                value = clamp(value, *_our_range(ours), type(value))
        fields[ours] = value
    if webhook_url is not None:
        fields["webhookUrl"] = webhook_url
    if idempotency_key:
        fields["idempotencyKey"] = idempotency_key
    try:
        return from_image_input(fields)
    except BadUserInput as exc:
        raise in_their_names(exc) from None


def in_their_names(exc: GatewayError) -> GatewayError:
    """`exc` naming fields as Krea does (`errors.renamed`)."""
    return renamed(exc, _THEIR_NAME)


def status_of(job: Job) -> str:
    """A gateway job's status as Krea's word: its own (ours are Krea's words), or, while
    it runs on Krea, the finer word Krea reported that means the same (sampling,
    intermediate-complete: never a step back from what was shown)."""
    word = job.metadata.get("upstreamStatus")
    on_krea = (job.upstream or {}).get("backend") == KreaProvider.name
    if job.status == "processing" and on_krea and word in _PAST_PROCESSING:
        return str(word)
    return job.status


def as_uuid(job_id: str) -> str:
    """A gateway job id (24 hex digits) in the form of Krea's `job_id`, a UUID (version 4
    and RFC 4122 variant, so a client that validates one takes it): our 96 bits around
    the version and variant digits, the rest zeros. `job_id_of` reverses it."""
    h = job_id.lower()
    return f"{h[:8]}-{h[8:12]}-4{h[12:15]}-8{h[15:18]}-{h[18:24]}000000"


def job_id_of(given: str) -> str:
    """The gateway job id a Krea-shaped `job_id` names (`as_uuid`'s form, or our own id
    as is); "" when it names none (unknown: 404)."""
    plain = given.replace("-", "").lower()
    if len(plain) == 24:
        return plain
    if len(plain) == 32 and plain[12] == "4" and plain[16] == "8" and plain.endswith("0" * 6):
        return plain[:12] + plain[13:16] + plain[17:26]
    return ""


def job_view(job: Job, *, pending: bool = False) -> dict[str, Any]:
    """The gateway job as Krea's job object: the answer to `GET` and `DELETE /jobs/{id}`,
    and the body of the `X-Webhook-URL` callback. `job_id` is the gateway's job id;
    `result` carries the gateway's stored copies.

    `pending`: the answer to `POST /generate/...`, which Krea's reference gives "in a
    pending state until the job is completed" (`completed_at` and `result` null, both
    required): a job that ended at once (a cache hit) is `queued` there, and its end is
    what the next `GET` (or the callback) shows."""
    if pending and job.ended:
        return {**job_view(job), "status": "queued", "completed_at": None, "result": None}
    result: dict[str, Any] | None = None
    if job.status == "completed":
        result = {"urls": list(job.urls)}
    elif job.status == "failed":
        result = {"error": job.error or "failed"}
    return {
        "job_id": as_uuid(job.id),
        "status": status_of(job),
        "created_at": iso(job.created_at),
        "completed_at": iso(job.completed_at) if job.ended else None,
        "result": result,
    }


def error_body(exc: GatewayError) -> dict[str, Any]:
    """An error as Krea's answers carry one (`message`, what `_failure` and the upstream
    error reader look for), with our code beside it."""
    return {"message": exc.message, "code": exc.code}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _our_range(name: str) -> tuple[float, float]:
    """The gateway's own range of a parameter, as `GenerationRequest` declares it."""
    low, high = float("-inf"), float("inf")
    for rule in GenerationRequest.model_fields[name].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high
