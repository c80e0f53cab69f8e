"""What logs and traces know of the work at hand (docs/api.md#logs-and-traces).

Logs: structlog's context variables carry `request_id`, `job_id` and `account` into every
line logged while a request or a job runs; `note()` adds what becomes known part way
(the account once authenticated, the job once admitted), to the request's own log line
too (`gateway/telemetry_http.py` writes it).

Traces: OpenTelemetry, on when the standard `OTEL_*` variables ask for it
(`configure_from_env`, called by `gateway serve` and `gateway worker`), off by default.
Off, nothing here calls OpenTelemetry: `ENABLED` is read once at each place that would
trace (the request's span, admission, an upstream call, a stored output, a webhook), and
the SDK is not even imported. A job's spans hang under the admission span of the request
that made it: its W3C `traceparent` is kept in the job record (`Job.trace`, written only
when tracing is on), and the worker and the webhook deliverer start from it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

#: Tracing is on (read at each place that traces; False: no OpenTelemetry call at all).
ENABLED = False
_tracer: Tracer | None = None
_provider: TracerProvider | None = None

_log = structlog.get_logger("gateway")

SERVICE_NAME = "image-gateway"  # the service's name in traces when OTEL_SERVICE_NAME is unset

# -- request ids and the log context ---------------------------------------------------

#: a client's `X-Request-Id` is kept when it is this (else a new one is made)
REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")

#: the fields of the request being answered (its log line is written from them)
_REQUEST: ContextVar[dict[str, Any] | None] = ContextVar("gateway_request", default=None)
#: structlog's own variables for the fields of the log context, the ones
#: `bind_contextvars(name=...)` sets (set here once to `...`, which structlog takes for
#: unset), to set them directly
_VARS: dict[str, ContextVar[Any]] = {
    name: token.var
    for name, token in structlog.contextvars.bind_contextvars(
        request_id=..., account=..., job_id=...
    ).items()
}
_REQUEST_ID = _VARS["request_id"]


def request_id(given: bytes | None) -> str:
    """The client's id when it is a sane token (at most 128 of `[A-Za-z0-9._-]`), else
    a new one: 24 hex digits (96 random bits: unique, not a secret, so not the system's
    randomness, a syscall per request)."""
    if given is not None and REQUEST_ID.fullmatch(given):
        return given.decode("ascii")
    return random.getrandbits(96).to_bytes(12).hex()


def open_request(rid: str) -> tuple[dict[str, Any], Any]:
    """The log context of one request: `request_id` bound for every line logged until
    `close_request`; the request's fields (which `note()` fills in) and what closes it.
    Two calls, not a context manager: this runs on every request."""
    fields: dict[str, Any] = {"request_id": rid}
    return fields, (_REQUEST.set(fields), _REQUEST_ID.set(rid))


def close_request(tokens: Any) -> None:
    _REQUEST.reset(tokens[0])
    _REQUEST_ID.reset(tokens[1])


def note(**fields: str) -> None:
    """What became known of the request or job at hand (`account`, `job_id`: the fields
    of the log context): on every line logged after it in this task, and on the
    request's own line. Never a key, a token or a prompt."""
    current = _REQUEST.get()
    if current is not None:  # seen by the request's line, from whichever task notes it
        current.update(fields)
    for name, value in fields.items():
        _VARS[name].set(value)


# -- background loops ----------------------------------------------------------------------


class Streak:
    """A background loop's failures in a row (Redis away, say): the first is logged
    (`WHAT failed`), then one line a minute while they last, each with the count so far,
    and one when the loop works again (`WHAT recovered`). Every failure logged would be
    thousands of lines an hour per loop, burying the one that says why."""

    def __init__(self, what: str, every: float = 60.0) -> None:
        self.what = what
        self.every = every
        self.failures = 0
        self.logged = 0.0

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        now = time.monotonic()
        if self.failures == 1 or now - self.logged >= self.every:
            self.logged = now
            _log.warning(f"{self.what} failed", error=str(exc), failures=self.failures)

    def ok(self) -> None:
        if self.failures:
            _log.info(f"{self.what} recovered", failures=self.failures)
            self.failures = 0


