"""`S3ArtifactStore`: outputs as objects `PREFIX/NAME` in an S3-compatible bucket
(AWS S3, MinIO, R2, Ceph, ...), through aiobotocore.

The URL handed out for an object is one that never expires, so that job records, cache
entries, webhooks and clients' own databases may keep it for the whole retention:

- with `GATEWAY_STORAGE_PUBLIC_URL` (a CDN, or a bucket whose objects are public), that
  base plus the name;
- without it, the gateway's own `GATEWAY_PUBLIC_URL/outputs/NAME` (the shape the local
  directory hands out), answered with a 302 to a presigned URL made fresh for each
  request (`location`). A presigned URL cannot be handed out itself: SigV4 caps its life
  at 7 days, and one signed with temporary credentials (an instance role, STS) dies with
  them, after hours; a cache hit hands the same URL out again days later.

Durability: `put` returns once the server has answered the upload with success (S3's
PUT is all or nothing: a cut upload stores nothing, and Content-MD5 has the server
refuse bytes damaged on the way), so a job is never completed with a missing object.
Any failure is `StorageUnavailable`: the worker leaves the job for a retry.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from gateway.artifacts import CACHE_CONTROL, NAME, StorageUnavailable, new_name
from gateway.config import Settings
from gateway.formats import format_named

log = structlog.get_logger("gateway.artifacts")

#: What a failed call to the bucket's server raises (aiobotocore maps most of aiohttp's).
FAILURES = (BotoCoreError, ClientError, aiohttp.ClientError, OSError, TimeoutError)
MISSING = {"NoSuchKey", "404", "NotFound"}
DELETE_BATCH = 1000  # DeleteObjects' limit
READY_TIMEOUT = 5.0  # /readyz answers within this even when the server hangs
#: /readyz, open to anyone, asks the bucket once in this many seconds at most, however
#: often it is asked: each HeadBucket is a request the bucket's owner pays for
READY_REUSE = 1.0


class _Upload(io.RawIOBase):
    """The bytes of one upload, read in chunks straight from the caller's buffer.

    A bytes body would be wrapped in a `BytesIO` by botocore, whose buffer aiohttp takes
    with `getbuffer()`: a full copy of the image. Read through this, only a chunk at a
    time is copied (aiohttp's 64 KiB, botocore's 1 MiB when it hashes the payload for
    SigV4 over plain HTTP); seekable, so botocore rewinds it to retry."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else self._pos + size
        chunk = bytes(self._view[self._pos : end])
        self._pos += len(chunk)
        return chunk

    def readall(self) -> bytes:
        return self.read()

    def __len__(self) -> int:
        return len(self._view)


