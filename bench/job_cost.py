"""CPU per job, end to end, for an upstream job, attributed to its steps.

`python -m bench job_cost` (`--quick`: fewer jobs). One measurement per mode per run, in
two passes (`--rounds` is not used: repeat the command for more).

What runs, each a real process on 127.0.0.1:
- a Krea-shaped upstream (`KreaJobs` below, served by uvicorn): Krea's job protocol as
  docs/providers/krea.md gives it (`POST /generate/image/{model}` answers a pending job,
  `GET /jobs/{id}` the job as it is, done `BENCH_JOB_COST_SECONDS` after submission,
  `result.urls` pointing at an image it serves). With `X-Webhook-URL` on the submission
  it POSTs the completed job there when it is done. The image is a real PNG of
  noise (generated once per run with Pillow so that it does not compress away), about
  1 MB. The same process is the client's webhook receiver (`POST /client-hook`): it
  counts each job's webhook, so the run knows when every job has been delivered;
- `gateway serve` (callbacks mode only): receives Krea's callbacks at
  `GATEWAY_CALLBACK_URL/v1/callbacks/krea/<token>` and wakes the worker through Redis;
- one `gateway worker` (`GATEWAY_WORKERS`, default 128 here), the measured process,
  alone on the last CPU with all its threads (`taskset`, `one_core_for_the_server`):
  its event loop's and those `asyncio.to_thread` starts (the image's check, the file's
  write). This bench, redis-server, the upstream, the API process and the profilers
  share the other CPUs. (Moving the worker's other threads to the other CPUs was tried:
  the GIL then passes between cores, and the worker spent more CPU per job.)
- outputs stored on disk (`GATEWAY_STORAGE_DIR`); loopback webhooks allowed with
  `GATEWAY_URL_ALLOW_CIDRS`.

Modes (`BENCH_JOB_COST_MODES`, default both): `callbacks` (the gateway has a public URL:
Krea calls back, the worker polls once when woken) and `polled` (no public URL: the worker
polls at Krea's pace, every 2 s).

A pass: the worker starts; `WARMUP` jobs run unmeasured (connections opened, the thread
pool started); its idle CPU is read for a while; N jobs (`BENCH_JOB_COST_JOBS`, provider
`flux-dev` routed to krea, each with a `webhookUrl`) are admitted in this process through
`Gateway.generate`; the pass ends when every job's webhook has reached the receiver and
the worker is idle again. Each mode runs two passes, everything started afresh: the first
with no profiler, for the totals; the second with py-spy attached (`py-spy record -f raw
--nonblocking`: the worker is never stopped) and, when installed, perf (`perf record
-F 999 -g`), for the shares. (The profilers take CPU on the other cores and slow the
pass, and the worker spends more per job in a slower pass, so the second pass's totals
are shown but not used.) `BENCH_JOB_COST_RATE=0`: the first pass only.

The worker's CPU (utime + stime from /proc/PID/stat) over the first pass, divided by N,
is the total per job, split exactly between the event loop's thread and the other threads
(/proc/PID/task/PID/stat). The profile's samples split each thread group's CPU into
steps: each sample goes to the innermost frame on its stack that names a step (`RULES`):
start, submit, wait/poll, download, decode/verify, store (with the threads' hand-offs),
finish, webhook delivery, logging, background loops; a stack naming none is upstream
answers read by aiohttp's protocol off the job's task (mostly the image's bytes), the
Redis auto-pipeline's own task, or other Python the loop runs. Samples of the loop's
thread with no Python frame above the loop (`bare_loop`: waiting in epoll, or in uvloop's
C code) are left out, since py-spy cannot tell the two apart, and py-spy's rate and its
idea of a thread's activity are not exact, so each group's steps are scaled to the
group's /proc CPU (the first pass's): shares within a group are the profile's, the
totals /proc's.

perf's view, beside it: its samples are CPU time only, so they say exactly how much of
each group's CPU went to the kernel (by system call), to copying bytes (libc's memmove),
to zlib's CRC (the PNG check) and to all other user code (the interpreter and C
extensions), without naming Python functions.

The image is converted to nothing (PNG asked, PNG served), so decode/verify is Pillow's
`verify` of the PNG in `normalize_image`, run in a thread: its CPU is timed alone in this
process on the same image (`decode_alone_ms`) and taken out of the threads' CPU; the
threads' other work (the store's file written, their hand-offs) is the rest.

Reported per mode: each step in ms per job and its share; the worker's total; perf's
view; the API process's CPU per job receiving the callbacks; the gateway's own share
(worker without decode/verify, plus the callbacks' receipt) against the target; and the
profile's top gateway lines (the innermost gateway frame of each sample, callees
included) and top frames of any code (self time). Checked: every job completed, submitted
once, its image downloaded once and stored (the stored files are the served bytes), its
webhook delivered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import math
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bench import Context, free_port, renderer, scenario
from bench.http import (
    BIN,
    ROOT,
    cpu_seconds,
    fresh_redis,
    gateway_binary,
    gateway_env,
    wait_idle,
)
from bench.scale import count_completed
from bench.serving import Server, one_core_for_the_server, spawn, stop

TARGET_MS = 2.0  # the bound on the gateway's own CPU per job
UPSTREAM_SECONDS = float(os.environ.get("BENCH_JOB_COST_SECONDS", "1"))
WORKERS = int(os.environ.get("BENCH_JOB_COST_WORKERS", "128"))
SAMPLE_RATE = int(os.environ.get("BENCH_JOB_COST_RATE", "1000"))  # py-spy samples/s
WARMUP = 64  # jobs run before the measured ones
KEEP = os.environ.get("BENCH_JOB_COST_KEEP")  # a directory: the raw profiles are copied there
IMAGE_SIDE = 1024  # a greyscale PNG of noise this wide and high: about 1 MB
LOOPBACK = "127.0.0.0/8"
SIZE = 1024  # the width and height asked for, the image's own
MODEL = "bfl/flux-1-dev"

# -- the upstream: Krea's job protocol, and the client's webhook receiver ----------------


def noise_png(side: int = IMAGE_SIDE) -> bytes:
    """A real PNG that does not compress: greyscale noise, the same on every run."""
    from PIL import Image

    pixels = random.Random(20).randbytes(side * side)
    out = io.BytesIO()
    Image.frombytes("L", (side, side), pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KreaJobs:
    """Krea's job API (docs/providers/krea.md): a job is done `seconds` after it was
    submitted; its one image is `png`. A submission with `X-Webhook-URL` is reported there
    when done, with the job object `GET /jobs/{id}` answers then. `POST /client-hook` is
    the gateway's client receiving the gateway's webhooks; `GET /stats` counts it all."""

    def __init__(self, png: bytes, seconds: float) -> None:
        self.png = png
        self.seconds = seconds
        self.jobs: dict[str, tuple[float, str]] = {}  # id -> (submitted at, created_at)
        self.polls = 0
        self.downloads = 0
        self.callbacks = 0
        self.hooks = 0
        self.hooked: set[str] = set()  # the gateway job ids whose webhook came
        self.hooks_completed = 0  # webhooks saying `completed`
        self.session: Any = None  # aiohttp, for the callbacks; opened on first use
        self.app = Starlette(
            routes=[
                Route("/generate/image/{model:path}", self.submit, methods=["POST"]),
                Route("/jobs/{job_id}", self.job, methods=["GET"]),
                Route("/files/{name}", self.file, methods=["GET"], name="file"),
                Route("/client-hook", self.client_hook, methods=["POST"]),
                Route("/stats", self.stats, methods=["GET"]),
            ]
        )

    def view(self, request: Request, job_id: str) -> dict[str, Any]:
        submitted, created_at = self.jobs[job_id]
        done = time.monotonic() - submitted >= self.seconds
        url = str(request.url_for("file", name=f"{job_id}.png"))
        return {
            "job_id": job_id,
            "status": "completed" if done else "processing",
            "created_at": created_at,
            "completed_at": _now_iso() if done else None,
            "result": {"urls": [url]} if done else None,
        }

    async def submit(self, request: Request) -> Response:
        if not request.headers.get("authorization", "").startswith("Bearer "):
            return JSONResponse({"message": "Unauthorized"}, status_code=401)
        body = await request.json()
        if request.path_params["model"] != MODEL or not isinstance(body.get("prompt"), str):
            return JSONResponse({"message": "bad request"}, status_code=400)
        job_id = str(uuid.uuid4())
        self.jobs[job_id] = (time.monotonic(), _now_iso())
        hook = request.headers.get("x-webhook-url")
        if hook:
            asyncio.get_running_loop().call_later(
                self.seconds,
                lambda: asyncio.ensure_future(self.call_back(hook, request, job_id)),
            )
        # The reference's answer to the POST: pending, nothing completed yet.
        return JSONResponse(
            {
                "job_id": job_id,
                "status": "backlogged",
                "created_at": self.jobs[job_id][1],
                "completed_at": None,
                "result": None,
            }
        )

    async def call_back(self, url: str, request: Request, job_id: str) -> None:
        import aiohttp

        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(60)
            )
        self.callbacks += 1
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.post(url, json=self.view(request, job_id)) as response:
                await response.read()

    async def job(self, request: Request) -> Response:
        self.polls += 1
        job_id = request.path_params["job_id"]
        if job_id not in self.jobs:
            return JSONResponse({"message": "Job not found"}, status_code=404)
        return JSONResponse(self.view(request, job_id))

    async def file(self, request: Request) -> Response:
        self.downloads += 1
        return Response(self.png, media_type="image/png")

    async def client_hook(self, request: Request) -> Response:
        body = await request.json()
        self.hooks += 1
        self.hooked.add(str(body.get("id")))
        self.hooks_completed += body.get("status") == "completed"
        return Response(b"", status_code=204)

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {
                "submitted": len(self.jobs),
                "polls": self.polls,
                "downloads": self.downloads,
                "callbacks": self.callbacks,
                "hooks": self.hooks,
                "hooked": len(self.hooked),
                "hooks_completed": self.hooks_completed,
            }
        )


def krea_emulator() -> Starlette:
    """uvicorn's factory (`--factory`): the image from `JOB_COST_IMAGE`."""
    png = Path(os.environ["JOB_COST_IMAGE"]).read_bytes()
    return KreaJobs(png, float(os.environ.get("JOB_COST_SECONDS", "1"))).app


