"""The limits on a GraphQL document's shape, measured in one pass before any rule runs.

A document over a limit is refused with these errors alone: graphql-core's rules are
not run on it, since their work grows with what the limits bound (the rules visit every
selection of the text; `OverlappingFieldsCanBeMergedRule` compares same-named fields
pairwise; each error is located in the text).

Hand-written because Strawberry's depth and alias validators expand every fragment
spread anew (a document of n fragments each spreading the previous one twice costs 2^n:
700 bytes held the server for seconds), and graphql-core has no such limits. Here each
definition is walked once; a spread adds the measure of the fragment it names, computed
once (memoised) and without recursion, so a long chain of fragments cannot exhaust the
stack. A spread that closes a cycle adds nothing: `NoFragmentCyclesRule` reports it.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

from graphql import (
    DocumentNode,
    FieldNode,
    FloatValueNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    ListValueNode,
    NullValueNode,
    ObjectValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    Source,
    SourceLocation,
    ValueNode,
)
from graphql.validation.rules import overlapping_fields_can_be_merged

from gateway.service import PAGE

# As Strawberry's `QueryDepthLimiter` counts it: a root field is at depth 0, its
# selections at 1...; introspection fields (`__schema`...) do not count their selections.
MAX_DEPTH = 8
# Fields with an alias, in the operations with their fragments expanded.
MAX_ALIASES = 15
# Fields in the operations with their fragments expanded, those below a page once per
# item it may hold (`PAGES`): what execution may complete. A full page of every job
# field is about 2,100; the 24,000 of fifteen such pages held the server for 60 ms.
MAX_FIELDS = 2_500
# Fields answering a page of `first` items, and the most they serve: below one, a field
# counts `first` times if it is written as a number, the page's default (`PAGE`) when
# `first` is left out or null, else (a variable) that most.
PAGES = {"jobs": 100}  # Query.jobs
# Fields an operation may ask for once (aliases would multiply them): `usage` reads up to
# 50,000 jobs (~0.1 s for 4,000); `__schema`, the whole schema (~25 ms, 1.2 MB for
# fifteen aliased, with no key needed).
ONCE = frozenset({"usage", "__schema"})
# The mutations that make what their answer alone shows (a job's id, a token, a key): each
# must be its operation's only mutation. Every mutation answers a non-null type, so any
# other one refused beside it would null the whole answer (GraphQL's null propagation),
# this one's job charged and running, its id, token or key never seen.
MAKES = ("generate", "generateImage", "createClientToken", "createKey", "rotateKey")
MUTATIONS = frozenset({*MAKES, "cancelJob", "resendWebhook", "revokeClientToken"})
MUTATIONS |= {"updateKey", "addCredits", "revokeKey"}  # Mutation's fields, all
# A page filtered by `status` reads up to a thousand records to fill itself
# (gateway/jobs/store.py, SCAN_MOST): once an operation too, as the one read it counts.
FILTERED = "jobs(status:)"
ONCE |= {FILTERED}
COUNTED = ONCE | MUTATIONS  # what `measure` counts
# Characters of a number written in the document: graphql-core turns a longer integer
# into an error that names Python's own limit (4,300 digits).
MAX_NUMBER = 64
# Fields, fragment spreads and inline fragments in the text: what the rules visit.
MAX_SELECTIONS = 500
# Operations and fragments: several rules walk each one of them on their own.
MAX_DEFINITIONS = 50
# graphql-core locates an error with several locations by reading the lines before
# them, in Python (`IndexedSource` spares the others): 120 such errors after 14,000
# lines took 0.23 s.
MAX_LINES = 500
# Values in a request's variables (members of objects and items of lists, at any
# depth), checked before they are coerced: graphql-core makes an error, with
# suggestions, for each member an input type does not have; 4,000 took 1.2 s. A
# client's variables hold a few dozen.
MAX_VARIABLE_VALUES = 200
# graphql-core's own bound on `OverlappingFieldsCanBeMergedRule`'s pairwise comparisons
# (documented as set by assigning it; read when each validation starts). Its default,
# 500,000, is about a second of CPU; 10,000 is about 10 ms, and a client's document
# needs none unless it selects a field several times.
overlapping_fields_can_be_merged.MAX_COMPLEXITY_BUDGET = 10_000

NEWLINE = re.compile(r"\r\n|[\n\r]")  # graphql-core's


class IndexedSource(Source):
    """A document's text that locates a position (an error's line and column) by
    bisecting its line breaks, found once. graphql-core's `Source` reads every line
    before the position, for each error: a hundred errors after 500 lines took 30 ms."""

    _breaks: list[tuple[int, int]] | None = None  # (start, end) of each line break

    def get_location(self, position: int) -> SourceLocation:
        breaks = self._breaks
        if breaks is None:
            breaks = self._breaks = [(m.start(), m.end()) for m in NEWLINE.finditer(self.body)]
        before = bisect.bisect_left(breaks, (position,))  # the line breaks before it
        line_start = breaks[before - 1][1] if before else 0
        return SourceLocation(before + 1, position + 1 - line_start)


@dataclass(slots=True)
class Measure:
    """A definition's measure; a fragment's depth is relative to where it is spread, and
    its fields are counted once per item of the pages it is spread below."""

    depth: int = 0  # the deepest selection, as `MAX_DEPTH` counts
    aliases: int = 0
    fields: int = 0
    selections: int = 0  # in the text, spreads not expanded
    once: dict[str, int] = field(default_factory=dict)  # times each of `COUNTED` is asked
    long_numbers: int = 0  # numbers over `MAX_NUMBER` characters in its arguments
    # The fragments spread: (name, the spread's depth, or None where depth does not
    # count; how many times its fields count there).
    spreads: list[tuple[str, int | None, int]] = field(default_factory=list)


def page_size(node: FieldNode) -> int:
    """How many times what `node` selects may be completed."""
    most = PAGES.get(node.name.value)
    if most is None:
        return 1
    for argument in node.arguments or ():
        value = argument.value
        if argument.name.value != "first":
            continue
        if isinstance(value, NullValueNode):
            break
        if not isinstance(value, IntValueNode) or len(value.value) > MAX_NUMBER:
            return most  # a variable; or too long a number, refused (`long_numbers`)
        return min(max(int(value.value), 1), most)
    return min(PAGE, most)


def _filtered(node: FieldNode) -> bool:
    """Whether a page is asked for with a `status` (a variable may give one)."""
    return any(
        a.name.value == "status" and not isinstance(a.value, NullValueNode)
        for a in node.arguments or ()
    )


def long_numbers(values: list[ValueNode]) -> int:
    """The numbers over `MAX_NUMBER` characters in `values`, at any depth."""
    found = 0
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, IntValueNode | FloatValueNode):
            found += len(value.value) > MAX_NUMBER
        elif isinstance(value, ListValueNode):
            stack.extend(value.values)
        elif isinstance(value, ObjectValueNode):
            stack.extend(member.value for member in value.fields)
    return found


def measure(selection_set: SelectionSetNode) -> Measure:
    """A selection set's own measure (its spreads listed, not expanded)."""
    out = Measure()
    # (selection set, its depth, whether depth counts there, times its fields count)
    stack: list[tuple[SelectionSetNode, int, bool, int]] = [(selection_set, 0, True, 1)]
    while stack:
        selection_set, depth, counted, times = stack.pop()
        for selection in selection_set.selections:
            out.selections += 1
            if counted and depth > out.depth:
                out.depth = depth
            if isinstance(selection, FieldNode):
                out.fields += times
                if selection.alias:
                    out.aliases += 1
                name = selection.name.value
                if name in PAGES and _filtered(selection):
                    name = FILTERED  # a scan of up to a thousand records: counted apart
                if name in COUNTED:
                    out.once[name] = out.once.get(name, 0) + times
                if selection.arguments:
                    out.long_numbers += long_numbers([a.value for a in selection.arguments])
                if selection.selection_set:
                    below = counted and not selection.name.value.startswith("__")
                    stack.append(
                        (selection.selection_set, depth + 1, below, times * page_size(selection))
                    )
            elif isinstance(selection, InlineFragmentNode):
                stack.append((selection.selection_set, depth, counted, times))
            elif isinstance(selection, FragmentSpreadNode):
                at = depth if counted else None
                out.spreads.append((selection.name.value, at, times))
    return out


