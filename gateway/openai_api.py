"""OpenAI's Images API, served by the gateway (docs/api.md#openai).

Backend code written against `POST /v1/images/generations` (the `openai` SDKs, LiteLLM,
Portkey) points its base URL at the gateway and its key at a gateway key, and names a
gateway service or backend as its `model`, or OpenAI's own model names, which
`GATEWAY_OPENAI_MODELS` maps to one (`dall-e-3` to `flux-krea`, by default). A
request is an ordinary job (`Gateway.generate`: admission, credits, cache, idempotency
via `Idempotency-Key`, routing with failover); the answer waits for its end on the
process's shared job watch (`wait_answering`), as OpenAI's does.

Errors take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the
statuses its SDKs turn into their exception classes (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 429 RateLimitError,
5xx, 504 included, InternalServerError; 402 is APIStatusError).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, NamedTuple

import orjson
import structlog
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import rest
from gateway.artifacts import StorageUnavailable
from gateway.auth import Principal, api_key_from
from gateway.bodies import json_object, memoized
from gateway.endpoints import disconnect, note_left, route, wait_answering
from gateway.errors import (
    BadUserInput,
    GatewayError,
    InternalError,
    NotFound,
    RateLimited,
    ServiceUnavailable,
)
from gateway.jobs.model import Job
from gateway.origins import page_origin
from gateway.params import GenerationRequest, from_image_input, with_idempotency_header
from gateway.rest import ORJSONResponse
from gateway.service import Gateway

#: OpenAI's image routes the gateway does not offer: answered so, whatever the upload
UNSUPPORTED = frozenset({"/v1/images/edits", "/v1/images/variations"})
log = structlog.get_logger("gateway.openai")

DEFAULT_MODEL = "flux-krea"
#: the longest `Retry-After` an SDK is left to wait out: OpenAI's Node SDK sleeps for
#: whatever a 429 says and then sends the request again (a day's limit: until midnight,
#: then charged), so a longer one says `x-should-retry: false` (the Python SDK's own
#: rule: it gives up past two minutes)
LONGEST_RETRY_WAIT = 60
#: OpenAI's GPT image models always answer base64 ("response_format ... unsupported for
#: GPT image models, which always return base64-encoded images": OpenAI's API reference),
#: so code written for them reads `b64_json`, and gets it unless it asks for `url`
BASE64_ONLY = ("gpt-image-", "chatgpt-image-")
DEFAULT_SIZE = "1024x1024"
#: OpenAI's parameters, and what each becomes (None: accepted, not used by any backend)
PARAMETERS: dict[str, str | None] = {
    "prompt": "prompt",
    "model": "service",
    "n": "numImages",
    "size": None,  # width and height
    "response_format": None,  # how the answer carries the images
    "output_format": "outputFormat",
    "quality": "quality",
    "seed": "seed",  # the gateway's extension: the same seed draws the same picture
    "user": None,
    "safety_identifier": None,  # what the SDK now advises instead of `user`
    "style": None,
    "complexity": None,  # how long the model plans: no backend has such a setting
    "frame_count": None,  # of a GIF, which is refused (`output_format`)
    "frame_duration_ms": None,
    "background": None,
    "moderation": None,
    "output_compression": None,
    "stream": None,  # server-sent events (`Streamed`)
    "partial_images": None,  # a stream's previews: none is drawn, so none is sent
    "svg": None,  # how SVG output is authored: null only (SVG is refused: `output_format`)
}
#: what OpenAI takes for parameters no backend uses, checked all the same: a typo is a
#: 400 there, not ignored (OpenAI's API reference)
CHOICES = {
    "style": ("vivid", "natural"),
    "complexity": ("low", "medium", "high"),
    "moderation": ("low", "auto"),
    "background": ("opaque", "auto"),  # transparent: refused, none draws it (`to_request`)
}
RANGES = {"output_compression": (0, 100), "partial_images": (0, 3), "frame_count": (2, 16)}
RANGES |= {"frame_duration_ms": (0, 2**31 - 1)}  # any delay (OpenAI caps long ones)
#: accepted and not used, but of their type (OpenAI's API reference)
STRINGS = ("user", "safety_identifier")
#: OpenAI's quality words, as the gateway's backends take them (and the other way, as
#: an answer says which was used)
QUALITY = {"hd": "high", "high": "high", "xhigh": "high", "max": "high", "low": "low"}
QUALITY |= {"standard": "standard", "medium": "standard"}
ANSWERED_QUALITY = {"high": "high", "standard": "medium", "low": "low"}
#: our field (as `from_image_input` names it in errors) -> OpenAI's parameter
PARAM_OF = {"service": "model", "numImages": "n", "width": "size", "height": "size"}
PARAM_OF |= {"outputFormat": "output_format", "aspectRatio": "size"}
#: our field -> the header OpenAI's clients send it in (no `param`: it is no body field)
HEADER_OF = {"idempotencyKey": "Idempotency-Key"}
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
#: the `code` OpenAI's clients see for ours
CODE_OF = {
    "UNAUTHENTICATED": "invalid_api_key",
    "RATE_LIMITED": "rate_limit_exceeded",
    "INSUFFICIENT_CREDITS": "insufficient_credits",
    "BAD_USER_INPUT": "invalid_value",
}


def rate_headers(principal: Principal, now: float) -> dict[str, str]:
    """The per-minute limit's headers, and the same under OpenAI's names (`_openai_named`)."""
    reset_in = min(60, max(0, round(principal.window_reset - now)))  # within a minute
    return _openai_named(principal.rate_headers(), reset_in)


def _openai_named(headers: dict[str, str], reset_in: int) -> dict[str, str]:
    """`headers` with their limit also under OpenAI's names
    (`x-ratelimit-{limit,remaining,reset}-requests`, the reset a duration:
    platform.openai.com/docs/guides/rate-limits), which tools written for OpenAI read
    (LiteLLM's router, say)."""
    if "X-RateLimit-Limit" not in headers:
        return headers
    return {
        **headers,
        "x-ratelimit-limit-requests": headers["X-RateLimit-Limit"],
        "x-ratelimit-remaining-requests": headers["X-RateLimit-Remaining"],
        "x-ratelimit-reset-requests": f"{reset_in}s",
    }


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    """A `GatewayError` as OpenAI's API answers an error, in OpenAI's names."""
    body, extra = error_body(exc)
    out = {**(headers or {}), **exc.headers}  # the refusal's own describe it best
    if "retryAfter" in extra:
        out["Retry-After"] = str(extra["retryAfter"])
        if isinstance(exc, RateLimited):  # its headers are the limit's that refused it
            out = _openai_named(out, extra["retryAfter"])
        if extra["retryAfter"] > LONGEST_RETRY_WAIT:  # a day's limit: hours
            out["x-should-retry"] = "false"
    elif isinstance(exc, ServiceUnavailable):  # nothing changes until the operator acts
        out["x-should-retry"] = "false"  # the SDK retries a 503 unless told not to
    return ORJSONResponse(body, status_code=exc.status, headers=out)


def error_body(exc: GatewayError) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenAI's `{"error": {message, type, param, code}}` for `exc`, and the extensions
    it carries beside them."""
    extra = {k: v for k, v in exc.extensions.items() if k not in ("code", "field")}
    field = exc.extensions.get("field")
    field = field if isinstance(field, str) else None
    message, param = exc.message, PARAM_OF.get(field, field) if field else None
    if isinstance(exc, UnknownParameter):  # named as sent: not one of ours renamed
        param = field
    elif field in HEADER_OF:
        param = None
        message = message.replace(field, f"the {HEADER_OF[field]} header", 1)
    elif field and param != field and message.startswith(field):  # "numImages: ..."
        theirs = f"{param} ({field})" if param == "size" else param
        message = f"{theirs}{message[len(field) :]}"
    if exc.status == 429:
        kind = "requests"
    elif exc.status >= 500:
        kind = "server_error"
    else:
        kind = "invalid_request_error"
    code = CODE_OF.get(exc.code, exc.code.lower())
    body = {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code,
            **extra,
        }
    }
    return body, extra


class UnknownParameter(BadUserInput):
    """A body field OpenAI's API does not take, named as sent (OpenAI's wording and code)."""

    code = "UNKNOWN_PARAMETER"

    def __init__(self, name: str) -> None:
        super().__init__(f"Unknown parameter: '{name}'.", field=name)


class ModelNotFound(NotFound):
    code = "MODEL_NOT_FOUND"  # OpenAI's `model_not_found`, with NOT_FOUND's 404

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist on this gateway", field="model")


class ImagesRequest(NamedTuple):
    wanted: GenerationRequest
    response_format: str  # url or b64_json
    stream: bool = False  # answered as server-sent events (`Streamed`)


Aliases = tuple[tuple[str, str], ...]
MAX_MODEL_NAME = 100


def aliases(gateway: Gateway) -> Aliases:
    """`GATEWAY_OPENAI_MODELS` as `serves` reads it (hashable, for `images_request`)."""
    return tuple(gateway.settings.openai_models.items())


def serves(name: str, models: Collection[str], aliases: Aliases) -> str | None:
    """The service or backend a `model` names: itself, or what `GATEWAY_OPENAI_MODELS`
    maps it to (an exact name, else the longest `prefix*` it starts with); None: no
    such model (nor any name longer than MAX_MODEL_NAME, which is never echoed)."""
    if name in models:
        return name
    if len(name) > MAX_MODEL_NAME:
        return None
    best, longest = None, -1
    for alias, target in aliases:
        if alias == name:
            best = target
            break
        if alias.endswith("*") and name.startswith(alias[:-1]) and len(alias) > longest:
            best, longest = target, len(alias)
    return best if best in models else None


@memoized
def images_request(body: bytes, models: tuple[str, ...], aliases: Aliases) -> ImagesRequest:
    """A `POST /v1/images/generations` body, parsed (the same object for the same bytes,
    models and aliases: `bodies.memoized`)."""
    data = json_object(body)
    wanted = to_request(data, models, aliases)
    fmt = data.get("response_format")  # valid: `to_request`
    if fmt is None:  # the model's own: a valid name (`to_request`), given or not
        fmt = "b64_json" if str(data.get("model")).startswith(BASE64_ONLY) else "url"
    return ImagesRequest(wanted, fmt, data.get("stream") is True)


def to_request(
    body: dict[str, Any], models: Collection[str], aliases: Aliases = ()
) -> GenerationRequest:
    """An OpenAI images request as the gateway's one parameter model."""
    unknown = sorted(body.keys() - PARAMETERS.keys())
    if unknown:
        raise UnknownParameter(unknown[0])
    if body.get("stream") is not None and type(body["stream"]) is not bool:
        raise BadUserInput("stream must be a boolean", field="stream")
    if body.get("svg") is not None:
        raise BadUserInput("svg output is not supported", field="svg")
    asked = DEFAULT_MODEL if body.get("model") is None else body["model"]
    model = serves(asked, models, aliases) if isinstance(asked, str) else None
    if model is None:  # named as sent, or by its JSON type: a value is never echoed
        raise ModelNotFound(
            asked[:MAX_MODEL_NAME] if isinstance(asked, str) else type(asked).__name__
        )
    if body.get("background") == "transparent":  # no backend draws one: never opaque silently
        raise BadUserInput("background transparent is not supported", field="background")
    for name, choices in CHOICES.items():
        if body.get(name) not in (None, *choices):
            raise BadUserInput(f"{name} must be one of {', '.join(choices)}", field=name)
    for name, (low, high) in RANGES.items():
        value = body.get(name)
        if value is not None and (type(value) is not int or not low <= value <= high):
            raise BadUserInput(f"{name} must be an integer from {low} to {high}", field=name)
    for name in STRINGS:
        if body.get(name) is not None and not isinstance(body[name], str):
            raise BadUserInput(f"{name} must be a string", field=name)
    if body.get("response_format") not in (None, "url", "b64_json"):
        raise BadUserInput("response_format must be url or b64_json", field="response_format")
    fields: dict[str, Any] = {
        ours: body[theirs]
        for theirs, ours in PARAMETERS.items()
        if ours and body.get(theirs) is not None
    }
    fields["service"] = model
    size = body.get("size") or DEFAULT_SIZE
    if size != "auto":
        match = SIZE.fullmatch(size) if isinstance(size, str) else None
        if match is None:
            raise BadUserInput("size must be WIDTHxHEIGHT (each 512-2048) or auto", field="size")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    quality = body.get("quality")
    if quality is not None and quality != "auto":
        if not isinstance(quality, str) or quality not in QUALITY:
            raise BadUserInput(f"quality must be one of {', '.join(QUALITY)} or auto", "quality")
        fields["quality"] = QUALITY[quality]
    else:
        fields.pop("quality", None)
    return from_image_input(fields)


