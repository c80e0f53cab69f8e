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

The tables below (Segmind's fields, ranges, defaults, sizes, qualities, states) are the
one description of Segmind's protocol in the gateway: this backend reads them to speak
to Segmind, and `/compat/segmind` (`gateway/compat/segmind.py`) reads them to serve
Segmind's protocol itself, through `request_from` (Segmind's request -> ours) and
`STATES` (our job's status -> Segmind's).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, cast
from urllib.parse import quote, urlsplit

from gateway.errors import BadUserInput, ProviderError, ProviderUnavailable
from gateway.formats import FORMATS, content_type_of_url
from gateway.params import (
    ASPECT_RATIOS,
    MIN_SIDE,
    RATIO_AREA,
    GenerationRequest,
    from_image_input,
    ratio_sides,
)
from gateway.providers.base import ImageParams, Output, Polled, Submitted, clamp, only_set
from gateway.providers.http import Answer, HTTPBackend, UpstreamClient, error_for, log

# -- Segmind's protocol, as tables both directions read -------------------------------------

#: Segmind's request field for each of our parameters (`ImageParams`, `GenerationRequest`).
#: The size is two of Segmind's fields, `aspect_ratio` and `megapixels` (see below).
FIELD_OF: dict[str, str] = {
    "prompt": "prompt",
    "aspect_ratio": "aspect_ratio",
    "num_images": "num_outputs",
    "output_format": "output_format",  # png, jpg, webp: the same names
    "quality": "output_quality",  # our words, Segmind's 0-100: see QUALITY
    "guidance": "guidance",
    "steps": "num_inference_steps",
    "seed": "seed",
}
#: Segmind's spellings of a field that other Segmind models use
ALIASES: dict[str, str] = {"steps": "num_inference_steps"}
#: Segmind's documented ranges (inclusive). Ours differ only for guidance (1-20).
RANGES: dict[str, tuple[float, float]] = {
    "guidance": (0.0, 10.0),
    "num_inference_steps": (1, 50),
    "num_outputs": (1, 4),
    "output_quality": (0, 100),
    "prompt_strength": (0.0, 1.0),
}
#: Segmind's documented defaults for what shapes the output (the seed left unset is a
#: random one, not its 42: see `request_from`).
DEFAULTS: dict[str, Any] = {
    "aspect_ratio": "16:9",
    "megapixels": "1",
    "num_outputs": 2,
    "output_format": "jpg",
    "output_quality": 90,
    "guidance": 7,
    "num_inference_steps": 40,
}
#: Segmind's `output_format` values: our formats' own names.
OUTPUT_FORMATS: tuple[str, ...] = ("webp", "jpg", "png")
assert set(OUTPUT_FORMATS) == set(FORMATS)
#: The documented values of `megapixels`, as Segmind's example sends them.
MEGAPIXELS: tuple[str, ...] = ("1", "0.25")
#: Our quality words and Segmind's `output_quality` for each.
QUALITY: dict[str, int] = {"high": 100, "standard": 90, "low": 75}
DEFAULT_QUALITY: int = DEFAULTS["output_quality"]
#: Documented fields that are checked (a boolean, a number in range) and not used: speed
#: and safety switches, and img2img's strength (`image` itself is refused, see below);
#: `go_fast` is always sent false (`translate`).
UNUSED: dict[str, str] = {
    "go_fast": "bool",
    "disable_safety_checker": "bool",
    "prompt_strength": "number",
}
#: Segmind's request states and the job status each one is.
STATES: dict[str, str] = {
    "QUEUED": "queued",
    "PROCESSING": "processing",
    "COMPLETED": "completed",
    "FAILED": "failed",
}
PENDING = frozenset(state for state, ours in STATES.items() if ours in ("queued", "processing"))
#: How far a size may be from Segmind's ratio (in log-ratio) and above its megapixels'
#: area and still be drawn there (`SegmindProvider.serves`): rounding, not a new shape.
RATIO_SLACK = math.log(1.03)
AREA_SLACK = 1.05
#: A seed of -1 asks Segmind for a random one.
RANDOM_SEED = -1


def _within(name: str, value: float | None, kind: Any) -> Any:
    """`value` brought into Segmind's range of `name`; None when unset."""
    low, high = RANGES[name]
    return clamp(value, low, high, kind)


