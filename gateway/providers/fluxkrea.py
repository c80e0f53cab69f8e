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

The other direction, flux-krea's protocol spoken by the gateway (`/compat/fluxkrea`,
plumbing in `gateway/compat/fluxkrea.py`), lives here too, on the same tables: `FIELDS`
reads a flux-krea request into a `GenerationRequest` (`request_from`); the answer words
(`SUCCESS`, `QUEUED`, `COMPLETED`, `FAILED`) and the async endpoint's fields
(`WEBHOOK_URL`, `CALLBACK_DATA`) write the answers and the webhook body as `submit` and
`poll` read them; `ERRORS` and `QUOTA_EXCEEDED` write errors as `_quota_exceeded` reads them.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urljoin

from gateway.errors import (
    BadUserInput,
    GatewayError,
    ProviderRejected,
    ProviderUnavailable,
    renamed,
)
from gateway.formats import content_type_of_url
from gateway.jobs.model import Job
from gateway.params import CAMEL_NAMES, GenerationRequest, from_image_input
from gateway.providers.base import (
    CallbackInbox,
    ImageParams,
    Output,
    Polled,
    Submitted,
    clamp,
    only_set,
)
from gateway.providers.http import Answer, HTTPBackend, UpstreamClient, json_body, log

DEFAULT_BASE_URL = "https://api.flux-krea.pro/v1"

PROMPT_MAX = 1000
SEED_MODULUS = 2**31  # seeds are 0-2147483647

#: Our parameter -> flux-krea's field of `POST /generate` (and `/generate/async`), in
#: the guide's order.
FIELDS = {
    "prompt": "prompt",
    "width": "width",
    "height": "height",
    "guidance": "guidance_scale",
    "steps": "num_inference_steps",
    "seed": "seed",
    "num_images": "num_images",
}
#: the guide's defaults for what shapes the picture, pinned on its route's requests: a
#: request that leaves them out is drawn with them by whichever backend runs it (Segmind's
#: own are 7 and 40 steps), and cached as such
DEFAULTS = {"guidance": 7.5, "steps": 4}
#: the async endpoint's own fields: where to report, and what to report back with it
WEBHOOK_URL, CALLBACK_DATA = "webhook_url", "callback_data"
#: the `status` words of flux-krea's answers: a synchronous generation done, an async
#: one accepted, and the two outcomes its webhook reports
SUCCESS, QUEUED, COMPLETED, FAILED = "success", "queued", "completed", "failed"
#: the guide's error table: status -> error type
ERRORS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    429: "Rate Limited",
    500: "Server Error",
}
#: the `error_code` of a 403 for quota (the guide's client raises QuotaExceededError)
QUOTA_EXCEEDED = "quota_exceeded"


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
            FIELDS["prompt"]: params.prompt,
            FIELDS["width"]: clamp(params.width, 512, 2048, int),
            FIELDS["height"]: clamp(params.height, 512, 2048, int),
            FIELDS["guidance"]: clamp(params.guidance, 1.0, 20.0, float),  # upstream: 7.5
            FIELDS["steps"]: clamp(params.steps, 1, 50, int),  # upstream: 4
            FIELDS["seed"]: None if params.seed is None else params.seed % SEED_MODULUS,
            FIELDS["num_images"]: clamp(params.num_images, 1, 4, int),
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

    def refused_credential(self, answer: Answer) -> bool:
        return answer.status_code == 401 or (
            answer.status_code == 403 and not _quota_exceeded(answer)
        )

    async def _post(self, path: str, body: dict[str, Any]) -> Answer:
        try:
            # Not idempotent: a re-sent generate could be charged twice.
            return await self.send("POST", f"{self.base_url}{path}", idempotent=False, json=body)
        except ProviderUnavailable as exc:
            if exc.answer is not None and _quota_exceeded(exc.answer):
                log.warning("upstream quota exceeded on our account", upstream=self.upstream)
            raise

    async def submit(self, params: ImageParams) -> Submitted:
        body = translate(params)
        if self.inbox is not None:
            return await self._submit_async(body)
        response = await self._post("/generate", body)
        data = self.json_object(response)
        if data.get("status") != SUCCESS:
            # What it says goes to our log only: the reason is shown in the job's `error`
            # and the public `providers` list (docs/api.md#failover).
            status = str(data.get("status"))[:32]
            detail = str(data.get("message") or data.get("error") or "")[:200]
            log.warning("flux-krea answered no success", status=status, detail=detail)
            raise ProviderUnavailable(f"flux-krea answered status {status!r}")
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
            WEBHOOK_URL: self.inbox.url_for(self.name, token),
            CALLBACK_DATA: {"token": token},
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

    def shown_id(self, upstream_id: str) -> str | None:
        # Async mode's id is our callback token (its request id is `upstream_request_id`).
        return None if self.inbox is not None else upstream_id

    async def poll(self, upstream_id: str) -> Polled:
        """Async mode: what the upstream reported to our callback URL, if it has."""
        if self.inbox is None:
            raise ProviderUnavailable("flux-krea jobs complete synchronously")
        report = await self.inbox.take(upstream_id)
        if not report:
            return Polled(state="pending", upstream_status="queued")
        status = report.get("status")
        meta = {"upstream_request_id": report.get("request_id")}
        if status == FAILED:
            return Polled(
                state="failed",
                upstream_status=FAILED,
                metadata=meta,
                error=f"flux-krea: {str(report.get('error') or 'failed')[:200]}",
            )
        images = report.get("images")
        if status != COMPLETED or not isinstance(images, list) or not images:
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
            upstream_status=COMPLETED,
            metadata=meta,
            outputs=[_output(image, defaults, base) for image in images],
        )


