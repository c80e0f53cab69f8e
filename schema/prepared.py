"""Prepared documents: the documents clients send again and again, run without the
general executor.

A gateway's traffic is a handful of documents: the Doitong `generate` mutation, the
`job` poll. Such a document is parsed, validated and planned once (bounded cache, keyed
by its text): one root field whose Strawberry field names its resolver (`resolved_by`)
and has no permission classes or field extensions, selecting leaf fields of its object
type, no fragments, no directives. Running the plan coerces the variables and arguments
with graphql-core's own functions, calls that resolver with them (Strawberry's field
calls it with the same values, `graphql_value`), and completes each selected field with
its GraphQL type's output coercion, with graphql-core's null rules and error shapes.
Any other document, and any variables that do not coerce, take Strawberry's path, which
reports them; nothing has run by then. `tests/test_prepared.py` sends generated
documents both ways and compares.

The schema is checked when a `Prepared` is made: the prepared path reproduces only the
schema extensions it is told it does (`reproduces`), Strawberry's default executor and
field resolution, and no exception handlers; anything else refuses to start.

Hand-written because graphql-core has no compiled execution (graphql-jit, its JavaScript
counterpart, is the model); on the `generate` mutation the general path spends more CPU
in Strawberry and graphql-core than in the gateway itself (BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    GraphQLField,
    GraphQLObjectType,
    GraphQLOutputType,
    OperationDefinitionNode,
    OperationType,
    get_named_type,
    is_leaf_type,
    is_list_type,
    is_non_null_type,
    located_error,
)
from graphql.execution.values import get_argument_values, get_variable_values
from graphql.pyutils import Undefined, inspect, is_iterable
from strawberry.extensions import MaskErrors
from strawberry.schema.name_converter import NameConverter
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.schema.schema_converter import GraphQLCoreConverter
from strawberry.types import ExecutionResult
from strawberry.types.base import StrawberryObjectDefinition, get_object_definition
from strawberry.types.field import StrawberryField
from strawberry.types.maybe import Some
from strawberry.types.unset import UNSET

from gateway import bodies
from schema import limits
from schema.bounded import TokenBounded, weight
from schema.context import Context

Resolver = Callable[[Context, dict[str, Any]], Awaitable[Any]]
_NONE: Any = object()  # no arguments kept yet for these bytes

# The key, in a root field's Strawberry `metadata`, of its one resolver body.
RESOLVER = "gateway.prepared.resolver"


def resolved_by(resolve: Resolver) -> dict[str, Resolver]:
    """A root field's `metadata`: `resolve(context, arguments)` is its one resolver body,
    the arguments as graphql-core coerced them (keyed by the schema's names, input
    objects as dicts). Strawberry's field calls it with `graphql_value` of the arguments
    it converted; a prepared document calls it with graphql-core's own, which are shared
    by every request that sent the same bytes (`Prepared.execute`): `resolve` must never
    change them."""
    return {RESOLVER: resolve}


def graphql_value(info: strawberry.Info[Any, Any], value: Any) -> Any:
    """An argument as Strawberry converted it, given back as graphql-core coerced it: an
    input object as a dict keyed by the schema's field names (every field it has a value
    for), items and fields likewise; scalars and enum members as they are."""
    return _graphql_value(value, info.schema.config.name_converter)


def _graphql_value(value: Any, names: NameConverter) -> Any:
    if isinstance(value, Some):
        value = value.value
    fields = _input_fields(value.__class__, names)
    if fields is not None:
        out = {}
        for python_name, graphql_name in fields:
            item = getattr(value, python_name)
            if item is not UNSET:
                out[graphql_name] = _graphql_value(item, names)
        return out
    if isinstance(value, list):
        return [_graphql_value(item, names) for item in value]
    return value


@functools.cache  # by type: the schema's input types, and the scalars'
def _input_fields(cls: type, names: NameConverter) -> tuple[tuple[str, str], ...] | None:
    """A Strawberry type's fields as (Python name, schema name); None for another type."""
    definition = get_object_definition(cls)
    if definition is None:
        return None
    return tuple((field.python_name, names.from_field(field)) for field in definition.fields)


