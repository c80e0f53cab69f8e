"""Where outputs live: `ArtifactStore`, a local directory (`LocalArtifactStore`) or an
S3-compatible bucket (`gateway/artifacts_s3.py`, when `GATEWAY_STORAGE_URL` is set).

Names are 144 random bits: the URLs are public like a CDN's, and unguessable.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import secrets
from pathlib import Path
from typing import Protocol

#: What `new_name` makes: 18 random bytes in URL-safe base64, then the format's extension.
NAME = re.compile(r"[A-Za-z0-9_-]{24}\.[a-z0-9]{1,8}")


#: How outputs are served, from the directory or a bucket: a name is never reused, so
#: caches may keep an output as long as they like.
CACHE_CONTROL = "public, max-age=31536000, immutable"


def new_name(ext: str) -> str:
    return f"{secrets.token_urlsafe(18)}.{ext}"


class StorageUnavailable(Exception):
    """The output store failed or could not be reached (a bucket's server away, or gone
    mid-upload): nothing was stored, and the same call may succeed later. A worker leaves
    its job for a retry; the API answers 503."""


class ArtifactStore(Protocol):
    async def put(self, data: bytes, ext: str) -> str:
        """Store bytes; return the public URL once they are stored (durably: a job is
        completed only after). Raises `StorageUnavailable` when they could not be."""
        ...

    async def read(self, url: str) -> bytes | None:
        """The bytes stored at a URL `put` returned, found by its name: the base it was
        made with does not matter (another process's, or a public URL since changed).
        None when there are none."""
        ...

    async def delete(self, urls: list[str]) -> None: ...

    async def ready(self) -> bool: ...

    async def sweep(self, older_than: float) -> int:
        """Remove outputs stored before `older_than` (unix seconds); how many."""
        ...


class LocalArtifactStore:
    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = base_url.rstrip("/") + "/outputs"
        root.mkdir(parents=True, exist_ok=True)

    def _write(self, name: str, data: bytes) -> None:
        """The file, then its name, on disk before this returns: the job that names it is
        completed (and charged, and cached) only after, so a power cut or a host crash
        cannot leave a completed job with no picture or an empty file behind its URL."""
        tmp = self.root / f".{name}.tmp"
        try:
            with open(tmp, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, self.root / name)  # readers never see half a file
            self._sync_directory()
        except OSError as exc:  # a full disk, a volume gone: the job waits for a retry
            for made in (tmp, self.root / name):  # renamed, not synced: a retry makes another
                with contextlib.suppress(OSError):
                    made.unlink(missing_ok=True)
            raise StorageUnavailable(f"the output directory refused a write: {exc}") from exc

    def _sync_directory(self) -> None:
        """The directory's entries (a name just made) on disk."""
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # a filesystem with nothing to sync for one
                raise
        finally:
            os.close(fd)

    async def put(self, data: bytes, ext: str) -> str:
        name = new_name(ext)
        await asyncio.to_thread(self._write, name, data)
        return f"{self.base_url}/{name}"

    def _path(self, url: str) -> Path | None:
        name = url.rpartition("/")[2]
        return self.root / name if NAME.fullmatch(name) else None

    async def read(self, url: str) -> bytes | None:
        path = self._path(url)
        if path is None:
            return None
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError):
            return None
        except OSError as exc:
            raise StorageUnavailable(f"the output directory refused a read: {exc}") from exc

    async def delete(self, urls: list[str]) -> None:
        def remove() -> None:
            for url in urls:
                name = url.rsplit("/", 1)[-1]
                if name and "/" not in name and not name.startswith("."):
                    (self.root / name).unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def ready(self) -> bool:
        def check() -> bool:
            return self.root.is_dir() and os.access(self.root, os.W_OK)

        return await asyncio.to_thread(check)

    async def sweep(self, older_than: float) -> int:
        """Only names `new_name` makes (and the temporary files of writes a crash cut
        short): the directory may hold other files, which are not the gateway's."""

        def ours(name: str) -> bool:
            if name.startswith(".") and name.endswith(".tmp"):
                name = name[1:-4]
            return NAME.fullmatch(name) is not None

        def remove() -> int:
            removed = 0
            for path in self.root.iterdir():
                try:
                    if ours(path.name) and path.is_file() and path.stat().st_mtime < older_than:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue  # another process swept it first
            return removed

        return await asyncio.to_thread(remove)