def _quota_exceeded(response: Answer) -> bool:
    """A 403 whose `error_code` says our account's quota is used up (the guide's
    QuotaExceededError)."""
    if response.status_code != 403:
        return False
    try:
        payload = response.json()
    except ValueError:
        return False
    code = payload.get("error_code") if isinstance(payload, dict) else None
    return isinstance(code, str) and QUOTA_EXCEEDED in code


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


# -- served: flux-krea's protocol spoken by the gateway (/compat/fluxkrea) --------------------

#: the gateway service flux-krea's endpoints run on (the API has no model parameter)
SERVICE = "flux-krea"
#: how our errors name a field (`params.CAMEL_NAMES`, the REST spelling) -> flux-krea's
_THEIR_NAME = {CAMEL_NAMES[ours]: theirs for ours, theirs in FIELDS.items()}
_THEIR_NAME |= {"webhookUrl": WEBHOOK_URL, "idempotencyKey": "Idempotency-Key"}
#: our error codes as the `error_code` of flux-krea's error bodies
_ERROR_CODES = {
    "BAD_USER_INPUT": "invalid_request",
    "UNAUTHENTICATED": "invalid_api_key",
    "INSUFFICIENT_CREDITS": QUOTA_EXCEEDED,
    "RATE_LIMITED": "rate_limited",
}


def request_from(
    body: Any, *, asynchronous: bool, idempotency_key: str | None = None
) -> tuple[GenerationRequest, Any]:
    """A flux-krea request (`POST /v1/generate`, or `/v1/generate/async` with its
    `webhook_url` and `callback_data`) as the gateway's one parameter model, and the
    `callback_data` to report back (None when synchronous). The guide's ranges are the
    gateway's own, but for the seed's: the guide's 0-2147483647 is kept here, narrower
    than ours. Errors name flux-krea's field."""
    if not isinstance(body, dict):
        raise BadUserInput("malformed request: the body must be a JSON object")
    extra = (WEBHOOK_URL, CALLBACK_DATA) if asynchronous else ()
    unknown = sorted(body.keys() - {*FIELDS.values(), *extra})
    if unknown:
        where = (
            " (only /v1/generate/async takes it)"
            if unknown[0] in (WEBHOOK_URL, CALLBACK_DATA)
            else ""
        )
        raise BadUserInput(f"{unknown[0]} is not a known parameter{where}", field=unknown[0])
    fields: dict[str, Any] = {"service": SERVICE}
    fields |= {ours: body[theirs] for ours, theirs in FIELDS.items() if theirs in body}
    fields |= {ours: value for ours, value in DEFAULTS.items() if fields.get(ours) is None}
    if asynchronous:
        if not isinstance(body.get(WEBHOOK_URL), str) or not body[WEBHOOK_URL]:
            raise BadUserInput(f"{WEBHOOK_URL} is required", field=WEBHOOK_URL)
        fields["webhookUrl"] = body[WEBHOOK_URL]
    if idempotency_key:
        fields["idempotencyKey"] = idempotency_key
    if _past_their_seeds(body.get(FIELDS["seed"])):  # within ours, not theirs
        raise BadUserInput(
            f"seed: Input should be less than or equal to {SEED_MODULUS - 1}", field="seed"
        )
    try:
        request = from_image_input(fields)
    except BadUserInput as exc:
        raise in_their_names(exc) from None
    return request, body.get(CALLBACK_DATA) if asynchronous else None