def unreproduced(schema: strawberry.Schema, reproduces: tuple[object, ...]) -> list[str]:
    """What of `schema` the prepared path would skip: schema extensions other than
    `reproduces` (each hook of those is reproduced by the caller's `parse`, `validate`
    and `mask`), exception handlers, another executor, another field resolution."""
    problems = []
    if tuple(schema.extensions) != tuple(reproduces):
        problems.append(
            f"schema extensions {list(schema.extensions)}, reproduced {list(reproduces)}"
        )
    if schema.exception_handlers:
        problems.append(f"exception handlers {list(schema.exception_handlers)}")
    if schema.execution_context_class is not StrawberryGraphQLCoreExecutionContext:
        problems.append(f"execution context class {schema.execution_context_class}")
    if schema.config.default_resolver is not getattr:
        problems.append(f"default resolver {schema.config.default_resolver}")
    return problems


@dataclass(frozen=True)
class Leaf:
    key: str  # the response name: the alias, or the field's name
    nodes: list[FieldNode]  # every selection of it (graphql-core merges them)
    attribute: str | None  # the Python attribute; None for __typename
    type: GraphQLOutputType
    field: str  # Type.field, for graphql-core's messages


@dataclass(frozen=True)
class Plan:
    operation_name: str | None
    operation: OperationType  # a query or a mutation
    node: FieldNode
    key: str
    field: GraphQLField
    name: str  # Type.field, for graphql-core's messages
    resolve: Resolver
    object_type: str
    leaves: tuple[Leaf, ...]
    variable_definitions: Any

    def arguments(self, schema: Any, variables: dict[str, Any]) -> dict[str, Any] | None:
        """The root field's arguments as graphql-core coerces them, or None when the
        variables are over their limit or the variables or arguments do not coerce: the
        general path then reports it as it does."""
        if limits.variables_error(variables) is not None:
            return None
        coerced = get_variable_values(schema, self.variable_definitions, variables)
        if isinstance(coerced, list):
            return None
        try:
            return get_argument_values(self.field, self.node, coerced)
        except GraphQLError:
            return None

    async def run(self, context: Context, args: dict[str, Any]) -> ExecutionResult:
        """The result of the resolver called with `args` (`arguments`)."""
        errors: list[GraphQLError] = []
        value: dict[str, Any] | None
        try:
            source = await self.resolve(context, args)
            value = None if source is None else self._complete(source, errors)
            if value is None and is_non_null_type(self.field.type):
                raise TypeError(f"Cannot return null for non-nullable field {self.name}.")
        except Exception as exc:
            # graphql-core's handle_field_error: a leaf's error that reached here keeps
            # its own path; the root field is null, and so is the data if it is non-null.
            errors.append(located_error(exc, [self.node], [self.key]))
            if is_non_null_type(self.field.type):
                return ExecutionResult(data=None, errors=errors)
            value = None
        return ExecutionResult(data={self.key: value}, errors=errors or None)

    def _complete(self, source: Any, errors: list[GraphQLError]) -> dict[str, Any]:
        """The object's selected fields; an error at a non-null field is raised, for the
        root field to be null (graphql-core's `complete_object_value`)."""
        out: dict[str, Any] = {}
        for leaf in self.leaves:
            if leaf.attribute is None:
                out[leaf.key] = self.object_type
                continue
            try:
                out[leaf.key] = _complete(
                    leaf, leaf.type, getattr(source, leaf.attribute), [self.key, leaf.key], errors
                )
            except Exception as exc:
                _field_error(exc, leaf, leaf.type, [self.key, leaf.key], errors)
                out[leaf.key] = None
        return out


def _field_error(
    exc: Exception, leaf: Leaf, type_: Any, path: list[str | int], errors: list[GraphQLError]
) -> None:
    """graphql-core's `handle_field_error`: at a non-null position the error is raised
    (its own path kept), making the nearest nullable position null; else collected."""
    error = located_error(exc, leaf.nodes, path)
    if is_non_null_type(type_):
        raise error
    errors.append(error)


