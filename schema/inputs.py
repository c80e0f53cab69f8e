"""GraphQL inputs in exactly the seed's shapes (seed 001's curl, JavaScript, Python).

Only types live here; ranges are checked once, in `gateway.params`, for GraphQL and
REST alike, and errors name the field as the client spelled it.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import strawberry


@strawberry.enum
class GenerateType(Enum):
    IMAGE = "IMAGE"


@strawberry.input
class GenerateText:
    text: str


@strawberry.input
class GenerateOptions:
    width: int | None = None
    height: int | None = None
    version: str | None = None
    quality: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_images: int | None = None
    output_format: str | None = None
    aspect_ratio: str | None = None
    cache: bool | None = None


@strawberry.input
class GenerateInput:
    type: GenerateType = GenerateType.IMAGE
    provider: str
    input: GenerateText
    options: GenerateOptions | None = None
    webhook_url: str | None = None
    idempotency_key: str | None = None


@strawberry.input
class ImageGenerationInput:
    service: str
    prompt: str
    width: int | None = None
    height: int | None = None
    version: str | None = None
    quality: str | None = None
    webhook_url: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    num_images: int | None = None
    output_format: str | None = None
    aspect_ratio: str | None = None
    cache: bool | None = None
    idempotency_key: str | None = None


def as_dict(value: Any) -> dict[str, Any]:
    """An input object as a plain dict (snake_case keys, nested inputs too)."""
    out = strawberry.asdict(value)
    out.pop("type", None)
    return out
