"""Hostile GraphQL documents (`schema/limits.py`): each is refused with 400 BAD_USER_INPUT
over POST, GET and WebSocket, in milliseconds, while the server keeps answering; and a
document of several operations runs one only when the request names it.

Timing is asserted only as the worst latency of health checks sent meanwhile, against a
bound far above noise (before these limits, one 700-byte document held the server for
seconds); the rest counts work instead of timing it.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import graphql.language.source
import httpx
import pytest
import websockets
from graphql import (
    GraphQLObjectType,
    Source,
    get_introspection_query,
    parse,
    specified_rules,
    validate,
)
from starlette.routing import Route
from strawberry.extensions.max_aliases import create_validator as alias_validator
from strawberry.extensions.query_depth_limiter import create_validator as depth_validator

import schema
from schema import limits
from tests.harness import GENERATE, Harness, gateway

JOB_FIELDS = (
    "id status type provider url urls width height metadata creditCost createdAt "
    "completedAt webhookUrl error duration __typename"
)


def bomb(n: int, on: str = "Me", leaf: str = "id", root: str = "query { me") -> str:
    """The outside probe's document: fragment Fi spreads F(i-1) twice, 2^n leaves."""
    fragments = [f"fragment F0 on {on} {{ {leaf} }}"] + [
        f"fragment F{i} on {on} {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, n + 1)
    ]
    return f"{root} {{ ...F{n} }} }} " + " ".join(fragments)


def generate_variables(**options: Any) -> dict[str, Any]:
    return {
        "input": {
            "type": "IMAGE",
            "provider": "local",
            "input": {"text": "a fox"},
            "options": options,
        }
    }


# name: (document, variables), each refused with 400 BAD_USER_INPUT. What each did
# before these limits, measured on a developer's machine, is in its comment.
HOSTILE: dict[str, tuple[str, dict[str, Any] | None]] = {
    # 4-5 s in Strawberry's depth and alias validators, then ran.
    "fragment bomb": (bomb(20), None),
    # As long, in the alias validator alone; 2^21 aliases.
    "aliases doubled through fragments": (bomb(20, leaf="a: id b: id"), None),
    # 0.2 s comparing them pairwise (OverlappingFieldsCanBeMergedRule), then ran.
    "same-named fields": ("{ " + " ".join("me { id }" for _ in range(249)) + " }", None),
    # 0.7-0.9 s, then aborted.
    "more same-named fields": ("{ " + " ".join("me { id }" for _ in range(490)) + " }", None),
    # 25 ms of rules, then ran.
    "fragment spreads": (
        "{ me { " + " ".join("...F" for _ in range(990)) + " } } fragment F on Me { id }",
        None,
    ),
    # 90 ms of rules, then ran.
    "many definitions": (
        "{ me { "
        + " ".join(f"...F{i}" for i in range(200))
        + " } } "
        + " ".join(f"fragment F{i} on Me {{ id }}" for i in range(200)),
        None,
    ),
    # Ran the first operation.
    "several operations": (" ".join(f"query Q{i} {{ me {{ id }} }}" for i in range(40)), None),
    # 0.4 s: each error read every line before it.
    "errors after many lines": (
        "{ me " + "\n" * 25_000 + "{ " + " ".join(f"f{i}" for i in range(110)) + " } }",
        None,
    ),
    # 0.23 s: each error with several locations reads the lines before them.
    "errors with several locations after many lines": (
        "{ me " + "\n" * 14_000 + " ".join("@skip(if: false)" for _ in range(120)) + " { id } }",
        None,
    ),
    # Ran.
    "a long document": ('{ job(id: "' + "x" * 30_000 + '") { id } }', None),
    # Fifteen full pages of every job field: 24,000 fields to complete.
    "pages": (
        "{ "
        + " ".join(f"p{i}: jobs(first: 100) {{ nodes {{ {JOB_FIELDS} }} }}" for i in range(15))
        + " }",
        None,
    ),
    # 0.36 s with no key: fifteen whole schemas, 1.2 MB.
    "introspection aliased": (
        "{ "
        + " ".join(
            f"s{i}: __schema {{ types {{ name fields {{ name args {{ name }} }} }} }}"
            for i in range(15)
        )
        + " }",
        None,
    ),
    # Each alias may read 50,000 jobs: ~0.1 s for 4,000.
    "usage aliased": (
        "{ "
        + " ".join(
            f'u{i}: usage(from: "2026-01-01", to: "2026-12-31") {{ totals {{ requests }} }}'
            for i in range(15)
        )
        + " }",
        None,
    ),
    # A 500: the page size was converted before the schema checked it.
    "a page size of 4,301 digits": ("{ jobs(first: " + "9" * 4_301 + ") { nodes { id } } }", None),
    # A 400 whose message named Python's own limit on converting integers.
    "a seed of 4,301 digits": (
        'mutation { generate(input: {type: IMAGE, provider: "local", input: {text: "x"}, '
        "options: {seed: " + "9" * 4_301 + "}}) { id } }",
        None,
    ),
    # 1.2 s making an error, with suggestions, for each member (twice: the prepared
    # path tried first).
    "variables with thousands of members": (
        GENERATE,
        generate_variables(**{f"x{i}": i for i in range(4_000)}),
    ),
}