def _complete(
    leaf: Leaf, type_: Any, value: Any, path: list[str | int], errors: list[GraphQLError]
) -> Any:
    """graphql-core's `complete_value` for a leaf type or lists of it: raises where it
    raises, each list item completed at its index."""
    if isinstance(value, Exception):
        raise value
    if is_non_null_type(type_):
        out = _complete(leaf, type_.of_type, value, path, errors)
        if out is None:
            raise TypeError(f"Cannot return null for non-nullable field {leaf.field}.")
        return out
    if value is None:
        return None
    if is_list_type(type_):
        if not is_iterable(value):
            raise GraphQLError(f"Expected Iterable, but did not find one for field '{leaf.field}'.")
        item_type = type_.of_type
        items = []
        for index, item in enumerate(value):
            item_path = [*path, index]
            try:
                items.append(_complete(leaf, item_type, item, item_path, errors))
            except Exception as exc:
                _field_error(exc, leaf, item_type, item_path, errors)
                items.append(None)
        return items
    coerced = type_.coerce_output_value(value)
    if coerced is None or coerced is Undefined:
        raise TypeError(
            f"Expected `{inspect(type_)}.coerce_output_value({inspect(value)})`"
            f" to return non-nullable value, returned: {inspect(coerced)}"
        )
    return coerced


