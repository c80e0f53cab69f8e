"""Request parameters (`gateway/params.py`): normalisation, validation, the size, the
cache key, and the GraphQL inputs built from the same declaration."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, cast

import pytest
import strawberry
from graphql import GraphQLInputObjectType, GraphQLNonNull

from gateway.cache import Cache
from gateway.config import Settings
from gateway.errors import BadUserInput
from gateway.formats import FORMATS
from gateway.params import (
    ASPECT_RATIOS,
    CAMEL_NAMES,
    OPTION_FIELDS,
    GenerationRequest,
    ImageParams,
    from_generate_input,
    from_image_input,
)
from schema.inputs import GenerateInput, ImageGenerationInput


def flat(**fields: Any) -> GenerationRequest:
    return from_image_input({"service": "local", "prompt": "a fox", **fields})


def generate(**options: Any) -> GenerationRequest:
    return from_generate_input(
        {"provider": "local", "input": {"text": "a fox"}, "options": options}
    )


def refused(parse: Any, *args: Any, **kwargs: Any) -> BadUserInput:
    with pytest.raises(BadUserInput) as caught:
        parse(*args, **kwargs)
    return caught.value


# -- defaults and spellings ----------------------------------------------------------------


def test_defaults() -> None:
    request = flat()
    assert (request.num_images, request.output_format, request.size()) == (1, "png", (1024, 1024))
    assert request.image_fields() == {
        "prompt": "a fox",
        "width": 1024,
        "height": 1024,
        "num_images": 1,
        "seed": None,
        "steps": None,
        "guidance": None,
        "output_format": "png",
        "aspect_ratio": None,
        "quality": None,
    }


def test_image_params_defaults_are_the_requests() -> None:
    """`ImageParams` is the request's picture fields: the same names, the same defaults."""
    names = [f.name for f in dataclasses.fields(ImageParams)]
    assert set(names) <= set(GenerationRequest.model_fields)
    assert flat().image_fields() == dataclasses.asdict(ImageParams(prompt="a fox"))
    request = flat(width=640, height=512, seed=3, steps=9, guidance=2.5, numImages=2,
                   outputFormat="webp", aspectRatio="4:5", quality="high")  # fmt: skip
    assert dataclasses.asdict(ImageParams(**request.image_fields())) == request.image_fields()


def test_a_chosen_seed_replaces_an_open_one_only_in_the_job() -> None:
    request = flat()
    assert request.image_fields(seed=77)["seed"] == 77
    assert request.seed is None
    assert flat(seed=5).image_fields()["seed"] == 5


def test_camel_and_snake_case_keys_are_the_same_request() -> None:
    camel = flat(numImages=2, outputFormat="jpg", aspectRatio="3:2", webhookUrl="https://x.test/h")
    snake = flat(
        num_images=2, output_format="jpg", aspect_ratio="3:2", webhook_url="https://x.test/h"
    )
    assert camel == snake
    assert generate(numImages=2) == generate(num_images=2)


def test_both_shapes_give_the_same_request() -> None:
    options = {"width": 768, "height": 512, "seed": 1, "numImages": 3, "cache": True}
    nested = from_generate_input(
        {
            "type": "IMAGE",
            "provider": "local",
            "input": {"text": "a fox"},
            "options": options,
            "webhookUrl": "https://x.test/h",
            "idempotencyKey": "k1",
        }
    )
    assert nested == flat(**options, webhookUrl="https://x.test/h", idempotencyKey="k1")


def test_null_is_unset() -> None:
    assert flat(width=None, numImages=None, outputFormat=None) == flat()
    assert generate(seed=None) == generate()


# -- ranges --------------------------------------------------------------------------------

RANGES = [
    ("width", 512, 2048),
    ("height", 512, 2048),
    ("seed", 0, 4_294_967_295),
    ("steps", 1, 50),
    ("guidance", 1.0, 20.0),
    ("numImages", 1, 4),
]


@pytest.mark.parametrize(("name", "low", "high"), RANGES)
def test_range_ends_are_accepted(name: str, low: float, high: float) -> None:
    for value in (low, high):
        assert flat(**{name: value}).model_dump()[_snake(name)] == value
        assert generate(**{name: value}) == flat(**{name: value})