def start_upstream(workdir: Path, image: Path) -> Server:
    port = free_port()
    env = {**os.environ, "JOB_COST_IMAGE": str(image), "JOB_COST_SECONDS": str(UPSTREAM_SECONDS)}
    argv = [
        str(BIN / "python"),
        "-m",
        "uvicorn",
        "bench.job_cost:krea_emulator",
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-server-header",
    ]
    return spawn("krea upstream", argv, env, port, workdir)


# -- attributing samples to steps ----------------------------------------------------------

SUBMIT, WAIT, DOWNLOAD, RECEIVED = "submit", "wait/poll", "download", "upstream bytes read"
DECODE, STORE, FINISH, WEBHOOK = "decode/verify", "store", "finish", "webhook"
START, LOGGING, BACKGROUND, OTHER = "start", "logging", "background loops", "other"
REDIS = "redis client"
#: the rows, in a job's order; what each covers
STEPS: dict[str, str] = {
    START: "fetch loop, start script, `job started` event",
    SUBMIT: "routing, KreaProvider.submit (callback token, POST), upstream id saved",
    WAIT: "UpstreamWait, callback listener and waiter, KreaProvider.poll, progress",
    DOWNLOAD: "HTTPBackend.fetch: GET of the image, in the job's task",
    RECEIVED: "aiohttp's protocol reading upstream answers off the task (the image, mostly)",
    DECODE: "normalize_image: Pillow opens and verifies the PNG (a thread; timed alone)",
    STORE: "LocalArtifactStore.put: the file's open, write, rename (a thread); hand-offs",
    FINISH: "Worker._complete: finish script, cache, events, queue ack",
    WEBHOOK: "gateway/webhooks.py: claim, read, sign, POST, log",
    LOGGING: "structlog: the job's log lines",
    BACKGROUND: "heartbeat, cancellation watch, metrics sampler",
    REDIS: "the Redis auto-pipeline's own task (gateway/store/batching.py): sends, replies",
    OTHER: "Python the loop runs outside any step (asyncio's and aiohttp's callbacks)",
}
#: (step, file, functions): a frame in `file` (its path's end) whose function is one of
#: `functions` (any, when empty) names `step`.
RULES: list[tuple[str, str, tuple[str, ...]]] = [
    (DECODE, "gateway/images.py", ()),
    (STORE, "gateway/artifacts.py", ()),
    (STORE, "gateway/jobs/worker.py", ("Worker._store_output", "Worker._store_one")),
    (STORE, "gateway/jobs/worker.py", ("Worker._discard",)),
    (DOWNLOAD, "gateway/providers/http.py", ("HTTPBackend.fetch", "download")),
    (SUBMIT, "gateway/providers/krea.py", ("KreaProvider.submit", "translate")),
    (WAIT, "gateway/providers/krea.py", ()),  # poll, _combine, _job, ...
    (SUBMIT, "gateway/jobs/worker.py", ("Worker._save_upstream",)),
    (SUBMIT, "gateway/routing.py", ()),
    (WAIT, "gateway/upstream_wait.py", ()),
    (WAIT, "gateway/callbacks.py", ()),
    (WAIT, "gateway/jobs/worker.py", ("Worker._progress", "Worker._cancelled")),
    (FINISH, "gateway/jobs/worker.py", ("Worker._complete", "Worker._end", "Worker._announce")),
    (FINISH, "gateway/jobs/queue.py", ("Queue.ack",)),
    (WEBHOOK, "gateway/webhooks.py", ()),
    (BACKGROUND, "gateway/jobs/worker.py", ("Worker._heartbeat", "Worker._watch_cancellations")),
    (BACKGROUND, "gateway/jobs/worker.py", ("Worker.beat", "Worker._sweep_logged")),
    (BACKGROUND, "gateway/metrics_http.py", ()),
    (START, "gateway/jobs/worker.py", ("Worker.run", "Worker._spawn", "Worker.process")),
    (START, "gateway/jobs/worker.py", ("Worker._run",)),
    (LOGGING, "structlog/", ()),
    (LOGGING, "logging/", ()),
    # the threads' own work between items, and handing them work (`to_thread`)
    (STORE, "concurrent/futures/thread.py", ()),
]
_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")