def translate(params: ImageParams) -> dict[str, Any]:
    """Our normalized parameters -> Segmind's request body; unset optionals are left to
    Segmind's defaults."""
    ours = {
        "prompt": params.prompt,
        # One of the documented ratios (ours are the same eleven); the size says which
        # when no ratio is given.
        "aspect_ratio": choose_aspect_ratio(params),
        "num_images": _within("num_outputs", params.num_images, int),  # never Segmind's 2
        "output_format": params.output_format,
        # high 100, standard or unset 90 (Segmind's default), low 75
        "quality": QUALITY.get(params.quality or "standard", DEFAULT_QUALITY),
        "guidance": _within("guidance", params.guidance, float),
        "steps": _within("num_inference_steps", params.steps, int),
        "seed": params.seed,
    }
    body = {FIELD_OF[name]: value for name, value in ours.items()}
    # "1" or "0.25", whichever is nearer to the size's area (as a string, as in Segmind's
    # own example): 1024x576 asks for "1", 512x512 for "0.25".
    body["megapixels"] = choose_megapixels(params.width, params.height, ours["aspect_ratio"])
    # Its default, true, is "less deterministic" (Segmind's API page: docs/providers/segmind.md):
    # the gateway's promise is the same picture for the same seed, whichever backend draws it,
    # retried or failed over.
    body["go_fast"] = False
    return only_set(body)


# -- Segmind's request -> ours (/compat/segmind) ---------------------------------------


def quality_named(output_quality: float) -> str:
    """Segmind's `output_quality` (0-100) -> the quality word whose value is nearest
    (ties go up): 100 high, 90 standard, 75 low; 95 is high, 82 low."""
    return min(QUALITY, key=lambda word: (abs(QUALITY[word] - output_quality), -QUALITY[word]))


def megapixels_named(value: Any) -> str:
    """`megapixels` as sent (a number, or a string like the page's example) -> one of
    MEGAPIXELS; BadUserInput for anything else."""
    number: float | None = None
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = None
    for name in MEGAPIXELS:
        if number == float(name):
            return name
    raise BadUserInput(f"megapixels must be one of {', '.join(MEGAPIXELS)}", field="megapixels")


def size_of(aspect_ratio: str, megapixels: str) -> tuple[int, int] | None:
    """Width and height for a documented ratio at Segmind's megapixels ("1" is 1024x1024's
    area, "0.25" 512x512's). None for "1": `GenerationRequest.size()` draws a ratio at that
    area itself. At "0.25" a side that would fall below ours (512) is raised to it, the
    other with it (16:9 is 912x512): the smallest size of that ratio the gateway makes."""
    if megapixels == "1":
        return None
    sides = ratio_sides(aspect_ratio)
    assert sides is not None  # one of ASPECT_RATIOS
    a, b = sides
    width = math.sqrt(RATIO_AREA * float(megapixels) * a / b)
    height = width * b / a
    scale = max(1.0, MIN_SIDE / min(width, height))
    return _by16(width * scale), _by16(height * scale)


def _by16(side: float) -> int:
    return max(MIN_SIDE, round(side / 16) * 16)


def _number(body: dict[str, Any], name: str, *, integer: bool) -> Any:
    """A numeric field of Segmind's body in its documented range; None when absent."""
    value = body.get(name)
    if value is None:
        return None
    kind = "an integer" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (integer and value != int(value))
    ):
        raise BadUserInput(f"{name} must be {kind}", field=name)
    if (field := ALIASES.get(name, name)) in RANGES:
        low, high = RANGES[field]
        if not low <= value <= high:
            raise BadUserInput(f"{name} must be between {low:g} and {high:g}", field=name)
    return int(value) if integer else float(value)


def _sent_as(body: dict[str, Any], name: str) -> str:
    """The spelling of Segmind's field `name` the client used: an alias when only that
    was sent."""
    if body.get(name) is None:
        for alias, field in ALIASES.items():
            if field == name and body.get(alias) is not None:
                return alias
    return name


def _or_default(body: dict[str, Any], name: str) -> Any:
    """The field as sent, or Segmind's default when absent or null."""
    value = body.get(name)
    return DEFAULTS[name] if value is None else value