@pytest.mark.parametrize(("name", "low", "high"), RANGES)
def test_outside_the_range_is_refused_naming_the_field(name: str, low: float, high: float) -> None:
    step = 0.5 if isinstance(low, float) else 1
    for value in (low - step, high + step):
        error = refused(flat, **{name: value})
        assert error.extensions == {"code": "BAD_USER_INPUT", "field": name}
        assert error.message.startswith(f"{name}: ")
        error = refused(generate, **{name: value})
        assert error.extensions["field"] == f"options.{name}"


@pytest.mark.parametrize(
    ("field", "value", "name"),
    [
        ("prompt", "x" * 1001, "prompt"),
        ("prompt", "   ", "prompt"),
        ("quality", "x" * 33, "quality"),
        ("version", "x" * 65, "version"),
        ("webhookUrl", "https://x.test/" + "x" * 2048, "webhookUrl"),
        ("idempotencyKey", "", "idempotencyKey"),
        ("idempotencyKey", "k" * 129, "idempotencyKey"),
        ("service", "", "service"),
    ],
)
def test_lengths_are_bounded(field: str, value: str, name: str) -> None:
    assert refused(flat, **{field: value}).extensions["field"] == name


def test_missing_and_unknown_fields_name_the_clients_spelling() -> None:
    assert refused(from_image_input, {"prompt": "p"}).message == "service is required"
    assert refused(from_image_input, {"service": "local"}).message == "prompt is required"
    missing = refused(from_generate_input, {"provider": "local", "input": {}})
    assert (missing.message, missing.extensions["field"]) == (
        "input.text is required",
        "input.text",
    )
    assert refused(flat, colour="red").message == "colour is not a known parameter"
    assert refused(generate, colour="red").extensions["field"] == "options.colour"
    blank = refused(from_generate_input, {"provider": "local", "input": {"text": " "}})
    assert blank.extensions["field"] == "input.text"
    # Spelled as the client did, however it is cased; and the generate shape's
    # `provider` is no name of the flat shape, whose `service` it would silently lose.
    for name in ("WIDTH", "webhookURL", "provider"):
        unknown = refused(flat, **{name: "x"})
        assert (unknown.message, unknown.extensions["field"]) == (
            f"{name} is not a known parameter",
            name,
        )
    assert refused(from_image_input, {"provider": "local", "prompt": "p"}).extensions == {
        "code": "BAD_USER_INPUT",
        "field": "provider",
    }
    assert refused(flat, num_images=9).extensions["field"] == "num_images"


# -- formats and aspect ratios -------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "format"),
    [("png", "png"), ("PNG", "png"), ("jpg", "jpg"), ("jpeg", "jpg"), ("JPEG", "jpg"),
     ("Jpg", "jpg"), ("webp", "webp"), ("WebP", "webp")],
)  # fmt: skip
def test_output_format_spellings(asked: str, format: str) -> None:
    assert flat(outputFormat=asked).output_format == format


@pytest.mark.parametrize("asked", ["gif", "tiff", "", "image/png", 3])
def test_other_output_formats_are_refused(asked: object) -> None:
    assert refused(flat, outputFormat=asked).extensions["field"] == "outputFormat"


def test_every_output_format_is_in_the_format_table() -> None:
    literal = GenerationRequest.model_fields["output_format"].annotation
    assert set(literal.__args__) == set(FORMATS)  # type: ignore[union-attr]


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_documented_aspect_ratios_are_accepted(ratio: str) -> None:
    assert flat(aspectRatio=ratio).aspect_ratio == ratio


@pytest.mark.parametrize("ratio", ["7:5", "1:2", "16:10", "", "16/9", "1:1 "])
def test_other_aspect_ratios_are_refused(ratio: str) -> None:
    error = refused(flat, aspectRatio=ratio)
    assert error.extensions["field"] == "aspectRatio"
    assert "must be one of 1:1, 16:9" in error.message


# -- size ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_size_from_aspect_ratio_is_about_a_megapixel(ratio: str) -> None:
    width, height = flat(aspectRatio=ratio).size()
    a, b = (int(x) for x in ratio.split(":"))
    assert width % 16 == 0 and height % 16 == 0
    assert 512 <= width <= 2048 and 512 <= height <= 2048
    assert abs(width * height / (1024 * 1024) - 1) < 0.05
    assert abs(math.log(width / height) - math.log(a / b)) < 0.03


