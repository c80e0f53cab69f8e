"""Property-based probing of a real `gateway serve` process: whatever GraphQL document or
REST body arrives, the answer is never a 5xx, always JSON, and the server keeps serving.

GraphQL documents come from `hypothesis-graphql` over the schema the server itself
introspects, valid ones and invalid ones; REST bodies from Hypothesis's JSON strategies
around the fields the routes take. A bounded number of examples, derandomised, so the
suite stays fast and repeatable; `HYPOTHESIS_PROFILE=explore` searches further.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from graphql import build_client_schema, get_introspection_query, print_schema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_graphql import Mode, from_schema
from redis import Redis

from tests.conftest import RedisServer
from tests.harness import GATEWAY, gateway_processes

settings.register_profile(
    "suite",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore",
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))
ADMIN = "admin-token-for-the-probe"


@dataclass
class Served:
    base: str
    key: str
    log: Path
    http: httpx.Client

    def healthy(self) -> bool:
        return self.http.get(f"{self.base}/healthz").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real server for the module: dev mode (every service routable, `local` last),
    admin on, in-process workers running what gets admitted."""
    tmp = tmp_path_factory.mktemp("probe")
    (tmp / "outputs").mkdir()
    redis = redis_server.url
    client = Redis(port=redis_server.port)
    client.flushall()  # no job another test left behind: this server's workers would run it
    client.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    made = subprocess.run(
        [GATEWAY, "keys", "create", "--plan", "enterprise", "--credits", "100000000", "--json"],
        env={**env, "GATEWAY_REDIS_URL": redis},
        capture_output=True,
        check=True,
    )
    key = json.loads(made.stdout)["key"]
    with (
        gateway_processes(
            redis,
            tmp / "outputs",
            tmp,
            GATEWAY_DEV="1",
            GATEWAY_INPROCESS_WORKERS="1",
            GATEWAY_ADMIN_TOKEN=ADMIN,
            GATEWAY_READ_RPM="1000000",
        ) as (base,),
        httpx.Client(timeout=30) as http,
    ):
        yield Served(base, key, tmp / "gw0.log", http)


@pytest.fixture(scope="module")
def sdl(served: Served) -> str:
    """The live schema, as the server answers introspection."""
    r = served.http.post(
        f"{served.base}/graphql",
        json={"query": get_introspection_query()},
        headers={"X-API-Key": served.key},
    )
    return print_schema(build_client_schema(r.json()["data"]))


def check(served: Served, r: httpx.Response, sent: Any) -> dict[str, Any]:
    assert r.status_code < 500, (r.status_code, r.text, sent)
    assert r.headers["content-type"].startswith("application/json"), (r.text, sent)
    body: dict[str, Any] = r.json()
    assert isinstance(body, dict), (body, sent)
    return body


def check_log(served: Served) -> None:
    """Nothing failed behind the answers either."""
    log = served.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def graphql_documents(sdl: str) -> st.SearchStrategy[str]:
    valid = from_schema(sdl, mode=Mode.POSITIVE)
    invalid = from_schema(sdl, mode=Mode.NEGATIVE)
    return st.one_of(valid, invalid)  # type: ignore[return-value]


def test_any_graphql_document_gets_a_json_answer_below_500(served: Served, sdl: str) -> None:
    credentials = st.sampled_from(
        [
            {"X-API-Key": served.key},
            {"Authorization": f"Bearer {ADMIN}"},
            {},
            {"Authorization": "Bearer gk_not_a_key"},
        ]
    )

    @PROFILE
    @given(
        document=graphql_documents(sdl),
        headers=credentials,
        method=st.sampled_from(["POST", "POST", "GET"]),
    )
    def probe(document: str, headers: dict[str, str], method: str) -> None:
        if method == "GET":
            r = served.http.get(
                f"{served.base}/graphql", params={"query": document}, headers=headers
            )
        else:
            r = served.http.post(
                f"{served.base}/graphql", json={"query": document}, headers=headers
            )
        body = check(served, r, document)
        assert "data" in body or "errors" in body, (body, document)
        for error in body.get("errors") or ():
            assert error["extensions"]["code"] != "INTERNAL_SERVER_ERROR", (error, document)

    probe()
    assert served.healthy()
    check_log(served)


FIELDS = [
    "provider",
    "width",
    "height",
    "version",
    "quality",
    "seed",
    "steps",
    "guidance",
    "numImages",
    "outputFormat",
    "aspectRatio",
    "webhookUrl",
    "idempotencyKey",
    "cache",
    "negativePrompt",
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
PLAUSIBLE = st.fixed_dictionaries(
    {"prompt": st.text(max_size=40) | JSON},
    optional={name: JSON | st.integers(-(2**70), 2**70) for name in FIELDS}
    | {"service": st.sampled_from(["local", "flux-krea", "flux-dev", "nope", ""])},
)


@PROFILE
@given(
    body=st.one_of(
        PLAUSIBLE.map(json.dumps),
        JSON.map(json.dumps),
        st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    ),
    content_type=st.sampled_from(
        [
            "application/json",
            "text/plain",
            "",
            "application/x-www-form-urlencoded",
            "application/json; charset=utf-16",
        ]
    ),
)
def _rest_probe(served: Served, body: str, content_type: str) -> None:
    headers = {"X-API-Key": served.key}
    if content_type:
        headers["Content-Type"] = content_type
    r = served.http.post(
        f"{served.base}/v1/text_to_image", content=body.encode("utf-8"), headers=headers
    )
    answer = check(served, r, body)
    if r.status_code >= 400:
        assert answer["error"]["code"] != "INTERNAL_SERVER_ERROR", (answer, body)
    else:
        assert r.status_code == 202, answer
        job = served.http.get(f"{served.base}/v1/jobs/{answer['id']}", headers=headers)
        assert check(served, job, body)["id"] == answer["id"]


def test_any_rest_body_gets_a_json_answer_below_500(served: Served) -> None:
    _rest_probe(served)
    assert served.healthy()
    check_log(served)


@PROFILE
@given(job_id=st.text(min_size=1, max_size=60), suffix=st.sampled_from(["", "/cancel", "/events"]))
def _job_route_probe(served: Served, job_id: str, suffix: str) -> None:
    method = "POST" if suffix == "/cancel" else "GET"
    path = "/v1/jobs/" + quote(job_id, safe="") + suffix
    r = served.http.request(method, served.base + path, headers={"X-API-Key": served.key})
    answer = check(served, r, path)
    assert r.status_code in (400, 404, 405), (r.status_code, answer, path)


def test_any_job_id_in_a_rest_path_gets_a_json_answer_below_500(served: Served) -> None:
    _job_route_probe(served)
    assert served.healthy()
    check_log(served)
