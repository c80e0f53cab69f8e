"""The documents of automatic persisted queries (Apollo's APQ), by their SHA-256.

Kept in Redis, so every gateway process shares them: one hash of documents and a sorted
set of when each was last stored or fetched, both under the tag `{apq}` (one slot), each
change one script (`apq_put.lua`, `apq_get.lua`). Bounded: at most `apq_max_documents`,
the least recently used evicted first; a document's length is bounded by the protocol
(`schema/persisted.py`), so the memory is too. In front, a process-local LRU of
hash -> document: a hash this process has seen costs no round trip.

What a request carries and what it is answered: `schema/persisted.py`
(docs/api.md#persisted-queries).
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

from gateway.errors import ServiceUnavailable
from gateway.store import keys
from gateway.store.redis import store_trouble
from gateway.store.scripts import Scripts

# Documents one process keeps (each at most `apq_max_document_bytes`).
LOCAL_DOCUMENTS = 512
# A document this process stored or fetched this recently is not stored again when a
# client sends its text with its hash once more (some clients always do).
CONFIRMED_SECONDS = 60.0


def sha256_hex(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


class PersistedQueries:
    def __init__(
        self,
        scripts: Scripts,
        *,
        max_documents: int,
        max_document_bytes: int,
        local_documents: int = LOCAL_DOCUMENTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.scripts = scripts
        self.max_documents = max_documents
        self.max_document_bytes = max_document_bytes  # checked by the protocol
        self.local_documents = local_documents
        self.clock = clock
        # sha -> (document, when Redis was last seen holding it: time.monotonic())
        self._local: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def known(self, sha: str) -> str | None:
        """The document, if this process holds it (no round trip)."""
        entry = self._local.get(sha)
        if entry is None:
            return None
        self._local.move_to_end(sha)
        return entry[0]

    async def get(self, sha: str) -> str | None:
        """The document of `sha`, from this process or from Redis; None when unknown.
        Redis away: ServiceUnavailable (503)."""
        document = self.known(sha)
        if document is not None:
            return document
        try:
            reply = await self.scripts.apq_get(
                documents=keys.apq_documents(),
                used=keys.apq_used(),
                sha=sha,
                now_ms=int(self.clock() * 1000),
            )
        except Exception as exc:
            if isinstance(exc, OSError) or store_trouble(exc):
                raise ServiceUnavailable("the persisted-query store is unreachable") from exc
            raise
        document = reply.document
        if document is None or sha256_hex(document) != sha:  # a damaged entry: unknown
            return None
        self._remember(sha, document)
        return document

    async def put(self, sha: str, document: str) -> None:
        """Store `document` (whose SHA-256 is `sha`, checked by the caller), unless this
        process stored or fetched it a moment ago. Redis errors are raised."""
        entry = self._local.get(sha)
        if entry is not None and time.monotonic() - entry[1] < CONFIRMED_SECONDS:
            self._local.move_to_end(sha)
            return
        await self.scripts.apq_put(
            documents=keys.apq_documents(),
            used=keys.apq_used(),
            sha=sha,
            document=document,
            now_ms=int(self.clock() * 1000),
            max_documents=self.max_documents,
        )
        self._remember(sha, document)

    def _remember(self, sha: str, document: str) -> None:
        self._local[sha] = (document, time.monotonic())
        self._local.move_to_end(sha)
        while len(self._local) > self.local_documents:
            self._local.popitem(last=False)