@pytest.mark.parametrize(
    ("fields", "size"),
    [
        ({"aspectRatio": "1:1"}, (1024, 1024)),
        ({"aspectRatio": "16:9"}, (1360, 768)),
        ({"aspectRatio": "9:16"}, (768, 1360)),
        ({"aspectRatio": "21:9"}, (1568, 672)),
        ({"width": 640, "height": 512}, (640, 512)),
        ({"width": 640, "height": 512, "aspectRatio": "16:9"}, (640, 512)),
        # With one side given, the ratio is not used: the other side is the default.
        ({"width": 640, "aspectRatio": "16:9"}, (640, 1024)),
        ({"height": 2048}, (1024, 2048)),
        ({}, (1024, 1024)),
    ],
)
def test_size(fields: dict[str, Any], size: tuple[int, int]) -> None:
    request = flat(**fields)
    assert request.size() == size
    assert (request.image_fields()["width"], request.image_fields()["height"]) == size


# -- the cache key -------------------------------------------------------------------------

PICTURE = {
    "width": 1024,
    "height": 768,
    "seed": 42,
    "steps": 20,
    "guidance": 3.5,
    "numImages": 2,
    "outputFormat": "webp",
    "quality": "high",
    "version": "v1",
}


def digest(request: GenerationRequest, **settings: Any) -> str | None:
    cache = Cache(None, None, Settings(**settings))  # type: ignore[arg-type]  # no I/O
    return cache.digest(request)


def test_cache_key_is_pinned() -> None:
    """Keys are stored in Redis: a change of the computation empties the cache."""
    request = flat(service="fluxkrea", prompt="a lighthouse at dusk", width=1024, height=768,
                   seed=42)  # fmt: skip
    assert digest(request) == "9c42fb7e7f012db7d41f3047f4b19f22645f6ff157df9ba32d492afaf60b08ee"
    request = from_generate_input(
        {"provider": "segmind", "input": {"text": "a fox"},
         "options": {"seed": 7, "aspectRatio": "16:9", "guidance": 3, "steps": 20,
                     "numImages": 2, "outputFormat": "JPEG", "quality": "high",
                     "version": "v1"}}
    )  # fmt: skip
    assert digest(request) == "49d46570dcc1dee5225c1d5792b7af1dc8208a94478a28f3c8d7990bf2d2810e"


def test_same_parameters_same_key_whatever_the_spelling() -> None:
    key = digest(flat(**PICTURE))
    assert key is not None
    assert digest(flat(**dict(reversed(PICTURE.items())))) == key
    assert digest(generate(**PICTURE)) == key
    snake = {"num_images" if k == "numImages" else k: v for k, v in PICTURE.items()}
    assert digest(flat(**snake)) == key
    assert digest(flat(**{**PICTURE, "outputFormat": "WEBP"})) == key
    # What does not change the picture does not change the key.
    for other in ({"cache": True}, {"webhookUrl": "https://x.test/h"}, {"idempotencyKey": "k"}):
        assert digest(flat(**PICTURE, **other)) == key


@pytest.mark.parametrize(
    "change",
    [
        {"service": "fluxkrea"},
        {"prompt": "a fox."},
        {"width": 1040},
        {"height": 784},
        {"seed": 43},
        {"steps": 21},
        {"steps": None},
        {"guidance": 3.6},
        {"guidance": None},
        {"numImages": 1},
        {"outputFormat": "png"},
        {"quality": "low"},
        {"quality": None},
        {"version": "v2"},
        {"aspectRatio": "4:3"},
    ],
)
def test_any_parameter_change_changes_the_key(change: dict[str, Any]) -> None:
    assert digest(flat(**{**PICTURE, **change})) != digest(flat(**PICTURE))


def test_defaults_written_out_give_the_same_key() -> None:
    key = digest(flat(seed=1))
    assert digest(flat(seed=1, width=1024, height=1024, numImages=1, outputFormat="png")) == key
    assert digest(flat(seed=1, aspectRatio="1:1")) != key  # the ratio is part of the request
    assert digest(flat(seed=1, guidance=3)) == digest(flat(seed=1, guidance=3.0))
    ratio = digest(flat(seed=1, aspectRatio="16:9"))
    assert ratio != digest(flat(seed=1, width=1360, height=768))


def test_what_is_not_cacheable_has_no_key() -> None:
    assert digest(flat()) is None  # no seed: a new picture was asked for
    assert digest(flat(cache=True)) is not None
    assert digest(flat(seed=1, cache=False)) is None
    assert digest(flat(seed=1), cache_enabled=False) is None
    assert digest(flat(seed=1), cache_disabled_services=["local"]) is None


# -- the GraphQL inputs are built from the same declaration --------------------------------


