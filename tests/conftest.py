"""Test fixtures: a real redis-server per session (flushed per test).

The server runs in cluster mode as a one-node Redis Cluster owning every slot: a plain
client works as against any Redis, while the server refuses any command or script
whose keys span two hash slots (CROSSSLOT). So every test also proves the keyspace
layout (`gateway/store/keys.py`), and `redis_url` checks no such refusal happened."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.s3server import BUCKET, PREFIX, MotoServer, fake_credentials
from tests.servers import free_cluster_port, free_port


class RedisServer:
    def __init__(
        self,
        workdir: Path,
        appendonly: bool = False,
        cluster: bool | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        """`cluster`: unset, the suite's kind (see `redis_server`). `args`: more of
        redis-server's options (`--maxmemory-policy allkeys-lru`...)."""
        if cluster is None:
            cluster = os.environ.get("GATEWAY_TEST_REDIS") != "plain"
        self.port = free_cluster_port() if cluster else free_port()
        self.workdir = workdir
        self.appendonly = appendonly
        self.cluster = cluster
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, claim_slots: bool = True) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("redis-server is not installed: run `make test`")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.workdir), "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]  # every write on disk before its reply
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(self.workdir / f"nodes-{self.port}.conf"),
            ]
        args += self.args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        if self.cluster and claim_slots:
            self._own_every_slot(client, deadline)
        client.close()

    @staticmethod
    def _own_every_slot(client: redis.Redis, deadline: float) -> None:
        """A fresh node takes all 16384 slots; a restarted one has them in nodes.conf."""
        if b"cluster_slots_assigned:16384" not in client.execute_command("CLUSTER", "INFO"):
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the one-node Redis Cluster did not come up")
            time.sleep(0.02)

    def cross_slot_refusals(self) -> int:
        client = redis.Redis(port=self.port)
        try:
            stats = client.info("errorstats")
        finally:
            client.close()
        return int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class ThreeNodeCluster:
    """A real Redis Cluster of three primaries on loopback, the slots split in three."""

    def __init__(self, workdir: Path) -> None:
        self.nodes = [RedisServer(workdir, cluster=True) for _ in range(3)]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> None:
        for node in self.nodes:
            node.start(claim_slots=False)
        clients = [redis.Redis(port=n.port) for n in self.nodes]
        try:
            for client, (lo, hi) in zip(
                clients, ((0, 5460), (5461, 10922), (10923, 16383)), strict=True
            ):
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + 20
            while not all(
                b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                and len(c.execute_command("CLUSTER", "NODES").splitlines()) == 3
                for c in clients
            ):
                if time.monotonic() > deadline:
                    raise RuntimeError("the three-node Redis Cluster did not come up")
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()

    def flush(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            client.flushall()
            client.config_resetstat()
            client.close()

    def cross_slot_refusals(self) -> int:
        return sum(n.cross_slot_refusals() for n in self.nodes)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(scope="session")
def three_node_cluster() -> Iterator[ThreeNodeCluster]:
    with tempfile.TemporaryDirectory() as d:
        cluster = ThreeNodeCluster(Path(d))
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A one-node Cluster (every script's keys must share a slot), or with
    GATEWAY_TEST_REDIS=plain a plain server (the gateway's other client: `make test` runs
    the modules that carry its data path again that way)."""
    with tempfile.TemporaryDirectory() as d:
        server = RedisServer(Path(d))
        server.start()
        yield server
        server.stop()


@pytest.fixture(scope="session")
def plain_redis_server() -> Iterator[RedisServer]:
    """A Redis not in cluster mode, for what differs there (the gateway's plain client)."""
    with tempfile.TemporaryDirectory() as d:
        server = RedisServer(Path(d), cluster=False)
        server.start()
        yield server
        server.stop()


@pytest.fixture(params=["cluster-node", "plain"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """The suite's Redis (a one-node Cluster), then a plain one."""
    if request.param == "cluster-node":
        return str(request.getfixturevalue("redis_url"))
    server: RedisServer = request.getfixturevalue("plain_redis_server")
    client = redis.Redis(port=server.port)
    client.flushall()
    client.close()
    return server.url


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    client = redis.Redis(port=redis_server.port)
    client.flushall()
    client.config_resetstat()
    client.close()
    yield redis_server.url
    assert redis_server.cross_slot_refusals() == 0, "a command spanned two hash slots"


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "outputs"
    path.mkdir()
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from what each test passes, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """moto's real S3 HTTP server, one process for the session (tests/s3server.py)."""
    server = MotoServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An empty bucket on `s3_server`, and the settings of a gateway storing into it."""
    fake_credentials(monkeypatch)
    s3_server.reset()
    s3_server.create_bucket()
    return {"storage_url": f"s3://{BUCKET}/{PREFIX}", "s3_endpoint_url": s3_server.url}


@pytest.fixture
def two_gateways(redis_url: str, storage_dir: Path, tmp_path: Path) -> Iterator[list[str]]:
    """Two real `gateway serve` processes on the suite's Redis (no in-process workers)."""
    from tests.harness import gateway_processes  # the harness imports the whole gateway

    with gateway_processes(redis_url, storage_dir, tmp_path, count=2) as bases:
        yield bases