Frame = tuple[str, str, int]  # function, file, line


def parse_raw(text: str) -> list[tuple[list[Frame], int]]:
    """py-spy's `-f raw`: one stack a line, outermost frame first, `;` between frames,
    then a space and how many samples had it."""
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames: list[Frame] = []
        for part in stack.split(";"):
            match = _FRAME.match(part)
            if match:
                frames.append((match["function"], match["file"], int(match["line"])))
            else:
                frames.append((part, "", 0))
        stacks.append((frames, int(count)))
    return stacks


def _in(file: str, suffix: str) -> bool:
    return file == suffix or file.endswith("/" + suffix) or file.startswith(suffix)


def step_of(frames: list[Frame]) -> str:
    for function, file, _ in reversed(frames):  # the innermost frame first
        for step, suffix, functions in RULES:
            if _in(file, suffix) and (not functions or function in functions):
                return step
    # A stack py-spy read only in part (it does not stop the worker) may lack the frame
    # naming its step; a library used by one step alone still names it.
    files = [file for _, file, _ in frames]
    if any(_in(file, "aiohttp/") for file in files):
        return RECEIVED
    if any(_in(f, "gateway/store/") or _in(f, "redis/") or _in(f, "hiredis/") for f in files):
        return REDIS
    return OTHER


