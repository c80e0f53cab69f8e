"""Serving the metrics of `gateway/metrics.py` (docs/api.md#metrics): `GET /metrics` of
`gateway serve`, the endpoint `gateway worker` serves on `GATEWAY_METRICS_PORT`, and the
gauges read from Redis or from this process's worker and router. HTTP requests are
counted by the outermost middleware, `gateway/telemetry_http.py`.

Each process serves its own figures and Prometheus scrapes every process as a target
of its own; prometheus-client's multiprocess mode (one port for processes that share
it, through files every process writes) is for pre-forked servers, which the gateway
is not: each `gateway serve` and `gateway worker` is its own server.

The Redis-backed gauges (queue depth, jobs in flight) are read when a scrape asks for
them, at most once every `GATEWAY_METRICS_REFRESH_SECONDS` per process (a scrape in
between gets the last figures; concurrent scrapes share one read): two O(1) commands
per shard in one pipelined round trip, and nothing at all while nobody scrapes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import hmac
import io
import math
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from http import HTTPStatus
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import structlog
from prometheus_client import REGISTRY, make_asgi_app, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway import metrics, rest, telemetry
from gateway.auth import api_key_from
from gateway.breaker import Breaker
from gateway.config import Settings
from gateway.errors import GatewayError, MethodNotAllowed, NotFound, Unauthenticated
from gateway.jobs.queue import Queue
from gateway.jobs.worker import Worker
from gateway.store.redis import store_trouble

log = structlog.get_logger("gateway.metrics")

PATH = "/metrics"
REFRESH_WAIT = 5.0  # seconds a worker's scrape waits for the Redis read before answering
ALIVE_WAIT = 2.0  # seconds a worker's event loop has to run a step for /healthz: 200


# -- the gauges --------------------------------------------------------------------------


class QueueSampler:
    """Sets the queue depth and jobs-in-flight gauges from Redis, at most once every
    `interval` seconds however often it is asked (0: at every ask)."""

    def __init__(
        self, queue: Queue, interval: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.queue = queue
        self.interval = interval
        self.clock = clock
        self.read_at = -math.inf
        self.lock = asyncio.Lock()
        self.trouble = telemetry.Streak("metrics: reading the queue's size")

    async def refresh(self) -> None:
        if self.clock() - self.read_at < self.interval:
            return
        async with self.lock:  # concurrent scrapes: one read
            if self.clock() - self.read_at < self.interval:
                return
            waiting: float
            taken: float
            try:
                waiting, taken = await self.queue.sizes()
                self.trouble.ok()
            except Exception as exc:
                if not (isinstance(exc, OSError) or store_trouble(exc)):
                    raise
                self.trouble.failed(exc)
                waiting = taken = math.nan  # unknown, not the last figure passed off as new
            metrics.QUEUE_DEPTH.set(waiting)
            metrics.JOBS_IN_FLIGHT.set(taken)
            self.read_at = self.clock()  # after a failure too: a sick Redis is not hammered


def watch(worker: Worker) -> Callable[[], None]:
    """Read this process's circuit breakers and running jobs at each scrape (no cost in
    between); returns what stops it (the gauges then read 0)."""
    router = worker.router

    def circuit_open(breaker: Breaker) -> Callable[[], float]:
        return lambda: float(breaker.circuit(router.clock()) != "closed")

    for name, breaker in router.breakers.items():
        metrics.CIRCUIT_OPEN.labels(name).set_function(circuit_open(breaker))
    metrics.WORKER_JOBS_RUNNING.set_function(lambda: float(len(worker.running)))

    def stop() -> None:
        for name in router.breakers:
            metrics.CIRCUIT_OPEN.labels(name).set_function(lambda: 0.0)
        metrics.WORKER_JOBS_RUNNING.set_function(lambda: 0.0)

    return stop


@contextlib.asynccontextmanager
async def watching(worker: Worker, settings: Settings) -> AsyncIterator[QueueSampler | None]:
    """The gauges of this process (its worker's, its router's and the queue's) while the
    block runs; the queue's sampler, None when metrics are off."""
    if not settings.metrics_enabled:
        yield None
        return
    stop = watch(worker)
    try:
        yield QueueSampler(worker.queue, settings.metrics_refresh_seconds)
    finally:
        stop()


@contextlib.asynccontextmanager
async def worker_metrics(worker: Worker, settings: Settings) -> AsyncIterator[int | None]:
    """`gateway worker`'s gauges, and its endpoint when `GATEWAY_METRICS_PORT` is set
    (its `/healthz` too, which the image's health check reads: served with metrics off
    as well); yields the port it serves on, or None."""
    async with watching(worker, settings) as sampler:
        if settings.metrics_port is None:
            yield None
            return
        async with worker_endpoint(settings, sampler) as port:
            served = PATH if sampler is not None else "/healthz"
            log.info("metrics served", url=f"http://{settings.host}:{port}{served}")
            yield port


# -- the endpoints -----------------------------------------------------------------------


def authorized(token: str | None, header: str | None) -> bool:
    """No token configured, or `Authorization: Bearer TOKEN` (compared in constant time)."""
    if not token:
        return True
    given = api_key_from({"authorization": header})  # a Bearer credential, as everywhere
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def refusal() -> Response:
    error = Unauthenticated("GET /metrics needs Authorization: Bearer GATEWAY_METRICS_TOKEN")
    error.headers = {"WWW-Authenticate": 'Bearer realm="metrics"'}
    return rest.error_response(error)


class MetricsEndpoint:
    """`GET /metrics` of `gateway serve` (an ASGI app for a Starlette `Route`): the Redis
    gauges refreshed if due, then prometheus-client's exposition (text format, or
    OpenMetrics when asked; gzip when accepted)."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.exposition = make_asgi_app(REGISTRY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
        if not authorized(self.token, header):
            await refusal()(scope, receive, send)
            return
        sampler = getattr(scope["app"].state, "metrics", None)  # set by the app's lifespan
        if sampler is not None:
            await sampler.refresh()
        await self.exposition(scope, receive, send)


def _wsgi_answer(response: Response, start_response: Callable[..., Any]) -> Iterable[bytes]:
    status = f"{response.status_code} {HTTPStatus(response.status_code).phrase}"
    start_response(status, [(k.decode(), v.decode()) for k, v in response.raw_headers])
    return [bytes(response.body)]


def worker_app(
    token: str | None, refresh: Callable[[], None] | None, alive: Callable[[], bool]
) -> Callable[..., Iterable[bytes]]:
    """The WSGI app `gateway worker` serves: `GET /metrics` (404 with metrics off:
    `refresh` None), and `GET /healthz` (200 while its event loop answers, for a
    container's health check), errors in the REST shape."""
    exposition = make_wsgi_app(REGISTRY)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz" and environ["REQUEST_METHOD"] == "GET":
            ok = alive()
            body = {"status": "ok" if ok else "unavailable"}
            answer = rest.ORJSONResponse(body, status_code=200 if ok else 503)
            return _wsgi_answer(answer, start_response)
        if environ.get("PATH_INFO") != PATH or refresh is None:
            error: GatewayError = NotFound(f"no route {environ.get('PATH_INFO')}")
            return _wsgi_answer(rest.error_response(error), start_response)
        if environ["REQUEST_METHOD"] != "GET":
            error = MethodNotAllowed(f"{environ['REQUEST_METHOD']} is not allowed on {PATH}")
            error.headers = {"Allow": "GET"}
            return _wsgi_answer(rest.error_response(error), start_response)
        if not authorized(token, environ.get("HTTP_AUTHORIZATION")):
            return _wsgi_answer(refusal(), start_response)
        refresh()
        return exposition(environ, start_response)

    return app


#: The worker's endpoint serves a scraper and a health check, a thread a connection: this
#: many connections at once, this many from one address (more are closed unanswered),
#: each request to have arrived whole within this many seconds however slowly it comes
#: (a client that connects and sends nothing, or a byte at a time, held a thread for
#: ever; a few such could otherwise hold the health check away from the probes).
WORKER_CONNECTIONS = 64
WORKER_CONNECTIONS_PER_ADDRESS = 4
WORKER_REQUEST_SECONDS = 5.0


class _UntilIO(socket.SocketIO):
    """A connection's reads, each given only what is left of the request's time."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__(sock, "rb")
        self.sock, self.deadline = sock, deadline

    def readinto(self, b: Any) -> int | None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        return super().readinto(b)


class _Quiet(WSGIRequestHandler):
    def setup(self) -> None:
        super().setup()
        deadline = time.monotonic() + WORKER_REQUEST_SECONDS
        self.rfile = io.BufferedReader(_UntilIO(self.connection, deadline))

    def parse_request(self) -> bool:
        """The request's head read: the answer's writes get their own bound, not what
        was left of the reading's."""
        parsed = super().parse_request()
        self.connection.settimeout(WORKER_REQUEST_SECONDS)
        return parsed

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing: a scrape every few seconds is not news."""


class _Bounded(ThreadingWSGIServer):
    """A thread a connection, within WORKER_CONNECTIONS, WORKER_CONNECTIONS_PER_ADDRESS."""

    request_queue_size = WORKER_CONNECTIONS  # the listen backlog (socketserver's: 5)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.held: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        with self.lock:
            full = self.held.total() >= WORKER_CONNECTIONS
            if full or self.held[address] >= WORKER_CONNECTIONS_PER_ADDRESS:
                self.shutdown_request(request)
                return
            self.held[address] += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(str(client_address[0]))

    def _release(self, address: str) -> None:
        with self.lock:
            self.held[address] -= 1
            if self.held[address] <= 0:
                del self.held[address]

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client too slow, or gone: not worth a traceback."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@contextlib.asynccontextmanager
async def worker_endpoint(
    settings: Settings, sampler: QueueSampler | None, host: str | None = None
) -> AsyncIterator[int]:
    """Serve the worker's `GET /metrics` (None: metrics off) and `/healthz` on
    `GATEWAY_HOST:GATEWAY_METRICS_PORT` from a thread (the scrape's Redis read runs on
    this event loop); yields the port."""
    assert settings.metrics_port is not None
    loop = asyncio.get_running_loop()
    token = settings.metrics_token.get_secret_value() if settings.metrics_token else None

    def refresh(sampler: QueueSampler) -> None:
        future = asyncio.run_coroutine_threadsafe(sampler.refresh(), loop)
        try:
            future.result(REFRESH_WAIT)
        except concurrent.futures.TimeoutError:
            pass  # a slow Redis: answer with the last figures
        except Exception:
            log.exception("metrics: the gauges could not be refreshed")  # the rest still

    def alive() -> bool:
        """The worker's event loop runs a step in time: it is not stuck."""
        future = asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop)
        try:
            future.result(ALIVE_WAIT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False
        return True

    host = host or settings.host
    family = socket.getaddrinfo(host, settings.metrics_port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Bounded):
        address_family = family

    try:
        server = make_server(
            host,
            settings.metrics_port,
            worker_app(token, functools.partial(refresh, sampler) if sampler else None, alive),
            Server,
            handler_class=_Quiet,
        )
    except OSError as exc:  # the port is taken (each worker on a host needs its own)
        raise SystemExit(
            f"cannot serve metrics on {host}:{settings.metrics_port} "
            f"(GATEWAY_HOST, GATEWAY_METRICS_PORT): {exc}"
        ) from None
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    try:
        yield int(server.server_port)
    finally:
        await asyncio.to_thread(server.shutdown)
        server.server_close()