def _past_their_seeds(seed: object) -> bool:
    """A seed, given as a number or as the string of one (which validation then reads as
    the number), past flux-krea's range."""
    if not isinstance(seed, int | float | str) or isinstance(seed, bool):
        return False
    try:
        return float(seed) >= SEED_MODULUS
    except OverflowError:  # an integer past any float
        return True
    except ValueError:  # not a number: validation says so
        return False


def in_their_names(exc: GatewayError) -> GatewayError:
    """`exc` naming fields as flux-krea does (`errors.renamed`)."""
    return renamed(exc, _THEIR_NAME)


def images_of(job: Job) -> list[dict[str, Any]]:
    """A completed job's outputs as flux-krea's `images` (the gateway's stored copies)."""
    seeds = job.metadata.get("seeds") or []
    default = job.metadata.get("seed", job.params.get("seed"))
    return [
        {
            "url": url,
            "seed": seeds[i] if i < len(seeds) and seeds[i] is not None else default,
            "width": job.width,
            "height": job.height,
        }
        for i, url in enumerate(job.urls)
    ]


def success_body(job: Job) -> dict[str, Any]:
    """The synchronous answer to a completed job: the guide's "Successful Response".
    `request_id` is the gateway's job id, `credits_used` the gateway credits it cost."""
    return {
        "status": SUCCESS,
        "request_id": job.id,
        "images": images_of(job),
        "generation_time": job.duration if job.duration is not None else 0.0,
        "credits_used": job.credit_cost,
    }


def accepted_body(job: Job) -> dict[str, Any]:
    """The answer to `POST /v1/generate/async`: accepted, reported later."""
    return {"status": QUEUED, "request_id": job.id}


def failure_body(job: Job) -> dict[str, Any]:
    """A job that ended without images, as the webhook reports it (and the synchronous
    endpoint answers it, with a 5xx)."""
    reason = job.error or f"the generation was {job.status}"
    return {"status": FAILED, "request_id": job.id, "error": reason, "message": reason}


def rejected_body(job: Job) -> dict[str, Any]:
    """A job whose input the upstream refused, as the synchronous endpoint answers it:
    the guide's 400 (its clients retry a 5xx, never a 4xx: the same input would be
    refused again), with the job's `status` and `request_id`."""
    reason = f"{job.error or 'the upstream refused the request'} (refunded)"
    return {**error_body(BadUserInput(reason)), "status": FAILED, "request_id": job.id}


def callback_body(job: Job, callback_data: Any) -> dict[str, Any]:
    """The body POSTed to an async request's `webhook_url` when its job ends: what the
    guide's handler reads (`request_id`, `status` completed or failed, `images`,
    `callback_data` as sent, `error`)."""
    if job.status == "completed":
        body = {**success_body(job), "status": COMPLETED}
    else:
        body = failure_body(job)
    return {**body, CALLBACK_DATA: callback_data if callback_data is not None else {}}


def error_status(exc: GatewayError) -> int:
    """The HTTP status flux-krea answers this error with: its 403 for quota stands for
    our 402 (the guide's client turns it into QuotaExceededError); the others are ours."""
    return 403 if exc.code == "INSUFFICIENT_CREDITS" else exc.status


def error_body(exc: GatewayError) -> dict[str, Any]:
    """An error as the guide's clients read one: `error` (the type, from its table),
    `message`, and `error_code` (`quota_exceeded` on the 403 for credits)."""
    status = error_status(exc)
    extra = {k: v for k, v in exc.extensions.items() if k != "code"}
    return {
        "error": ERRORS.get(status) or ("Server Error" if status >= 500 else "Error"),
        "message": exc.message,
        "error_code": _ERROR_CODES.get(exc.code, exc.code.lower()),
        **extra,
    }