async def generations(request: Request) -> Response:
    """`POST /v1/images/generations`: admitted as any job; answered when it ends."""
    gateway: Gateway = request.app.state.gateway
    arrived = time.monotonic()
    response_format = "url"
    wanted: GenerationRequest | None = None
    streamed = False

    async def parse() -> GenerationRequest:
        nonlocal response_format, wanted, streamed
        asked = images_request(await request.body(), gateway.router.names, aliases(gateway))
        response_format, streamed = asked.response_format, asked.stream
        wanted = with_idempotency_header(asked.wanted, request.headers.get("idempotency-key"))
        return wanted

    headers: dict[str, str] = {}
    noted = False  # the job left for the same request sent again (`wait_answering`)
    try:
        job, principal = await gateway.generate(
            api_key_from(request.headers), parse, page_origin(request.headers), rejoin=True
        )
        headers = {**rate_headers(principal, gateway.clock()), "X-Gateway-Job-Id": job.id}
        if streamed:
            return Streamed(request, gateway, principal, job, wanted, headers)
        waited = _wait(request, gateway)
        left = max(0.0, waited - (time.monotonic() - arrived))  # counted from its arrival
        job, noted = await wait_answering(request, gateway, principal, job, wanted, left)
        answer = await _answer(gateway, job, response_format, waited)
    except ClientDisconnect:
        raise  # nobody to answer (`wait_answering`)
    except Exception as exc:
        if not headers:  # refused before admission: nothing made, a retry makes nothing twice
            if isinstance(exc, GatewayError):
                return error_response(exc, headers)
            raise
        # The job was accepted (and has run, or runs on): OpenAI's SDKs retry a 5xx on
        # their own. A wait that ran out is worth it: the same request joins the job
        # still running (`wait_answering`), charged once. Any other would be another
        # job, charged again.
        if not isinstance(exc, GatewayError):
            log.exception("answering an accepted job failed", job_id=headers["X-Gateway-Job-Id"])
            exc = InternalError("internal server error")
        if exc.status >= 500:
            # Only a job the retry will join is worth it: named by its Idempotency-Key,
            # or noted (not when the store was away).
            named = wanted is not None and bool(wanted.idempotency_key)
            joins = isinstance(exc, WaitRanOut) and (noted or named)
            headers["x-should-retry"] = "true" if joins else "false"
        return error_response(exc, headers)
    if response_format == "b64_json":
        return ImagesAnswer(answer, headers, _cut(gateway, principal, job, wanted))
    return ORJSONResponse(answer, headers=headers)


