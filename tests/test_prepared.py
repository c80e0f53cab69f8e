"""Prepared documents answer exactly as Strawberry's general path does.

Each document is sent twice to the served gateway: as clients send it (a prepared
document takes `schema.prepared`) and with an `extensions` member the prepared path does
not know (`general`), which only the general path takes. Status, the headers a client
reads, and the body must agree (job ids and times aside). The hand-written cases also
assert which path the first request took;
`test_generated_documents_answer_alike` sends documents Hypothesis makes of the fields the
prepared path runs, some against job records damaged in Redis. A bounded number of
examples, derandomised; `HYPOTHESIS_PROFILE=explore` searches further.

The prepared path reproduces Strawberry's and graphql-core's execution as the versions
in `PROVEN_WITH` do: upgrading either means running this file again (and exploring) and
reading what changed in their execution before updating the pin.
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import strawberry
from graphql import (
    GraphQLEnumType,
    GraphQLError,
    GraphQLInputObjectType,
    GraphQLInputType,
    GraphQLList,
    GraphQLNonNull,
    StringValueNode,
    ValidationRule,
    is_non_null_type,
    is_required_input_field,
    print_ast,
)
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from starlette.routing import Route
from strawberry.extensions import FieldExtension, SchemaExtension
from strawberry.permission import BasePermission

import schema
from gateway.store import keys
from schema import mutations, queries
from schema.inputs import GenerateInput
from schema.prepared import graphql_value, resolved_by
from schema.types import Generation
from tests.harness import GENERATE, JOB, Harness, gateway
from tests.records import change

PROVEN_WITH = {"strawberry-graphql": "0.341.2", "graphql-core": "3.3.2"}

SEED = """mutation Generate($input: GenerateInput!) {
  generate(input: $input) { id status type provider url metadata creditCost } }"""
EVERY_FIELD = """mutation($input: GenerateInput!) { made: generate(input: $input) {
  __typename id again: id status type provider url urls width height metadata creditCost
  createdAt completedAt webhookUrl error duration id } }"""
FLAT = """mutation($input: ImageGenerationInput!) {
  generateImage(input: $input) { id status provider creditCost width height } }"""
LITERAL = """mutation { generate(input: {type: IMAGE, provider: "local",
  input: {text: "a literal fox"}, options: {width: 512, height: 512}}) { id creditCost } }"""
NAMED_JOB = "query Poll($id: ID!) { job(id: $id) { id status urls metadata } }"
ESTIMATE = "query($input: GenerateInput!) { estimate(input: $input) { credits } }"

settings.register_profile(
    "suite",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    # Not shrunk: an example is six requests, and shrinking one took minutes; the
    # failing example is reported as generated (`explore` shrinks).
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "explore",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))


def doitong(provider: str = "local", **options: Any) -> dict[str, Any]:
    return {
        "input": {
            "type": "IMAGE",
            "provider": provider,
            "input": {"text": "a red fox"},
            "options": options,
        }
    }


def normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: normalized(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalized(v) for v in value]
    if isinstance(value, str):
        value = re.sub(r"\b[0-9a-f]{24}\b", "<id>", value)
        return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "<time>", value)
    return value


def graphql_view(gw: Harness) -> Any:
    return next(r.endpoint for r in gw.app.routes if isinstance(r, Route) and r.path == "/graphql")


async def both(
    gw: Harness,
    query: str,
    variables: dict[str, Any] | None,
    key: str | None,
    *,
    prepared: bool | None = True,
    operation_name: str | None = None,
) -> tuple[httpx.Response, httpx.Response]:
    """(the answer as sent, the general path's answer), after checking they agree.
    `prepared`: whether the first takes the prepared path (None: not checked)."""
    if prepared is not None:
        assert (graphql_view(gw).prepared.plan(query) is not None) is prepared
    body: dict[str, Any] = {"query": query, "variables": variables}
    if operation_name:
        body["operationName"] = operation_name
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    sent = await gw.http.post("/graphql", json=body, headers=headers)
    general = await gw.http.post(
        "/graphql", json={**body, "extensions": {"general": True}}, headers=headers
    )
    assert sent.status_code == general.status_code, (sent.text, general.text)
    for name in ("content-type", "retry-after", "x-ratelimit-limit"):
        assert sent.headers.get(name) == general.headers.get(name), name
    assert normalized(sent.json()) == normalized(general.json())
    return sent, general


async def test_successful_documents_answer_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=10_000)
        sent, _ = await both(gw, SEED, doitong(width=1024, height=1024), key)
        assert sent.json()["data"]["generate"]["creditCost"] == 20
        assert sent.headers["X-RateLimit-Remaining"] == "59"
        sent, _ = await both(gw, EVERY_FIELD, doitong(width=768, height=512), key)
        made = sent.json()["data"]["made"]
        assert list(made) == [
            "__typename",
            "id",
            "again",
            "status",
            "type",
            "provider",
            "url",
            "urls",
            "width",
            "height",
            "metadata",
            "creditCost",
            "createdAt",
            "completedAt",
            "webhookUrl",
            "error",
            "duration",
        ]
        assert made["__typename"] == "Generation" and made["again"] == made["id"]
        await both(gw, GENERATE, doitong(), key)
        flat = {"input": {"service": "local", "prompt": "a fox", "width": 512, "height": 512}}
        sent, _ = await both(gw, FLAT, flat, key)
        assert sent.json()["data"]["generateImage"]["creditCost"] == 10
        await both(gw, LITERAL, None, key)

        job_id = made["id"]
        sent, _ = await both(gw, JOB, {"id": job_id}, key)
        assert sent.json()["data"]["job"]["status"] == "queued"
        await both(gw, NAMED_JOB, {"id": job_id}, key, operation_name="Poll")
        other = await gw.key()
        sent, _ = await both(gw, JOB, {"id": job_id}, other)  # another key's job
        assert sent.json() == {"data": {"job": None}}


async def test_refusals_answer_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=10_000)
        sent, _ = await both(gw, SEED, doitong(), None)
        assert sent.status_code == 401
        sent, _ = await both(gw, SEED, doitong(), "gk_nobody_secret")
        assert sent.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        sent, _ = await both(gw, SEED, doitong("no-such-provider"), key)
        assert sent.status_code == 400
        assert sent.json()["errors"][0]["extensions"]["field"] == "provider"
        assert sent.headers["X-RateLimit-Limit"] == "60"
        sent, _ = await both(gw, SEED, doitong(width=100_000), key)
        assert sent.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        broke = await gw.key("pro", credits=0)
        sent, _ = await both(gw, SEED, doitong(), broke)
        assert sent.status_code == 402

        limited = await gw.key("pro", credits=10_000, rpm=1)
        assert (await gw.generate(limited)).status_code == 200
        sent, _ = await both(gw, SEED, doitong(), limited)
        assert sent.status_code == 429 and int(sent.headers["Retry-After"]) >= 1

        # Variables that do not coerce: nothing runs on the prepared path; the general
        # path reports graphql-core's message, which names the option.
        sent, _ = await both(gw, SEED, doitong(colour="red"), key)
        assert sent.status_code == 400 and "colour" in sent.json()["errors"][0]["message"]
        sent, _ = await both(gw, SEED, {}, key)
        assert sent.status_code == 400
        sent, _ = await both(gw, NAMED_JOB, {"id": "x"}, key, operation_name="Other")
        assert sent.status_code == 400


async def test_the_same_bytes_sent_again_answer_as_they_did_for_their_own_caller(
    redis_url: str, storage_dir: Path
) -> None:
    """A prepared document's arguments are kept by the bytes that carried them (a poll, a
    cache hit: sent again byte for byte). Each request still answers for its own caller,
    input that does not coerce is refused each time, and no resolver changes what is
    kept (it is shared by every request that sends those bytes)."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        one, two = await gw.key(credits=1000), await gw.key(credits=1000)
        body = orjson.dumps({"query": SEED, "variables": doitong(seed=5)})
        bad = orjson.dumps({"query": SEED, "variables": doitong(colour="red")})
        made: dict[str, list[str]] = {one: [], two: []}
        for key in (one, two, one):
            headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
            r = await gw.http.post("/graphql", content=body, headers=headers)
            made[key].append(r.json()["data"]["generate"]["id"])
            for _ in range(2):
                refused = await gw.http.post("/graphql", content=bad, headers=headers)
                assert refused.status_code == 400 and "colour" in refused.text
        for key, ids in made.items():
            listed = await gw.gql("{ jobs(first: 5) { nodes { id } } }", key=key)
            assert sorted(n["id"] for n in listed.json()["data"]["jobs"]["nodes"]) == sorted(ids)

        prepared = graphql_view(gw).prepared
        plan = prepared.plan(SEED)
        kept = prepared._arguments[body]
        assert kept == plan.arguments(prepared.core, doitong(seed=5))  # unchanged by use
        assert prepared._arguments[bad] is None


