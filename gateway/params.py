"""A generation request, validated and normalized: one code path for GraphQL and REST.

`GenerationRequest` is the one declaration of what a request may say: each field's
name, type, range, default and meaning. What else names the fields is derived from it:
the GraphQL inputs (`schema/inputs.py` builds `GenerateOptions`, `ImageGenerationInput`
and the request fields of `GenerateInput` from it), the spelling errors use, the cache
key, and `ImageParams`, what a backend receives (a unit test holds its fields to this
declaration).

Both API shapes (the `generate` shape {provider, input: {text}, options: {...}} and the
flat `generateImage` / REST shape {service, prompt, width, ...}) become the same
`GenerationRequest`. Its ranges are ones every backend accepts: each backend brings a
value into its upstream's own range. An error names the field as the client spelled it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Self

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel

from gateway.errors import BadUserInput
from gateway.formats import DEFAULT_FORMAT, OutputFormat, format_named

#: The ratios a client may ask for: the eleven Segmind documents for flux-krea-dev (the
#: Segmind backend sends them as they are; the others receive the size they give).
ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
MIN_SIDE, MAX_SIDE = 512, 2048
DEFAULT_SIDE = 1024
#: the area, in pixels, a size drawn from an aspect ratio has (about)
RATIO_AREA = 1024 * 1024
#: GraphQL's `Int` is 32 bits: the largest number any field can carry in or out
INT_MAX = 2_147_483_647
#: A seed is any 32-bit unsigned number, the range clients commonly draw seeds from;
#: GraphQL's `Int` carries up to INT_MAX of it, the JSON routes all of it. A backend
#: with a smaller range brings the seed into its own (flux-krea's 0-INT_MAX).
SEED_MAX = 2**32 - 1

Side = Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE)]


class GenerationRequest(BaseModel):
    """Every field either shape may give, in the order of the flat GraphQL input.

    The fields of the request itself are `REQUEST_FIELDS`; the others are its options
    (GraphQL's `GenerateOptions`, in the same order).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(
        min_length=1,
        max_length=64,
        description="The service or backend to run the request (`service` in the flat shape).",
    )
    prompt: str = Field(
        min_length=1,
        max_length=1000,
        description="What to draw (`input.text` in the generate shape).",
    )
    width: Side = Field(default=None, description="In pixels. Unset: see aspectRatio, else 1024.")
    height: Side = Field(default=None, description="In pixels. Unset: see aspectRatio, else 1024.")
    version: str | None = Field(
        default=None,
        max_length=64,
        description="A model version: part of the cache key; no backend takes one yet.",
    )
    quality: str | None = Field(
        default=None,
        max_length=32,
        description="high, standard or low, for a backend with such a setting (Segmind).",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Called with the job when it ends.",
    )
    seed: int | None = Field(
        default=None,
        ge=0,
        le=SEED_MAX,
        description="The same seed and parameters draw the same picture, and make the "
        "request cacheable. Unset: a random seed.",
    )
    steps: int | None = Field(
        default=None, ge=1, le=50, description="Denoising steps. Unset: the backend's default."
    )
    guidance: float | None = Field(
        default=None,
        ge=1.0,
        le=20.0,
        description="How closely to follow the prompt. Unset: the backend's default.",
    )
    num_images: int = Field(
        default=1, ge=1, le=4, description="How many images; each costs its own credits."
    )
    output_format: OutputFormat = Field(
        default=DEFAULT_FORMAT, description="png, jpg (or jpeg) or webp, in any case."
    )
    aspect_ratio: str | None = Field(
        default=None,
        description="One of ASPECT_RATIOS: with neither width nor height given, the size is "
        "this ratio at about one megapixel.",
    )
    cache: bool | None = Field(
        default=None,
        description="false: never answered from the cache; true: cacheable even without "
        "a seed. Unset: cacheable when it has a seed.",
    )
    idempotency_key: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        description="Sent again with the same request, the same key gives the same job.",
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("width", "height", "seed", "steps", "guidance", "num_images", mode="before")
    @classmethod
    def _not_a_boolean(cls, v: Any) -> Any:
        """JSON's true is no number (pydantic would take it for 1): `"seed": true` drew
        seed 1, a cache hit on someone else's picture."""
        if isinstance(v, bool):
            raise ValueError("must be a number, not true or false")
        return v

    @field_validator("quality", mode="before")
    @classmethod
    def _quality(cls, v: Any) -> Any:
        """In any case: `High` is `high` (one cache key, and Segmind's 100, not its 90)."""
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("output_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if isinstance(v, str) and (found := format_named(v)):
            return found.name
        return v

    @field_validator("aspect_ratio")
    @classmethod
    def _ratio(cls, v: str | None) -> str | None:
        if v is not None and v not in ASPECT_RATIOS:
            raise ValueError(f"must be one of {', '.join(ASPECT_RATIOS)}")
        return v

    def size(self) -> tuple[int, int]:
        """Width and height: as given, else from the aspect ratio at about 1 MP."""
        if self.width and self.height:
            return self.width, self.height
        if self.aspect_ratio and not (self.width or self.height):
            sides = ratio_sides(self.aspect_ratio)
            assert sides is not None  # validated
            a, b = sides
            w = math.sqrt(RATIO_AREA * a / b)
            h = w * b / a
            return _snap(w), _snap(h)
        return self.width or DEFAULT_SIDE, self.height or DEFAULT_SIDE

    def image_fields(self, seed: int | None = None) -> dict[str, Any]:
        """The job's `ImageParams` fields, as its record stores them."""
        fields = self.__dict__  # pydantic keeps a model's field values there
        values = {name: fields[name] for name in IMAGE_FIELDS}
        values["width"], values["height"] = self.size()
        if seed is not None:
            values["seed"] = seed
        return values

    @functools.cached_property
    def cache_key(self) -> str:
        """SHA-256 of everything that changes the picture, normalized: the same request
        spelled differently (key order, defaults written out) gives the same key. Worked
        out once: the model is frozen (a copy works it out again: `model_copy`)."""
        data = self.image_fields()
        data["provider"], data["version"] = self.provider, self.version
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """pydantic's, without the `cache_key` (and `fingerprint`) worked out for the
        original when the update changes them (an idempotency key changes neither, a
        webhook only the fingerprint)."""
        copy = super().model_copy(update=update, deep=deep)
        if update and any(name in PICTURE_FIELDS for name in update):
            copy.__dict__.pop("cache_key", None)
        if update and update.keys() - {"idempotency_key"}:
            copy.__dict__.pop("fingerprint", None)
        return copy

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of what the request asks for (for idempotency keys), not how it is spelled.
        Worked out once, as `cache_key` is."""
        data = self.model_dump(exclude={"idempotency_key"})
        data["width"], data["height"] = self.size()
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


#: The fields of the request itself; the others are its options.
REQUEST_FIELDS = ("provider", "prompt", "webhook_url", "idempotency_key")
OPTION_FIELDS = tuple(name for name in GenerationRequest.model_fields if name not in REQUEST_FIELDS)
#: The flat shape's names that are not the field's own.
FLAT_NAMES = {"provider": "service"}


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """A request as a backend receives it: the fields of `GenerationRequest` that make the
    picture, with the size resolved and the seed chosen when the client left it open."""

    prompt: str
    width: int = DEFAULT_SIDE
    height: int = DEFAULT_SIDE
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    output_format: OutputFormat = DEFAULT_FORMAT
    aspect_ratio: str | None = None
    quality: str | None = None


IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(ImageParams))
#: What `GenerationRequest.cache_key` is made of.
PICTURE_FIELDS = frozenset({*IMAGE_FIELDS, "provider", "version"})


def ratio_sides(value: str) -> tuple[float, float] | None:
    """`"16:9"` -> (16.0, 9.0); None when it is not a `w:h` of positive finite numbers."""
    left, sep, right = value.partition(":")
    if not sep:
        return None
    try:
        w, h = float(left), float(right)
    except ValueError:
        return None
    if not (w > 0 and h > 0 and math.isfinite(w) and math.isfinite(h)):
        return None
    return w, h


def _snap(x: float) -> int:
    """A side in pixels: a multiple of 16, within the range."""
    return max(MIN_SIDE, min(MAX_SIDE, round(x / 16) * 16))


# -- the two shapes ------------------------------------------------------------------------

#: A field's camelCase name, as GraphQL (and the REST documentation) spells it.
CAMEL_NAMES = {name: to_camel(name) for name in GenerationRequest.model_fields}
#: The client's spelling of each field, for errors, per shape (options: see below).
_GENERATE_NAMES = {
    **{name: CAMEL_NAMES[name] for name in REQUEST_FIELDS},
    "prompt": "input.text",
}
_FLAT_ERROR_NAMES = {**CAMEL_NAMES, **FLAT_NAMES}


def from_generate_input(data: dict[str, Any]) -> GenerationRequest:
    """The `generate` shape: {type, provider, input: {text}, options: {...}, ...}."""
    data = {_snake(k): v for k, v in data.items()}
    options = {_snake(k): v for k, v in (data.get("options") or {}).items()}
    for name in ("webhook_url", "idempotency_key"):  # at the top or in the options
        if options.get(name) is None:
            options.pop(name, None)
        elif data.get(name) is not None and data[name] != options[name]:
            spelled = CAMEL_NAMES[name]
            raise BadUserInput(
                f"options.{spelled} and {spelled} differ: give it once", f"options.{spelled}"
            )
    fields: dict[str, Any] = {
        "provider": data.get("provider"),
        "prompt": (data.get("input") or {}).get("text"),
        "webhook_url": data.get("webhook_url"),
        "idempotency_key": data.get("idempotency_key"),
        **options,
    }

    def named(key: str) -> str:
        if key in options:
            return "options." + CAMEL_NAMES.get(key, key)
        return _GENERATE_NAMES.get(key, key)

    return _validate(fields, named)


def with_idempotency_header(wanted: GenerationRequest, header: str | None) -> GenerationRequest:
    """`wanted` with an `Idempotency-Key` header as its `idempotency_key` (REST's body may
    name it too, `idempotencyKey`: another one beside it is refused, as the caller meant
    one of them; OpenAI's and the providers' bodies have none): a key too long is
    refused, not cut, since two keys that share their first characters are different
    requests."""
    if not header or wanted.idempotency_key == header:
        return wanted
    if wanted.idempotency_key:
        raise BadUserInput(
            "the Idempotency-Key header and the body's idempotencyKey differ: send one",
            field="idempotencyKey",
        )
    limit = GenerationRequest.model_fields["idempotency_key"].metadata
    longest = next(rule.max_length for rule in limit if hasattr(rule, "max_length"))
    if len(header) > longest:
        raise BadUserInput(
            f"Idempotency-Key must be at most {longest} characters", field="idempotencyKey"
        )
    return wanted.model_copy(update={"idempotency_key": header})


def from_image_input(data: dict[str, Any]) -> GenerationRequest:
    """The flat `generateImage` / REST shape: {service, prompt, width, height, ...}.
    Errors name a field as the client spelled it (`WIDTH`, `webhookURL`), or as this
    shape names it when the client left it out."""
    spelled = {_snake(k): k for k in data}
    if len(spelled) < len(data):  # `prompt` and `Prompt`, `numImages` and `num_images`
        first = next(k for k in data if spelled[_snake(k)] != k)
        also = spelled[_snake(first)]
        raise BadUserInput(f"{first} is given twice, also as {also}", field=first)
    fields = {field: data[name] for field, name in spelled.items()}
    for field, name in FLAT_NAMES.items():
        if field in fields:  # not this shape's name (`service` is): unknown here
            raise BadUserInput(f"{spelled[field]} is not a known parameter", field=spelled[field])
        if name in fields:
            fields[field] = fields.pop(name)
            spelled[field] = spelled.pop(name)
    return _validate(fields, lambda key: spelled.get(key) or _FLAT_ERROR_NAMES.get(key, key))


# GraphQL passes its schema's camelCase names; a REST body is the client's own JSON, and
# takes the documented camelCase or snake_case (which passes through unchanged).
@functools.lru_cache(maxsize=512)
def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _validate(fields: dict[str, Any], named: Callable[[str], str]) -> GenerationRequest:
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = named(str(err["loc"][0]) if err["loc"] else "")
        if err["type"] == "missing":
            message = f"{field} is required"
        elif err["type"] == "extra_forbidden":
            message = f"{field} is not a known parameter"
        else:
            message = f"{field}: {err['msg']}"
        raise BadUserInput(message, field=field) from None
