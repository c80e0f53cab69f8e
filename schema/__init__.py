"""The GraphQL layer of the gateway (types, inputs, resolvers, context, view).

Not the PyPI library of the same name: a test proves `import schema` is this package.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import strawberry
from graphql import GraphQLError, parse, specified_rules
from strawberry.extensions import MaskErrors
from strawberry.extensions.max_aliases import create_validator as alias_validator
from strawberry.extensions.query_depth_limiter import create_validator as depth_validator
from strawberry.schema.schema import validate_document
from strawberry.types import ExecutionContext

from gateway.errors import GatewayError
from schema.mutations import RAW_MUTATIONS, Mutation, install_raw_resolvers
from schema.prepared import Prepared
from schema.queries import RAW_QUERIES, Query
from schema.subscriptions import Subscription

IS_GATEWAY_SCHEMA = True
SDL_PATH = Path(__file__).with_name("schema.graphql")

MAX_DEPTH = 8
MAX_ALIASES = 15
MAX_TOKENS = 2_000
CACHE_SIZE = 512


def should_mask(error: GraphQLError) -> bool:
    """Mask unexpected errors raised while resolving (they have a path); keep our coded
    ones and the request's own parse, validation and variable errors, which describe
    only what the client sent."""
    original = error.original_error
    if original is None or not error.path:
        return False
    return not isinstance(original, GatewayError)


class MaskUnexpected(MaskErrors):
    """Strawberry's masking, with the contract's code: a masked error is ours (500)."""

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked


class GatewaySchema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Log only unexpected errors: a refusal (429, 402, 400...) is not an incident."""
        unexpected = [e for e in errors if should_mask(e)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


# Built once: the validation cache is keyed by the rule classes, and a new class per
# request would never hit.
LIMIT_RULES = (
    depth_validator(MAX_DEPTH, None),
    alias_validator(MAX_ALIASES),
)
# Bounded, shared by every request: a client cannot grow them with unique documents.
_parse = functools.lru_cache(maxsize=CACHE_SIZE)(parse)
_validate = functools.lru_cache(maxsize=CACHE_SIZE)(validate_document)


class Guard(MaskUnexpected):
    """Strawberry's MaxTokensLimiter, AddValidationRules (depth, aliases), ParserCache,
    ValidationCache and MaskErrors, as one extension. Strawberry enters every hook of
    every extension on every request; as five extensions that was about a fifth of a
    cached request's CPU (BENCHMARKS.md)."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=should_mask)

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.parse_options["max_tokens"] = MAX_TOKENS
        context.validation_rules = (*context.validation_rules, *LIMIT_RULES)
        yield from super().on_operation()  # masking, once the result is there

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        context.graphql_document = _parse(context.query, **context.parse_options)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        context.pre_execution_errors = _validate(
            context.schema._schema, context.graphql_document, context.validation_rules
        )
        yield


def build_schema() -> strawberry.Schema:
    schema = GatewaySchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[Guard],  # a class: a fresh instance per request, caches shared
    )
    install_raw_resolvers(schema)
    return schema


def prepared(schema: strawberry.Schema) -> Prepared:
    """The known-document path (`schema.prepared`): parsed, validated and masked as
    `Guard` does, sharing its caches."""
    # What Guard validates with: Strawberry's default rules (graphql-core's) and ours.
    rules = (*specified_rules, *LIMIT_RULES)
    return Prepared(
        schema,
        parse=lambda query: _parse(query, max_tokens=MAX_TOKENS),
        validate=lambda document: _validate(schema._schema, document, rules),
        mutations=RAW_MUTATIONS, queries=RAW_QUERIES,
        mask=MaskUnexpected(should_mask_error=should_mask), size=CACHE_SIZE,
    )


def sdl() -> str:
    return build_schema().as_str() + "\n"