def graphql_inputs() -> dict[str, GraphQLInputObjectType]:
    @strawberry.type
    class Query:
        @strawberry.field
        def probe(self, a: GenerateInput, b: ImageGenerationInput) -> int:
            return 0

    types = strawberry.Schema(query=Query)._schema.type_map
    names = ("GenerateInput", "GenerateOptions", "ImageGenerationInput")
    return {name: cast(GraphQLInputObjectType, types[name]) for name in names}


def shape(input_type: GraphQLInputObjectType) -> dict[str, tuple[str, bool]]:
    """{GraphQL name: (scalar or input type name, required)}"""
    out = {}
    for name, field in input_type.fields.items():
        kind = field.type
        required = isinstance(kind, GraphQLNonNull)
        inner = kind.of_type if required else kind
        out[name] = (inner.name, required)
    return out


def test_graphql_inputs_have_the_requests_fields_in_its_order() -> None:
    inputs = graphql_inputs()
    flat_fields = list(shape(inputs["ImageGenerationInput"]))
    expected = [
        "service" if name == "provider" else CAMEL_NAMES[name]
        for name in GenerationRequest.model_fields
    ]
    assert flat_fields == expected
    assert list(shape(inputs["GenerateOptions"])) == [
        *(CAMEL_NAMES[name] for name in OPTION_FIELDS), "webhookUrl", "idempotencyKey",
    ]  # fmt: skip
    assert list(shape(inputs["GenerateInput"])) == [
        "type", "provider", "input", "options", "webhookUrl", "idempotencyKey",
    ]  # fmt: skip


def test_graphql_types_follow_the_declaration() -> None:
    inputs = graphql_inputs()
    scalars = {int: "Int", float: "Float", str: "String", bool: "Boolean"}
    for graphql_name, (kind, required) in shape(inputs["ImageGenerationInput"]).items():
        name = {"service": "provider"}.get(graphql_name, _snake(graphql_name))
        field = GenerationRequest.model_fields[name]
        assert required == field.is_required(), graphql_name
        annotation = field.annotation
        python = {t for t in getattr(annotation, "__args__", (annotation,)) if t is not type(None)}
        expected = {scalars.get(t, "String") for t in python}  # a Literal of strings: String
        assert {kind} == expected, graphql_name
    options = inputs["GenerateOptions"].fields
    assert all(field.default_value is None for field in options.values())


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def test_a_field_given_twice_in_two_spellings_is_refused_not_guessed() -> None:
    """`prompt` and `Prompt`: which one did the client mean? It drew one silently."""
    for body, field in (
        ({"service": "local", "prompt": "a cat", "Prompt": "a dog"}, "prompt"),
        ({"service": "local", "prompt": "a cat", "numImages": 1, "num_images": 3}, "numImages"),
    ):
        with pytest.raises(BadUserInput, match="given twice") as refused:
            from_image_input(body)
        assert refused.value.extensions["field"] == field


def test_true_is_no_number_and_quality_is_read_in_any_case() -> None:
    for field in ("seed", "width", "numImages", "steps", "guidance"):
        with pytest.raises(BadUserInput, match="not true or false") as refused:
            from_image_input({"service": "local", "prompt": "x", field: True})
        assert refused.value.extensions["field"] == field
    shouted = from_image_input({"service": "local", "prompt": "x", "quality": " HIGH "})
    assert shouted.quality == "high"
    assert (
        shouted.cache_key
        == from_image_input({"service": "local", "prompt": "x", "quality": "high"}).cache_key
    )


def test_webhook_url_and_idempotency_key_may_come_in_the_options() -> None:
    """Doitong's parameter table lists `webhookUrl` beside width and height, which the
    generate shape takes in `options`: a client that put it there too got a 400 and no
    job. Given in both places, they must agree."""
    given = {"webhookUrl": "https://x.test/h", "idempotencyKey": "k1"}
    assert generate(**given) == flat(**given)
    assert generate(webhookUrl=None) == generate()
    agreeing = {"provider": "local", "input": {"text": "a fox"}, "options": given, **given}
    assert from_generate_input(agreeing) == flat(**given)
    for name in given:
        error = refused(from_generate_input, {**agreeing, name: "other"})
        assert error.extensions["field"] == f"options.{name}"
        assert error.message == f"options.{name} and {name} differ: give it once"
    error = refused(generate, webhookUrl="x" * 2049)
    assert error.extensions["field"] == "options.webhookUrl"