def _gateway(file: str) -> bool:
    return _in(file, "gateway/") and "/bench/" not in file


def _short(file: str) -> str:
    index = file.rfind("gateway/")
    if _gateway(file) and index >= 0:
        return file[index:]
    index = file.rfind("site-packages/")
    return file[index + len("site-packages/") :] if index >= 0 else file


MAIN, THREADS = "main thread", "pool threads"


def group_of(frames: list[Frame]) -> str:
    """The event loop's thread, or one of the threads `asyncio.to_thread` runs work in
    (the worker starts no other)."""
    return THREADS if frames and frames[0][0] == "Thread._bootstrap" else MAIN


def bare_loop(frames: list[Frame]) -> bool:
    """The event loop's thread with no Python frame above the loop's `run`: waiting in
    epoll or in uvloop's C code; py-spy cannot tell which, so these samples are left out
    (perf's view shows the loop's C code and system calls apart)."""
    function, file, _ = frames[-1] if frames else ("", "", 0)
    return (function == "Runner.run" and _in(file, "asyncio/runners.py")) or (
        function == "run" and _in(file, "uvloop/")
    )


@dataclass
class Profile:
    samples: int = 0
    bare: int = 0  # samples of the loop's thread left out (`bare_loop`)
    #: samples per thread group, and per group and step
    groups: dict[str, int] = field(default_factory=dict)
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    #: the innermost gateway frame of each sample (its callees included), by line
    gateway_lines: list[tuple[str, int]] = field(default_factory=list)
    #: the innermost frame of each sample (self time), by line
    self_lines: list[tuple[str, int]] = field(default_factory=list)


def attribute(text: str, top: int = 10) -> Profile:
    profile = Profile(
        groups=dict.fromkeys((MAIN, THREADS), 0),
        steps={group: dict.fromkeys(STEPS, 0) for group in (MAIN, THREADS)},
    )
    lines: collections.Counter[str] = collections.Counter()
    selves: collections.Counter[str] = collections.Counter()
    for frames, count in parse_raw(text):
        if group_of(frames) == MAIN and bare_loop(frames):
            profile.bare += count
            continue
        profile.samples += count
        step, group = step_of(frames), group_of(frames)
        profile.groups[group] += count
        profile.steps[group][step] += count
        inner = next(((f, p, n) for f, p, n in reversed(frames) if _gateway(p)), None)
        where = "(no gateway frame)"
        if inner is not None:
            where = f"{inner[0]} {_short(inner[1])}:{inner[2]}"
        lines[f"{where} [{step}]"] += count
        function, file, line = frames[-1]
        selves[f"{function} {_short(file)}:{line}" if file else function] += count
    profile.gateway_lines = lines.most_common(top)
    profile.self_lines = selves.most_common(top)
    return profile


# -- the second view: perf's CPU samples, by kind ------------------------------------------

_SYSCALL = re.compile(r"^(?:__x64_sys_|__do_sys_|ksys_|__sys_|do_sys_)(?P<name>\w+)$")


def perf_kind(leaf_ip: str, symbols: list[str]) -> str:
    """What a perf sample was doing, from its stack (the leaf first): in which system
    call, or, in user space, copying bytes, computing a CRC, or running anything else
    (the interpreter, C extensions)."""
    for symbol in symbols:
        match = _SYSCALL.match(symbol)
        if match:
            return f"{match['name'].removesuffix('2')}(2)"  # openat2 is openat
    if any("page_fault" in symbol for symbol in symbols):
        return "page faults"
    if leaf_ip.startswith("ffffffff"):
        return "kernel, other"
    leaf = symbols[0] if symbols else ""
    if leaf.startswith("crc32"):
        return "crc32 (zlib)"
    if "memmove" in leaf or "memcpy" in leaf:
        return "memcpy (libc)"
    return "user code"


def perf_kinds(script: str, pid: int) -> dict[str, dict[str, int]]:
    """`perf script -F tid,ip,sym` output: samples per thread group and kind."""
    kinds: dict[str, dict[str, int]] = {MAIN: {}, THREADS: {}}
    for block in script.split("\n\n"):
        lines = block.strip().splitlines()
        if not lines or not lines[0].strip().isdigit():
            continue
        group = MAIN if int(lines[0]) == pid else THREADS
        frames = [line.split(None, 1) for line in lines[1:]]
        ip = frames[0][0] if frames else ""
        kind = perf_kind(ip, [f[1] if len(f) > 1 else "" for f in frames])
        kinds[group][kind] = kinds[group].get(kind, 0) + 1
    return kinds


