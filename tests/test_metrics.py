"""Prometheus metrics (docs/api.md#metrics): a real `gateway serve` and a real `gateway
worker` process on one Redis, upstream emulators over loopback, real jobs (a success, a
failover after a 500, a failure, a cache hit, a rate-limited request, a job held in
flight, a webhook), then both processes' `/metrics` scraped and parsed with
prometheus-client's own parser: every family of docs/api.md's metrics moved as it should, the
token is asked for (401 in the REST error shape), and no label carries a key, a job id
or a prompt."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import metrics
from gateway.accounts import Accounts
from gateway.config import BACKENDS, DEFAULT_ROUTES, load_settings
from gateway.store.redis import Scripts, connect
from tests.emulators.fluxkrea import FluxKreaEmulator
from tests.emulators.krea import KreaEmulator
from tests.emulators.segmind import SegmindEmulator
from tests.harness import GATEWAY, gateway, gateway_processes, until
from tests.servers import free_port, serve

TOKEN = "metrics-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TERMINAL = ("completed", "failed", "cancelled")
PROMPT = "a lighthouse made of glass, seen from a boat at dusk"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: the gateway's families as docs/api.md names them (the `_total` of a counter is the
#: sample's name; the parser names the family without it)
FAMILIES = {
    "gateway_http_requests": "counter",
    "gateway_http_request_duration_seconds": "histogram",
    "gateway_admissions": "counter",
    "gateway_jobs": "counter",
    "gateway_job_duration_seconds": "histogram",
    "gateway_upstream_requests": "counter",
    "gateway_credits_charged": "counter",
    "gateway_queue_depth": "gauge",
    "gateway_jobs_in_flight": "gauge",
    "gateway_backend_circuit_open": "gauge",
    "gateway_webhook_deliveries": "counter",
}


@dataclass
class Scrape:
    samples: Samples
    types: dict[str, str]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 for a labelled child never made (nothing counted yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def ours(self) -> list[tuple[str, dict[str, str]]]:
        return [(n, dict(ls)) for n, ls in self.samples if n.startswith("gateway_")]


def parse(text: str) -> Scrape:
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return Scrape(samples, types, text)


async def scrape(client: httpx.AsyncClient, url: str) -> Scrape:
    response = await client.get(url, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@dataclass
class Hooks:
    """A webhook receiver: the bodies it was sent."""

    received: list[bytes] = field(default_factory=list)

    async def endpoint(self, request: Request) -> Response:
        self.received.append(await request.body())
        return Response(status_code=204)


@contextlib.contextmanager
def worker_process(env: dict[str, str], logs: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real `gateway worker`, ready once its metrics port accepts connections."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    full.update(env)
    with (logs / "worker.log").open("wb") as out:
        proc = subprocess.Popen([GATEWAY, "worker"], env=full, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 30
        port = int(env["GATEWAY_METRICS_PORT"])
        while True:
            assert proc.poll() is None, (logs / "worker.log").read_text()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, "gateway worker served no metrics"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class Client:
    """The test's calls to `gateway serve`, tallied by route template and status, as
    its `gateway_http_requests_total` must count them."""

    http: httpx.AsyncClient
    sent: Counter[tuple[str, str]] = field(default_factory=Counter)

    async def generate(self, key: str, **body: Any) -> httpx.Response:
        body.setdefault("service", "flux-krea")
        body.setdefault("prompt", PROMPT)
        body.setdefault("width", 512)
        body.setdefault("height", 512)
        r = await self.http.post("/v1/text_to_image", json=body, headers={"X-API-Key": key})
        self.sent["/v1/text_to_image", str(r.status_code)] += 1
        return r

    async def job(self, key: str, job_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key})
        self.sent["/v1/jobs/{job_id}", str(r.status_code)] += 1
        assert r.status_code == 200, r.text
        return dict(r.json())

    async def ended(self, key: str, job_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(key, job_id)
            if job["status"] in TERMINAL:
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def upstreams() -> AsyncIterator[
    tuple[FluxKreaEmulator, SegmindEmulator, KreaEmulator, dict[str, str]]
]:
    fluxkrea = FluxKreaEmulator(api_key="test-key")
    segmind = SegmindEmulator(api_key="test-key")
    krea = KreaEmulator(token="test-token", steps_to_complete=10**9)  # held until released
    async with serve(fluxkrea.app) as fb, serve(segmind.app) as sb, serve(krea.app) as kb:
        yield (
            fluxkrea,
            segmind,
            krea,
            {
                "GATEWAY_FLUXKREA_API_BASE": f"{fb}/v1",
                "GATEWAY_FLUXKREA_API_KEY": "test-key",
                "GATEWAY_SEGMIND_API_BASE": sb,
                "GATEWAY_SEGMIND_API_KEY": "test-key",
                "GATEWAY_KREA_API_BASE": kb,
                "GATEWAY_KREA_API_TOKEN": "test-token",
            },
        )


async def test_serve_and_worker_count_real_jobs(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    hooks = Hooks()
    receiver = Starlette(routes=[Route("/hook", hooks.endpoint, methods=["POST"])])
    redis = await connect(redis_url)
    accounts = Accounts(redis, Scripts.register(redis), load_settings(redis_url=redis_url))
    async with upstreams() as (fluxkrea, _, krea, upstream_env), serve(receiver) as hook_base:
        env = {
            **upstream_env,
            "GATEWAY_METRICS_TOKEN": TOKEN,
            "GATEWAY_METRICS_REFRESH_SECONDS": "0",  # every scrape reads the queue afresh
            "GATEWAY_POLL_INTERVAL": "0.05",
            "GATEWAY_BREAKER_THRESHOLD": "1",  # one failover opens the circuit
            "GATEWAY_URL_ALLOW_CIDRS": "127.0.0.0/8",  # the webhook receiver is on loopback
        }
        worker_port = free_port()
        with gateway_processes(redis_url, storage_dir, tmp_path, **env) as (base,):
            async with httpx.AsyncClient(base_url=base, timeout=30) as http:
                api = Client(http)
                key_made = await accounts.create("pro", 10_000)
                key = str(key_made["key"])
                limited_made = await accounts.create("pro", 10_000, rpm=1)
                limited = str(limited_made["key"])

                # -- the token: 401 in the REST error shape without it ----------------------
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
                    refused = await http.get("/metrics", headers=headers)
                    api.sent["/metrics", "401"] += 1
                    assert refused.status_code == 401, refused.text
                    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
                    assert refused.headers["www-authenticate"].startswith("Bearer")
                    assert "gateway_" not in refused.text

                # -- a job queued while no worker runs: the queue's depth -------------------
                r = await api.generate(key, seed=11, webhookUrl=f"{hook_base}/hook")
                assert r.status_code == 202, r.text
                first = r.json()["id"]
                queued = await scrape(http, "/metrics")
                assert queued.value("gateway_queue_depth") == 1
                assert queued.value("gateway_jobs_in_flight") == 0

                worker_env = {
                    **env,
                    "GATEWAY_REDIS_URL": redis_url,
                    "GATEWAY_STORAGE_DIR": str(storage_dir),
                    "GATEWAY_METRICS_PORT": str(worker_port),
                }
                worker_url = f"http://127.0.0.1:{worker_port}/metrics"
                with worker_process(worker_env, tmp_path):
                    # the worker's endpoint asks for the token too, same shape
                    refused = await http.get(worker_url)
                    assert refused.status_code == 401, refused.text
                    assert refused.json()["error"]["code"] == "UNAUTHENTICATED"
                    missing = await http.get(worker_url.replace("/metrics", "/nope"), headers=AUTH)
                    assert missing.status_code == 404
                    assert missing.json()["error"]["code"] == "NOT_FOUND"
                    # Its health, no token needed: the image's check finds it there, as it
                    # finds the server's on GATEWAY_PORT (a worker listens on neither else).
                    health = await http.get(worker_url.replace("/metrics", "/healthz"))
                    assert health.json() == {"status": "ok"}
                    server_port = base.rsplit(":", 1)[1]
                    nothing = str(free_port())
                    for ports, healthy in (
                        ({"GATEWAY_PORT": nothing, "GATEWAY_METRICS_PORT": str(worker_port)}, 0),
                        ({"GATEWAY_PORT": server_port}, 0),
                        ({"GATEWAY_PORT": nothing, "GATEWAY_METRICS_PORT": nothing}, 1),
                    ):
                        check = await asyncio.to_thread(
                            subprocess.run,
                            [sys.executable, "-m", "gateway.healthcheck"],
                            env={**os.environ, **ports},
                            timeout=30,
                        )
                        assert check.returncode == healthy, ports

                    # 1. a success on the first backend (fluxkrea), its webhook delivered
                    done = await api.ended(key, first)
                    assert done["status"] == "completed", done
                    assert done["metadata"]["backend"] == "fluxkrea"

                    # 2. the same request again: a cache hit, answered at once
                    r = await api.generate(key, seed=11)
                    assert r.status_code == 200, r.text
                    assert r.json()["metadata"]["cached"] is True

                    # 3. a failure: fluxkrea refuses the input (400), no failover
                    fluxkrea.fail_next(1, 400)
                    r = await api.generate(key, seed=12)
                    failed = await api.ended(key, r.json()["id"])
                    assert failed["status"] == "failed", failed

                    # 4. a failover: fluxkrea answers 500, segmind makes the picture
                    fluxkrea.fail_next(1, 500)
                    r = await api.generate(key, seed=13)
                    over = await api.ended(key, r.json()["id"])
                    assert over["status"] == "completed", over
                    assert over["metadata"]["backend"] == "segmind"

                    # 5. a job held upstream (Krea): in flight, the queue empty
                    r = await api.generate(key, service="flux-dev", seed=14)
                    held = r.json()["id"]

                    async def running() -> bool:
                        return (await api.job(key, held))["status"] == "processing" and bool(
                            krea.jobs
                        )

                    await until(running, what="the Krea job to be running")
                    busy = await scrape(http, "/metrics")
                    assert busy.value("gateway_jobs_in_flight") == 1
                    assert busy.value("gateway_queue_depth") == 0
                    busy_worker = await scrape(http, worker_url)
                    assert busy_worker.value("gateway_worker_jobs_running") == 1
                    assert busy_worker.value("gateway_jobs_in_flight") == 1
                    krea.steps_to_complete = 1  # the next poll completes it
                    assert (await api.ended(key, held))["status"] == "completed"

                    # 6. rate limited: a key allowed one generation a minute asks twice
                    r = await api.generate(limited, service="local")
                    assert r.status_code == 202, r.text
                    assert (await api.ended(limited, r.json()["id"]))["status"] == "completed"
                    r = await api.generate(limited, service="local")
                    assert r.status_code == 429, r.text

                    # 7. refused before admission: bad input, an unknown key
                    r = await api.generate(key, width=100)
                    assert r.status_code == 400, r.text
                    r = await api.generate("gk_not_a_key")
                    assert r.status_code == 401, r.text
                    r = await http.get("/no/such/path")
                    api.sent["unmatched", "404"] += 1
                    assert r.status_code == 404

                    async def delivered() -> bool:
                        return bool(hooks.received)

                    await until(delivered, what="the webhook")
                    work = await scrape(http, worker_url)

                    async def counted() -> bool:  # once its attempt is recorded
                        nonlocal work
                        work = await scrape(http, worker_url)
                        delivered = work.value(
                            "gateway_webhook_deliveries_total", outcome="delivered"
                        )
                        return delivered >= 1

                    await until(counted, what="the delivery to be counted")

                api_side = await scrape(http, "/metrics")

    await redis.aclose()

    # -- every family is there, with its type, on both processes ------------------------
    for name, kind in FAMILIES.items():
        assert api_side.types.get(name) == kind, (name, api_side.types.get(name))
        assert work.types.get(name) == kind, (name, work.types.get(name))

    # -- gateway serve: requests and admissions -----------------------------------------
    # two scrapes before this one (counted once its answer is sent, so not in itself)
    assert api_side.value("gateway_http_requests_total", route="/metrics", status="200") == 2
    for (route, status), count in api.sent.items():
        assert api_side.value("gateway_http_requests_total", route=route, status=status) == count, (
            route,
            status,
        )
    generations = sum(c for (route, _), c in api.sent.items() if route == "/v1/text_to_image")
    assert (
        api_side.value("gateway_http_request_duration_seconds_count", route="/v1/text_to_image")
        == generations
    )
    assert (
        api_side.value(
            "gateway_http_request_duration_seconds_bucket", route="/v1/text_to_image", le="+Inf"
        )
        == generations
    )
    assert (
        api_side.value("gateway_http_request_duration_seconds_sum", route="/v1/text_to_image") > 0
    )
    # Buckets up to what a waiting answer may take (GATEWAY_SYNC_WAIT_SECONDS: 300 s).
    assert (
        api_side.value(
            "gateway_http_request_duration_seconds_bucket", route="/v1/text_to_image", le="300.0"
        )
        == generations
    )
    admitted = {
        outcome: api_side.value("gateway_admissions_total", outcome=outcome)
        for outcome in metrics.ADMISSION_OUTCOMES
    }
    assert admitted == {
        "accepted": 5,  # the first, the failed, the failed-over, the held, the limited key's
        "cache_hit": 1,
        "coalesced": 0,
        "duplicate": 0,
        "rate_limited": 1,
        "insufficient_credits": 0,
        "invalid": 1,
        "unauthenticated": 1,
        "forbidden": 0,
        "unavailable": 0,
    }, admitted
    # The API process runs no jobs: none counted there, its circuits closed.
    assert api_side.total("gateway_jobs_total") == 0
    assert api_side.value("gateway_backend_circuit_open", backend="fluxkrea") == 0
    assert api_side.value("gateway_queue_depth") == 0
    assert api_side.value("gateway_jobs_in_flight") == 0

    # -- gateway worker: jobs, upstream calls, credits, circuits, webhooks --------------
    jobs = {
        (ls["service"], ls["backend"], ls["status"]): work.samples[(n, frozenset(ls.items()))]
        for n, ls in work.ours()
        if n == "gateway_jobs_total"
    }
    assert {k: v for k, v in jobs.items() if v} == {
        ("flux-krea", "fluxkrea", "completed"): 1,
        ("flux-krea", "fluxkrea", "failed"): 1,
        ("flux-krea", "segmind", "completed"): 1,
        ("flux-dev", "krea", "completed"): 1,
        ("local", "local", "completed"): 1,
    }, jobs
    for backend in ("fluxkrea", "segmind", "krea", "local"):
        assert work.value("gateway_job_duration_seconds_count", backend=backend) == 1, backend
        assert work.value("gateway_job_duration_seconds_bucket", backend=backend, le="900.0") == 1
    # 512x512 costs 10; the four completed jobs kept theirs, the failed one was refunded
    assert work.value("gateway_credits_charged_total") == 40
    assert (
        work.value("gateway_upstream_requests_total", backend="fluxkrea", outcome="client_error")
        == 1
    )
    assert (
        work.value("gateway_upstream_requests_total", backend="fluxkrea", outcome="server_error")
        == 1
    )
    assert work.value("gateway_upstream_requests_total", backend="fluxkrea", outcome="ok") >= 1
    assert work.value("gateway_upstream_requests_total", backend="segmind", outcome="ok") >= 2
    assert work.value("gateway_upstream_requests_total", backend="krea", outcome="ok") >= 2
    assert work.total("gateway_upstream_requests_total", outcome="timeout") == 0
    assert work.total("gateway_upstream_requests_total", backend="local") == 0
    assert work.value("gateway_backend_circuit_open", backend="fluxkrea") == 1
    assert work.value("gateway_backend_circuit_open", backend="segmind") == 0
    assert work.value("gateway_backend_circuit_open", backend="krea") == 0
    assert work.value("gateway_webhook_deliveries_total", outcome="delivered") == 1
    assert work.value("gateway_webhook_deliveries_total", outcome="retrying") == 0
    assert work.value("gateway_worker_jobs_running") == 0
    assert work.total("gateway_admissions_total") == 0  # admission is the API's
    assert work.total("gateway_http_requests_total") == 0  # the worker serves no API
    assert work.value("process_cpu_seconds_total") > 0  # prometheus-client's own, per process

    # -- labels: bounded, never a key, a job id or a prompt -----------------------------
    secrets = [key, limited, key_made["id"], limited_made["id"], first, held, PROMPT, "lighthouse"]
    routes = {getattr(r, "path", "") for r in gateway_routes(redis_url, storage_dir)} | {
        metrics.UNMATCHED
    }
    allowed: dict[str, set[str] | re.Pattern[str]] = {
        "route": routes,
        "status": re.compile(r"[1-5]\d\d"),
        "outcome": {
            *metrics.ADMISSION_OUTCOMES,
            *metrics.UPSTREAM_OUTCOMES,
            *metrics.WEBHOOK_OUTCOMES,
        },
        "service": {*DEFAULT_ROUTES, *BACKENDS},
        "backend": {*BACKENDS, metrics.NO_BACKEND},
        "le": re.compile(r"\+Inf|\d+(\.\d+)?(e[+-]?\d+)?"),
    }
    for scraped in (api_side, work):
        for secret in secrets:
            assert secret not in scraped.text, secret
        series = scraped.ours()
        assert len(series) < 600, len(series)
        for name, labels in series:
            for label, value in labels.items():
                rule = allowed.get(label)
                if name == "gateway_jobs_total" and label == "status":
                    rule = set(metrics.JOB_STATUSES)  # a job's, not an HTTP status
                assert rule is not None, (name, label)
                ok = rule.fullmatch(value) if isinstance(rule, re.Pattern) else value in rule
                assert ok, (name, label, value)


def gateway_routes(redis_url: str, storage_dir: Path) -> list[Any]:
    from gateway.app import build_app

    return list(build_app(load_settings(redis_url=redis_url, storage_dir=storage_dir)).routes)


async def test_a_worker_with_metrics_off_still_answers_its_health_check(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    """The image's health check reads a worker's `/healthz` on GATEWAY_METRICS_PORT:
    with metrics off it is still served (and `/metrics` is not), so the container does
    not read unhealthy for ever."""
    port = free_port()
    env = {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_STORAGE_DIR": str(storage_dir),
        "GATEWAY_METRICS_PORT": str(port),
        "GATEWAY_METRICS_ENABLED": "false",
    }
    with worker_process(env, tmp_path):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get("/metrics")).status_code == 404
        ports = {"GATEWAY_PORT": str(free_port()), "GATEWAY_METRICS_PORT": str(port)}
        check = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway.healthcheck"],
            env={**os.environ, **ports},
            timeout=30,
        )
        assert check.returncode == 0


async def test_slow_or_silent_clients_cannot_take_a_workers_health_check(
    redis_url: str, storage_dir: Path, tmp_path: Path
) -> None:
    """The worker's endpoint gives a thread to each connection: one address gets at most
    WORKER_CONNECTIONS_PER_ADDRESS of them and all together WORKER_CONNECTIONS (the rest
    closed at once), so a probe from another address is answered meanwhile; a request
    must arrive whole within WORKER_REQUEST_SECONDS, however slowly it trickles in; then
    the silent ones' addresses are answered again too. (Linux: all of 127/8 is local.)"""
    from gateway.metrics_http import WORKER_CONNECTIONS as ALL
    from gateway.metrics_http import WORKER_CONNECTIONS_PER_ADDRESS as PER_ADDRESS
    from gateway.metrics_http import WORKER_REQUEST_SECONDS as IN_TIME

    port = free_port()
    env = {
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_STORAGE_DIR": str(storage_dir),
        "GATEWAY_METRICS_PORT": str(port),
    }

    def connect(source: str) -> socket.socket:
        conn = socket.create_connection(("127.0.0.1", port), 5, (source, 0))
        conn.setblocking(False)
        return conn

    def closed(conn: socket.socket) -> bool:
        try:
            return conn.recv(1) == b""
        except BlockingIOError:  # open, silent
            return False
        except ConnectionError:  # closed while we wrote to it
            return True

    async def healthy(source: str) -> bool:
        transport = httpx.AsyncHTTPTransport(local_address=source)
        async with httpx.AsyncClient(transport=transport, timeout=2) as http:
            with contextlib.suppress(httpx.TransportError):
                return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        return False

    opened: list[socket.socket] = []
    with worker_process(env, tmp_path):
        try:
            silent = [connect("127.0.0.1") for _ in range(PER_ADDRESS + 20)]
            opened += silent
            # Closed at once, well before any request's time is up: the 20 past the bound.
            soon = IN_TIME / 3
            await until(lambda: sum(map(closed, silent)) >= 20, timeout=soon, what="20 closed")
            assert sum(not closed(conn) for conn in silent) == PER_ADDRESS
            await until(lambda: healthy("127.0.0.2"), what="another address answered")

            trickle = connect("127.0.0.3")
            opened.append(trickle)
            trickle.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")

            def cut() -> bool:
                with contextlib.suppress(OSError):
                    trickle.sendall(b"x")  # a header's byte at a time, never a whole line
                return closed(trickle)

            await until(cut, what="a request trickling in cut at its deadline")
            # All the threads held, from ALL / PER_ADDRESS addresses: one more is refused.
            await until(lambda: all(map(closed, silent)), what="the silent ones cut in time")
            others = [f"127.0.1.{n}" for n in range(1, ALL // PER_ADDRESS + 1)]
            held = [connect(address) for address in others for _ in range(PER_ADDRESS)]
            opened += held
            late = connect("127.0.2.1")
            opened.append(late)
            await until(lambda: closed(late), timeout=soon, what="one past all the threads")
            assert not any(closed(conn) for conn in held)

            await until(lambda: healthy("127.0.0.1"), what="the silent address answered again")
            assert "Traceback" not in (tmp_path / "worker.log").read_text()
        finally:
            for conn in opened:
                conn.close()


# -- in-process: the switch, the route label, the Redis gauges' pace ----------------------


async def test_metrics_off_serves_nothing_and_on_counts_route_templates(
    storage_dir: Path,
) -> None:
    async with gateway(None, storage_dir, metrics_enabled=False) as gw:
        r = await gw.http.get("/metrics")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "NOT_FOUND"
    async with gateway(None, storage_dir) as gw:  # no token set: open
        key = await gw.key()
        before = parse((await gw.http.get("/metrics")).text)
        r = await gw.http.get("/v1/jobs/0123456789abcdef01234567", headers={"X-API-Key": key})
        assert r.status_code == 404
        r = await gw.http.get("/v1/jobs/another-id", headers={"X-API-Key": key})
        after = parse((await gw.http.get("/metrics")).text)
        name, template = "gateway_http_requests_total", "/v1/jobs/{job_id}"
        moved = after.value(name, route=template, status="404") - before.value(
            name, route=template, status="404"
        )
        assert moved == 2
        assert "0123456789abcdef01234567" not in after.text
        assert "another-id" not in after.text


class CountingQueue:
    def __init__(self) -> None:
        self.reads = 0

    async def sizes(self) -> tuple[int, int]:
        self.reads += 1
        await asyncio.sleep(0.01)
        return 3, 2


async def test_the_redis_gauges_are_read_at_most_once_per_interval() -> None:
    from gateway.metrics_http import QueueSampler

    now = [100.0]
    queue = CountingQueue()
    sampler = QueueSampler(queue, interval=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    await asyncio.gather(*(sampler.refresh() for _ in range(10)))  # ten scrapes at once
    assert queue.reads == 1
    assert metrics.QUEUE_DEPTH._value.get() == 3
    assert metrics.JOBS_IN_FLIGHT._value.get() == 2
    now[0] += 4.9
    await sampler.refresh()
    assert queue.reads == 1  # within the interval: the last figures
    now[0] += 0.2
    await sampler.refresh()
    assert queue.reads == 2


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (None, False),
        ("Bearer " + TOKEN, True),
        ("bearer " + TOKEN, True),
        ("Bearer " + TOKEN + "x", False),
        (TOKEN, False),
        ("Basic " + TOKEN, False),
    ],
)
def test_the_token_check(header: str | None, ok: bool) -> None:
    from gateway.metrics_http import authorized

    assert authorized(TOKEN, header) is ok
    assert authorized(None, header) is True


def test_the_grafana_dashboard_reads_the_families_the_gateway_exports() -> None:
    import json

    from prometheus_client import REGISTRY

    dashboard = json.loads(
        (Path(__file__).parents[1] / "deploy/grafana-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exported = {
        family.name + suffix
        for family in REGISTRY.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    used = {name for expr in exprs for name in re.findall(r"\b(?:gateway|process)_[a-z_]+", expr)}
    assert used - exported == set(), used - exported
    for family in FAMILIES:  # every documented family is on a panel
        assert any(family in expr for expr in exprs), family