def expand(own: Measure, totals: dict[str, Measure]) -> Measure:
    """`own` with the totals of the fragments it spreads added (a missing one adds
    nothing: unknown, or closing a cycle)."""
    total = Measure(
        own.depth, own.aliases, own.fields, own.selections, dict(own.once), own.long_numbers
    )
    for name, depth, times in own.spreads:
        spread = totals.get(name)
        if spread is None:
            continue
        total.aliases += spread.aliases
        total.fields += times * spread.fields
        total.long_numbers += spread.long_numbers
        for field_name, asked in spread.once.items():
            total.once[field_name] = total.once.get(field_name, 0) + times * asked
        if depth is not None and depth + spread.depth > total.depth:
            total.depth = depth + spread.depth
    return total


def fragment_totals(document: DocumentNode) -> tuple[dict[str, Measure], int]:
    """Every fragment's measure with its spreads expanded, by name; and the selections
    in the text of all fragments (of each, where two have one name)."""
    measured = [
        (definition.name.value, measure(definition.selection_set))
        for definition in document.definitions
        if isinstance(definition, FragmentDefinitionNode)
    ]
    own = dict(measured)
    totals: dict[str, Measure] = {}
    for root in own:
        if root in totals:
            continue
        # Depth first without recursion: a fragment's total once all it spreads have theirs.
        path = [(root, iter(own[root].spreads))]
        on_path = {root}
        while path:
            name, spreads = path[-1]
            for spread, _, _ in spreads:
                if spread in own and spread not in totals and spread not in on_path:
                    path.append((spread, iter(own[spread].spreads)))
                    on_path.add(spread)
                    break
            else:
                path.pop()
                on_path.discard(name)
                totals[name] = expand(own[name], totals)
    return totals, sum(m.selections for _, m in measured)