def _choice(body: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = _or_default(body, name)
    if not isinstance(value, str) or value.lower() not in allowed:
        raise BadUserInput(f"{name} must be one of {', '.join(allowed)}", field=name)
    return value.lower()


#: our field, as `from_image_input` names it in an error -> Segmind's
_SEGMIND_NAME = {
    "service": "model",
    "width": "megapixels",
    "height": "megapixels",
    "aspectRatio": "aspect_ratio",
    "numImages": "num_outputs",
    "outputFormat": "output_format",
    "quality": "output_quality",
    "steps": "num_inference_steps",
}


def request_from(body: dict[str, Any], provider: str) -> GenerationRequest:
    """Segmind's request body (its fields, ranges and defaults, docs/providers/segmind.md)
    -> our one parameter model, for `provider` (a service or backend). Errors are
    BadUserInput naming Segmind's field.

    Segmind's documented defaults apply to what is left out (two images, guidance 7, 40
    steps, ...), whichever backend runs it. Differences, all documented: the seed is
    random when unset (Segmind's page says both
    "Default: 42" and "leave random for variability"; -1 also asks for a random one);
    guidance below our minimum of 1 is taken as 1; `output_quality` becomes the nearest
    quality word; `go_fast`, `disable_safety_checker` and `prompt_strength` are checked
    and not used; `image` (img2img) is refused; fields Segmind does not document are
    ignored, as a model ignores what it does not take.
    """
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadUserInput("prompt is required and must be a non-empty string", field="prompt")
    if body.get("image"):
        raise BadUserInput("image (image-to-image) is not supported by this gateway", field="image")
    for name, kind in UNUSED.items():
        if kind == "bool":
            if body.get(name) is not None and not isinstance(body[name], bool):
                raise BadUserInput(f"{name} must be a boolean", field=name)
        else:
            _number(body, name, integer=False)
    aspect_ratio = _choice(body, "aspect_ratio", ASPECT_RATIOS)
    megapixels = megapixels_named(_or_default(body, "megapixels"))
    size = size_of(aspect_ratio, megapixels)
    seed = _number(body, "seed", integer=True)
    if seed is not None and seed < 0:
        if seed != RANDOM_SEED:
            raise BadUserInput("seed must be a positive integer, or -1 for a random one", "seed")
        seed = None
    guidance = _number(body, "guidance", integer=False)
    steps = _number(body, _sent_as(body, "num_inference_steps"), integer=True)
    num_outputs = _number(body, "num_outputs", integer=True)
    output_quality = _number(body, "output_quality", integer=True)
    ours: dict[str, Any] = {
        "service": provider,
        "prompt": prompt,
        "aspect_ratio": aspect_ratio,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "num_images": DEFAULTS["num_outputs"] if num_outputs is None else num_outputs,
        "output_format": _choice(body, "output_format", OUTPUT_FORMATS),
        "quality": quality_named(
            DEFAULTS["output_quality"] if output_quality is None else output_quality
        ),
        "guidance": max(DEFAULTS["guidance"] if guidance is None else guidance, 1.0),
        "steps": DEFAULTS["num_inference_steps"] if steps is None else steps,
        "seed": seed,
    }
    try:
        return from_image_input(ours)
    except BadUserInput as exc:  # a limit of ours Segmind does not have (prompt length, ...)
        field = str(exc.extensions.get("field") or "")
        theirs = _SEGMIND_NAME.get(field, field)
        message = exc.message.replace(field, theirs, 1) if field else exc.message
        raise BadUserInput(message, field=theirs or None) from None


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


def choose_megapixels(width: int, height: int, aspect_ratio: str | None = None) -> str:
    """ "1" or "0.25", whichever is nearer to width*height/1e6 (log space); "0.25" also
    for a size no larger than the smallest the gateway makes at `aspect_ratio` (its
    0.25 megapixels with the short side raised to 512, `size_of`: 1200x512 at 21:9), so
    that a Segmind request served by /compat/segmind reaches Segmind as it was sent."""
    smallest = size_of(aspect_ratio, MEGAPIXELS[-1]) if aspect_ratio else None
    if smallest and width * height <= smallest[0] * smallest[1]:
        return MEGAPIXELS[-1]
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

    def serves(self, params: ImageParams) -> bool:
        """Segmind takes no width or height, only `megapixels` ("1" or "0.25") and one of
        its documented aspect ratios (docs/providers/segmind.md): a size off those ratios would come
        back in another shape, and one larger than the megapixels chosen for it smaller than asked
        (and paid for). Those are left to the route's other backends."""
        chosen = choose_aspect_ratio(params)
        ratio = _ratio(chosen)
        if ratio is None or abs(math.log(params.width / params.height / ratio)) > RATIO_SLACK:
            return False
        megapixels = choose_megapixels(params.width, params.height, chosen)
        if (params.width, params.height) == size_of(chosen, megapixels):
            return True  # the size the gateway gives Segmind's own requests of that kind
        drawn = float(megapixels) * RATIO_AREA
        return params.width * params.height <= drawn * AREA_SLACK

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
            if status == 422:
                return None, answer
            # What Segmind says of its own trouble goes to the log (`error_for`), not into
            # the job's error; nor does what our account's trouble means: the operator's.
            if status == 404:
                meaning = f"segmind answered 404: {not_found}"
            elif status == 406:
                log.warning("upstream account out of credits", upstream="segmind")
                meaning = "segmind answered 406"
            elif status in (401, 403):  # `send` told the operator
                meaning = f"segmind answered {status}"
            else:
                raise
            error = ProviderUnavailable(meaning)
            error.answer = answer  # a poll's 404s, in a row, say the job is lost
            raise error from exc
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
