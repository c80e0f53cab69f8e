"""Prepared documents: the documents clients send again and again, run without the
general executor.

A gateway's traffic is a handful of documents: the Doitong `generate` mutation, the
`job` poll. Such a document is parsed, validated and planned once (bounded cache, keyed
by its text): one root field whose resolver is in `RAW_MUTATIONS`/`RAW_QUERIES`, selecting
leaf fields of its object type, no fragments, no directives. Running the plan coerces the
variables and arguments with graphql-core's own functions, calls the very resolver
graphql-core would, and completes each selected field with its GraphQL type's
serializer, with graphql-core's null rules and error shapes. Any other document, and
any variables that do not coerce, take Strawberry's path, which reports them; nothing
has run by then. `tests/test_prepared.py` sends every document both ways and compares.

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
from strawberry.extensions import MaskErrors
from strawberry.types import ExecutionResult
from strawberry.types.base import StrawberryObjectDefinition

from schema import limits
from schema.context import Context

Resolver = Callable[[Context, dict[str, Any]], Awaitable[Any]]


class _Null(Exception):
    """A field completed to null where its type says non-null (graphql-core's rule)."""


@dataclass(frozen=True)
class Leaf:
    key: str  # the response name: the alias, or the field's name
    node: FieldNode
    attribute: str | None  # the Python attribute; None for __typename
    type: GraphQLOutputType
    field: str  # Type.field, for graphql-core's null message


@dataclass(frozen=True)
class Plan:
    operation_name: str | None
    node: FieldNode
    key: str
    field: GraphQLField
    parent: str
    resolve: Resolver
    object_type: str
    leaves: tuple[Leaf, ...]
    variable_definitions: Any

    async def run(
        self, schema: Any, context: Context, variables: dict[str, Any]
    ) -> ExecutionResult | None:
        """The result, or None (nothing run) when the variables are over their limit or
        the variables or arguments do not coerce: the general path then reports it as it
        does."""
        if limits.variables_error(variables) is not None:
            return None
        coerced = get_variable_values(schema, self.variable_definitions, variables)
        if isinstance(coerced, list):
            return None
        try:
            args = get_argument_values(self.field, self.node, coerced)
        except GraphQLError:
            return None
        path = [self.key]
        errors: list[GraphQLError] = []
        value: Any
        try:
            source = await self.resolve(context, args)
        except Exception as exc:
            errors.append(located_error(exc, [self.node], path))
            value = None
        else:
            value = None if source is None else self._complete(source, errors)
        if value is None and is_non_null_type(self.field.type):
            if not errors:
                field = f"{self.parent}.{self.node.name.value}"
                errors.append(_null_error(field, self.node, path))
            return ExecutionResult(data=None, errors=errors)
        return ExecutionResult(data={self.key: value}, errors=errors or None)

    def _complete(self, source: Any, errors: list[GraphQLError]) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        for leaf in self.leaves:
            if leaf.attribute is None:
                out[leaf.key] = self.object_type
                continue
            path = [self.key, leaf.key]
            try:
                out[leaf.key] = _serialize(getattr(source, leaf.attribute), leaf.type)
            except _Null:
                errors.append(_null_error(leaf.field, leaf.node, path))
                return None  # a non-null field's null nulls its object
            except Exception as exc:
                errors.append(located_error(exc, [leaf.node], path))
                if is_non_null_type(leaf.type):
                    return None
                out[leaf.key] = None
        return out


def _null_error(field: str, node: FieldNode, path: list[str]) -> GraphQLError:
    return GraphQLError(f"Cannot return null for non-nullable field {field}.", node, path=path)


def _serialize(value: Any, type_: Any) -> Any:
    if is_non_null_type(type_):
        out = _serialize(value, type_.of_type)
        if out is None:
            raise _Null
        return out
    if value is None:
        return None
    if is_list_type(type_):
        return [_serialize(item, type_.of_type) for item in value]
    out = type_.serialize(value)
    if out is None:
        raise TypeError(f"Expected a value of type '{type_}' but received: {value!r}")
    return out


class Prepared:
    """Plans for the documents seen, bounded: a client cannot grow it with unique ones."""

    def __init__(
        self,
        schema: strawberry.Schema,
        *,
        parse: Callable[[str], DocumentNode],
        validate: Callable[[DocumentNode], list[GraphQLError]],
        mutations: dict[str, Resolver],
        queries: dict[str, Resolver],
        mask: MaskErrors,
        size: int,
    ) -> None:
        """`parse` and `validate` are the general path's own (limits and caches)."""
        self.schema = schema
        self.mask = mask
        self.core = schema._schema
        self._parse = parse
        self._validate = validate
        self._roots = {OperationType.MUTATION: mutations, OperationType.QUERY: queries}
        self.plan = functools.lru_cache(maxsize=size)(self._plan)

    async def execute(
        self,
        query: str,
        operation_name: str | None,
        variables: dict[str, Any],
        context: Context,
    ) -> ExecutionResult | None:
        """The document's result as Strawberry's path would give it (errors logged and
        masked alike), or None: not a prepared document, or its input does not coerce."""
        plan = self.plan(query)
        if plan is None or operation_name not in (None, plan.operation_name):
            return None
        result = await plan.run(self.core, context, variables)
        if result is not None and result.errors:
            self.schema.process_errors(result.errors)
            mask = self.mask
            result.errors = [
                mask.anonymise_error(e) if mask.should_mask_error(e) else e for e in result.errors
            ]
        return result

    def _plan(self, query: str) -> Plan | None:
        try:
            document = self._parse(query)
        except GraphQLError:
            return None
        if self._validate(document):
            return None
        if len(document.definitions) != 1:
            return None
        operation = document.definitions[0]
        if not isinstance(operation, OperationDefinitionNode) or operation.directives:
            return None
        resolvers = self._roots.get(operation.operation)
        root_type = self.core.get_root_type(operation.operation)
        selections = operation.selection_set.selections
        if resolvers is None or root_type is None or len(selections) != 1:
            return None
        node = selections[0]
        if not isinstance(node, FieldNode) or node.directives or node.name.value not in resolvers:
            return None
        field = root_type.fields[node.name.value]
        object_type = get_named_type(field.type)
        leaves = self._leaves(node, object_type)
        if leaves is None:
            return None
        return Plan(
            operation_name=operation.name.value if operation.name else None,
            node=node,
            key=node.alias.value if node.alias else node.name.value,
            field=field,
            parent=root_type.name,
            resolve=resolvers[node.name.value],
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
        leaves: dict[str, Leaf] = {}
        for selection in node.selection_set.selections:
            if not isinstance(selection, FieldNode) or selection.directives or selection.arguments:
                return None
            name = selection.name.value
            key = selection.alias.value if selection.alias else name
            if key in leaves:  # validation made it the same field: graphql-core merges
                continue
            if name == "__typename":
                leaves[key] = Leaf(key, selection, None, object_type, "")
                continue
            field = object_type.fields.get(name)
            if field is None or name not in plain or not is_leaf_type(get_named_type(field.type)):
                return None
            leaves[key] = Leaf(
                key, selection, plain[name], field.type, f"{object_type.name}.{name}"
            )
        return tuple(leaves.values())