class Prepared:
    """Plans for the documents seen, bounded: a client cannot grow it with unique ones."""

    def __init__(
        self,
        schema: strawberry.Schema,
        *,
        parse: Callable[[str], DocumentNode],
        validate: Callable[[DocumentNode], list[GraphQLError]],
        mask: MaskErrors,
        reproduces: tuple[object, ...],
    ) -> None:
        """`parse`, `validate` and `mask` are the general path's own (limits, caches,
        masking): together, what the schema extensions in `reproduces` do. A schema with
        more (or other) extensions, or anything else the prepared path would skip, is
        refused here: teach this module to reproduce it first."""
        if problems := unreproduced(schema, reproduces):
            raise ValueError(
                "the prepared path (schema/prepared.py) does not reproduce " + "; ".join(problems)
            )
        self.schema = schema
        self.mask = mask
        self.core = schema._schema
        self._parse = parse
        self._validate = validate
        self._plans: TokenBounded[str, Plan | None] = TokenBounded()
        # The arguments of the requests sent again byte for byte (a poll, a cache hit:
        # `gateway/bodies.py`): coercing the variables is most of what graphql-core
        # spends on a prepared document (BENCHMARKS.md).
        self._arguments: dict[bytes, dict[str, Any] | None] = {}

    async def execute(
        self,
        query: str,
        operation_name: str | None,
        variables: dict[str, Any],
        context: Context,
        *,
        queries_only: bool = False,
        sent: bytes = b"",
    ) -> ExecutionResult | None:
        """The document's result as Strawberry's path would give it (errors logged and
        masked alike), or None: not a prepared document, or its input does not coerce.
        `queries_only` (a GET): a mutation is None too, for Strawberry's path to refuse.
        `sent`: the bytes the request was read from (its body, or a GET's query string
        with `queries_only`), which the same arguments are kept by, when short."""
        plan = self.plan(query)
        if plan is None or operation_name not in (None, plan.operation_name):
            return None
        if queries_only and plan.operation is not OperationType.QUERY:
            return None
        if not sent or len(sent) > bodies.MAX_BYTES:
            args = plan.arguments(self.core, variables)
        else:
            key = b"G" + sent if queries_only else sent  # a body is not a query string
            args = self._arguments.pop(key, _NONE)
            if args is _NONE:
                args = plan.arguments(self.core, variables)
                if len(self._arguments) >= bodies.ENTRIES:
                    del self._arguments[next(iter(self._arguments))]  # least recently used
            self._arguments[key] = args  # the most recently used last
        if args is None:
            return None
        result = await plan.run(context, args)  # resolvers change no argument: shared
        if result.errors:
            self.schema.process_errors(result.errors)
            mask = self.mask
            result.errors = [
                mask.anonymise_error(e) if mask.should_mask_error(e) else e for e in result.errors
            ]
        return result

    def plan(self, query: str) -> Plan | None:
        """The query's plan, kept by its text (bounded by tokens: `schema.bounded`)."""
        return self._plans.get(query, self._weighed)

    def _weighed(self, query: str) -> tuple[Plan | None, int]:
        try:
            document = self._parse(query)
        except GraphQLError:
            return None, weight(query)
        return self._plan(document), weight(query, document)

    def _plan(self, document: DocumentNode) -> Plan | None:
        if self._validate(document):
            return None
        if len(document.definitions) != 1:
            return None
        operation = document.definitions[0]
        if not isinstance(operation, OperationDefinitionNode) or operation.directives:
            return None
        if operation.operation not in (OperationType.QUERY, OperationType.MUTATION):
            return None
        root_type = self.core.get_root_type(operation.operation)
        selections = operation.selection_set.selections
        if root_type is None or len(selections) != 1:
            return None
        node = selections[0]
        if not isinstance(node, FieldNode) or node.directives:
            return None
        field = root_type.fields.get(node.name.value)
        resolve = None if field is None else _resolver(field)
        if field is None or resolve is None:
            return None
        object_type = get_named_type(field.type)
        leaves = self._leaves(node, object_type)
        if leaves is None:
            return None
        return Plan(
            operation_name=operation.name.value if operation.name else None,
            operation=operation.operation,
            node=node,
            key=node.alias.value if node.alias else node.name.value,
            field=field,
            name=f"{root_type.name}.{node.name.value}",
            resolve=resolve,
            object_type=object_type.name,
            leaves=leaves,
            variable_definitions=operation.variable_definitions or (),
        )

    def _leaves(self, node: FieldNode, object_type: Any) -> tuple[Leaf, ...] | None:
        """The selected leaf fields, each with its Python attribute; None when a field
        has arguments, a directive, a selection of its own or a resolver."""
        if not isinstance(object_type, GraphQLObjectType) or node.selection_set is None:
            return None
        definition = self.schema.get_type_by_name(object_type.name)
        if not isinstance(definition, StrawberryObjectDefinition):
            return None
        plain = {
            self.schema.config.name_converter.get_graphql_name(f): f.python_name
            for f in definition.fields
            if f.base_resolver is None and not f.extensions and not f.permission_classes
        }
        nodes: dict[str, list[FieldNode]] = {}  # by response name, in order
        for selection in node.selection_set.selections:
            if not isinstance(selection, FieldNode) or selection.directives or selection.arguments:
                return None
            name = selection.name.value
            if name != "__typename":
                field = object_type.fields.get(name)
                if field is None or name not in plain:
                    return None
                if not is_leaf_type(get_named_type(field.type)):
                    return None
            # Validation made those of one response name the same field: graphql-core
            # completes it once, and locates its errors at each of them.
            key = selection.alias.value if selection.alias else name
            nodes.setdefault(key, []).append(selection)
        leaves = []
        for key, selected in nodes.items():
            name = selected[0].name.value
            if name == "__typename":
                leaves.append(Leaf(key, selected, None, object_type, ""))
            else:
                leaves.append(
                    Leaf(
                        key,
                        selected,
                        plain[name],
                        object_type.fields[name].type,
                        f"{object_type.name}.{name}",
                    )
                )
        return tuple(leaves)


def _resolver(field: GraphQLField) -> Resolver | None:
    """The root field's one resolver body, unless Strawberry's field does more than call
    it: permission classes and field extensions run only on Strawberry's path."""
    definition = field.extensions.get(GraphQLCoreConverter.DEFINITION_BACKREF)
    if not isinstance(definition, StrawberryField):
        return None
    if definition.permission_classes or definition.extensions:
        return None
    resolve: Resolver | None = definition.metadata.get(RESOLVER)
    return resolve
