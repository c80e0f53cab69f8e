"""A gateway served over real loopback HTTP on a real Redis, and a client for it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from gateway.accounts import Accounts
from gateway.app import build_app, server_limits
from gateway.config import Settings, load_settings
from gateway.store.redis import Scripts, connect, source
from tests.servers import ReplyCutter, free_port, serve

GENERATE = """mutation Generate($input: GenerateInput!) {
  generate(input: $input) {
    id status type provider url urls width height metadata creditCost createdAt
    completedAt webhookUrl error
  }
}"""
JOB = """query($id: ID!) { job(id: $id) {
  id status url urls width height metadata creditCost error completedAt } }"""


class Clock:
    """Wall time plus an offset a test may move (never sleep to pass time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


async def until(check: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll `check` (plain, or returning an awaitable) until it gives something truthy,
    and return that; fail, naming `what`, once `timeout` seconds have passed (a
    condition, not a sleep-and-hope)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@dataclass
class Harness:
    base: str
    settings: Settings
    http: httpx.AsyncClient
    accounts: Accounts
    clock: Clock
    app: Any = None  # the Starlette app being served
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)

    async def key(self, plan: str = "pro", credits: int = 10_000, **limits: Any) -> str:
        made = await self.accounts.create(plan, credits, **limits)
        self.keys[made["key"]] = made
        return str(made["key"])

    async def gql(
        self, query: str, variables: dict[str, Any] | None = None, key: str | None = None
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await self.http.post(
            "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
        )

    async def generate(self, key: str, prompt: str = "a red fox", **options: Any) -> httpx.Response:
        variables = {
            "input": {
                "type": "IMAGE",
                "provider": options.pop("provider", "local"),
                "input": {"text": prompt},
                "options": options,
            }
        }
        return await self.gql(GENERATE, variables, key)

    async def job(self, key: str, job_id: str) -> dict[str, Any] | None:
        response = await self.gql(JOB, {"id": job_id}, key)
        return response.json()["data"]["job"]  # type: ignore[no-any-return]

    async def wait(self, key: str, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until the job ends (a condition, not a sleep-and-hope)."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(key, job_id)
            assert job is not None
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def gateway(
    redis_url: str | None,
    storage_dir: Path,
    clock: Clock | None = None,
    *,
    public: bool = False,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    """`public`: the gateway has a public URL (its own), so upstreams may call it back."""
    clock = clock or Clock()
    overrides.setdefault("poll_interval", 0.02)
    overrides.setdefault("shutdown_grace_seconds", 2.0)
    port = free_port()
    if public:
        overrides["public_url"] = overrides["callback_url"] = f"http://127.0.0.1:{port}"
    settings = load_settings(redis_url=redis_url, storage_dir=storage_dir, port=port, **overrides)
    app = build_app(settings, clock=clock)
    async with serve(app, port=port, **server_limits(settings)) as base:
        redis = await connect(redis_url) if redis_url else app.state.gateway.redis
        accounts = Accounts(redis, Scripts.register(redis), settings)
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            yield Harness(base, settings, http, accounts, clock, app)
        if redis_url:
            await redis.aclose()


@contextlib.asynccontextmanager
async def reads_limited(
    redis_url: str, storage_dir: Path, read_rpm: int, **overrides: Any
) -> AsyncIterator[Harness]:
    """A gateway whose keys may read `read_rpm` times a minute, the read limit as
    configured alone (none of it from the jobs a key may run), with no worker; its clock
    1 s into a clock minute, so that no minute rolls over mid-test."""
    limited = {"read_rpm": read_rpm, "read_rpm_per_job": 0, **overrides}
    async with gateway(redis_url, storage_dir, inprocess_workers=False, **limited) as gw:
        gw.clock.advance(61 - gw.clock() % 60)
        yield gw


@contextlib.asynccontextmanager
async def replies_cut(
    port: int, script: str, storage_dir: Path, **overrides: Any
) -> AsyncIterator[tuple[ReplyCutter, Harness]]:
    """A gateway whose Redis (a plain server on `port`, flushed) is reached through a
    `ReplyCutter` for the EVALSHA of `script` (a name of `store/redis.py:NAMES`): arm it
    to cut the next reply."""
    Redis(port=port).flushall()
    sha = hashlib.sha1(source(script).encode()).hexdigest().encode()
    cutter = ReplyCutter(port, sha)
    overrides.setdefault("inprocess_workers", False)
    async with (
        cutter.running() as proxied,
        gateway(f"redis://127.0.0.1:{proxied}/0", storage_dir, **overrides) as gw,
    ):
        yield cutter, gw


GATEWAY = str(Path(sys.executable).with_name("gateway"))


@contextlib.contextmanager
def gateway_processes(
    redis_url: str, storage_dir: Path, logs: Path, count: int = 1, **env: str
) -> Iterator[list[str]]:
    """`count` real `gateway serve` processes on one Redis, ready; their base URLs.
    `env`: more GATEWAY_* settings (no in-process workers unless given)."""
    procs: list[subprocess.Popen[bytes]] = []
    bases: list[str] = []
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    base_env.update(
        {
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_STORAGE_DIR": str(storage_dir),
            "GATEWAY_INPROCESS_WORKERS": "0",
            **env,
        }
    )
    try:
        for i in range(count):
            port = free_port()
            with (logs / f"gw{i}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [GATEWAY, "serve"],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env={**base_env, "GATEWAY_PORT": str(port)},
                    )
                )
            bases.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        for i, (proc, base) in enumerate(zip(procs, bases, strict=True)):
            while True:
                assert proc.poll() is None, (logs / f"gw{i}.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "gateway serve did not become ready"
                time.sleep(0.05)
        yield bases
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
