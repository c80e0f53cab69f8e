"""Request ids, JSON log lines and OpenTelemetry traces (docs/api.md#logs-and-traces)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import structlog
import websockets
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from gateway import cli, telemetry
from gateway.store import keys
from tests.emulators.krea import KreaEmulator
from tests.harness import gateway, until
from tests.records import record
from tests.servers import serve
from tests.test_webhooks import FAST, Receiver

GENERATED = re.compile(r"[0-9a-f]{24}")


# -- X-Request-Id ------------------------------------------------------------------------


async def test_a_sane_request_id_is_echoed_a_missing_or_bad_one_replaced(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        r = await gw.http.get("/healthz", headers={"X-Request-Id": "abc.DEF_1-2"})
        assert r.headers["x-request-id"] == "abc.DEF_1-2"
        r = await gw.http.get("/healthz")
        assert GENERATED.fullmatch(r.headers["x-request-id"])
        assert r.headers["x-request-id"] != (await gw.http.get("/healthz")).headers["x-request-id"]
        for bad in ("a" * 129, "has space", "semi;colon", "ünï", ""):
            r = await gw.http.get("/healthz", headers={"X-Request-Id": bad.encode()})
            assert GENERATED.fullmatch(r.headers["x-request-id"]), bad
        assert (await gw.http.get("/healthz", headers={"X-Request-Id": "a" * 128})).headers[
            "x-request-id"
        ] == "a" * 128


async def test_errors_carry_the_request_id_too(
    redis_url: str, storage_dir: Path, log_lines: io.BytesIO
) -> None:
    async with gateway(redis_url, storage_dir, max_body_bytes=1000) as gw:
        given = {"X-Request-Id": "err-1"}
        cases = [
            (404, await gw.http.get("/no/such/route", headers=given)),  # routing's 404
            (401, await gw.http.post("/graphql", json={"query": "{ me { id } }"}, headers=given)),
            (413, await gw.http.post("/v1/text_to_image", content=b"x" * 2000, headers=given)),
            (
                401,
                await gw.http.get("/v1/jobs/nope", headers={**given, "Authorization": "Bearer x"}),
            ),
        ]
        for status, r in cases:
            assert r.status_code == status, r.text
            assert r.headers["x-request-id"] == "err-1", (r.status_code, r.text)
    # Each line names the route that answered; a body refused before any route took the
    # request, like an unknown path, is `unmatched` (docs/api.md#metrics).
    routes = [(e["status"], e["route"]) for e in lines(log_lines) if e["event"] == "request"]
    assert routes == [
        (404, "unmatched"),
        (401, "/graphql"),
        (413, "unmatched"),
        (401, "/v1/jobs/{job_id}"),
    ]


async def test_an_unanswered_exception_is_a_500_with_the_request_id(
    redis_url: str, storage_dir: Path
) -> None:
    async def boom(request: Request) -> PlainTextResponse:
        raise RuntimeError("a bug")

    async with gateway(redis_url, storage_dir) as gw:
        gw.app.router.routes.append(Route("/v1/me/boom", boom))  # a REST path: REST's shape
        r = await gw.http.get("/v1/me/boom", headers={"X-Request-Id": "x-500"})
    assert r.status_code == 500
    assert r.headers["x-request-id"] == "x-500"
    assert r.json()["error"]["code"] == "INTERNAL_SERVER_ERROR"


# -- log lines -----------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.BytesIO]:
    """The logging `gateway serve` configures, written here instead of stdout."""
    out = io.BytesIO()
    cli._configure_logging()
    structlog.configure(logger_factory=structlog.BytesLoggerFactory(file=out))
    try:
        yield out
    finally:
        structlog.reset_defaults()


def lines(out: io.BytesIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.startswith(b"{")]


async def test_log_lines_carry_request_job_and_account_and_nothing_secret(
    redis_url: str, storage_dir: Path, log_lines: io.BytesIO
) -> None:
    prompt = "a very private prompt about a purple walrus"
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        account = gw.keys[key]["id"]
        r = await gw.http.post(
            "/graphql",
            json={
                "query": "mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }",
                "variables": {"i": {"service": "local", "prompt": prompt, "width": 512}},
            },
            headers={"Authorization": f"Bearer {key}", "X-Request-Id": "req-42"},
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["generateImage"]["id"]
        await gw.wait(key, job_id)
        await gw.http.get(f"/v1/jobs/{job_id}?token=secret-in-query", headers={"X-Api-Key": key})
        # Off: nothing of tracing in the job record.
        assert "trace" not in await record(gw.accounts.redis, keys.job(account, job_id))

    logged = lines(log_lines)
    text = log_lines.getvalue().decode()
    assert key not in text and prompt not in text and "walrus" not in text
    assert "secret-in-query" not in text
    (request,) = [e for e in logged if e["event"] == "request" and e["request_id"] == "req-42"]
    assert request["account"] == account and request["job_id"] == job_id
    assert request["route"] == "/graphql" and request["method"] == "POST"
    assert request["status"] == 200 and request["level"] == "info"
    assert isinstance(request["duration_ms"], float) and request["timestamp"].endswith("Z")
    read = [e for e in logged if e["event"] == "request" and e["route"] == "/v1/jobs/{job_id}"]
    assert read and read[0]["account"] == account
    events = {e["event"]: e for e in logged if e.get("job_id") == job_id}
    for event in ("job started", "job completed"):
        assert events[event]["account"] == account, events
        assert "request_id" not in events[event]  # a worker's line, not the request's
    assert events["job completed"]["backend"] == "local"
    # Each job line says its service and attempt (docs/api.md#logs-and-traces).
    for event in ("job started", "job completed"):
        assert (events[event]["service"], events[event]["attempt"]) == ("local", 1), events


async def test_the_request_lines_can_be_turned_off_the_id_stays(
    redis_url: str, storage_dir: Path, log_lines: io.BytesIO
) -> None:
    async with gateway(redis_url, storage_dir, access_log=False, metrics_enabled=False) as gw:
        r = await gw.http.get("/healthz", headers={"X-Request-Id": "quiet-1"})
        assert r.headers["x-request-id"] == "quiet-1"
        assert GENERATED.fullmatch((await gw.http.get("/no/such/route")).headers["x-request-id"])
    assert not [e for e in lines(log_lines) if e["event"] == "request"]


async def test_a_websocket_connection_has_an_id_and_a_line_of_its_own(
    redis_url: str, storage_dir: Path, log_lines: io.BytesIO
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        url = gw.base.replace("http://", "ws://") + "/graphql"
        async with websockets.connect(
            url, subprotocols=["graphql-transport-ws"], additional_headers={"X-Request-Id": "ws-7"}
        ) as ws:
            assert ws.response is not None and ws.response.headers["X-Request-Id"] == "ws-7"
            init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {key}"}}
            await ws.send(json.dumps(init))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
        # Without one sent, one is made.
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as ws:
            assert GENERATED.fullmatch(ws.response.headers["X-Request-Id"])

    async def logged() -> list[dict[str, Any]]:
        return [e for e in lines(log_lines) if e.get("request_id") == "ws-7"]

    await until(logged)
    (line,) = await logged()
    assert (line["event"], line["method"], line["route"]) == ("request", "WEBSOCKET", "/graphql")
    assert line["status"] == 101 and line["account"] == gw.keys[key]["id"]
    assert line["duration_ms"] > 0


# -- traces ----------------------------------------------------------------------------------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.enable(provider)
    try:
        yield exporter
    finally:
        telemetry.disable()


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.name == name]


async def test_a_job_is_traced_from_its_request_to_its_webhook(
    redis_url: str, storage_dir: Path, spans: InMemorySpanExporter
) -> None:
    emu = KreaEmulator(steps_to_complete=2)
    receiver = Receiver()
    async with (
        serve(emu.app) as krea,
        serve(receiver.app) as hook,
        gateway(
            redis_url, storage_dir, krea_api_base=krea, krea_api_token="test-token", **FAST
        ) as gw,
    ):
        key = await gw.key()
        client_trace = "0af7651916cd43dd8448eb211c80319c"
        r = await gw.http.post(
            "/graphql",
            json={
                "query": "mutation($i: ImageGenerationInput!) { generateImage(input: $i) { id } }",
                "variables": {
                    "i": {"service": "flux-dev", "prompt": "a kite", "webhookUrl": f"{hook}/hook"}
                },
            },
            headers={
                "Authorization": f"Bearer {key}",
                "traceparent": f"00-{client_trace}-b7ad6b7169203331-01",
            },
        )
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["generateImage"]["id"]
        assert (await gw.wait(key, job_id))["status"] == "completed"
        await until(lambda: len(receiver.calls) == 1 and named(spans, "webhook"))

    (server,) = [s for s in named(spans, "POST /graphql") if s.parent is not None]
    trace_id = server.context.trace_id
    assert f"{trace_id:032x}" == client_trace  # the client's trace goes on
    assert server.attributes["http.route"] == "/graphql"
    assert server.attributes["http.response.status_code"] == 200
    (admission,) = named(spans, "admission")
    assert admission.parent is not None and admission.parent.span_id == server.context.span_id
    assert admission.attributes["gateway.job_id"] == job_id
    (job,) = named(spans, "job")
    assert job.parent is not None and job.parent.span_id == admission.context.span_id
    (render,) = named(spans, "render")
    assert render.parent is not None and render.parent.span_id == job.context.span_id
    assert render.attributes["gateway.backend"] == "krea"
    upstream = [s for s in spans.get_finished_spans() if s.name.startswith("krea ")]
    assert upstream and all(s.context.trace_id == trace_id for s in upstream)
    assert {s.attributes["gateway.upstream"] for s in upstream} == {"krea"}
    (put,) = named(spans, "storage.put")
    assert put.parent is not None and put.parent.span_id == job.context.span_id
    (webhook,) = named(spans, "webhook")
    assert webhook.context.trace_id == trace_id
    assert webhook.attributes["http.response.status_code"] == 200
    # The upstream was sent each call's traceparent, in the job's trace.
    sent = [q.headers.get("traceparent", "") for q in emu.requests]
    assert sent and all(t.split("-")[1] == client_trace for t in sent), sent
    assert {t.split("-")[2] for t in sent} <= {f"{s.context.span_id:016x}" for s in upstream}
    # The receiver is not sent the trace.
    assert "traceparent" not in receiver.calls[0][0]


async def test_a_local_render_is_traced_too(
    redis_url: str, storage_dir: Path, spans: InMemorySpanExporter
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        r = await gw.generate(key)
        job_id = r.json()["data"]["generate"]["id"]
        await gw.wait(key, job_id)
        stored = (await record(gw.accounts.redis, keys.job(gw.keys[key]["id"], job_id)))["trace"]
    (admission,) = named(spans, "admission")
    assert stored is not None and f"{admission.context.span_id:016x}" in str(stored)
    (render,) = named(spans, "render")
    assert render.attributes["gateway.backend"] == "local"
    assert render.context.trace_id == admission.context.trace_id
    assert named(spans, "storage.put")


def test_configure_from_env_reads_the_standard_variables() -> None:
    assert telemetry.configure_from_env({}) is False
    assert telemetry.configure_from_env({"OTEL_TRACES_EXPORTER": "none"}) is False
    assert not telemetry.configure_from_env(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    )
    assert not telemetry.ENABLED
    with pytest.raises(ValueError, match="grpc"):
        telemetry.configure_from_env(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
        )
    with pytest.raises(ValueError, match="zipkin"):
        telemetry.configure_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    try:
        assert telemetry.configure_from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"})
        assert telemetry.ENABLED
    finally:
        telemetry.disable()
    assert not telemetry.ENABLED
    # An empty variable is unset (a deployment that passes every name, empty or not):
    # the endpoint alone still turns tracing on, under the gateway's own service name.
    empty = {"OTEL_TRACES_EXPORTER": "", "OTEL_SERVICE_NAME": ""}
    try:
        assert telemetry.configure_from_env(
            {**empty, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
        )
        assert telemetry._provider is not None
        named = telemetry._provider.resource.attributes["service.name"]
        assert named == telemetry.SERVICE_NAME
    finally:
        telemetry.disable()


def test_the_libraries_own_log_lines_are_json_with_the_request_id() -> None:
    """What uvicorn or Strawberry log through the standard library (an unexpected error
    and its traceback, say) comes out as one JSON line like the gateway's own, carrying
    the request's id when one is bound."""
    script = """
import logging
import structlog
from gateway.cli import _configure_logging
_configure_logging()
structlog.contextvars.bind_contextvars(request_id="r-123")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("strawberry.execution").exception("an error in a resolver")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    [line] = done.stderr.strip().splitlines()
    logged = json.loads(line)
    assert logged["event"] == "an error in a resolver" and logged["request_id"] == "r-123"
    assert logged["level"] == "error" and logged["logger"] == "strawberry.execution"
    assert "ZeroDivisionError" in logged["exception"]


async def test_a_client_that_leaves_mid_body_is_a_499_not_a_500(
    redis_url: str, storage_dir: Path, log_lines: io.BytesIO
) -> None:
    """It announced more than it sent, then closed: no traceback, no 500 counted (which
    anyone could inflate to trip alerts), one request line with status 499."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        url = urlsplit(gw.base)
        for n, path in enumerate(("/graphql", "/v1/text_to_image", "/v1/images/generations")):
            _, writer = await asyncio.open_connection(url.hostname, url.port)
            writer.write(
                b"POST %b HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"X-Request-Id: left-%d\r\nAuthorization: Bearer %b\r\n"
                b'Content-Length: 1000\r\n\r\n{"query": "{' % (path.encode(), n, key.encode())
            )
            await writer.drain()
            writer.close()

        async def logged() -> list[dict[str, Any]]:
            return [e for e in lines(log_lines) if e.get("request_id", "").startswith("left-")]

        async def all_logged() -> bool:
            return len(await logged()) == 3

        await until(all_logged)
        metrics = (await gw.http.get("/metrics")).text
    assert sorted(e["status"] for e in await logged()) == [499, 499, 499]
    assert "unexpected error" not in log_lines.getvalue().decode()
    for route in ("/graphql", "/v1/text_to_image", "/v1/images/generations"):
        assert f'route="{route}",status="499"' in metrics  # counted as what it was


async def test_a_client_that_leaves_is_not_a_server_error_in_its_trace(
    redis_url: str, storage_dir: Path, spans: InMemorySpanExporter
) -> None:
    """A client whose timeout ends a waiting answer: its span says 499, not an error."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key()
        async with httpx.AsyncClient(base_url=gw.base, timeout=0.5) as http:
            with pytest.raises(httpx.TimeoutException):
                await http.post(
                    "/v1/text_to_image",
                    json={"service": "local", "prompt": "a kite"},
                    headers={"X-API-Key": key, "Prefer": "wait=60"},
                )
        await until(lambda: named(spans, "POST /v1/text_to_image"))
    (server,) = named(spans, "POST /v1/text_to_image")
    assert server.attributes["http.response.status_code"] == 499
    assert server.status.status_code.name != "ERROR"
    assert not [e for e in server.events if e.name == "exception"]