async def health_latencies(base: str, stop: asyncio.Event) -> list[float]:
    """The latency of each health check, until `stop`; infinite for one that failed (a
    server that stalled for seconds may drop the connection)."""
    latencies = []
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = (await client.get("/healthz")).status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.perf_counter() - started if ok else float("inf"))
            await asyncio.sleep(0.005)
    return latencies


def assert_refused(response: httpx.Response, name: str) -> None:
    assert response.status_code == 400, (name, response.text[:300])
    body = response.json()
    assert body["data"] is None, name
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT", (name, body)


async def test_hostile_documents_are_refused_while_the_server_keeps_answering(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        auth = {"Authorization": f"Bearer {key}"}
        sent = 0
        running = asyncio.Semaphore(4)

        async def send(
            name: str, query: str, variables: dict[str, Any] | None, method: str
        ) -> None:
            nonlocal sent
            sent += 1
            query = f"# {sent}\n{query}"  # a text of its own: no cache answers it
            async with running:
                if method == "GET":
                    params = {"query": query}
                    if variables:
                        params["variables"] = json.dumps(variables)
                    r = await gw.http.get("/graphql", params=params, headers=auth)
                else:
                    r = await gw.http.post(
                        "/graphql", headers=auth, json={"query": query, "variables": variables}
                    )
            assert_refused(r, f"{method} {name}")

        stop = asyncio.Event()
        health = asyncio.create_task(health_latencies(gw.base, stop))
        try:
            await asyncio.sleep(0.1)
            await asyncio.gather(
                *(
                    send(name, query, variables, method)
                    for _ in range(2)
                    for name, (query, variables) in HOSTILE.items()
                    for method in ("POST", "GET")
                    # A URL holds a few kilobytes; GET runs queries only.
                    if method == "POST" or (len(query) < 8_000 and "mutation" not in query)
                )
            )
            await asyncio.sleep(0.1)
        finally:
            stop.set()
            latencies = await health
        assert len(latencies) >= 5
        assert max(latencies) < 1.0, sorted(latencies)[-5:]
        # Still serving, and nothing was charged.
        me = (await gw.gql("{ me { credits } }", key=key)).json()
        assert me == {"data": {"me": {"credits": gw.keys[key]["credits"]}}}


async def test_subscriptions_are_held_to_the_same_limits(redis_url: str, storage_dir: Path) -> None:
    subscription = 'subscription { jobUpdates(id: "x")'
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        url = gw.base.replace("http://", "ws://") + "/graphql"

        async def subscribe(payload: dict[str, Any]) -> dict[str, Any]:
            async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
                await ws.send(
                    json.dumps(
                        {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
                    )
                )
                assert json.loads(await ws.recv())["type"] == "connection_ack"
                await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
                try:
                    return dict(json.loads(await asyncio.wait_for(ws.recv(), 10)))
                except websockets.ConnectionClosed as closed:
                    assert closed.rcvd is not None
                    return {"closed": closed.rcvd.code, "reason": closed.rcvd.reason}

        for query, words in (
            (bomb(20, on="Generation", root=subscription), "fields found"),
            (bomb(20, on="Generation", leaf="a: id b: id", root=subscription), "aliases"),
            (f"{subscription} {{ {'a { ' * 10}id{' }' * 10} }} }}", "depth"),
            (
                'subscription A { jobUpdates(id: "x") { id } } '
                'subscription B { jobUpdates(id: "y") { id } }',
                "operation name",
            ),
        ):
            answer = await subscribe({"query": query})
            assert answer["type"] == "error", answer
            assert words in answer["payload"][0]["message"], answer
        answer = await subscribe(
            {
                "query": GENERATE,
                "variables": generate_variables(**{f"x{i}": i for i in range(4_000)}),
            }
        )
        assert answer["type"] == "error" and "values" in answer["payload"][0]["message"]
        # The protocol's answer to a document that does not parse: the socket is closed,
        # saying why (before, a refusal while parsing ended the operation silently).
        # (Over the text's limit, within a message's: a larger message is refused whole.)
        answer = await subscribe({"query": f"{subscription} {{ id }} }}" + " " * 30_000})
        assert answer["closed"] == 4400 and "Source contains more than" in answer["reason"]


def graphql_view(gw: Harness) -> Any:
    return next(r.endpoint for r in gw.app.routes if isinstance(r, Route) and r.path == "/graphql")


async def test_two_generations_in_one_operation_are_refused_before_either_is_charged(
    redis_url: str, storage_dir: Path
) -> None:
    """The second refused (here: its empty prompt) would null the whole answer while the
    first ran, charged, its id never seen: the document is refused first, for both."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=1_000)
        two = (
            'mutation { a: generate(input: {prompt: "a fox"}) { id } '
            'b: generate(input: {prompt: ""}) { id } }'
        )
        r = await gw.gql(two, key=key)
        assert r.status_code == 400, r.text
        (error,) = r.json()["errors"]
        assert error["message"].startswith("generate must be its operation's only mutation")
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1_000
        jobs = await gw.gql("{ jobs { nodes { id } } }", key=key)
        assert jobs.json()["data"]["jobs"]["nodes"] == []


async def test_several_operations_run_one_only_when_the_request_names_it(
    redis_url: str, storage_dir: Path
) -> None:
    two = "query A { me { plan } } query B { me { credits } }"
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("pro", credits=1_000)
        auth = {"Authorization": f"Bearer {key}"}

        async def ask(method: str, query: str, name: str | None = None) -> httpx.Response:
            body = {"query": query, **({"operationName": name} if name else {})}
            if method == "GET":
                return await gw.http.get("/graphql", params=body, headers=auth)
            return await gw.http.post("/graphql", json=body, headers=auth)

        for method in ("POST", "GET"):
            r = await ask(method, two)
            assert_refused(r, method)
            assert r.json()["errors"][0]["message"] == (
                "Must provide operation name if query contains multiple operations."
            )
            r = await ask(method, two, "B")
            assert r.json() == {"data": {"me": {"credits": 1_000}}}
            r = await ask(method, two, "A")
            assert r.json() == {"data": {"me": {"plan": "pro"}}}
            assert_refused(await ask(method, two, "C"), method)
            # One operation, and fragments: nothing to choose.
            r = await ask(method, "query A { me { ...F } } fragment F on Me { plan }")
            assert r.json() == {"data": {"me": {"plan": "pro"}}}

        # Two mutations the prepared path would run each alone: neither runs unnamed.
        literal = (
            'generate(input: {type: IMAGE, provider: "local", input: {text: "a fox"},'
            " options: {width: 512, height: 512}}) { id creditCost }"
        )
        two = f"mutation A {{ {literal} }} mutation B {{ {literal} }}"
        assert graphql_view(gw).prepared.plan(f"mutation A {{ {literal} }}") is not None
        assert graphql_view(gw).prepared.plan(two) is None
        assert_refused(await ask("POST", two), "two mutations")
        assert_refused(await ask("POST", two, "C"), "two mutations, C")
        assert (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"] == {
            "credits": 1_000
        }
        r = await ask("POST", two, "B")
        assert r.json()["data"]["generate"]["creditCost"] == 10
        assert (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"] == {
            "credits": 990
        }


# --- The limits themselves, without a server ---

CORE = schema.build_schema()._schema


def strawberrys_verdicts(query: str) -> tuple[bool, bool]:
    """(over the depth, over the aliases), by the Strawberry validators the limits
    replaced (exponential in fragments: only for small documents)."""
    document = parse(query)
    depth = validate(CORE, document, [depth_validator(limits.MAX_DEPTH, None)])
    aliases = validate(CORE, document, [alias_validator(limits.MAX_ALIASES)])
    return bool(depth), bool(aliases)


def verdicts(query: str) -> tuple[bool, bool]:
    messages = [e.message for e in limits.check(parse(query))]
    return (any("depth" in m for m in messages), any("aliases" in m for m in messages))


def nested(levels: int, leaf: str = "id") -> str:
    return "a { " * levels + leaf + " }" * levels


@pytest.mark.parametrize(
    "query",
    [
        f"{{ {nested(8)} }}",
        f"{{ {nested(9)} }}",
        f"query Q {{ me {{ ...F }} }} fragment F on Me {{ {nested(7)} }}",
        f"query Q {{ me {{ ...F }} }} fragment F on Me {{ {nested(8)} }}",
        f"{{ me {{ ... on Me {{ ... on Me {{ {nested(7)} }} }} }} }}",
        f"{{ me {{ ... on Me {{ {nested(8)} }} }} }}",
        f"{{ __schema {{ {nested(12)} }} }}",  # introspection does not count
        f"{{ me {{ __typename {nested(8, '__typename')} }} }}",
        f'{{ x {{ __type(name: "Me") {{ ...F }} }} }} fragment F on __Type {{ {nested(9)} }}',
        "{ " + " ".join(f"a{i}: me {{ id }}" for i in range(15)) + " }",
        "{ " + " ".join(f"a{i}: me {{ id }}" for i in range(16)) + " }",
        "{ me { ...A ...A } } fragment A on Me { " + " ".join(f"a{i}: id" for i in range(8)) + " }",
        "{ me { ...A ...A } } fragment A on Me { " + " ".join(f"a{i}: id" for i in range(7)) + " }",
        "{ __schema { " + " ".join(f"t{i}: types {{ name }}" for i in range(16)) + " } }",
        "query A { a: me { id } } query B { "
        + " ".join(f"b{i}: me {{ id }}" for i in range(15))
        + " }",
        bomb(8, leaf="x: id"),
        bomb(3, leaf=nested(7)),
        bomb(3, leaf=nested(8)),
    ],
)
def test_the_limits_mean_what_strawberrys_validators_meant(query: str) -> None:
    assert verdicts(query) == strawberrys_verdicts(query)


def test_each_fragment_is_measured_once(monkeypatch: pytest.MonkeyPatch) -> None:
    measured = []
    measure = limits.measure

    def counting(selection_set: Any) -> limits.Measure:
        measured.append(selection_set)
        return measure(selection_set)

    monkeypatch.setattr(limits, "measure", counting)
    for n in (12, 20, 40):
        measured.clear()
        errors = limits.check(parse(bomb(n)))
        assert len(measured) == n + 2  # the operation and each fragment, once
        assert [e.message for e in errors] == [
            f"{2**n + 1} fields found with fragments expanded and pages full. "
            f"Allowed: {limits.MAX_FIELDS}"
        ]
    # A cycle ends (graphql-core's rule reports it), as does a spread of no fragment.
    cycle = "{ me { ...A } } fragment A on Me { ...B id } fragment B on Me { ...A ...C }"
    assert limits.check(parse(cycle)) == []
    assert [e.message for e in schema.validate(CORE, parse(cycle), tuple(specified_rules))] == [
        "Cannot spread fragment 'A' within itself via 'B'.",
        "Unknown fragment 'C'.",
    ]
    # A long chain is no deeper a recursion than a short one.
    chain = (
        "{ me { ...F0 } } "
        + " ".join(
            f"fragment F{i} on Me {{ ...F{i + 1} }}" for i in range(limits.MAX_DEFINITIONS - 2)
        )
        + f" fragment F{limits.MAX_DEFINITIONS - 2} on Me {{ id }}"
    )
    assert limits.check(parse(chain)) == []


def test_pages_count_the_items_they_may_hold() -> None:
    page = f"jobs(first: 100) {{ nodes {{ {JOB_FIELDS} }} pageInfo {{ endCursor }} }}"
    assert limits.check(parse(f"{{ {page} }}")) == []
    assert limits.check(parse(f"{{ a: {page} b: {page} }}"))
    small = f"jobs(first: 10) {{ nodes {{ {JOB_FIELDS} }} }}"
    assert limits.check(parse("{ " + " ".join(f"a{i}: {small}" for i in range(10)) + " }")) == []
    # A variable counts as the most a page holds; no `first`, or null, as the default.
    full = f"jobs(first: $n) {{ nodes {{ {JOB_FIELDS} }} }}"
    assert limits.check(parse(f"query($n: Int!) {{ {full} }}")) == []
    assert limits.check(parse(f"query($n: Int!) {{ a: {full} b: {full} }}"))
    beside = f"jobs(first: 100) {{ nodes {{ {JOB_FIELDS} }} }}"
    assert limits.check(parse(f"query($n: Int!) {{ a: {full} b: {beside} }}"))
    # A dashboard's two default pages of every field (as `first: 20` written out).
    recent, failed = (f"jobs{a} {{ nodes {{ {JOB_FIELDS} }} }}" for a in ("", '(status: "failed")'))
    assert limits.check(parse(f"{{ a: {recent} b: {failed} }}")) == []
    null = f"jobs(first: null) {{ nodes {{ {JOB_FIELDS} }} }}"
    assert limits.check(parse(f"{{ a: {null} b: {null} }}")) == []
    # Every field that takes `first` is listed.
    taking_first = {
        name
        for type_ in CORE.type_map.values()
        if isinstance(type_, GraphQLObjectType)
        for name, field in type_.fields.items()
        if "first" in field.args
    }
    assert taking_first == set(limits.PAGES)


def test_what_costs_most_is_asked_once_and_numbers_are_bounded() -> None:
    usage = 'usage(from: "2026-01-01", to: "2026-01-31") { totals { requests } }'
    assert limits.check(parse(f"{{ {usage} me {{ id }} }}")) == []
    assert [e.message for e in limits.check(parse(f"{{ a: {usage} b: {usage} }}"))] == [
        "usage asked for 2 times. Allowed: once"
    ]
    # Through fragments too, as many times as they are spread.
    twice = "{ ...F ...G } fragment F on Query { __schema { queryType { name } } } " + (
        "fragment G on Query { ...F }"
    )
    assert [e.message for e in limits.check(parse(twice))] == [
        "__schema asked for 2 times. Allowed: once"
    ]
    # What a mutation makes and only its answer shows, alone in its operation: another
    # mutation refused beside it would null the answer, its id (token, key) never seen.
    make = 'generate(input: {prompt: "x"}) { id }'
    alone = (
        "generate must be its operation's only mutation: another one refused beside it "
        "would null the whole answer, generate's included"
    )
    for beside in (
        f"b: {make}",
        'generateImage(input: {prompt: "y"}) { id }',
        'cancelJob(id: "j") { id }',
    ):
        assert [e.message for e in limits.check(parse(f"mutation {{ a: {make} {beside} }}"))] == [
            alone
        ], beside
    fragment = 'mutation { ...M } fragment M on Mutation { cancelJob(id: "j") { id } ' + make + " }"
    assert [e.message for e in limits.check(parse(fragment))] == [alone]
    assert (
        limits.check(
            parse('mutation { a: cancelJob(id: "j") { id } b: cancelJob(id: "k") { id } }')
        )
        == []
    )
    # A page filtered by status scans up to a thousand records: once an operation too.
    failed = 'jobs(first: 1, status: "failed") { nodes { id } }'
    assert [e.message for e in limits.check(parse(f"{{ a: {failed} b: {failed} }}"))] == [
        "jobs(status:) asked for 2 times. Allowed: once"
    ]
    assert limits.check(parse(f"{{ a: {failed} b: jobs(first: 5) {{ nodes {{ id }} }} }}")) == []
    assert limits.check(parse(f"mutation {{ {make} __typename }}")) == []
    assert limits.check(parse(f"mutation A {{ {make} }} mutation B {{ {make} }}")) == []  # one runs
    # Every mutation is listed.
    assert set(CORE.mutation_type.fields) == limits.MUTATIONS
    longest = "9" * limits.MAX_NUMBER
    assert limits.check(parse(f"{{ jobs(first: {longest}) {{ nodes {{ id }} }} }}")) == []
    for written in (longest + "9", f"[{{a: {longest}9}}]", longest + ".5"):
        document = parse(f"query($x: Int = {written}) {{ job(id: {written}) {{ id }} }}")
        assert limits.check(document)[0].message.startswith("2 numbers over 64 characters")


def test_the_text_and_the_variables_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Errors with several locations after many lines: refused before any is located.
    searched = newline_searches(monkeypatch)
    query = HOSTILE["errors with several locations after many lines"][0]
    document = schema.parse_document(query, **schema.PARSE_OPTIONS)
    errors = schema.validate(CORE, document, tuple(specified_rules))
    assert [e.message for e in errors] == [
        f"14001 lines found in the document. Allowed: {limits.MAX_LINES}"
    ]
    assert searched == []
    assert limits.check(parse("{ me { id } }" + "\r\n" * (limits.MAX_LINES - 1))) == []
    assert limits.check(
        parse(" ".join(f"query Q{i} {{ me {{ id }} }}" for i in range(limits.MAX_DEFINITIONS + 1)))
    )
    assert limits.variables_error(generate_variables(width=512, height=512)) is None
    assert limits.variables_error({"input": [[1] * 100] * 3}) is not None


def newline_searches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of each text searched for line breaks from now on, to locate errors (by
    graphql-core's `Source` or the gateway's `IndexedSource`)."""
    searched: list[int] = []

    class Counting:
        def __init__(self, pattern: Any) -> None:
            self.pattern = pattern

        def finditer(self, text: str) -> Any:
            searched.append(len(text))
            return self.pattern.finditer(text)

    source = graphql.language.source
    monkeypatch.setattr(source, "_re_newline", Counting(source._re_newline))
    monkeypatch.setattr(limits, "NEWLINE", Counting(limits.NEWLINE))
    return searched


def test_errors_are_located_without_reading_the_text_again_for_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = newline_searches(monkeypatch)
    query = "{ me " + "\n" * 400 + "{ " + " ".join(f"f{i}" for i in range(100)) + " } }"
    document = schema.parse_document(query, **schema.PARSE_OPTIONS)
    errors = schema.validate(CORE, document, tuple(specified_rules))
    assert len(errors) == 100
    assert len(reads) == 1
    expected = Source(query)  # graphql-core's: the same lines and columns
    assert [e.locations for e in errors] == [
        [expected.get_location(position) for position in e.positions or ()] for e in errors
    ]


async def test_a_huge_text_is_refused_having_read_no_more_than_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As a WebSocket message or a GET's query string may be: megabytes."""
    read = newline_searches(monkeypatch)
    result = await schema.build_schema().execute("{ me { id } }" + " " * 4_000_000)
    assert result.errors is not None
    assert "Source contains more than" in result.errors[0].message
    assert sum(read) <= 2 * (schema.MAX_SOURCE_LENGTH + 1)


def test_introspection_and_the_gateways_own_documents_are_within_the_limits() -> None:
    for query in (get_introspection_query(descriptions=True), GENERATE):
        assert schema.validate(CORE, parse(query), tuple(specified_rules)) == []


async def test_a_poll_beside_a_failing_field_answers_the_others(
    redis_url: str, storage_dir: Path
) -> None:
    """`job` checks the key and reads in one step that `me` waits on; a sibling field's
    error (which may cancel the fields still waiting) neither breaks that step nor
    turns the answer into a 500 (found by tests/test_properties.py)."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        document = """{ job(id: "") { id } jobs(first: 0) { nodes { id } } me { credits } }"""
        for _ in range(20):
            r = await gw.gql(document, key=key)
            assert r.status_code == 400, r.text
            body = r.json()
            assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT", body
            assert "INTERNAL_SERVER_ERROR" not in r.text


async def test_null_for_an_argument_is_its_default_or_a_bad_request_never_a_500(
    redis_url: str, storage_dir: Path
) -> None:
    """Variables set to null: `jobs(first:)` and `ttlSeconds` (nullable, as the contract
    writes them) take their defaults; a non-null argument given null (`type`) is 400
    BAD_USER_INPUT naming it, not an unexpected error."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        r = await gw.gql("query($f: Int) { jobs(first: $f) { nodes { id } } }", {"f": None}, key)
        assert r.status_code == 200 and r.json()["data"]["jobs"]["nodes"] == [], r.text
        mint = """mutation($t: Int) { createClientToken(input: {maxCredits: 5, ttlSeconds: $t})
          { expiresAt } }"""
        r = await gw.gql(mint, {"t": None}, key)
        assert r.status_code == 200 and r.json()["data"]["createClientToken"]["expiresAt"]
        typed = """query($t: GenerateType) {
          estimate(input: {type: $t, provider: "local", input: {text: "x"}}) { credits } }"""
        r = await gw.gql(typed, {"t": None}, key)
        assert r.status_code == 400, r.text
        [error] = r.json()["errors"]
        assert error["extensions"]["code"] == "BAD_USER_INPUT" and "type" in error["message"]


async def test_a_client_that_accepts_graphql_responses_gets_that_type_errors_included(
    redis_url: str, storage_dir: Path
) -> None:
    """Apollo Client 4 asks for `application/graphql-response+json` and reads a 4xx's
    errors (their codes) only when the answer has that type."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        accept = "application/graphql-response+json,application/json;q=0.9"
        for query, status in (
            ("{ me { plan } }", 200),
            ("{ jobs(first: 1000) { nodes { id } } }", 400),
        ):
            r = await gw.http.post(
                "/graphql",
                json={"query": query},
                headers={"Authorization": f"Bearer {key}", "Accept": accept},
            )
            assert r.status_code == status
            assert r.headers["content-type"].startswith("application/graphql-response+json")
        assert r.json()["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
        plain = await gw.http.post(
            "/graphql",
            json={"query": "{ me { plan } }"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert plain.headers["content-type"].startswith("application/json")


async def test_a_body_that_is_no_object_or_a_subscription_over_http_is_a_400(
    redis_url: str, storage_dir: Path
) -> None:
    """Both were 500s with a traceback: Strawberry read a JSON string as the request, and
    graphql-core ran a subscription as a query whose field yields nothing."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for body in (b'"hello"', b"1", b"true", b"null"):
            r = await gw.http.post("/graphql", content=body, headers=headers)
            assert_refused(r, body.decode())
            assert "JSON object" in r.json()["errors"][0]["message"]
        subscription = 'subscription { jobUpdates(id: "x") { id } }'
        for r in (
            await gw.http.post("/graphql", json={"query": subscription}, headers=headers),
            await gw.http.get("/graphql", params={"query": subscription}, headers=headers),
        ):
            assert_refused(r, "subscription over HTTP")
            assert "WebSocket" in r.json()["errors"][0]["message"]
