"""The exported SDL matches the code, and `schema` is our package."""

from __future__ import annotations

import schema


def test_exported_sdl_matches_the_code() -> None:
    assert schema.SDL_PATH.read_text() == schema.sdl(), (
        "schema/schema.graphql is stale: run `make schema` and commit it"
    )


def test_import_schema_is_the_gateway_package_not_the_pypi_library() -> None:
    assert getattr(schema, "IS_GATEWAY_SCHEMA", False) is True
    assert schema.__file__ is not None and schema.__file__.endswith("schema/__init__.py")


def test_seed_input_shapes_are_in_the_schema() -> None:
    sdl = schema.sdl()
    for line in (
        "generate(input: GenerateInput!): Generation!",
        "generateImage(input: ImageGenerationInput!): Generation!",
        "cancelJob(id: ID!): Generation!",
        "jobUpdates(id: ID!): Generation!",
    ):
        assert line in sdl
    for name in ("creditCost", "createdAt", "completedAt", "webhookUrl", "urls", "error"):
        assert f"  {name}:" in sdl