# -- traces ------------------------------------------------------------------------------


def configure_from_env(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn tracing on when the standard variables ask for it: `OTEL_TRACES_EXPORTER`
    (`otlp`, `console`, or `none`), or else an `OTEL_EXPORTER_OTLP_ENDPOINT` (or its
    `_TRACES_` form) alone; never with `OTEL_SDK_DISABLED=true`. The OTLP exporter speaks
    HTTP/protobuf and reads its own variables (endpoint, headers, timeout); the SDK reads
    `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and the batch
    processor's. True when tracing is on."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = environ.get("OTEL_TRACES_EXPORTER") or None  # empty: unset, as the SDK reads it
    if names is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        names = "otlp" if endpoint else "none"
    wanted = [n.strip().lower() for n in names.split(",") if n.strip().lower() not in ("", "none")]
    if not wanted:
        return False

    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    exporters: list[SpanExporter] = []
    for name in wanted:
        if name == "otlp":
            protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol.strip() != "http/protobuf":
                raise ValueError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: the gateway exports traces "
                    "over OTLP's http/protobuf only (point it at the collector's 4318 port)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name}: known are otlp, console and none")
    named = bool(environ.get("OTEL_SERVICE_NAME")) or "service.name=" in environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": SERVICE_NAME})
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    enable(provider)
    return True


def enable(provider: TracerProvider) -> None:
    """Trace into `provider` (tests give one with an in-memory exporter). The gateway's
    own tracer: OpenTelemetry's global provider is left alone."""
    global ENABLED, _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("gateway")
    ENABLED = True


def disable() -> None:
    """Stop tracing; spans still buffered are exported first."""
    global ENABLED, _tracer, _provider
    ENABLED = False
    _tracer = None
    if _provider is not None:
        _provider.shutdown()
    _provider = None


def _parent(traceparent: str | None) -> Any:
    """The context a `traceparent` names (None: the current one)."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


def extract(headers: Mapping[str, str]) -> Any:
    """The context a request's headers carry (`traceparent`, through the propagators
    of `OTEL_PROPAGATORS`)."""
    from opentelemetry.propagate import extract as extracting

    return extracting(headers)


def inject(headers: dict[str, str]) -> None:
    """Add the current span's `traceparent` (and the propagators' other headers)."""
    from opentelemetry.propagate import inject as injecting

    injecting(headers)


def traceparent() -> str | None:
    """The current span's `traceparent` while tracing, else None (to store in a job)."""
    if not ENABLED:
        return None
    carrier: dict[str, str] = {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(carrier)
    return carrier.get("traceparent")


_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()  # reusable: it holds nothing


def span(
    name: str,
    *,
    parent: str | None = None,
    context: Any = None,
    kind: str = "internal",
    attributes: Mapping[str, Any] | None = None,
) -> contextlib.AbstractContextManager[Span | None]:
    """A span around the block while tracing (yields it), else nothing at all (yields
    None). `parent`: a stored `traceparent` to start from; `context`: an extracted one;
    `kind`: internal, server or client."""
    if not ENABLED or _tracer is None:
        return _NO_SPAN
    from opentelemetry.trace import SpanKind

    return _tracer.start_as_current_span(
        name,
        context=context if context is not None else _parent(parent),
        kind=SpanKind[kind.upper()],
        attributes=attributes,
    )


def failed(description: str, span: Span | None = None) -> None:
    """Mark `span` (by default the current one) an error while tracing: a 5xx answer, a
    failed job, with no exception raised."""
    if not ENABLED:
        return
    from opentelemetry.trace import Status, StatusCode, get_current_span

    (span or get_current_span()).set_status(Status(StatusCode.ERROR, description))