def perf_binary() -> str | None:
    return shutil.which("perf")


# -- one run ------------------------------------------------------------------------------


@dataclass
class JobCostRow:
    mode: str  # "callbacks" or "polled"
    jobs: int
    placement: str = ""
    image_bytes: int = 0
    completed: int = 0
    submitted: int = 0
    downloads: int = 0
    polls: int = 0
    hooked: int = 0  # jobs whose webhook reached the receiver (completed)
    stored_ok: bool = False  # every output on disk, the served bytes
    seconds: float = 0.0  # the measured window
    cpu_ms: float = 0.0  # worker CPU per job (/proc), the window
    #: of which each thread group's (/proc/PID/task/TID/stat)
    group_ms: dict[str, float] = field(default_factory=dict)
    idle_ms: float = 0.0  # of which the worker's idle loops (its idle rate x the window)
    api_cpu_ms: float = math.nan  # the API process receiving the callbacks, per job
    decode_alone_ms: float = math.nan  # `normalize_image` of the image, timed in this process
    profile: Profile | None = None
    #: the profiled pass's own figures (the profilers attached)
    profiled_cpu_ms: float = math.nan
    profiled_group_ms: dict[str, float] = field(default_factory=dict)
    profiled_seconds: float = math.nan
    profiled_ok: bool = False
    #: perf's samples per thread group and kind (`perf_kinds`); empty without perf
    perf: dict[str, dict[str, int]] = field(default_factory=dict)
    why_no_profile: str = ""
    rates: list[float] = field(default_factory=list)  # jobs/s (the runner needs it)

    @property
    def callbacks(self) -> bool:
        return self.mode == "callbacks"

    @property
    def ok(self) -> bool:
        """Every job completed, submitted once, its image downloaded once and stored as
        served, its webhook delivered once."""
        return (
            self.completed == self.jobs
            and self.submitted == self.jobs
            and self.downloads == self.jobs
            and self.hooked == self.jobs
            and self.stored_ok
        )

    def step_ms(self, step: str) -> float:
        """A step's CPU per job: in each thread group, its share of the group's samples
        times the group's CPU (so a group the profiler over- or under-sampled is still
        counted at what /proc says it used)."""
        p = self.profile
        if p is None or not p.samples:
            return math.nan
        total = 0.0
        for group, steps in p.steps.items():
            cpu, counted = self.group_ms.get(group, 0.0), p.groups[group]
            if group == THREADS and not math.isnan(self.decode_alone_ms):
                # Decode/verify at its cost timed alone; the pool's other steps share the
                # rest by their samples (a sampled thread is running or waiting for the
                # core, so the profile alone would weigh a slow write by its wall time).
                decode = min(self.decode_alone_ms, cpu)
                if step == DECODE:
                    total += decode
                    continue
                cpu, counted = cpu - decode, counted - steps[DECODE]
            if counted > 0:
                total += cpu * steps[step] / counted
        return total

    @property
    def own_worker_ms(self) -> float:
        """The worker's CPU per job without decoding and verifying the image."""
        return self.cpu_ms - self.step_ms(DECODE)

    @property
    def own_ms(self) -> float:
        """The gateway's own: the worker's without decode/verify, plus the callbacks'
        receipt in the API process."""
        return self.own_worker_ms + (0.0 if math.isnan(self.api_cpu_ms) else self.api_cpu_ms)


@scenario("job_cost")
async def job_cost(ctx: Context) -> list[JobCostRow]:
    jobs = int(os.environ.get("BENCH_JOB_COST_JOBS", 200 if ctx.quick else 500))
    modes = os.environ.get("BENCH_JOB_COST_MODES", "callbacks,polled").split(",")
    rows = []
    for mode in modes:
        row = await one_pass(ctx, mode, jobs, profiled=False)
        if SAMPLE_RATE > 0:
            # The profilers cost CPU on the other cores and slow the run, and a slower run
            # costs the worker more per job (fewer jobs share each wake-up and each Redis
            # round trip): the totals are the first pass's, the shares the second's.
            second = await one_pass(ctx, mode, jobs, profiled=True)
            row.profile, row.perf = second.profile, second.perf
            row.why_no_profile = second.why_no_profile
            row.profiled_cpu_ms, row.profiled_group_ms = second.cpu_ms, second.group_ms
            row.profiled_seconds = second.seconds
            row.profiled_ok = second.ok
        rows.append(row)
    return rows


async def one_pass(ctx: Context, mode: str, jobs: int, *, profiled: bool) -> JobCostRow:
    admin, redis_pid = await fresh_redis(ctx)
    try:
        with one_core_for_the_server(redis_pid) as (prefix, placement):
            where = placement
            if prefix:
                where = (
                    f"the worker alone on CPU {prefix[-1]} (taskset), all its threads; "
                    "this bench, redis-server, the upstream, the API process and the "
                    "profilers on the others"
                )
            row = JobCostRow(mode, jobs, placement=where)
            return await run_jobs(ctx, row, prefix, admin, profiled)
    finally:
        await admin.aclose()


