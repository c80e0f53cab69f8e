"""HTTP throughput of the served gateway, as a ratio against framework floors.

Everything runs as real processes on 127.0.0.1: the runner's private redis-server, the
gateway (`gateway serve`, with `GATEWAY_INPROCESS_WORKERS=0` so only the API path is
measured and jobs stay queued), and two floors from `bench/floors.py` served by uvicorn
the same way (one worker, uvloop and httptools). Load comes from wrk
(`wrk -t2 -c64 -d5s --timeout=10s -s CASE.lua --latency URL`); its Lua script sets the
POST body and headers and prints the exact counts and percentiles when done.

Each measured server (the gateway, the floors, the peer) runs alone on the last CPU
(`taskset`), wrk, redis-server and the bench on the others (`one_core_for_the_server`);
`BENCH_SHARED_CORES=1` runs everything on every CPU instead (the second view).

Cases, round-robin within each round (the median of the rounds is reported):
- floor: starlette   a bare Starlette JSON POST route
- floor: strawberry  a trivial Strawberry `generate` mutation (ParserCache +
                     ValidationCache), sent the very document the gateway gets
- gateway: generate  Doitong's `generate` mutation (README's first request), provider "local"
- gateway: REST      `POST /v1/text_to_image`
- gateway: job       the `job` query the shipped polling client sends, one job id
- gateway: cache miss the same seeded `generate` with a seed no request had (wrk's Lua
                     counts one up per request): looked up, not found, admitted to run
- gateway: cache hit the `generate` of a seeded request already completed once (a worker
                     runs it before the rounds): answered from the cache, cost 0
- gateway: REST cache hit  the same picture asked over `POST /v1/text_to_image`: answered
                     from the cache (200, `metadata.cached`)
- openai: cache hit  the same picture over OpenAI's `POST /v1/images/generations`
- gateway: REST job  `GET /v1/jobs/{id}` of the job the `job` case polls
- gateway: job, APQ GET  the `job` case as an automatic persisted query, its hash alone
                     over GET (as Apollo Client's persisted-query link sends it)
- krea: job          the same job over the Krea-compatible `GET /compat/krea/jobs/{id}`
- peer: litellm      optional: a LiteLLM proxy's image request to a fake upstream that
                     answers at once (`bench/peer.py`); skipped, saying why, when LiteLLM
                     does not install

After the rounds, the bare route and the REST cache hit are sent over one connection
(`wrk -t1 -c1`, three runs each, interleaved): the latency a lone client sees.

Per case: requests/s, p50 and p99 latency, server CPU per request (utime + stime of the
serving process from /proc/PID/stat), Redis's CPU and commands per request (its
/proc/PID/stat and `INFO commandstats`), and the process's RSS (VmRSS) at rest after
the load. Server-side figures are read once the server is idle again and divided by the
requests it handled: those wrk completed plus the one each of its connections still had
in flight when it stopped (a saturated server has one queued for every connection).

The gateway's enterprise key has a huge balance and no limits, and its per-key read limit
is raised (`GATEWAY_READ_RPM`) so that polling at full speed is measured, not refused.

Scenario `apq` (`python -m bench apq`; the gateway alone, no floors): `gateway: job`
against `gateway: job, APQ GET`, the same document as an automatic persisted query, its
hash alone over GET (registered once before), as Apollo Client's persisted-query link
sends it with `useGETForHashedQueries`; interleaved in each round like the cases above.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import redis.asyncio as aioredis

from bench import Context, command_stats, free_port, peer, renderer, scenario
from bench.serving import (
    BIN,
    ROOT,
    Server,
    cpu_seconds,
    floor,
    loop_and_parser,
    one_core_for_the_server,
    spawn,
    stop,
)
from bench.serving import status_kb as status_kb  # bench/scale.py imports it from here
from gateway.store import keys

THREADS, CONNECTIONS = 2, 64
QUIET = 0.15  # seconds without CPU use that mean a server is idle
TIMEOUT = 10  # wrk's default (2 s) would drop the slowest answers from the percentiles
HUGE_CREDITS = 1_000_000_000

GENERATE = (
    "mutation Generate($input: GenerateInput!) { generate(input: $input) "
    "{ id status type provider url metadata creditCost } }"
)
GENERATE_VARIABLES: dict[str, Any] = {
    "input": {
        "type": "IMAGE",
        "provider": "local",
        "input": {"text": "A futuristic city with flying cars and neon lights"},
        "options": {"width": 1024, "height": 1024},
    }
}
TEXT_TO_IMAGE = {
    "service": "local",
    "prompt": "A futuristic city with flying cars and neon lights",
    "width": 1024,
    "height": 1024,
}
CACHEABLE_VARIABLES: dict[str, Any] = {
    "input": {
        **GENERATE_VARIABLES["input"],
        "options": {**GENERATE_VARIABLES["input"]["options"], "seed": 7},
    }
}  # a seed: the same picture
#: the same picture over OpenAI's images route (docs/api.md#openai)
OPENAI_CACHEABLE = {
    "model": "local",
    "prompt": CACHEABLE_VARIABLES["input"]["input"]["text"],
    "size": "1024x1024",
    "seed": CACHEABLE_VARIABLES["input"]["options"]["seed"],
}
# What `gateway generate` sends while it waits (gateway/cli.py, POLL).
POLL = "query($id: ID!) { job(id: $id) { id status url error metadata } }"

STARLETTE, STRAWBERRY = "floor: starlette", "floor: strawberry"
GENERATE_CASE, REST_CASE, JOB_CASE = "gateway: generate", "gateway: REST", "gateway: job"
REST_HIT_CASE = "gateway: REST cache hit"
OPENAI_HIT_CASE, REST_JOB_CASE, KREA_JOB_CASE = (
    "openai: cache hit",
    "gateway: REST job",
    "krea: job",
)
MISS_CASE, CACHE_CASE, PEER = "gateway: cache miss", "gateway: cache hit", "peer: litellm"
APQ_CASE = "gateway: job, APQ GET"
# (case, its reference, the share of the reference's req/s the issue asks for, or None)
TARGETS = [
    (GENERATE_CASE, STRAWBERRY, 0.80),
    (REST_CASE, STARLETTE, 0.50),
    (REST_HIT_CASE, STARLETTE, 0.50),
    (JOB_CASE, STRAWBERRY, 1.5),
    (APQ_CASE, STRAWBERRY, 1.5),
    (REST_JOB_CASE, STARLETTE, 0.50),
    (KREA_JOB_CASE, STARLETTE, 0.50),
    (OPENAI_HIT_CASE, REST_HIT_CASE, 0.90),
    (CACHE_CASE, MISS_CASE, 1.0),
    (CACHE_CASE, GENERATE_CASE, None),
    (GENERATE_CASE, PEER, 25.0),
]
RSS_TARGET_MB = 100
# each request of these makes a job
GENERATIONS = (GENERATE_CASE, REST_CASE, MISS_CASE, CACHE_CASE, REST_HIT_CASE, OPENAI_HIT_CASE)


# -- processes -------------------------------------------------------------------------------


def gateway_env(redis_url: str, port: int, storage: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(port),
        GATEWAY_STORAGE_DIR=str(storage),
        GATEWAY_INPROCESS_WORKERS="0",
        GATEWAY_READ_RPM=str(10**9),
    )
    return env


def gateway_binary() -> str:
    candidate = BIN / "gateway"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("gateway")
    if not found:
        raise SystemExit("the `gateway` console script is not installed (make installs it)")
    return found


def create_key(redis_url: str, storage: Path) -> dict[str, Any]:
    out = subprocess.run(
        [
            gateway_binary(),
            "keys",
            "create",
            "--plan",
            "enterprise",
            "--credits",
            str(HUGE_CREDITS),
            "--name",
            "bench",
            "--json",
        ],
        env=gateway_env(redis_url, 0, storage),
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"gateway keys create failed:\n{out.stdout}{out.stderr}")
    made: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return made


@contextlib.contextmanager
def servers(
    redis_url: str, gateway_only: bool = False, prefix: list[str] | None = None
) -> Iterator[tuple[dict[str, Server], dict[str, Any], Path, str]]:
    """The gateway, the floors and the peer when it runs; the last item says why the
    peer does not ("" when it does). `gateway_only`: no floors, no peer. `prefix`: what
    runs each measured server (`taskset`: `one_core_for_the_server`)."""
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        workdir = Path(tmp)
        storage = workdir / "outputs"
        started: dict[str, Server] = {}
        try:
            made = create_key(redis_url, storage)
            port = free_port()
            started["gateway"] = spawn(
                "gateway",
                [*(prefix or []), gateway_binary(), "serve"],
                gateway_env(redis_url, port, storage),
                port,
                workdir,
            )
            if gateway_only:
                yield started, made, workdir, "not asked for"
                return
            started[STARLETTE] = floor(STARLETTE, "starlette_app", workdir, prefix)
            started[STRAWBERRY] = floor(STRAWBERRY, "strawberry_app", workdir, prefix)
            peers, why_not = peer.start(workdir, prefix)
            for server in peers:
                started[server.name] = server
            yield started, made, workdir, why_not
        finally:
            for server in reversed(started.values()):
                server.stop()


def complete_one(
    redis_url: str,
    storage: Path,
    client: httpx.Client,
    gateway: Server,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Run one generation to its end with a worker process, so the next is a cache hit."""
    job = client.post(gateway.url("/graphql"), content=body, headers=headers).json()
    job_id = job["data"]["generate"]["id"]
    with (storage.parent / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [gateway_binary(), "worker"],
            env=gateway_env(redis_url, 0, storage),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        poll = json.dumps({"query": POLL, "variables": {"id": job_id}}).encode()
        deadline = time.monotonic() + 60
        while True:
            answer = client.post(gateway.url("/graphql"), content=poll, headers=headers).json()
            status = answer["data"]["job"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled") or time.monotonic() > deadline:
                raise SystemExit(f"the job to cache ended {status}: {answer}")
            time.sleep(0.05)
    finally:
        stop(worker)


# -- wrk --------------------------------------------------------------------------------------

DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRKJSON {\\"requests\\": %d, \\"duration_us\\": %d, " ..
    "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, " ..
    "\\"timeout\\": %d, \\"p50_us\\": %.0f, \\"p99_us\\": %.0f}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


# Each request with a seed of its own: `SEED` in the body becomes a number that no other
# request of the run had (each wrk thread counts up from its own base; `first` moves the
# bases on between runs).
FRESH_SEEDS = """
local threads = 0
setup = function(thread)
  threads = threads + 1
  thread:set("base", FIRST + threads * 1000000)
end
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(template, base + counter))
end
"""
SEED = "SEED"


def lua_script(
    body: bytes, headers: dict[str, str], first: int | None = None, method: str = "POST"
) -> str:
    """wrk's script for one case; with `first`, `"SEED"` in the body is a fresh seed.
    A GET sends no body (its request is in the URL)."""
    text = body.decode()
    assert "]==]" not in text
    lines = [f'wrk.method = "{method}"']
    if method != "GET":
        lines.append(f"wrk.body = [==[{text}]==]")
    for name, value in headers.items():
        lines.append(f'wrk.headers["{name}"] = "{value}"')
    if first is not None:
        assert "%" not in text
        template = text.replace(f'"{SEED}"', "%d")
        lines += [f"template = [==[{template}]==]", FRESH_SEEDS.replace("FIRST", str(first))]
    return "\n".join(lines) + "\n" + DONE


@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: int  # non-2xx/3xx answers, plus socket errors
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


async def fresh_redis(ctx: Context) -> tuple[aioredis.Redis, int]:
    """A client of the runner's Redis, emptied, and the server's pid (its CPU is read from
    /proc)."""
    admin = aioredis.Redis.from_url(ctx.redis_url, decode_responses=True)
    await admin.flushall()
    return admin, redis_pid_of(await admin.info("server"))


async def warmed_rows(cases: list[Case], workdir: Path) -> dict[str, HttpRow]:
    """A row per case, each case sent for a second first: connection pools filled, caches
    hot."""
    rows = {
        case.name: HttpRow(case.name, loaded=loop_and_parser(case.server.pid)) for case in cases
    }
    for case in cases:
        case.write_script(workdir)
        await wrk(case.server.url(case.path), case.script, 1)
    return rows


async def wrk(
    url: str, script: Path, seconds: float, threads: int = THREADS, connections: int = CONNECTIONS
) -> WrkResult:
    binary = shutil.which("wrk")
    if not binary:
        raise SystemExit("wrk is not installed (make bench installs it: apt-get install wrk)")
    proc = await asyncio.create_subprocess_exec(
        binary,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={TIMEOUT}s",
        "-s",
        str(script),
        "--latency",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    match = re.search(r"^WRKJSON (\{.*\})$", text, re.MULTILINE)
    if proc.returncode != 0 or not match:
        raise SystemExit(f"wrk failed ({proc.returncode}):\n{text}")
    r = json.loads(match.group(1))
    return WrkResult(
        requests=r["requests"],
        seconds=r["duration_us"] / 1e6,
        errors=r["status"] + r["connect"] + r["read"] + r["write"] + r["timeout"],
        p50_ms=r["p50_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
    )


# -- cases --------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    server: Server
    path: str
    body: bytes
    headers: dict[str, str]
    expect: int  # the status a correct answer has
    fresh_seeds: bool = False  # each request a seed of its own (`SEED` in the body)
    method: str = "POST"  # GET: `path` carries the request, `body` is empty
    script: Path = field(init=False)
    runs: int = field(default=0, init=False)

    def write_script(self, workdir: Path) -> None:
        """Before each wrk run: a case with fresh seeds starts where no run has been."""
        self.script = workdir / f"{self.name.replace(' ', '_').replace(':', '')}.lua"
        self.runs += 1
        first = self.runs * 10_000_000 if self.fresh_seeds else None
        self.script.write_text(lua_script(self.body, self.headers, first, self.method))

    def check(self, client: httpx.Client) -> dict[str, Any]:
        """One request by hand: the answer must be the right one, not an error."""
        sent = self.body.replace(f'"{SEED}"'.encode(), b"1") if self.fresh_seeds else self.body
        response = client.request(
            self.method, self.server.url(self.path), content=sent or None, headers=self.headers
        )
        body: dict[str, Any] = response.json()
        if response.status_code != self.expect or body.get("errors") or body.get("error"):
            raise SystemExit(f"{self.name}: {response.status_code} {response.text[:500]}")
        return body


@dataclass
class HttpRow:
    case: str
    rates: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)  # server CPU per request
    cpu_share: list[float] = field(default_factory=list)  # server CPU / wall time
    redis_us: list[float] = field(default_factory=list)  # redis-server CPU per request
    redis_cmds: list[float] = field(default_factory=list)  # commands executed per request
    commands: dict[str, int] = field(default_factory=dict)  # summed over the rounds
    counted: int = 0  # the requests of those rounds (`commands` per request: the notes)
    requests: int = 0  # completed, as wrk counted them
    handled: int = 0  # completed, plus those in flight when wrk stopped (any run)
    errors: int = 0
    rss_mb: float = 0.0  # at rest after the load
    loaded: str = ""  # event loop + HTTP parser the server runs
    summary: list[str] = field(default_factory=list)  # lines printed under the table

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


async def wait_idle(pid: int, timeout: float = 10.0) -> None:
    """Until the process has used no CPU for QUIET seconds (clock ticks are 10 ms)."""
    deadline = time.monotonic() + timeout
    last, quiet = cpu_seconds(pid), 0
    while quiet < 3 and time.monotonic() < deadline:
        await asyncio.sleep(QUIET / 3)
        now = cpu_seconds(pid)
        quiet = quiet + 1 if now == last else 0
        last = now


def redis_pid_of(info: dict[str, Any]) -> int:
    return int(info["process_id"])


async def measure(
    case: Case, row: HttpRow, admin: aioredis.Redis, redis_pid: int, seconds: float
) -> None:
    case.write_script(case.script.parent)
    before_stats = await command_stats(admin)
    cpu0, rcpu0 = cpu_seconds(case.server.pid), cpu_seconds(redis_pid)
    start = time.monotonic()
    result = await wrk(case.server.url(case.path), case.script, seconds)
    await wait_idle(case.server.pid)  # the requests still in flight when wrk stopped
    busy_for = time.monotonic() - start - QUIET
    cpu1, rcpu1 = cpu_seconds(case.server.pid), cpu_seconds(redis_pid)
    stats = (await command_stats(admin) - before_stats).without("info")
    # The server worked for every request wrk completed, and for the one each connection
    # still had in flight when wrk stopped (the server is saturated, so each had one).
    n = result.requests + CONNECTIONS
    row.rates.append(result.rate)
    row.p50.append(result.p50_ms)
    row.p99.append(result.p99_ms)
    row.cpu_ms.append((cpu1 - cpu0) * 1000 / n)
    row.cpu_share.append((cpu1 - cpu0) / busy_for)
    row.redis_us.append((rcpu1 - rcpu0) * 1e6 / n)
    row.redis_cmds.append(sum(stats.calls.values()) / n)
    for name, calls in stats.calls.items():
        if calls:
            row.commands[name] = row.commands.get(name, 0) + calls
    row.counted += n
    row.requests += result.requests
    row.handled += n
    row.errors += result.errors


LONE_ROUNDS, LONE_SECONDS, LONE_TARGET_MS = 3, 3, 0.2


async def one_connection(cases: list[Case], rows: dict[str, HttpRow]) -> str:
    """The REST cache hit's p50 latency over one connection against the bare route's
    (`wrk -t1 -c1`, rounds interleaved): what a lone client waits beyond the floor.
    The requests are counted in `rows` (`requests`, `handled`): each makes a job."""
    p50: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(LONE_ROUNDS):
        for case in cases:
            case.write_script(case.script.parent)
            result = await wrk(case.server.url(case.path), case.script, LONE_SECONDS, 1, 1)
            if result.errors:
                raise SystemExit(f"{case.name}: {result.errors} errors over one connection")
            p50[case.name].append(result.p50_ms)
            rows[case.name].requests += result.requests
            rows[case.name].handled += result.requests + 1
    bare, hit = (statistics.median(p50[name]) for name in (STARLETTE, REST_HIT_CASE))
    return (
        f"one connection (wrk -t1 -c1, p50, median of {LONE_ROUNDS} runs): {STARLETTE} "
        f"{bare:.3f} ms, {REST_HIT_CASE} {hit:.3f} ms: +{hit - bare:.3f} ms; target "
        f"+{LONE_TARGET_MS} ms: " + ("met" if hit - bare <= LONE_TARGET_MS else "NOT met")
    )


@contextlib.contextmanager
def placed(redis_pid: int) -> Iterator[tuple[list[str], str]]:
    """Each measured server alone on one core (`one_core_for_the_server`), or, with
    BENCH_SHARED_CORES=1, everything sharing every core (the second view)."""
    if os.environ.get("BENCH_SHARED_CORES") == "1":
        yield [], "shared cores: the servers, wrk, redis-server and the bench on every CPU"
        return
    with one_core_for_the_server(redis_pid) as placement:
        yield placement


@scenario("http")
async def http(ctx: Context) -> list[HttpRow]:
    rounds, seconds = ctx.timed()
    warmup = 1
    admin, redis_pid = await fresh_redis(ctx)
    try:
        with (
            placed(redis_pid) as (prefix, placement),
            servers(ctx.redis_url, prefix=prefix) as (procs, made, workdir, peer_missing),
            httpx.Client(timeout=30) as client,
        ):
            gateway = procs["gateway"]
            rss_start = gateway.rss_mb()
            auth = {"Content-Type": "application/json", "Authorization": f"Bearer {made['key']}"}
            plain = {"Content-Type": "application/json"}
            generate = json.dumps({"query": GENERATE, "variables": GENERATE_VARIABLES}).encode()
            rest = json.dumps(TEXT_TO_IMAGE).encode()
            cases = [
                Case(STARLETTE, procs[STARLETTE], "/v1/text_to_image", rest, plain, 202),
                Case(STRAWBERRY, procs[STRAWBERRY], "/graphql", generate, plain, 200),
                Case(GENERATE_CASE, gateway, "/graphql", generate, auth, 200),
                Case(REST_CASE, gateway, "/v1/text_to_image", rest, auth, 202),
            ]
            job_id = cases[2].check(client)["data"]["generate"]["id"]
            poll = json.dumps({"query": POLL, "variables": {"id": job_id}}).encode()
            cases.append(Case(JOB_CASE, gateway, "/graphql", poll, auth, 200))
            cacheable = json.dumps({"query": GENERATE, "variables": CACHEABLE_VARIABLES}).encode()
            complete_one(ctx.redis_url, workdir / "outputs", client, gateway, cacheable, auth)
            fresh = json.dumps(
                {
                    "query": GENERATE,
                    "variables": {
                        "input": {
                            **CACHEABLE_VARIABLES["input"],
                            "options": {**CACHEABLE_VARIABLES["input"]["options"], "seed": SEED},
                        }
                    },
                }
            ).encode()
            cases.append(Case(MISS_CASE, gateway, "/graphql", fresh, auth, 200, fresh_seeds=True))
            cases.append(Case(CACHE_CASE, gateway, "/graphql", cacheable, auth, 200))
            rest_hit = json.dumps({**TEXT_TO_IMAGE, "seed": 7}).encode()  # the same picture
            cases.append(Case(REST_HIT_CASE, gateway, "/v1/text_to_image", rest_hit, auth, 200))
            openai_hit = json.dumps(OPENAI_CACHEABLE).encode()
            krea_job = f"/compat/krea/jobs/{job_id}"
            cases += [
                Case(OPENAI_HIT_CASE, gateway, "/v1/images/generations", openai_hit, auth, 200),
                Case(REST_JOB_CASE, gateway, f"/v1/jobs/{job_id}", b"", auth, 200, method="GET"),
                persisted_poll(client, gateway, made["key"], job_id),
                Case(KREA_JOB_CASE, gateway, krea_job, b"", auth, 200, method="GET"),
            ]
            if PEER in procs:
                cases.append(
                    Case(
                        PEER,
                        procs[PEER],
                        "/v1/images/generations",
                        json.dumps(peer.BODY).encode(),
                        {**plain, "Authorization": f"Bearer {peer.MASTER_KEY}"},
                        200,
                    )
                )
            for case in cases:
                case.write_script(workdir)
                answer = case.check(client)
                if case.name == CACHE_CASE and not answer["data"]["generate"]["metadata"].get(
                    "cached"
                ):
                    raise SystemExit(f"{CACHE_CASE}: not answered from the cache: {answer}")
                if case.name == OPENAI_HIT_CASE and not answer["data"][0]["url"]:
                    raise SystemExit(f"{OPENAI_HIT_CASE}: no image: {answer}")
                if case.name == REST_HIT_CASE and not answer["metadata"].get("cached"):
                    raise SystemExit(f"{REST_HIT_CASE}: not answered from the cache: {answer}")
                if case.name == MISS_CASE and answer["data"]["generate"]["status"] != "queued":
                    raise SystemExit(f"{MISS_CASE}: not admitted to run: {answer}")
            rss_first = gateway.rss_mb()  # at rest, after the first few requests

            rows = {
                case.name: HttpRow(case.name, loaded=loop_and_parser(case.server.pid))
                for case in cases
            }
            # the checks, the job polled and the one cached: (fewest, most) recorded
            generations = [6, 6]
            for case in cases:  # warm-up: connection pools filled, caches hot
                case.write_script(workdir)
                done = await wrk(case.server.url(case.path), case.script, warmup)
                if case.name in GENERATIONS:
                    generations[0] += done.requests
                    generations[1] += done.requests + CONNECTIONS
            for _ in range(rounds):
                for case in cases:
                    await measure(case, rows[case.name], admin, redis_pid, seconds)

            alone = [case for case in cases if case.name in (STARLETTE, REST_HIT_CASE)]
            lone = await one_connection(alone, rows)
            await asyncio.sleep(1.0)  # at rest again
            for case in cases:
                rows[case.name].rss_mb = case.server.rss_mb()
            summary = [
                placement,
                lone,
                f"gateway RSS at rest: {rss_start:.1f} MB after start, {rss_first:.1f} MB after "
                f"its first requests, {gateway.rss_mb():.1f} MB after the load (peak "
                f"{gateway.peak_mb():.1f} MB); target under {RSS_TARGET_MB} MB: "
                + ("met" if gateway.rss_mb() < RSS_TARGET_MB else "NOT met"),
                f"floors at rest after the load: starlette {procs[STARLETTE].rss_mb():.1f} MB, "
                f"strawberry {procs[STRAWBERRY].rss_mb():.1f} MB",
            ]
            for name in GENERATIONS:  # a hit records a job too
                generations[0] += rows[name].requests
                generations[1] += rows[name].handled
            jobs = await admin.zcard(keys.jobs(made["id"]))
            fewest, most = generations
            summary.append(
                f"jobs recorded in Redis: {jobs:,}; expected {fewest:,} (answers wrk received) "
                f"to {most:,} (plus the requests in flight when it stopped): "
                + ("ok" if fewest <= jobs <= most else "MISMATCH")
            )
    finally:
        await admin.flushall()
        await admin.aclose()

    out = list(rows.values())
    if peer_missing:
        summary.append(f"{PEER}: skipped: {peer_missing}")
    for case_name, floor_name, target in TARGETS:
        if floor_name not in rows:
            continue
        share = rows[case_name].median / rows[floor_name].median
        shown = f"{share:.1f}x" if target and target > 1 else f"{share:.0%}"
        goal = f"{target:g}x" if target and target > 1 else f"{target:.0%}" if target else ""
        verdict = (
            ""
            if target is None
            else (f"; target {goal}: " + ("met" if share >= target else "NOT met"))
        )
        relation = "" if target and target > 1 else "of "
        summary.append(f"{case_name}: {shown} {relation}{floor_name}'s req/s{verdict}")
    out[-1].summary = summary
    return out


def persisted_poll(client: httpx.Client, gateway: Server, key: str, job_id: str) -> Case:
    """The `job` poll as an automatic persisted query: registered once (its text and
    hash by POST), then sent as Apollo's link sends it, the hash alone over GET."""
    variables = {"id": job_id}
    sha = hashlib.sha256(POLL.encode()).hexdigest()
    persisted = {"persistedQuery": {"version": 1, "sha256Hash": sha}}
    headers = {"Authorization": f"Bearer {key}"}
    registered = client.post(
        gateway.url("/graphql"),
        json={"query": POLL, "variables": variables, "extensions": persisted},
        headers=headers,
    )
    if registered.status_code != 200 or registered.json().get("errors"):
        raise SystemExit(f"{APQ_CASE}: registering failed: {registered.text[:500]}")
    query = urlencode(
        {
            "variables": json.dumps(variables, separators=(",", ":")),
            "extensions": json.dumps(persisted, separators=(",", ":")),
        }
    )
    return Case(APQ_CASE, gateway, f"/graphql?{query}", b"", headers, 200, method="GET")


def apq_summary(rows: dict[str, HttpRow]) -> list[str]:
    """The persisted GET against the text POST: what each costs the server."""
    if APQ_CASE not in rows or JOB_CASE not in rows:
        return []
    apq, text = rows[APQ_CASE], rows[JOB_CASE]
    apq_cpu, text_cpu = statistics.median(apq.cpu_ms), statistics.median(text.cpu_ms)
    return [
        f"{APQ_CASE}: {apq_cpu:.3f} ms CPU/req against the text POST's {text_cpu:.3f} "
        f"({apq_cpu / text_cpu:.0%}), {apq.median / text.median:.0%} of its req/s; "
        "target no more CPU: " + ("met" if apq_cpu <= text_cpu else "NOT met")
    ]


@scenario("apq")
async def apq(ctx: Context) -> list[HttpRow]:
    """The `job` poll as text over POST and as a persisted query over GET, interleaved
    in each round: the gateway alone (`python -m bench apq`)."""
    rounds, seconds = ctx.timed()
    admin, redis_pid = await fresh_redis(ctx)
    try:
        with (
            servers(ctx.redis_url, gateway_only=True) as (procs, made, workdir, _),
            httpx.Client(timeout=30) as client,
        ):
            gateway = procs["gateway"]
            auth = {"Content-Type": "application/json", "Authorization": f"Bearer {made['key']}"}
            generate = json.dumps({"query": GENERATE, "variables": GENERATE_VARIABLES}).encode()
            made_job = Case(GENERATE_CASE, gateway, "/graphql", generate, auth, 200)
            job_id = made_job.check(client)["data"]["generate"]["id"]
            poll = json.dumps({"query": POLL, "variables": {"id": job_id}}).encode()
            cases = [
                Case(JOB_CASE, gateway, "/graphql", poll, auth, 200),
                persisted_poll(client, gateway, made["key"], job_id),
            ]
            for case in cases:
                case.write_script(workdir)
                answer = case.check(client)
                if answer["data"]["job"]["id"] != job_id:
                    raise SystemExit(f"{case.name}: {answer}")
            rows = await warmed_rows(cases, workdir)
            for _ in range(rounds):
                for case in cases:
                    await measure(case, rows[case.name], admin, redis_pid, seconds)
            await asyncio.sleep(1.0)  # at rest again
            for case in cases:
                rows[case.name].rss_mb = case.server.rss_mb()
    finally:
        await admin.flushall()
        await admin.aclose()
    out = list(rows.values())
    out[-1].summary = apq_summary(rows)
    return out


# -- output ----------------------------------------------------------------------------------


def _pct(row: HttpRow, rows: dict[str, HttpRow], floor_name: str) -> str:
    if row.case.startswith("floor") or floor_name not in rows:
        return ""
    return f"{row.median / rows[floor_name].median:.0%}"


@renderer(HttpRow)
def http_table(rows: list[HttpRow], rounds: int) -> str:
    by_name = {r.case: r for r in rows}
    med = statistics.median
    head = (
        "HTTP case",
        f"req/s (median of {len(rows[0].rates)})",
        "min..max",
        "% starlette",
        "% strawberry",
        "p50 ms",
        "p99 ms",
        "CPU ms/req",
        "CPU busy",
        "Redis µs/req",
        "Redis cmds/req",
        "RSS MB",
        "server",
        "notes",
    )
    body = []
    for r in rows:
        total = max(1, r.counted)  # not the one-connection runs: no commands counted there
        floor_row = r.case.startswith(("floor", "peer"))  # not ours: no Redis figures
        # EVALSHA is always top level (a script cannot call it): one round trip each.
        others = sorted(
            ((k, v) for k, v in r.commands.items() if k != "evalsha"), key=lambda kv: -kv[1]
        )
        top = [("evalsha", r.commands.get("evalsha", 0)), *others[:2]]
        notes = "" if floor_row else ", ".join(f"{k} {v / total:.2f}/req" for k, v in top)
        if r.errors:
            notes = f"{r.errors} errors! {notes}"
        redis_us = "" if floor_row else f"{med(r.redis_us):.0f}"
        redis_cmds = "" if floor_row else f"{med(r.redis_cmds):.1f}"
        body.append(
            (
                r.case,
                f"{r.median:,.0f}",
                f"{min(r.rates):,.0f}..{max(r.rates):,.0f}",
                _pct(r, by_name, STARLETTE),
                _pct(r, by_name, STRAWBERRY),
                f"{med(r.p50):.1f}",
                f"{med(r.p99):.1f}",
                f"{med(r.cpu_ms):.3f}",
                f"{med(r.cpu_share):.0%}",
                redis_us,
                redis_cmds,
                f"{r.rss_mb:.1f}",
                r.loaded,
                notes,
            )
        )
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]

    def fmt(line: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if 1 <= i <= 11 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    summary = [line for r in rows for line in r.summary]
    return "\n".join([fmt(head), rule, *(fmt(line) for line in body), "", *summary])