Cut = Callable[[], Awaitable[object]]


def _cut(
    gateway: Gateway, principal: Principal, job: Job, wanted: GenerationRequest | None
) -> Cut | None:
    """What an answer carrying `job`'s images does when its client leaves before the
    end (its SDK timed out while the images were read or sent; it retries): the job is
    left for the same request sent again, which joins it, charged once, as one that
    ran out of time is (`wait_answering`). None with an idempotency key: the retry
    names the job itself."""
    if wanted is None or wanted.idempotency_key:
        return None
    return lambda: note_left(gateway, principal, job, wanted)


class Base64:
    """An image's bytes in an answer, written as base64 a slice at a time (`_write`): a
    few megabytes encoded and serialized at once held the event loop, and every other
    request of the process, for tens of milliseconds."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:  # its base64's
        return (len(self.data) + 2) // 3 * 4


#: bytes of an image encoded at once, the loop free between (a multiple of 3: the slices'
#: base64 joined is the whole's)
SLICE = 3 * 2**16
Piece = bytes | Base64


def _pieces(document: Any) -> list[Piece]:
    """`document` as orjson writes it, each Base64 in it left a piece of its own (written
    where orjson wrote a marker no prompt can hold: random, made per answer)."""
    marker = f"b64-{secrets.token_hex(12)}-"
    found: list[Base64] = []

    def default(value: Any) -> str:
        if isinstance(value, Base64):
            found.append(value)
            return f"{marker}{len(found) - 1}"
        raise TypeError

    parts = re.split(rb"%b(\d+)" % marker.encode(), orjson.dumps(document, default=default))
    return [found[int(part)] if i % 2 else part for i, part in enumerate(parts) if part]


async def _write(send: Send, pieces: list[Piece], gone: asyncio.Future[None] | None = None) -> bool:
    """The pieces, an image a slice at a time; no more once `gone` is done (the client
    went away: nothing would read the rest). Whether all were written."""
    for piece in pieces:
        if isinstance(piece, bytes):
            await _send(send, piece)
            continue
        view = memoryview(piece.data)
        for at in range(0, len(view), SLICE):
            if gone is not None and gone.done():
                return False
            await _send(send, base64.b64encode(view[at : at + SLICE]))
            await asyncio.sleep(0)  # the other requests' turn
    return True


async def _write_all(receive: Receive, send: Send, pieces: list[Piece], cut: Cut | None) -> None:
    """The pieces, then the body's end, unless the client leaves first: then `cut`."""
    gone = asyncio.ensure_future(disconnect(receive))
    # Nothing more to hear (receiving failed) is as good as gone: its error is seen here.
    gone.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        if await _write(send, pieces, gone):
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        elif cut is not None:
            await cut()
    finally:
        gone.cancel()


