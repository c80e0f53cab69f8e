"""Micro-benchmarks, run by `python -m bench` (`make bench`).

A scenario is an async function `(ctx: Context) -> list[Row]` registered with
`@scenario("name")` in a module listed in `MODULES`; it measures against the private
redis-server the runner starts on a free port (never the developer's own Redis). Add a
scenario by writing such a function; add a module by appending it to `MODULES`.

A scenario may return rows of its own dataclass instead of `Row` (the HTTP scenarios do):
register how to print them with `@renderer(ThatRow)`; the runner prints one table per
kind of row. Such a row needs a `rates` list (one entry per timed round).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, ConnectionPool

MODULES = [
    "bench.admission",
    "bench.http",
    "bench.openai_route",
    "bench.browser_route",
    "bench.upstream",
    "bench.scale",
    "bench.metrics",
    "bench.memory",
    "bench.job_cost",
    "bench.request_cost",
]


@dataclass
class Context:
    redis_url: str
    rounds: int = 5
    quick: bool = False  # fewer operations per round (a smoke run)
    duration: int = 5  # seconds of load per timed HTTP round (whole: wrk takes no fractions)

    def timed(self) -> tuple[int, int]:
        """Timed rounds and seconds of load each (a smoke run: at most 2 of 2 s)."""
        if self.quick:
            return min(self.rounds, 2), min(self.duration, 2)
        return self.rounds, self.duration


@dataclass
class Row:
    scenario: str
    case: str
    rates: list[float]  # operations per second, one per round
    round_trips: float  # client->Redis round trips per operation
    redis_commands: float  # commands Redis executed per operation (inside scripts too)
    redis_usec: float  # Redis's time per operation (its busy time: the server's ceiling)
    notes: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


Scenario = Callable[[Context], Awaitable[list[Any]]]
Renderer = Callable[[list[Any], int], str]


@dataclass
class Registry:
    scenarios: dict[str, Scenario] = field(default_factory=dict)
    renderers: dict[type, Renderer] = field(default_factory=dict)


REGISTRY = Registry()


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        REGISTRY.scenarios[name] = fn
        return fn

    return register


def renderer(kind: type) -> Callable[[Renderer], Renderer]:
    """How to print rows of `kind`: `(rows, rounds) -> text`."""

    def register(fn: Renderer) -> Renderer:
        REGISTRY.renderers[kind] = fn
        return fn

    return register


def render(rows: list[Any], rounds: int) -> str:
    """One table per kind of row, in the order the kinds first appear."""
    kinds: dict[type, list[Any]] = {}
    for row in rows:
        kinds.setdefault(type(row), []).append(row)
    return "\n\n".join(
        REGISTRY.renderers.get(kind, table)(group, rounds) for kind, group in kinds.items()
    )


# -- a private redis-server --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def idle_polling(on: bool) -> Iterator[None]:
    """With `on`, every idle CPU polls instead of halting while this is held: a CPU
    latency request of 0 µs (Linux's PM QoS, /dev/cpu_dma_latency, kept while the file
    is open; root only), as latency-tuned machines hold. On a VM whose kernel does not
    poll before halting (BENCHMARKS.md, "Machine and software"), a halted vCPU is woken
    through the host, and a lone request pays that at each hop."""
    if not on:
        yield
        return
    try:
        fd = os.open("/dev/cpu_dma_latency", os.O_WRONLY)
    except OSError as exc:
        raise SystemExit(f"--idle-poll: cannot hold /dev/cpu_dma_latency: {exc}") from None
    try:
        os.write(fd, struct.pack("i", 0))
        yield
    finally:
        os.close(fd)  # the request ends with the file


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free loopback port (no persistence); its URL."""
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is not installed (make redis-server installs it)")
    port = free_port()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                workdir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            client = redis.Redis(port=port)
            deadline = time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            proc.wait(10)


# -- counting round trips -----------------------------------------------------------------


class CountingConnection(Connection):
    """Counts what the client sends: each send is one round trip (a pipeline is one)."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        await super().send_packed_command(command, check_health)


def counting_client(redis_url: str) -> aioredis.Redis:
    pool = ConnectionPool.from_url(
        redis_url, decode_responses=True, connection_class=CountingConnection
    )
    return aioredis.Redis(connection_pool=pool)


@dataclass(frozen=True)
class CommandStats:
    """Redis's own count of each command executed (scripts' inner calls included) and
    the microseconds spent in it (a script's time includes its inner calls')."""

    calls: dict[str, int]
    usec: dict[str, int]

    def __sub__(self, before: CommandStats) -> CommandStats:
        return CommandStats(
            {k: v - before.calls.get(k, 0) for k, v in self.calls.items()},
            {k: v - before.usec.get(k, 0) for k, v in self.usec.items()},
        )

    def __add__(self, other: CommandStats) -> CommandStats:
        names = set(self.calls) | set(other.calls)
        return CommandStats(
            {k: self.calls.get(k, 0) + other.calls.get(k, 0) for k in names},
            {k: self.usec.get(k, 0) + other.usec.get(k, 0) for k in names},
        )

    def without(self, *names: str) -> CommandStats:
        return CommandStats(
            {k: v for k, v in self.calls.items() if k not in names},
            {k: v for k, v in self.usec.items() if k not in names},
        )


EMPTY_STATS = CommandStats({}, {})
TOP_LEVEL = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")


async def command_stats(client: aioredis.Redis) -> CommandStats:
    stats = await client.info("commandstats")
    return CommandStats(
        {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()},
        {name.removeprefix("cmdstat_"): int(v["usec"]) for name, v in stats.items()},
    )


# -- output -------------------------------------------------------------------------------


def table(rows: list[Row], rounds: int) -> str:
    head = (
        "scenario",
        "case",
        f"ops/s (median of {rounds})",
        "min..max",
        "round trips/op",
        "Redis cmds/op",
        "Redis µs/op",
        "notes",
    )
    body = [
        (
            r.scenario,
            r.case,
            f"{r.median:,.0f}",
            f"{min(r.rates):,.0f}..{max(r.rates):,.0f}",
            f"{r.round_trips:.2f}",
            f"{r.redis_commands:.1f}",
            f"{r.redis_usec:.0f}",
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(str(line[i])) for line in (head, *body)) for i in range(len(head))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if 2 <= i <= 6 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(head), rule, *(fmt(line) for line in body)])
