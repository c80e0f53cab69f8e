"""The processes the HTTP benchmarks start and measure: the floors, the gateway, a peer.

Each runs as a real process on 127.0.0.1 with its output in a log file, and is ready
once it accepts connections. Its CPU time and memory are read from /proc, so the figures
are the server's own, not the load generator's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def loop_and_parser(pid: int) -> str:
    """Which event loop and HTTP parser the process has loaded (from its memory map)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    loop = "uvloop" if "/uvloop/" in maps else "asyncio"
    parser = "httptools" if "/httptools/" in maps else "h11"
    return f"{loop}+{parser}"


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def rss_mb(self) -> float:
        return status_kb(self.pid, "VmRSS") / 1024

    def peak_mb(self) -> float:
        return status_kb(self.pid, "VmHWM") / 1024

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"{self.name} exited with {self.proc.returncode}:\n"
                    + self.log.read_text()[-3000:]
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
            ):
                return
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name} did not listen on {self.port} in {timeout} s")
            time.sleep(0.05)

    def stop(self) -> None:
        stop(self.proc, 15)


def stop(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM, `grace` seconds to exit, then SIGKILL (a process already gone: nothing)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def spawn(name: str, argv: list[str], env: dict[str, str], port: int, workdir: Path) -> Server:
    log = workdir / f"{name.replace(' ', '_').replace(':', '')}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(name, proc, port, log)
    server.wait_ready()
    return server


def floor(name: str, app: str, workdir: Path, prefix: list[str] | None = None) -> Server:
    """A floor served by uvicorn as the gateway is; `prefix`: what runs it (`taskset`)."""
    port = free_port()
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "auto"
    try:
        import httptools  # noqa: F401

        http = "httptools"
    except ImportError:
        http = "auto"
    argv = [
        *(prefix or []),
        str(BIN / "python"),
        "-m",
        "uvicorn",
        f"bench.floors:{app}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        loop,
        "--http",
        http,
        "--workers",
        "1",
        "--log-level",
        "warning",
        "--no-server-header",
    ]
    return spawn(name, argv, dict(os.environ), port, workdir)


@contextlib.contextmanager
def one_core_for_the_server(redis_pid: int) -> Iterator[tuple[list[str], str]]:
    """The prefix that runs a measured server alone on the last CPU, with this process (and so
    wrk and any worker it starts) and redis-server moved to the others meanwhile; and
    a line saying so. With one CPU, no prefix."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield [], "not pinned: one CPU"
        return
    server_cpu, others = cpus[-1], set(cpus[:-1])
    own, redis_own = os.sched_getaffinity(0), os.sched_getaffinity(redis_pid)
    os.sched_setaffinity(0, others)
    os.sched_setaffinity(redis_pid, others)
    try:
        yield (
            ["taskset", "-c", str(server_cpu)],
            f"gateway alone on CPU {server_cpu} (taskset); the bench, wrk, redis-server and "
            f"workers on CPU {','.join(map(str, sorted(others)))}",
        )
    finally:
        os.sched_setaffinity(0, own)
        with contextlib.suppress(OSError):
            os.sched_setaffinity(redis_pid, redis_own)
