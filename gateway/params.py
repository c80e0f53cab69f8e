"""A generation request, validated and normalized: one code path for GraphQL and REST.

Both API shapes (Doitong's `GenerateInput` and `ImageGenerationInput`) are turned into
the same `GenerationRequest`; its ranges are the contract's (seed 000's), which every
backend accepts. A range error names the field as the client spelled it.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.errors import BadUserInput

ASPECT_RATIOS = ("1:1", "16:9", "21:9", "3:2", "2:3", "4:5", "5:4", "3:4", "4:3", "9:16", "9:21")
MIN_SIDE, MAX_SIDE = 512, 2048
SEED_MAX = 2_147_483_647


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=1000)
    width: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    height: int | None = Field(default=None, ge=MIN_SIDE, le=MAX_SIDE)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    steps: int | None = Field(default=None, ge=1, le=50)
    guidance: float | None = Field(default=None, ge=1.0, le=20.0)
    num_images: int = Field(default=1, ge=1, le=4)
    output_format: Literal["png", "jpg", "webp"] = "png"
    aspect_ratio: str | None = None
    quality: str | None = Field(default=None, max_length=32)
    version: str | None = Field(default=None, max_length=64)
    cache: bool | None = None
    webhook_url: str | None = Field(default=None, max_length=2048)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v

    @field_validator("output_format", mode="before")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.lower()
            return "jpg" if v == "jpeg" else v
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
            a, b = (int(x) for x in self.aspect_ratio.split(":"))
            w = math.sqrt(1024 * 1024 * a / b)
            h = w * b / a
            return _side(w), _side(h)
        return self.width or 1024, self.height or 1024

    def image_fields(self, seed: int | None = None) -> dict[str, Any]:
        """The job's `ImageParams` fields, as its record stores them."""
        width, height = self.size()
        return {
            "prompt": self.prompt,
            "width": width,
            "height": height,
            "num_images": self.num_images,
            "seed": self.seed if seed is None else seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "output_format": self.output_format,
            "aspect_ratio": self.aspect_ratio,
            "quality": self.quality,
        }

    def cache_key(self) -> str:
        """SHA-256 of everything that changes the picture, normalized: the same request
        spelled differently (key order, defaults written out) gives the same key."""
        width, height = self.size()
        data = {
            "provider": self.provider,
            "prompt": self.prompt,
            "width": width,
            "height": height,
            "seed": self.seed,
            "steps": self.steps,
            "guidance": None if self.guidance is None else float(self.guidance),
            "num_images": self.num_images,
            "output_format": self.output_format,
            "aspect_ratio": self.aspect_ratio,
            "quality": self.quality,
            "version": self.version,
        }
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()

    def fingerprint(self) -> str:
        """Hash of what the request asks for (for idempotency keys), not how it is spelled."""
        data = self.model_dump(exclude={"idempotency_key"})
        data["width"], data["height"] = self.size()
        return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _side(x: float) -> int:
    return max(MIN_SIDE, min(MAX_SIDE, round(x / 16) * 16))


# The client's spelling of each field, per input shape, for error messages.
_GENERATE_NAMES = {
    "provider": "provider",
    "prompt": "input.text",
    "webhook_url": "webhookUrl",
    "idempotency_key": "idempotencyKey",
}
_OPTION_NAMES = {
    "num_images": "numImages",
    "output_format": "outputFormat",
    "aspect_ratio": "aspectRatio",
}
_IMAGE_NAMES = {
    "provider": "service",
    "webhook_url": "webhookUrl",
    "idempotency_key": "idempotencyKey",
    **_OPTION_NAMES,
}


def from_generate_input(data: dict[str, Any]) -> GenerationRequest:
    """Doitong's `generate` shape: {type, provider, input: {text}, options: {...}, ...},
    in GraphQL's names (`webhookUrl`, `numImages`) or Python's."""
    data = {_snake(k): v for k, v in data.items()}
    options = {_snake(k): v for k, v in (data.get("options") or {}).items()}
    fields: dict[str, Any] = {
        "provider": data.get("provider"),
        "prompt": (data.get("input") or {}).get("text"),
        "webhook_url": data.get("webhook_url"),
        "idempotency_key": data.get("idempotency_key"),
        **options,
    }
    names = dict(_GENERATE_NAMES)
    for key in options:
        names[key] = "options." + _OPTION_NAMES.get(key, key)
    return _validate(fields, names)


def from_image_input(data: dict[str, Any]) -> GenerationRequest:
    """The `generateImage` / REST shape: {service, prompt, width, height, ...}."""
    fields = {_snake(k): v for k, v in data.items()}
    fields["provider"] = fields.pop("service", None)
    return _validate(fields, _IMAGE_NAMES)


@functools.lru_cache(maxsize=512)
def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _validate(fields: dict[str, Any], names: dict[str, str]) -> GenerationRequest:
    fields = {k: v for k, v in fields.items() if v is not None}
    try:
        return GenerationRequest.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        field = names.get(key, key)
        if err["type"] == "missing":
            message = f"{field} is required"
        elif err["type"] == "extra_forbidden":
            message = f"{field} is not a known parameter"
        else:
            message = f"{field}: {err['msg']}"
        raise BadUserInput(message, field=field) from None
