"""The GraphQL layer of the gateway (types, inputs, resolvers, context, view).

Not the PyPI library of the same name: a test proves `import schema` is this package.
"""

from __future__ import annotations

from pathlib import Path

import strawberry
from graphql import GraphQLError
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxTokensLimiter,
    ParserCache,
    ValidationCache,
)
from strawberry.extensions.max_aliases import create_validator as alias_validator
from strawberry.extensions.query_depth_limiter import create_validator as depth_validator
from strawberry.types import ExecutionContext

from gateway.errors import GatewayError
from schema.mutations import Mutation, install_raw_resolvers
from schema.queries import Query
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


LIMIT_RULES = [
    depth_validator(MAX_DEPTH, None),
    alias_validator(MAX_ALIASES),
]


def build_schema() -> strawberry.Schema:
    schema = GatewaySchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[
            # Factories: a fresh extension per request; the caches live at module level.
            lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
            # The depth and alias rules are built once: the validation cache is keyed by
            # the rule classes, and a new class per request would never hit.
            lambda: AddValidationRules(LIMIT_RULES),
            lambda: ParserCache(maxsize=CACHE_SIZE),
            lambda: ValidationCache(maxsize=CACHE_SIZE),
            lambda: MaskUnexpected(should_mask_error=should_mask),
        ],
    )
    install_raw_resolvers(schema)
    return schema


def sdl() -> str:
    return build_schema().as_str() + "\n"