class ImagesAnswer(Response):
    """An answer carrying images as base64 (`b64_json`), written a slice at a time; its
    length known before (a client reads a Content-Length as from OpenAI)."""

    media_type = "application/json"

    def __init__(
        self, answer: dict[str, Any], headers: dict[str, str], cut: Cut | None = None
    ) -> None:
        self.status_code = 200
        self.pieces, self.cut = _pieces(answer), cut
        length = sum(len(piece) for piece in self.pieces)
        self.init_headers({**headers, "Content-Length": str(length)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        await _write_all(receive, send, self.pieces, self.cut)


def _wait(request: Request, gateway: Gateway) -> float:
    """`GATEWAY_SYNC_WAIT_SECONDS`, or less: just under the timeout the SDK says it has
    (`_their_timeout`), so that a job outlasting it is answered 504 (`x-should-retry:
    true`, its id noted for the retry to join) rather than left by a client."""
    wait = gateway.settings.sync_wait_seconds
    theirs = _their_timeout(request)
    return wait if theirs is None else min(wait, theirs - min(1.0, theirs / 10))


def _their_timeout(request: Request) -> float | None:
    """The timeout the SDK says it has (Python's read timeout, `x-stainless-read-timeout`;
    Node's whole-request one, `X-Stainless-Timeout`), in seconds; None when it says none
    (or nonsense)."""
    said = request.headers.get("x-stainless-read-timeout") or request.headers.get(
        "x-stainless-timeout", "inf"
    )
    try:
        theirs = float(said)
    except ValueError:
        return None
    if theirs != theirs or theirs <= 0 or theirs == float("inf"):  # NaN, nonsense, none
        return None
    return theirs


class Streamed(Response):
    """`stream: true`: server-sent events, as OpenAI streams an image. Its headers go at
    once; while the job runs, a comment every `rest.KEEP_ALIVE_SECONDS`, or every half of
    the read timeout the SDK says it has when that is shorter (a client's read timeout
    counts from its last byte, and proxies close a silent connection); when it
    ends, one `image_generation.completed` event an image (base64, as OpenAI streams
    them: no `partial_images` are drawn), or one `error` event, which the SDK raises
    (its job's progress unreadable, Redis away: a 503's). The wait is
    `GATEWAY_SYNC_WAIT_SECONDS` whatever the SDK's read timeout (each comment restarts
    it), and a client that leaves is a waiting client that left (`wait_answering`)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        request: Request,
        gateway: Gateway,
        principal: Principal,
        job: Job,
        wanted: GenerationRequest | None,
        headers: dict[str, str],
    ) -> None:
        self.status_code = 200
        # No body: no length. Nothing buffered by a proxy in front (nginx's header).
        self.init_headers({**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.request, self.gateway, self.principal = request, gateway, principal
        self.job, self.wanted = job, wanted
        theirs, every = _their_timeout(request), rest.KEEP_ALIVE_SECONDS
        self.every = every if theirs is None else min(every, max(0.5, theirs / 2))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        waited = self.gateway.settings.sync_wait_seconds
        deadline = time.monotonic() + waited
        job = self.job
        cut: Cut | None = None  # an answer with images, cut short: noted (`_cut`)
        try:
            while not job.ended:
                every = self.every
                left = deadline - time.monotonic()
                last = left <= every  # the wait runs out with this slice: noted then
                wait = max(0.0, left) if last else every
                started = time.monotonic()
                job = (
                    await wait_answering(
                        self.request,
                        self.gateway,
                        self.principal,
                        job,
                        self.wanted,
                        wait,
                        answered_with_id=not last,
                    )
                ).job
                if job.ended or last:
                    break
                if time.monotonic() - started < wait / 2:  # the job's watch failed
                    raise ServiceUnavailable(
                        f"job {job.id}'s progress cannot be read now; it goes on: "
                        f"GET /v1/jobs/{job.id}"
                    )
                await _send(send, b": waiting for the image\n\n")
            answer = await _answer(self.gateway, job, "b64_json", waited)
            events = [_completed(answer, image) for image in answer["data"]]
            cut = _cut(self.gateway, self.principal, job, self.wanted)
        except ClientDisconnect:
            return  # nobody to answer (`wait_answering`)
        except GatewayError as exc:
            body, _ = error_body(exc)
            events = [_event("error", {"type": "error", **body})]
        except Exception:
            log.exception("answering an accepted job failed", job_id=job.id)
            body, _ = error_body(InternalError("internal server error"))
            events = [_event("error", {"type": "error", **body})]
        await _write_all(receive, send, [piece for event in events for piece in event], cut)


def _completed(answer: dict[str, Any], image: dict[str, Any]) -> list[Piece]:
    return _event(
        "image_generation.completed",
        {
            "type": "image_generation.completed",
            "b64_json": image["b64_json"],
            "background": answer["background"],
            "created_at": answer["created"],
            "output_format": answer["output_format"],
            "quality": answer.get("quality", "auto"),
            "size": answer["size"],
        },
    )


def _event(name: str, data: dict[str, Any]) -> list[Piece]:
    return [b"event: %b\ndata: " % name.encode(), *_pieces(data), b"\n\n"]


async def _send(send: Send, chunk: bytes) -> None:
    await send({"type": "http.response.body", "body": chunk, "more_body": True})


class Unsupported(NotFound):
    code = "UNSUPPORTED_ENDPOINT"


def not_offered(method: str, path: str) -> Unsupported:
    """Any other path of OpenAI's API (`/v1/chat/completions`, `/v1/responses`, …), in
    OpenAI's wording for a route it does not have."""
    return Unsupported(
        f"Invalid URL ({method} {path}): this gateway serves images.generate "
        "(POST /v1/images/generations) and the model list (GET /v1/models)"
    )


async def unsupported(request: Request) -> Response:
    """`POST /v1/images/edits` and `/v1/images/variations`: not offered, said in OpenAI's
    shape without reading the upload (`UNSUPPORTED`: no body limit refuses it first)."""
    what = "edits" if request.url.path.endswith("/edits") else "variations"
    return error_response(
        Unsupported(
            f"image {what} are not supported by this gateway: it serves images.generate "
            "(POST /v1/images/generations)"
        )
    )


class WaitRanOut(GatewayError):
    code, status = "TIMEOUT", 504


class GenerationFailed(GatewayError):
    code, status = "GENERATION_FAILED", 502


class RejectedInput(GatewayError):
    code, status = "REJECTED_BY_PROVIDER", 400


async def _answer(
    gateway: Gateway, job: Job, response_format: str, waited: float
) -> dict[str, Any]:
    if not job.ended:
        raise WaitRanOut(
            f"the image was not ready within {waited:g} s; "
            f"job {job.id} goes on: GET /v1/jobs/{job.id}",
            job_id=job.id,
        )
    if job.rejected:  # the provider refused this prompt: the caller's to change, not retry
        raise RejectedInput(
            f"the provider refused the request: {job.error or 'no reason given'} (refunded)",
            job_id=job.id,
        )
    if job.status != "completed":
        raise GenerationFailed(
            f"the generation {job.status}: {job.error or 'no reason given'} (refunded)",
            job_id=job.id,
        )
    prompt = job.params.get("prompt", "")
    data: list[dict[str, Any]] = []
    for url in job.urls:
        if response_format == "b64_json":
            try:
                stored = await gateway.artifacts.read(url)
            except StorageUnavailable:
                raise ServiceUnavailable(
                    f"job {job.id}'s image cannot be read now; try again or fetch its url"
                ) from None
            if stored is None:
                raise GenerationFailed(f"job {job.id}'s image is gone", job_id=job.id)
            data.append({"b64_json": Base64(stored), "revised_prompt": prompt})
        else:
            data.append({"url": url, "revised_prompt": prompt})
    answer = {
        "created": (job.completed_at or int(time.time() * 1000)) // 1000,
        "data": data,
        "background": "opaque",  # a transparent one is refused: no backend draws it
        "output_format": job.params.get("output_format", "png").replace("jpg", "jpeg"),
        "size": f"{job.width}x{job.height}",
    }
    if quality := ANSWERED_QUALITY.get(job.params.get("quality") or ""):
        answer["quality"] = quality  # unset: the backend's own, which it does not say
    return answer


def _model(name: str, target: str, services: dict[str, list[str]]) -> dict[str, Any]:
    if name != target:
        owner = f"gateway (alias of {target})"
    else:
        owner = "gateway (service)" if name in services else "gateway (backend)"
    return {"id": name, "object": "model", "created": 0, "owned_by": owner}


async def models(request: Request) -> Response:
    """`GET /v1/models`: the services and backends, as OpenAI lists models, and the
    OpenAI names `GATEWAY_OPENAI_MODELS` maps exactly (a `prefix*` names no one model).
    Every service; a backend only when configured here (the list fills model pickers,
    and a gateway runs on one or two of the providers, rarely all)."""
    gateway: Gateway = request.app.state.gateway
    try:
        principal = await gateway.authenticate(
            api_key_from(request.headers), read=True, origin=page_origin(request.headers)
        )
    except GatewayError as exc:
        return error_response(exc)
    router = gateway.router
    names, routes = router.names, router.routes

    def offered(name: str | None) -> bool:
        return name is not None and (name in routes or router.runs(name))

    data = [_model(name, name, routes) for name in names if offered(name)]
    mapped = aliases(gateway)
    data += [
        _model(alias, target, routes)
        for alias, target in mapped
        if not alias.endswith("*") and alias not in names and offered(serves(alias, names, mapped))
    ]
    headers = rate_headers(principal, gateway.clock())
    return ORJSONResponse({"object": "list", "data": data}, headers=headers)


async def model(request: Request) -> Response:
    """`GET /v1/models/{model}`: a service, a backend, or an OpenAI name mapped to one."""
    gateway: Gateway = request.app.state.gateway
    name = request.path_params["model"]
    try:
        principal = await gateway.authenticate(
            api_key_from(request.headers), read=True, origin=page_origin(request.headers)
        )
    except GatewayError as exc:
        return error_response(exc)
    target = serves(name, gateway.router.names, aliases(gateway))
    if target is None:
        headers = rate_headers(principal, gateway.clock())
        return error_response(ModelNotFound(name[:MAX_MODEL_NAME]), headers)
    body = _model(name, target, gateway.router.routes)
    return ORJSONResponse(body, headers=rate_headers(principal, gateway.clock()))


routes = [
    route("/v1/images/generations", generations, ["POST"]),
    *(route(path, unsupported, ["POST"]) for path in sorted(UNSUPPORTED)),
    route("/v1/models", models, ["GET"]),
    route("/v1/models/{model}", model, ["GET"]),
]