def variables_error(variables: object) -> GraphQLError | None:
    """The error of a request whose variables hold too many values; None if they do not."""
    count = 0
    stack = [variables]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            count += len(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            count += len(value)
            stack.extend(value)
        if count > MAX_VARIABLE_VALUES:
            return GraphQLError(
                f"More than {MAX_VARIABLE_VALUES} values found in the "
                f"variables. Allowed: {MAX_VARIABLE_VALUES}"
            )
    return None


def lines(document: DocumentNode) -> int:
    """The document's lines, as graphql-core counts them (CR, LF or CRLF end one)."""
    body = document.loc.source.body if document.loc else ""
    return body.count("\n") + body.count("\r") - body.count("\r\n") + 1


def check(document: DocumentNode) -> list[GraphQLError]:
    """The errors of a document over the limits; none if it is within them."""
    # First, and alone: the other errors have locations.
    if (found := lines(document)) > MAX_LINES:
        return [GraphQLError(f"{found} lines found in the document. Allowed: {MAX_LINES}")]
    if (found := len(document.definitions)) > MAX_DEFINITIONS:
        return [
            GraphQLError(
                f"{found} operations and fragments found in the document. "
                f"Allowed: {MAX_DEFINITIONS}"
            )
        ]
    totals, selections = fragment_totals(document)
    errors = []
    aliases = fields = numbers = 0
    once: dict[str, int] = {}
    for definition in document.definitions:
        if not isinstance(definition, OperationDefinitionNode):
            continue
        own = measure(definition.selection_set)
        selections += own.selections
        total = expand(own, totals)
        aliases += total.aliases
        fields += total.fields
        numbers += total.long_numbers + long_numbers(
            [v.default_value for v in definition.variable_definitions or () if v.default_value]
        )
        for name, asked in total.once.items():  # one operation runs: its own count
            once[name] = max(once.get(name, 0), asked)
        made = next((name for name in MAKES if total.once.get(name)), None)
        if made and sum(total.once.get(name, 0) for name in MUTATIONS) > 1:
            errors.append(
                GraphQLError(
                    f"{made} must be its operation's only mutation: another one refused "
                    f"beside it would null the whole answer, {made}'s included"
                )
            )
        if total.depth > MAX_DEPTH:
            name = definition.name.value if definition.name else "anonymous"
            errors.append(
                GraphQLError(f"'{name}' exceeds maximum operation depth of {MAX_DEPTH}", definition)
            )
    if aliases > MAX_ALIASES:
        errors.append(GraphQLError(f"{aliases} aliases found. Allowed: {MAX_ALIASES}"))
    if fields > MAX_FIELDS:
        errors.append(
            GraphQLError(
                f"{fields} fields found with fragments expanded and pages full. "
                f"Allowed: {MAX_FIELDS}"
            )
        )
    for name, asked in sorted(once.items()):
        if asked > 1 and name in ONCE:
            errors.append(GraphQLError(f"{name} asked for {asked} times. Allowed: once"))
    if numbers:
        errors.append(
            GraphQLError(
                f"{numbers} numbers over {MAX_NUMBER} characters found in the document. "
                f"Allowed: {MAX_NUMBER} characters"
            )
        )
    if selections > MAX_SELECTIONS:
        errors.append(
            GraphQLError(
                f"{selections} selections found in the document. Allowed: {MAX_SELECTIONS}"
            )
        )
    return errors
