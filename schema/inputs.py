"""GraphQL inputs: the `generate` shape and the flat `generateImage` shape.

Their request fields and options are `gateway.params.GenerationRequest`'s, built from it
in its order, so they are declared once. Only the types live here: ranges are checked
once, in `gateway.params`, for GraphQL and REST alike, and errors name the field as the
client spelled it. An optional field is nullable with no GraphQL default of its own
(`= null`): its default is the request's, applied there. The fields' descriptions are
not (yet) in the schema: they would add to the published SDL.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from enum import Enum
from typing import Any, Literal, TypeVar

import strawberry
from pydantic.fields import FieldInfo

from gateway.params import FLAT_NAMES, OPTION_FIELDS, GenerationRequest
from gateway.tokens import TTL_DEFAULT

T = TypeVar("T")


def graphql_type(field: FieldInfo) -> Any:
    """A request field's GraphQL type: its scalar (a Literal of strings is a String),
    nullable unless the field is required."""
    kind = _scalar(field.annotation)
    return kind if field.is_required() else kind | None


def _scalar(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        (kind,) = {type(value) for value in typing.get_args(annotation)}
        return kind
    if origin in (typing.Union, types.UnionType):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _scalar(inner)
    return annotation


def request_fields(
    names: Iterable[str], renames: Mapping[str, str] | None = None
) -> Callable[[type[T]], type[T]]:
    """Complete an input class with fields of `GenerationRequest`, in the order of
    `names`; a name the class annotates itself is the class's own field. `renames`:
    {field: its name in this input}."""

    def complete(cls: type[T]) -> type[T]:
        own = dict(inspect.get_annotations(cls))
        annotations: dict[str, Any] = {}
        for name in names:
            if name in own:
                annotations[name] = own.pop(name)
                continue
            field = GenerationRequest.model_fields[name]
            name = (renames or {}).get(name, name)
            annotations[name] = graphql_type(field)
            if not field.is_required():
                setattr(cls, name, None)
        assert not own, f"{cls.__name__} does not place {sorted(own)}"
        cls.__annotations__ = annotations
        return cls

    return complete


@strawberry.enum
class GenerateType(Enum):
    IMAGE = "IMAGE"


@strawberry.input
class GenerateText:
    text: str


@strawberry.input
@request_fields((*OPTION_FIELDS, "webhook_url", "idempotency_key"))
class GenerateOptions:
    """Every option of a request; `webhookUrl` and `idempotencyKey` may come here too:
    Doitong's parameter table lists `webhookUrl` beside `width` and `height`, which this
    shape takes here."""


@strawberry.input
@request_fields(("type", "provider", "input", "options", "webhook_url", "idempotency_key"))
class GenerateInput:
    """{type, provider, input: {text}, options: {...}, webhookUrl, idempotencyKey}"""

    type: GenerateType = GenerateType.IMAGE
    input: GenerateText
    options: GenerateOptions | None = None


@strawberry.input
@request_fields(GenerationRequest.model_fields, renames=FLAT_NAMES)
class ImageGenerationInput:
    """Every field of a request, flat: {service, prompt, width, height, ...}."""


def as_dict(value: Any) -> dict[str, Any]:
    """An input object as a plain dict (snake_case keys, nested inputs too)."""
    out = strawberry.asdict(value)
    out.pop("type", None)
    return out


@strawberry.input(description="A client token's rules (docs/api.md#client-tokens).")
class ClientTokenInput:
    max_credits: int = strawberry.field(description="credits it may spend in all")
    ttl_seconds: int | None = strawberry.field(
        default=TTL_DEFAULT, description="its life: at most 86400 (null: the default)"
    )
    origins: list[str] | None = strawberry.field(
        default=None, description="pages it may be used from (Origin); null: any"
    )
    services: list[str] | None = strawberry.field(
        default=None, description="services or backends it may use; null: any"
    )
    max_jobs: int | None = strawberry.field(default=None, description="jobs it may make")