async def test_unexpected_errors_are_masked_alike(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        job = (await gw.generate(key)).json()["data"]["generate"]
        await change(gw.accounts.redis, keys.job(gw.keys[key]["id"], job["id"]), created_at="{")
        sent, _ = await both(gw, JOB, {"id": job["id"]}, key)
        assert sent.status_code == 500
        assert sent.json()["errors"] == [
            {
                "message": "Unexpected error.",
                "locations": [{"line": 1, "column": 19}],
                "path": ["job"],
                "extensions": {"code": "INTERNAL_SERVER_ERROR"},
            }
        ]
        assert sent.json()["data"] == {"job": None}


# A job record's `urls` as damaged in Redis, and the errors' paths: `urls` is
# `[String!]!`, so a bad item nulls the list, which nulls the job (nullable); `url`, the
# first item, is `String`, nulled alone.
DAMAGED_URLS = [
    ('"https://a.example/1.png"', [["job", "urls"]]),  # not a list
    ('["https://a.example/1.png", null]', [["job", "urls", 1]]),
    ('["https://a.example/1.png", {"x": 1}]', [["job", "urls", 1]]),
    ("[null]", [["job", "urls", 0]]),
    ('[{"x": 1}, "https://a.example/1.png"]', [["job", "url"], ["job", "urls", 0]]),
]


async def test_null_items_bubble_to_the_nearest_nullable_position_alike(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        redis, account = gw.accounts.redis, gw.keys[key]["id"]
        for stored, paths in DAMAGED_URLS:
            job_id = (await gw.generate(key)).json()["data"]["generate"]["id"]
            await change(redis, keys.job(account, job_id), urls=orjson.loads(stored))
            sent, _ = await both(gw, JOB, {"id": job_id}, key)
            body = sent.json()
            assert body["data"] == {"job": None}, stored
            assert [e["path"] for e in body["errors"]] == paths, stored
            assert {e["message"] for e in body["errors"]} == {"Unexpected error."}
        # An error at a field selected twice is located at both selections (the last
        # job's `urls` is broken too).
        twice = "query($id: ID!) { job(id: $id) { urls id urls } }"
        sent, _ = await both(gw, twice, {"id": job_id}, key)
        assert sent.json()["errors"][0]["locations"] == [
            {"line": 1, "column": 34},
            {"line": 1, "column": 42},
        ]
        # Only the nullable `url` selected: it alone is null.
        await change(redis, keys.job(account, job_id), urls=[{"x": 1}])
        sent, _ = await both(gw, "query($id: ID!) { job(id: $id) { id url } }", {"id": job_id}, key)
        assert sent.json()["data"] == {"job": {"id": job_id, "url": None}}
        assert [e["path"] for e in sent.json()["errors"]] == [["job", "url"]]


def test_graphql_core_runs_the_resolvers_strawberry_built() -> None:
    """None is replaced after the schema is built: Strawberry's permissions, extensions
    and argument conversion run on the general path for every field."""
    core = schema.build_schema()._schema
    for root in (core.query_type, core.mutation_type):
        assert root is not None
        for name, field in root.fields.items():
            assert field.resolve is not None, name
            assert field.resolve.__module__ == "strawberry.schema.schema_converter", name


def recording(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: list[dict[str, Any]]
) -> None:
    """`module.name` (a `gateway.params` parser) records what it is given."""
    real: Callable[[dict[str, Any]], Any] = getattr(module, name)

    def record(data: dict[str, Any]) -> Any:
        seen.append(copy.deepcopy(data))
        return real(data)

    monkeypatch.setattr(module, name, record)


def graphql_names(value: Any, type_: Any) -> bool:
    """Whether an input value is keyed by the schema's field names, nested ones too."""
    while isinstance(type_, GraphQLNonNull | GraphQLList):
        type_ = type_.of_type
    if not isinstance(type_, GraphQLInputObjectType) or value is None:
        return True
    return value.keys() == type_.fields.keys() and all(
        graphql_names(v, type_.fields[k].type) for k, v in value.items()
    )


async def test_params_get_the_schemas_names_alike_from_every_path(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    recording(monkeypatch, mutations, "from_generate_input", seen)
    recording(monkeypatch, mutations, "from_image_input", seen)
    recording(monkeypatch, queries, "from_generate_input", seen)
    core = schema.build_schema()._schema
    doitong_input, flat_input = (
        core.get_type("GenerateInput"),
        core.get_type("ImageGenerationInput"),
    )
    options = {"width": 768, "numImages": 2, "outputFormat": "JPEG", "aspectRatio": None}
    hook = "https://93.184.216.34/hook"
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        for query, variables, type_ in (
            (SEED, {"input": {**doitong(**options)["input"], "webhookUrl": hook}}, doitong_input),
            (FLAT, {"input": {"service": "local", "prompt": "a fox", **options}}, flat_input),
        ):
            seen.clear()
            await both(gw, query, variables, key)
            prepared, general = seen
            assert prepared == general
            assert graphql_names(prepared, type_), prepared
        seen.clear()
        r = await gw.gql(ESTIMATE, doitong(**options), key)
        assert r.json()["data"]["estimate"]["credits"] > 0
        assert len(seen) == 1 and graphql_names(seen[0], doitong_input), seen


class Deny(BasePermission):
    message = "denied"

    def has_permission(self, source: Any, info: strawberry.Info, **kwargs: Any) -> bool:
        return False


class Passing(FieldExtension):
    async def resolve_async(
        self, next_: Callable[..., Any], source: Any, info: strawberry.Info, **kwargs: Any
    ) -> Any:
        return await next_(source, info, **kwargs)


def test_root_fields_with_permissions_or_field_extensions_are_not_prepared() -> None:
    """Those run only on Strawberry's path: the document goes there."""
    for extra in ({"permission_classes": [Deny]}, {"extensions": [Passing()]}):

        @strawberry.type
        class Mutation:
            @strawberry.mutation(metadata=resolved_by(mutations.resolve_generate), **extra)
            async def generate(self, info: strawberry.Info, input: GenerateInput) -> Generation:
                args = {"input": graphql_value(info, input)}
                return await mutations.resolve_generate(info.context, args)

        guarded = schema.GatewaySchema(
            query=queries.Query, mutation=Mutation, extensions=[schema.Guard]
        )
        assert schema.prepared(guarded).plan(SEED) is None, extra
    assert schema.prepared(schema.build_schema()).plan(SEED) is not None


class Noting(SchemaExtension):
    def on_execute(self) -> Any:
        yield


def test_a_schema_extension_the_prepared_path_does_not_reproduce_is_refused() -> None:
    extended = schema.GatewaySchema(
        query=queries.Query, mutation=mutations.Mutation, extensions=[schema.Guard, Noting]
    )
    with pytest.raises(ValueError, match="does not reproduce schema extensions"):
        schema.prepared(extended)
    schema.prepared(schema.build_schema())  # the gateway's own: Guard alone


class NoJobs(ValidationRule):
    def enter_field(self, node: Any, *_: Any) -> None:
        if node.name.value == "job":
            self.report_error(GraphQLError("no jobs here", node))


class Stricter(schema.GatewaySchema):
    """A schema whose requests are validated with one more rule."""

    def _create_execution_context(self, *args: Any, **kwargs: Any) -> Any:
        context = super()._create_execution_context(*args, **kwargs)
        context.validation_rules = (*context.validation_rules, NoJobs)
        return context


async def test_the_prepared_path_validates_with_strawberrys_rules() -> None:
    stricter = Stricter(query=queries.Query, mutation=mutations.Mutation, extensions=[schema.Guard])
    assert schema.prepared(stricter).plan(JOB) is None
    result = await stricter.execute(JOB, variable_values={"id": "x"})
    assert result.errors and [e.message for e in result.errors] == ["no jobs here"]
    assert schema.prepared(schema.build_schema()).plan(JOB) is not None


def test_the_versions_the_prepared_path_was_proven_against() -> None:
    found = {name: importlib.metadata.version(name) for name in PROVEN_WITH}
    assert found == PROVEN_WITH, (
        "schema/prepared.py reproduces the execution of the versions in PROVEN_WITH. "
        "After upgrading, run tests/test_prepared.py (also with HYPOTHESIS_PROFILE=explore), "
        "read what changed in Strawberry's and graphql-core's execution, then update the pin."
    )


# Generated documents: one root field the prepared path runs, leaf selections with
# aliases and __typename, arguments as literals or variables (with defaults, nulls).

CORE = schema.build_schema()._schema
ROOTS = {"generate": "mutation", "generateImage": "mutation", "job": "query"}
LEAVES = [*sorted(CORE.get_type("Generation").fields), "__typename"]  # type: ignore[union-attr]
# Those a damaged record breaks first, and more often: Hypothesis favours the first.
SELECTED = ["urls", "url", *LEAVES]
ALIASES = ["a", "b", "again", "id", "url"]  # some are field names: the rules may refuse
JOBS = [f"@job{n}@" for n in range(9)]  # the ids of `served`'s jobs, once served

STRINGS = st.one_of(
    st.sampled_from(["a red fox", "", " ", "png", "JPEG", "webp", "gif", "16:9", "7:3", "k1"]),
    st.text(max_size=8),
)
INTS = st.one_of(
    st.sampled_from([512, 768, 1024, 2048, 1, 2, 4, 7, 50]),
    st.integers(-(2**31), 2**31 - 1),
)
SCALARS: dict[str, st.SearchStrategy[Any]] = {
    "String": STRINGS,
    "Int": INTS,
    "Float": st.one_of(st.sampled_from([1, 7.5, 20.0, 0.5]), st.floats(-1e6, 1e6, width=32)),
    "Boolean": st.booleans(),
    "ID": st.sampled_from(JOBS),
}


def mostly(*usual: Any, other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """One of `usual` (the last of them out of the gateway's range) or, less often, `other`."""
    return st.one_of(st.sampled_from(usual), st.sampled_from(usual), other)


# By input field name: values the gateway admits, most of the time, so that generated
# requests succeed about as often as they are refused.
BY_FIELD: dict[str, st.SearchStrategy[Any]] = {
    "provider": st.sampled_from(["local", "local", "local", "no-such-provider"]),
    "service": st.sampled_from(["local", "local", "local", "no-such-provider"]),
    "text": mostly("a red fox", "a fox", "", other=STRINGS),
    "prompt": mostly("a red fox", "a fox", " ", other=STRINGS),
    "width": mostly(512, 768, 1024, 2048, 100, other=INTS),
    "height": mostly(512, 640, 1024, 4000, other=INTS),
    "seed": mostly(0, 7, 2**31 - 1, -1, other=INTS),
    "steps": mostly(1, 20, 50, 51, other=INTS),
    "guidance": mostly(1, 7.5, 20.0, 21, other=st.floats(-1e6, 1e6, width=32)),
    "numImages": mostly(1, 2, 4, 5, other=INTS),
    "outputFormat": mostly("png", "JPEG", "webp", "gif", other=STRINGS),
    "aspectRatio": mostly("1:1", "16:9", "9:21", "7:3", other=STRINGS),
    "webhookUrl": st.sampled_from(["https://93.184.216.34/hook", "http://127.0.0.1/x", "no"]),
    "cache": st.just(False),  # a cached or coalesced second request would cost nothing
}


def values(type_: GraphQLInputType, name: str = "") -> st.SearchStrategy[Any]:
    """Variable values (JSON) of `type_`; the gateway's own ranges often met."""
    if is_non_null_type(type_):
        return _values(type_.of_type, name)  # type: ignore[union-attr]
    if name == "cache":
        return BY_FIELD[name]
    return st.one_of(st.none(), _values(type_, name))


def _values(type_: Any, name: str) -> st.SearchStrategy[Any]:
    if name in BY_FIELD:
        return BY_FIELD[name]
    if isinstance(type_, GraphQLInputObjectType):
        fields = type_.fields.items()
        required = {n: values(f.type, n) for n, f in fields if is_required_input_field(f)}
        optional = {n: values(f.type, n) for n, f in fields if not is_required_input_field(f)}
        if "cache" in optional:
            required["cache"] = optional.pop("cache")
        return st.fixed_dictionaries(required, optional=optional)
    if isinstance(type_, GraphQLList):
        return st.lists(values(type_.of_type), max_size=3)
    if isinstance(type_, GraphQLEnumType):
        return st.sampled_from(sorted(type_.values))
    return SCALARS[type_.name]


def literal(value: Any, type_: Any) -> str:
    """`value` (JSON, as `values` makes it) as a GraphQL literal of `type_`."""
    while isinstance(type_, GraphQLNonNull):
        type_ = type_.of_type
    if value is None:
        return "null"
    if isinstance(type_, GraphQLInputObjectType):
        fields = ", ".join(f"{k}: {literal(v, type_.fields[k].type)}" for k, v in value.items())
        return "{" + fields + "}"
    if isinstance(type_, GraphQLList):
        return "[" + ", ".join(literal(v, type_.of_type) for v in value) + "]"
    if isinstance(type_, GraphQLEnumType):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return print_ast(StringValueNode(value=value))


@dataclass
class Case:
    root: str
    query: str
    variables: dict[str, Any] | None
    operation_name: str | None
    caller: str  # "key", "none" or "bad"


@st.composite
def documents(draw: st.DrawFn, root: str) -> Case:
    root_type = CORE.mutation_type if ROOTS[root] == "mutation" else CORE.query_type
    assert root_type is not None
    ((argument, arg),) = root_type.fields[root].args.items()
    definitions: list[str] = []
    variables: dict[str, Any] = {}

    def written(value: Any, type_: Any, *, top: bool) -> str:
        """The argument (or an input field) as a literal, or a variable sent or not."""
        how = draw(
            st.sampled_from(
                ["literal", "variable", "default"] if top else ["literal"] * 5 + ["variable"]
            )
        )
        named = type_.of_type if isinstance(type_, GraphQLNonNull) else type_
        if how == "literal":
            if isinstance(named, GraphQLInputObjectType) and isinstance(value, dict):
                fields = ", ".join(
                    f"{k}: {written(v, named.fields[k].type, top=False)}" for k, v in value.items()
                )
                return "{" + fields + "}"
            return literal(value, type_)
        name = f"v{len(definitions)}"
        if how == "variable":
            definitions.append(f"${name}: {type_}")
            variables[name] = value
        else:
            default = draw(values(named, ""))
            definitions.append(f"${name}: {named} = {literal(default, named)}")
            sent = draw(st.sampled_from(["value", "value", "omitted", "null"]))
            if sent != "omitted":
                variables[name] = value if sent == "value" else None
        return f"${name}"

    value = draw(values(arg.type, argument))
    written_argument = written(value, arg.type, top=True)
    selected = draw(
        st.lists(
            st.tuples(st.sampled_from(SELECTED), st.sampled_from([None, None, None, *ALIASES])),
            min_size=1,
            max_size=6,
        )
    )
    selection = " ".join(f"{alias}: {name}" if alias else name for name, alias in selected)
    root_alias = draw(st.sampled_from(["", "", "made: "]))
    operation_name = draw(st.sampled_from([None, None, "Op"]))
    head = ROOTS[root] + (f" {operation_name}" if operation_name else "")
    if definitions:
        head += "(" + ", ".join(definitions) + ")"
    query = f"{head} {{ {root_alias}{root}({argument}: {written_argument}) {{ {selection} }} }}"
    sent_name = draw(
        st.sampled_from(
            [None, operation_name, operation_name, "Other"] if operation_name else [None]
        )
    )
    caller = draw(st.sampled_from(["key"] * 8 + ["none", "bad"]))
    return Case(
        root, query, variables if variables or draw(st.booleans()) else None, sent_name, caller
    )


def with_jobs(value: Any, jobs: list[str]) -> Any:
    """`value` with each job placeholder replaced by that job's id."""
    if isinstance(value, dict):
        return {k: with_jobs(v, jobs) for k, v in value.items()}
    if isinstance(value, list):
        return [with_jobs(v, jobs) for v in value]
    if isinstance(value, str):
        for index, placeholder in enumerate(JOBS):
            value = value.replace(placeholder, jobs[index])
    return value


@dataclass
class Served:
    gw: Harness
    key: str
    jobs: list[str]  # in JOBS' order
    seen: list[dict[str, Any]]  # what gateway.params was given


@pytest.fixture
async def served(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    """A gateway, an unlimited key, and its jobs as `JOBS` names them: damaged ones
    (`DAMAGED_URLS`, a record that does not decode), a healthy one, another key's, none."""
    seen: list[dict[str, Any]] = []
    recording(monkeypatch, mutations, "from_generate_input", seen)
    recording(monkeypatch, mutations, "from_image_input", seen)
    async with gateway(redis_url, storage_dir, inprocess_workers=False, read_rpm=10**6) as gw:
        made = await gw.accounts.create("enterprise", 10**9, rpm=-1, concurrency=-1, daily=-1)
        key, account = str(made["key"]), str(made["id"])
        jobs = []  # the damaged first: Hypothesis favours the first
        for damage in [*(stored for stored, _ in DAMAGED_URLS), "created_at", None]:
            job_id = (await gw.generate(key)).json()["data"]["generate"]["id"]
            record = keys.job(account, job_id)
            if damage == "created_at":
                await change(gw.accounts.redis, record, created_at="{")
            elif damage is not None:
                await change(gw.accounts.redis, record, urls=orjson.loads(damage))
            jobs.append(job_id)
        other = await gw.key()
        jobs.append((await gw.generate(other)).json()["data"]["generate"]["id"])
        jobs.append("0" * 24)
        assert len(jobs) == len(JOBS)
        yield Served(gw, key, jobs, seen)


def cases() -> st.SearchStrategy[tuple[Case, ...]]:
    """A document of each root field the prepared path runs."""
    return st.tuples(*(documents(root) for root in ROOTS))


@settings(PROFILE)
@given(trio=cases())
async def test_generated_documents_answer_alike(served: Served, trio: tuple[Case, ...]) -> None:
    for case in trio:
        await answer_alike(served, case)


async def answer_alike(served: Served, case: Case) -> None:
    query = with_jobs(case.query, served.jobs)
    variables = with_jobs(case.variables, served.jobs)
    key = {"key": served.key, "none": None, "bad": "gk_nobody_secret"}[case.caller]
    served.seen.clear()
    sent, _ = await both(
        served.gw, query, variables, key, prepared=None, operation_name=case.operation_name
    )
    planned = graphql_view(served.gw).prepared.plan(query) is not None
    code = (sent.json().get("errors") or [{}])[0].get("extensions", {}).get("code")
    event(f"{case.root}, {'prepared' if planned else 'general'}: {sent.status_code} {code}")
    # Each path gave gateway.params the same input, keyed by the schema's names.
    assert len(served.seen) in (0, 2), served.seen
    if served.seen:
        assert served.seen[0] == served.seen[1]
        (argument,) = CORE.mutation_type.fields[case.root].args.values()  # type: ignore[union-attr]
        assert graphql_names(served.seen[0], argument.type), served.seen[0]


def test_generated_documents_mostly_take_the_prepared_path() -> None:
    """The generated documents exercise the prepared path: most are planned."""
    prepared = schema.prepared(schema.build_schema())
    planned: list[bool] = []

    @settings(PROFILE)
    @given(trio=cases())
    def plan(trio: tuple[Case, ...]) -> None:
        planned.extend(prepared.plan(case.query) is not None for case in trio)

    plan()
    assert sum(planned) >= len(planned) / 2, f"{sum(planned)} of {len(planned)} planned"