class S3ArtifactStore:
    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str,
        *,
        gateway_url: str,
        public_url: str | None,
        presign_seconds: int,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.gateway_base = gateway_url.rstrip("/") + "/outputs"
        self.public_base = public_url.rstrip("/") if public_url else None
        self.presign_seconds = presign_seconds
        self._ready: asyncio.Future[bool] | None = None  # the last check
        self._ready_at = 0.0  # when it ended

    # -- names, keys and URLs ----------------------------------------------------------

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _url(self, name: str) -> str:
        return f"{self.public_base or self.gateway_base}/{name}"

    def _name(self, url: str) -> str | None:
        """The name in a URL this store handed out, whatever its base (`ArtifactStore.read`);
        None for a URL that ends in no name of ours."""
        name = url.rpartition("/")[2]
        return name if NAME.fullmatch(name) else None

    async def location(self, name: str) -> str | None:
        """Where `GET /outputs/NAME` sends a client: the public URL, or a presigned one
        made now. None for what is no name of ours (the object itself is not looked up:
        the bucket answers 404 for one that is gone)."""
        if not NAME.fullmatch(name):
            return None
        if self.public_base:
            return f"{self.public_base}/{name}"
        try:
            url: str = await self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(name)},
                ExpiresIn=self.presign_seconds,
            )
        except FAILURES as exc:  # no credentials, say
            raise StorageUnavailable(f"cannot sign a URL for {name}: {exc}") from exc
        return url

    # -- the ArtifactStore protocol ----------------------------------------------------

    async def put(self, data: bytes, ext: str) -> str:
        name = new_name(ext)
        kind = format_named(ext)
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        try:
            await self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(name),
                Body=_Upload(data),
                ContentLength=len(data),
                ContentMD5=base64.b64encode(digest).decode(),
                ContentType=kind.content_type if kind else "application/octet-stream",
                CacheControl=CACHE_CONTROL,
            )
        except FAILURES as exc:
            raise StorageUnavailable(f"storing {name} in bucket {self.bucket}: {exc}") from exc
        return self._url(name)

    async def read(self, url: str) -> bytes | None:
        name = self._name(url)
        if name is None:
            return None
        try:
            response = await self.client.get_object(Bucket=self.bucket, Key=self._key(name))
            async with response["Body"] as body:
                data: bytes = await body.read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in MISSING:
                return None
            raise StorageUnavailable(f"reading {name}: {exc}") from exc
        except FAILURES as exc:
            raise StorageUnavailable(f"reading {name}: {exc}") from exc
        return data

    async def delete(self, urls: list[str]) -> None:
        keys = [self._key(name) for name in map(self._name, urls) if name]
        await self._delete_keys(keys)

    async def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                reply = await self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except FAILURES as exc:
                raise StorageUnavailable(f"deleting {len(batch)} objects: {exc}") from exc
            errors = reply.get("Errors") or []
            if errors:
                raise StorageUnavailable(f"{len(errors)} objects not deleted: {errors[0]}")

    async def ready(self) -> bool:
        """The bucket answers: the last check's answer, or a new check's once that one
        ended READY_REUSE ago (callers meanwhile share it)."""
        last = self._ready
        if last is None or (last.done() and time.monotonic() - self._ready_at >= READY_REUSE):
            last = self._ready = asyncio.ensure_future(self._check())
            last.add_done_callback(_seen)
        return await asyncio.shield(last)

    async def _check(self) -> bool:
        try:
            return await self._head_bucket()
        finally:
            self._ready_at = time.monotonic()

    async def _head_bucket(self) -> bool:
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await self.client.head_bucket(Bucket=self.bucket)
        except FAILURES as exc:  # TimeoutError among them: the time ran out
            log.warning("bucket not ready", bucket=self.bucket, error=repr(exc))
            return False
        return True

    async def sweep(self, older_than: float) -> int:
        """List the prefix, a page at a time, and delete our objects (names `new_name`
        makes, directly under the prefix) stored before `older_than`. A bucket lifecycle
        rule expiring `PREFIX/` a day after the retention does the same without listing
        (docs/api.md#configuration)."""
        prefix = f"{self.prefix}/" if self.prefix else ""
        removed = 0
        old: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
                for entry in page.get("Contents") or []:
                    key, modified = entry["Key"], entry["LastModified"].timestamp()
                    if NAME.fullmatch(key[len(prefix) :]) and modified < older_than:
                        old.append(key)
                if len(old) >= DELETE_BATCH:
                    await self._delete_keys(old)
                    removed += len(old)
                    old = []
        except FAILURES as exc:
            raise StorageUnavailable(f"listing bucket {self.bucket}: {exc}") from exc
        await self._delete_keys(old)
        return removed + len(old)


def _seen(check: asyncio.Future[bool]) -> None:
    """A shared check's error marked seen: every caller awaiting it may have gone."""
    if not check.cancelled():
        check.exception()


def _content_md5(request: Any, **_: Any) -> None:
    """DeleteObjects must carry a checksum; botocore (1.36+) sends a CRC32 one even with
    `when_required`, which MinIO and other S3-compatible servers refuse
    (MissingContentMD5): send Content-MD5, which every one of them checks, instead."""
    body = request.body if isinstance(request.body, bytes) else b""
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    request.headers["Content-MD5"] = base64.b64encode(digest).decode()
    for name in ("x-amz-checksum-crc32", "x-amz-sdk-checksum-algorithm"):
        if name in request.headers:
            del request.headers[name]


@contextlib.asynccontextmanager
async def open_s3(settings: Settings) -> AsyncIterator[S3ArtifactStore]:
    """A store on the bucket `settings.storage_url` names; its client closed on exit.
    Nothing is sent to the server here: a bucket that is away makes `/readyz` say so and
    jobs wait for it, rather than stopping start-up."""
    bucket, prefix = settings.storage_bucket
    config = AioConfig(
        signature_version="s3v4",
        # Virtual-hosted names (BUCKET.host) rarely resolve for MinIO and its kind.
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
        connect_timeout=5,
        read_timeout=30,
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=min(settings.workers, 256),
        # botocore's default CRC checksums (1.36+) are refused by several S3-compatible
        # servers; uploads carry Content-MD5, which all of them check.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = get_session()
    async with session.create_client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        # botocore reads AWS_DEFAULT_REGION, not AWS_REGION, which the AWS SDKs and CLI
        # read as well (first): both, as docs/api.md#configuration says.
        region_name=settings.s3_region or os.environ.get("AWS_REGION") or None,
        config=config,
    ) as client:
        client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5)
        yield S3ArtifactStore(
            client,
            bucket,
            prefix,
            gateway_url=settings.base_url,
            public_url=settings.storage_public_url,
            presign_seconds=settings.storage_presign_seconds,
        )