async def wait_for_log(path: Path, text: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start:\n{path.read_text()[-3000:]}")
        await asyncio.sleep(0.1)


def decode_alone_ms(png: bytes, times: int = 30) -> float:
    """The CPU of `normalize_image` (PNG asked of a PNG: open and verify) on the image, in
    this thread: the median of `times`, in ms."""
    from gateway.images import normalize_image

    spent = []
    for i in range(times + 5):
        began = time.thread_time()
        normalize_image(png, "png")
        if i >= 5:  # the first ones warm up
            spent.append(time.thread_time() - began)
    spent.sort()
    return spent[len(spent) // 2] * 1000


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (utime + stime) of the process's main thread and of its other threads
    (the process's total less the main thread's, so threads ended count too)."""
    raw = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    main = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {MAIN: main, THREADS: cpu_seconds(pid) - main}


def py_spy() -> str | None:
    candidate = BIN / "py-spy"
    return str(candidate) if candidate.exists() else None


class Jobs:
    """Admits jobs through `Gateway.generate` in this process, as an API process would:
    provider `flux-dev`, a prompt of their own (nothing cached), the client's webhook."""

    def __init__(self, rt: Any, key: str, hook: str) -> None:
        self.rt, self.key, self.hook = rt, key, hook
        self.count = 0

    def asked(self, i: int) -> Callable[[], Awaitable[Any]]:
        from gateway.params import from_image_input

        async def parse() -> Any:
            return from_image_input(
                {
                    "service": "flux-dev",
                    "prompt": f"a harbour at dusk, take {i}",
                    "width": SIZE,
                    "height": SIZE,
                    "webhookUrl": self.hook,
                }
            )

        return parse

    async def admit(self, n: int) -> list[str]:
        ids: list[str] = []
        for first in range(self.count, self.count + n, 50):
            last = min(first + 50, self.count + n)
            batch = await asyncio.gather(
                *(self.rt.gateway.generate(self.key, self.asked(i)) for i in range(first, last))
            )
            ids += [job.id for job, _ in batch]
        self.count += n
        return ids


async def run_jobs(
    ctx: Context, row: JobCostRow, prefix: list[str], admin: aioredis.Redis, profiled: bool
) -> JobCostRow:
    """One pass of `row.jobs` jobs; with `profiled`, py-spy and perf attached."""
    from gateway.config import load_settings
    from gateway.runtime import runtime

    callbacks = row.mode == "callbacks"
    with tempfile.TemporaryDirectory(prefix="bench-job-cost-") as tmp:
        workdir = Path(tmp)
        storage = workdir / "outputs"
        png = noise_png()
        row.image_bytes = len(png)
        row.decode_alone_ms = decode_alone_ms(png)
        image = workdir / "upstream.png"
        image.write_bytes(png)
        upstream = start_upstream(workdir, image)
        api: Server | None = None
        worker: subprocess.Popen[bytes] | None = None
        spy: subprocess.Popen[bytes] | None = None
        perf: subprocess.Popen[bytes] | None = None
        client = httpx.AsyncClient(timeout=30)

        async def stats() -> dict[str, int]:
            answer: dict[str, int] = (await client.get(upstream.url("/stats"))).json()
            return answer

        async def delivered(count: int, since: dict[str, int]) -> None:
            """Until `count` more jobs' webhooks came (or 100 s)."""
            deadline = time.monotonic() + 100
            while time.monotonic() < deadline and worker is not None and worker.poll() is None:
                await asyncio.sleep(0.25)
                if (await stats())["hooked"] - since["hooked"] >= count:
                    return

        try:
            env = gateway_env(ctx.redis_url, 0, storage)
            env.update(
                GATEWAY_WORKERS=str(WORKERS),
                GATEWAY_KREA_API_BASE=upstream.url(""),
                GATEWAY_KREA_API_TOKEN="bench",
                GATEWAY_ROUTES='{"flux-dev": ["krea"]}',
                GATEWAY_URL_ALLOW_CIDRS=LOOPBACK,
            )
            if callbacks:
                port = free_port()
                env.update(
                    GATEWAY_PUBLIC_URL=f"http://127.0.0.1:{port}",
                    GATEWAY_CALLBACK_URL=f"http://127.0.0.1:{port}",
                    GATEWAY_PORT=str(port),
                )
                api = spawn("gateway", [gateway_binary(), "serve"], env, port, workdir)
            log = workdir / "worker.log"
            with log.open("wb") as out:
                worker = subprocess.Popen(
                    [*prefix, gateway_binary(), "worker"],
                    env=env,
                    cwd=ROOT,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            await wait_for_log(log, "worker started", worker)
            settings = load_settings(
                redis_url=ctx.redis_url,
                storage_dir=storage,
                inprocess_workers=False,
                krea_api_base=upstream.url(""),
                krea_api_token="bench",
                routes={"flux-dev": ["krea"]},
                url_allow_cidrs=LOOPBACK,
            )
            async with runtime(settings) as rt:
                made = await rt.gateway.accounts.create(
                    "enterprise", 10**9, name="job-cost", rpm=-1, concurrency=-1, daily=-1
                )
                jobs = Jobs(rt, made["key"], upstream.url("/client-hook"))
                # Warm-up, not measured: connections opened, code paths hot, the thread
                # pool's threads started.
                before = await stats()
                await jobs.admit(WARMUP)
                await delivered(WARMUP, before)
                await wait_idle(worker.pid)
                idle_from, idle_cpu = time.monotonic(), cpu_seconds(worker.pid)
                await asyncio.sleep(2.0)
                idle_rate = (cpu_seconds(worker.pid) - idle_cpu) / (time.monotonic() - idle_from)

                raw = workdir / "worker.raw"
                binary = py_spy()
                if not profiled:
                    row.why_no_profile = "BENCH_JOB_COST_RATE=0 (no profiler)"
                elif binary is None:
                    row.why_no_profile = f"py-spy is not installed in {BIN}"
                else:
                    argv = [binary, "record", "-p", str(worker.pid), "-f", "raw", "-o", str(raw)]
                    argv += ["-r", str(SAMPLE_RATE), "--nonblocking"]
                    with (workdir / "py-spy.log").open("wb") as out:
                        spy = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
                recorded = workdir / "perf.data"
                if profiled and perf_binary():
                    argv = [str(perf_binary()), "record", "-F", "999", "-g"]
                    argv += ["-p", str(worker.pid), "-o", str(recorded)]
                    with (workdir / "perf.log").open("wb") as out:
                        perf = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
                if spy is not None or perf is not None:
                    await asyncio.sleep(1.0)  # attached
                if spy is not None and spy.poll() is not None:
                    row.why_no_profile = (workdir / "py-spy.log").read_text()[-500:]

                before = await stats()
                started, cpu0 = time.monotonic(), cpu_seconds(worker.pid)
                threads0 = thread_cpu(worker.pid)
                api_cpu0 = cpu_seconds(api.pid) if api else 0.0
                ids = await jobs.admit(row.jobs)
                await delivered(row.jobs, before)
                await wait_idle(worker.pid)
                row.seconds = time.monotonic() - started
                cpu = cpu_seconds(worker.pid) - cpu0
                threads1 = thread_cpu(worker.pid)
                row.group_ms = {g: (threads1[g] - threads0[g]) / row.jobs * 1000 for g in threads1}
                if api:
                    row.api_cpu_ms = (cpu_seconds(api.pid) - api_cpu0) / row.jobs * 1000
                for sampler in (spy, perf):
                    if sampler is not None and sampler.poll() is None:
                        sampler.send_signal(signal.SIGINT)
                        sampler.wait(60)
                row.cpu_ms = cpu / row.jobs * 1000
                row.idle_ms = idle_rate * row.seconds / row.jobs * 1000
                row.completed = await count_completed(admin, str(made["id"]), ids)
            seen = await stats()
            row.submitted = seen["submitted"] - before["submitted"]
            row.downloads = seen["downloads"] - before["downloads"]
            row.polls = seen["polls"] - before["polls"]
            if seen["hooks"] == seen["hooked"]:  # none twice
                row.hooked = seen["hooks_completed"] - before["hooks_completed"]
            row.stored_ok = stored_intact(storage, png, WARMUP + row.completed)
            row.rates = [row.completed / row.seconds]
            if raw.exists():
                row.profile = attribute(raw.read_text())
                if KEEP:
                    Path(KEEP).mkdir(parents=True, exist_ok=True)
                    shutil.copy(raw, Path(KEEP) / f"worker-{row.mode}-{int(time.time())}.raw")
            elif spy is not None and not row.why_no_profile:
                row.why_no_profile = (workdir / "py-spy.log").read_text()[-500:]
            if perf is not None and recorded.exists():
                script = subprocess.run(
                    [str(perf_binary()), "script", "-i", str(recorded), "-F", "tid,ip,sym"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                ).stdout
                row.perf = perf_kinds(script, worker.pid)
        finally:
            await client.aclose()
            for sampler in (spy, perf):
                if sampler is not None and sampler.poll() is None:
                    sampler.kill()
                    sampler.wait(10)
            if worker is not None:
                stop(worker)
            if api is not None:
                api.stop()
            upstream.stop()
    return row


def stored_intact(storage: Path, png: bytes, expected: int) -> bool:
    """One stored file per completed job, each the upstream's bytes (PNG asked: stored
    as served)."""
    files = [p for p in storage.iterdir() if p.is_file() and not p.name.startswith(".")]
    digest = hashlib.sha256(png).digest()
    return len(files) == expected and all(
        p.stat().st_size == len(png) and hashlib.sha256(p.read_bytes()).digest() == digest
        for p in files
    )


# -- output -------------------------------------------------------------------------------


@renderer(JobCostRow)
def job_cost_table(rows: list[JobCostRow], rounds: int) -> str:
    out: list[str] = []
    for r in rows:
        how = (
            "Krea calls back (X-Webhook-URL) to `gateway serve`; the worker polls once then"
            if r.callbacks
            else "no public URL: polled at Krea's 2 s pace"
        )
        out += [
            f"job_cost, {r.mode}: {r.jobs:,} Krea jobs of {UPSTREAM_SECONDS:g} s, a "
            f"{r.image_bytes / 1e6:.2f} MB PNG each, one `gateway worker` "
            f"(GATEWAY_WORKERS={WORKERS}); {how}",
            f"  {r.placement}",
            f"  completed {r.completed:,}/{r.jobs:,}, submitted {r.submitted:,}, images "
            f"downloaded {r.downloads:,}, webhooks delivered {r.hooked:,}, stored files "
            f"{'intact' if r.stored_ok else 'NOT as served'}: {'ok' if r.ok else 'NOT ok'}; "
            f"{r.polls / max(1, r.jobs):.2f} upstream polls per job; "
            f"{r.seconds:.1f} s ({r.rates[0] if r.rates else 0:.0f} jobs/s)",
        ]
        groups = ", ".join(f"{g} {ms:.3f}" for g, ms in r.group_ms.items())
        p = r.profile
        if p is None or not p.samples:
            out.append(
                f"  worker CPU per job: {r.cpu_ms:.3f} ms ({groups}); no profile: "
                f"{r.why_no_profile}"
            )
            continue
        head = ("step", "ms/job", "share", "what")
        body = [
            (step, f"{r.step_ms(step):.3f}", f"{r.step_ms(step) / r.cpu_ms:.1%}", what)
            for step, what in STEPS.items()
        ]
        body.append(("worker total", f"{r.cpu_ms:.3f}", "100%", "/proc, no profiler attached"))
        widths = [max(len(line[i]) for line in (head, *body)) for i in range(3)]
        for line in (head, *body):
            cells = [line[0].ljust(widths[0]), line[1].rjust(widths[1]), line[2].rjust(widths[2])]
            out.append(("  " + "  ".join([*cells, line[3]])).rstrip())
        covered = ", ".join(
            f"{g} {p.groups[g] / SAMPLE_RATE / (ms * r.jobs / 1000):.0%}"
            for g, ms in r.profiled_group_ms.items()
            if ms > 0
        )
        profiled = ", ".join(f"{g} {ms:.3f}" for g, ms in r.profiled_group_ms.items())
        out.append(
            f"  worker CPU per job by thread (/proc): {groups} ms; the worker idle costs "
            f"{r.idle_ms:.3f} ms/job of the total over this window"
        )
        out.append(
            f"  second pass, profilers attached: {r.profiled_cpu_ms:.3f} ms/job ({profiled}), "
            f"{r.profiled_seconds:.1f} s, {'ok' if r.profiled_ok else 'NOT ok'}; its shares "
            "are applied to each thread group's CPU of the first pass"
        )
        out.append(
            f"  profile: {p.samples:,} samples at {SAMPLE_RATE} Hz (py-spy --nonblocking; "
            f"{p.bare:,} more of the loop's thread in epoll or uvloop's C left out); samples "
            f"/ rate against that pass's /proc CPU: {covered}"
        )
        out.append(
            f"  decode/verify timed alone (normalize_image on the image, this process): "
            f"{r.decode_alone_ms:.3f} ms; profile's share of the pool threads' samples: "
            f"{p.steps[THREADS][DECODE] / max(1, p.groups[THREADS]):.0%}"
        )
        for group, kinds in r.perf.items():
            counted = sum(kinds.values())
            if not counted:
                continue
            ms = r.group_ms.get(group, 0.0) / counted
            top = sorted(kinds.items(), key=lambda kv: -kv[1])[:7]
            out.append(
                f"  perf, {group} ({counted:,} CPU samples of the second pass; ms/job of the "
                "first): " + ", ".join(f"{kind} {n * ms:.3f}" for kind, n in top)
            )
        if r.callbacks:
            out.append(
                f"  callbacks received by the API process (`gateway serve`): "
                f"{r.api_cpu_ms:.3f} ms CPU per job (/proc)"
            )
        extra = " + callbacks' receipt" if r.callbacks else ""
        out.append(
            f"  gateway's own (worker without decode/verify{extra}): {r.own_ms:.3f} ms/job "
            f"(the worker alone {r.own_worker_ms:.3f}); decode/verify {r.step_ms(DECODE):.3f} "
            f"ms/job; target < {TARGET_MS:g} ms: "
            f"{'met' if r.own_ms < TARGET_MS else 'NOT met'}"
        )
        out.append("  top gateway lines (the innermost gateway frame; its callees included):")
        out += [f"    {n / p.samples:6.1%}  {where}" for where, n in p.gateway_lines]
        out.append("  top frames (self time, any code):")
        out += [f"    {n / p.samples:6.1%}  {where}" for where, n in p.self_lines]
        out.append("")
    return "\n".join(out).rstrip()
