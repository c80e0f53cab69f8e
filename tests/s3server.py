"""A real S3 HTTP server for the tests: moto's (`moto_server`, the `moto[server]` dev
dependency), run as a process on a free loopback port; and a TCP proxy in front of it
that can cut uploads part way (a bucket's server that goes away mid-upload)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from tests.servers import free_port, relay

MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))
BUCKET = "gateway-outputs"
PREFIX = "outputs"


class MotoServer:
    """moto's S3 over HTTP. In memory: a restarted server has lost its buckets."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, "moto_server exited"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/moto-api/data.json", timeout=2).status_code == 200:
                    return
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.05)

    def kill(self) -> None:
        """Gone at once, as a crashed server (connections refused from now on)."""
        if self.proc:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.proc = None

    def reset(self) -> None:
        """Every bucket and object gone (moto's own reset API)."""
        httpx.post(f"{self.url}/moto-api/reset", timeout=10).raise_for_status()

    def client(self) -> Any:
        """A plain boto3 client, to look into the bucket behind the gateway's back."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",  # moto checks no signature
        )

    def create_bucket(self, bucket: str = BUCKET) -> None:
        self.client().create_bucket(Bucket=bucket)

    def allow_public_reads(self, bucket: str = BUCKET, prefix: str = PREFIX) -> None:
        """The bucket policy of a public base: anyone may GET an object under the prefix
        (by its unguessable name); nothing else, listing included, is granted."""
        statement = {
            "Effect": "Allow",
            "Principal": "*",
            "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{bucket}/{prefix}/*",
        }
        policy = {"Version": "2012-10-17", "Statement": [statement]}
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def keys(self, bucket: str = BUCKET) -> list[str]:
        listed = self.client().list_objects_v2(Bucket=bucket)
        return sorted(entry["Key"] for entry in listed.get("Contents", []))


def fake_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's standard chain finds these first: no profile, file or instance role of
    the machine is looked at."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class UploadCutter:
    """A TCP proxy in front of an S3 server. While `cutting`, a connection is relayed
    for its first `after` bytes (a PUT's headers and the start of its body) and then
    closed both ways: the server never receives the whole object, the client never
    hears back. `cut_uploads` counts the PUTs cut part way through their body, `heads`
    the HEAD requests sent."""

    def __init__(self, port: int, after: int = 4096) -> None:
        self.port, self.after = port, after
        self.cutting = False
        self.cut_uploads = 0
        self.heads = 0  # HEAD requests relayed

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            await server.wait_closed()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.port)

        async def requests() -> None:
            seen = bytearray()  # the connection's first bytes, up to `after`
            while data := await client_r.read(65536):
                self.heads += data.count(b"HEAD /")
                if self.cutting and len(seen) + len(data) > self.after:
                    part = data[: max(0, self.after - len(seen))]
                    server_w.write(part)
                    await server_w.drain()
                    head, sep, body = bytes(seen + part).partition(b"\r\n\r\n")
                    if head.startswith(b"PUT ") and sep and body:
                        self.cut_uploads += 1
                    return
                seen += data[: max(0, self.after - len(seen))]
                server_w.write(data)
                await server_w.drain()

        async def replies() -> None:
            while data := await server_r.read(65536):
                client_w.write(data)
                await client_w.drain()

        await relay(requests(), replies(), (client_w, server_w))
