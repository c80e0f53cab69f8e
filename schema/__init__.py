"""The GraphQL layer of the gateway (types, inputs, resolvers, context, view).

Not the PyPI library of the same name: a test proves `import schema` is this package.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import strawberry
from graphql import (
    ASTValidationRule,
    DocumentNode,
    FieldNode,
    GraphQLError,
    GraphQLSchema,
    OperationType,
    get_operation_ast,
    parse,
)
from starlette.websockets import WebSocket
from strawberry.extensions import MaskErrors
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.schema.schema import validate_document
from strawberry.types import ExecutionContext

from gateway.errors import GatewayError
from schema import limits
from schema.bounded import TokenBounded, weight
from schema.mutations import Mutation
from schema.prepared import Prepared
from schema.queries import Query
from schema.subscriptions import Subscription

IS_GATEWAY_SCHEMA = True
SDL_PATH = Path(__file__).with_name("schema.graphql")

MAX_TOKENS = 2_000
# In characters. A client's document is a few hundred (a literal prompt is at most 1,000,
# `gateway/params.py`), 2,000 tokens fit in about 10,000, and each error with several
# locations reads the text before them. Bounds a GET's query string and a WebSocket
# message too, which the HTTP body limit does not.
MAX_SOURCE_LENGTH = 16 * 1024
PARSE_OPTIONS = {"max_tokens": MAX_TOKENS, "max_source_length": MAX_SOURCE_LENGTH}


#: graphql-core's words for a value in a variable that its type refuses (a string for an
#: Int, a number past 32 bits), and where in the variable it is: the field it names
INVALID_VARIABLE = re.compile(r"Variable '\$\w+' has invalid value at \.([\w.\[\]]+): ")
#: what refuses the request itself before it runs: graphql-core's errors, and Strawberry's
#: for an operation it cannot find or that its transport does not run
REQUEST_ERRORS = (GraphQLError, CannotGetOperationTypeError, InvalidOperationTypeError)


def should_mask(error: GraphQLError) -> bool:
    """Mask unexpected errors: raised while resolving (they have a path), or by a
    subscription's stream between its events (no path, and nothing of the request
    located: Strawberry wraps the exception as it is). Keep our coded ones and the
    request's own parse, validation and variable errors, which describe only what the
    client sent (located in it, or graphql-core's own)."""
    original = error.original_error
    if original is None or isinstance(original, GatewayError):
        return False
    if not error.path:
        return not error.nodes and not isinstance(original, REQUEST_ERRORS)
    return not argument_error(error)


def argument_error(error: GraphQLError) -> bool:
    """graphql-core's, raised while resolving, about an argument the request's variables
    made invalid (null for a non-null argument that has a default): the request's fault.
    It points at the argument or the variable; an error of the result (a resolver's
    value that does not fit its type) points at the field."""
    original = error.original_error
    nodes = (original.nodes if isinstance(original, GraphQLError) else None) or []
    return bool(nodes) and not isinstance(nodes[0], FieldNode)


def error_code(error: GraphQLError) -> str:
    """The code of an error raised without one: the request's own (parse, validation,
    variables, an argument its variables made invalid) is BAD_USER_INPUT, unless it arose
    while resolving (INTERNAL_SERVER_ERROR: masked, `should_mask`)."""
    own = (not error.path and not should_mask(error)) or argument_error(error)
    return "BAD_USER_INPUT" if own else "INTERNAL_SERVER_ERROR"


class MaskUnexpected(MaskErrors):
    """Strawberry's masking, with the gateway's codes (docs/api.md#errors): a masked
    error is ours (500)."""

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        masked = super().anonymise_error(error)
        masked.extensions = {"code": "INTERNAL_SERVER_ERROR"}
        return masked


class GatewaySchema(strawberry.Schema):
    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        """Give every error its code (`error_code`), over HTTP and WebSockets alike; log
        only unexpected ones: a refusal (429, 402, 400...) is not an incident."""
        for error in errors:
            if "code" not in (error.extensions or {}):
                error.extensions = {**(error.extensions or {}), "code": error_code(error)}
                if found := INVALID_VARIABLE.match(error.message):  # as our own errors do
                    error.extensions["field"] = found[1]
        unexpected = [e for e in errors if should_mask(e)]
        if unexpected:
            super().process_errors(unexpected, execution_context)


def validate(
    schema: GraphQLSchema, document: DocumentNode, rules: tuple[type[ASTValidationRule], ...]
) -> list[GraphQLError]:
    """The document's limits (`schema.limits`), then the rules, graphql-core's and
    Strawberry's: a document over the limits is refused without the rules, whose work
    grows with what the limits bound."""
    return limits.check(document) or validate_document(schema, document, rules)


def parse_document(query: str, **options: Any) -> DocumentNode:
    """graphql-core's parse, of a text that locates its errors quickly."""
    return parse(limits.IndexedSource(query), **options)


# Bounded by the tokens they hold (`schema.bounded`), shared by every request: a client
# cannot grow them with unique documents.
_documents: TokenBounded[str, DocumentNode] = TokenBounded()
Rules = tuple[type[ASTValidationRule], ...]
# By the document's text, not the document: a node hashes its whole tree, each time.
_validations: TokenBounded[tuple[GraphQLSchema, str, Rules], list[GraphQLError]] = TokenBounded()


def _parse(query: str) -> DocumentNode:
    """`query` parsed with PARSE_OPTIONS (the only options any request is parsed with)."""
    return _documents.get(query, _parsed)


def _parsed(query: str) -> tuple[DocumentNode, int]:
    document = parse_document(query, **PARSE_OPTIONS)
    return document, weight(query, document)


def _validate(schema: GraphQLSchema, document: DocumentNode, rules: Rules) -> list[GraphQLError]:
    """`validate`, kept for a document `_parse` made (the same text, the same document)."""
    if document.loc is None:  # not parsed here: nothing to know it by
        return validate(schema, document, rules)
    text = document.loc.source.body

    def validated(_: object) -> tuple[list[GraphQLError], int]:
        return validate(schema, document, rules), weight(text, document)

    return _validations.get((schema, text, rules), validated)


def operation_error(document: DocumentNode, operation_name: str | None) -> GraphQLError | None:
    """graphql-core's request error for several operations and no operation name, which
    Strawberry does not give: it runs the first. (A name that names none of them,
    Strawberry refuses before validation.)"""
    if operation_name is not None or len(document.definitions) == 1:
        return None
    if get_operation_ast(document) is not None:  # one operation, and fragments
        return None
    return GraphQLError("Must provide operation name if query contains multiple operations.")


class Guard(MaskUnexpected):
    """Strawberry's MaxTokensLimiter, ParserCache, ValidationCache and MaskErrors, with
    the document's limits (`schema.limits`, in place of Strawberry's depth and alias
    validators) and the operation's choice, as one extension. Strawberry enters every
    hook of every extension on every request; as five extensions that was about a fifth
    of a cached request's CPU (BENCHMARKS.md)."""

    def __init__(self) -> None:
        super().__init__(should_mask_error=should_mask)
        self.operation_name: str | None = None

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        # The request's own: once the document is parsed, Strawberry answers the first
        # operation's name when the request names none.
        self.operation_name = context.operation_name
        context.parse_options.update(PARSE_OPTIONS)  # type: ignore[typeddict-item]
        query = context.query
        if isinstance(query, str) and len(query) > MAX_SOURCE_LENGTH:
            # Cut to one character over: graphql-core refuses it all the same
            # (max_source_length), and locates its error by scanning the text for line
            # breaks, twice (Strawberry parses a refused document again): for megabytes
            # in a WebSocket message, tenths of a second.
            context.query = query[: MAX_SOURCE_LENGTH + 1]
        yield from super().on_operation()  # masking, once the result is there

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        # On a syntax error, left unparsed: Strawberry parses it again and reports the
        # error as a request error. Raised from here, it would end a WebSocket operation
        # with no error sent to the client, only a traceback in the log.
        query = context.query
        if isinstance(query, str):  # else Strawberry's parse says what is wrong
            with contextlib.suppress(GraphQLError):
                context.graphql_document = _parse(query)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        assert document is not None  # Strawberry validates only a parsed document
        errors = _validate(context.schema._schema, document, context.validation_rules)
        if not errors and (
            error := operation_error(document, self.operation_name)
            or limits.variables_error(context.variables)
            or self._transport_error(document)
        ):
            errors = [error]
        context.pre_execution_errors = errors
        yield

    def _transport_error(self, document: DocumentNode) -> GraphQLError | None:
        """A subscription asked over HTTP, where it cannot stream (graphql-core would
        run it as a query, whose field yields nothing: a 500)."""
        operation = get_operation_ast(document, self.operation_name)
        if operation is None or operation.operation != OperationType.SUBSCRIPTION:
            return None
        request = getattr(self.execution_context.context, "request", None)
        if isinstance(request, WebSocket):
            return None
        return GraphQLError(
            "Subscriptions are served over a WebSocket on this path "
            "(graphql-transport-ws or graphql-ws), not over HTTP."
        )


def build_schema() -> strawberry.Schema:
    return GatewaySchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        extensions=[Guard],  # a class: a fresh instance per request, caches shared
    )


def prepared(schema: strawberry.Schema) -> Prepared:
    """The known-document path (`schema.prepared`): parsed, validated and masked as
    `Guard` does, sharing its caches. Refused (at start) if the schema has extensions
    other than `Guard`."""
    # What Guard validates with: the rules of the execution context Strawberry makes for
    # each request (its defaults, graphql-core's; Guard does not change them).
    rules = schema._create_execution_context(None, ()).validation_rules
    return Prepared(
        schema,
        parse=_parse,
        validate=lambda document: _validate(schema._schema, document, rules),
        mask=MaskUnexpected(should_mask_error=should_mask),
        reproduces=(Guard,),
    )


def sdl() -> str:
    return build_schema().as_str() + "\n"
