"""The job record as stored in Redis (a hash) and as clients see it (a `Generation`)."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

TERMINAL = frozenset({"completed", "failed", "cancelled"})


def iso(ms: int | None) -> str | None:
    if not ms:
        return None
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_second(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=64)  # most stamps made are of the last few seconds
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


@dataclass
class Job:
    id: str
    account: str
    status: str
    provider: str  # what the client named: a service or a backend
    params: dict[str, Any]
    cost: int
    created_at: int
    type: str = "IMAGE"
    started_at: int | None = None
    completed_at: int | None = None
    webhook_url: str | None = None
    urls: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    upstream: dict[str, Any] | None = None  # {backend, id, sent}: resume, never resubmit
    refunded: int = 0
    cache_key: str | None = None  # digest of a cacheable request's parameters
    token: str | None = None  # the id of the client token it was made with
    #: the protocol its webhook speaks, when not the gateway's own (a provider-compatible
    #: route's: `{"protocol": "krea"}`, `{"protocol": "fluxkrea", "callback_data": ...}`)
    webhook_shape: dict[str, Any] | None = None
    #: the W3C `traceparent` of the admission that made it, kept only while tracing is on
    #: (gateway/telemetry.py): the worker's and the webhook's spans continue its trace
    trace: str | None = None

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def credit_cost(self) -> int:
        """What the job finally cost the client (0 once refunded)."""
        return self.cost - self.refunded

    @property
    def duration(self) -> float | None:
        if self.completed_at and self.status == "completed":
            return round((self.completed_at - self.created_at) / 1000, 3)
        return None

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        def opt_int(name: str) -> int | None:
            v = h.get(name)
            return int(v) if v not in (None, "") else None

        return cls(
            id=h["id"],
            account=h["account"],
            status=h["status"],
            provider=h["provider"],
            type=h.get("type", "IMAGE"),
            params=orjson.loads(h["params"]) if h.get("params") else {},
            cost=int(h.get("cost", 0)),
            created_at=int(h["created_at"]),
            started_at=opt_int("started_at"),
            completed_at=opt_int("completed_at"),
            webhook_url=h.get("webhook_url") or None,
            urls=orjson.loads(h["urls"]) if h.get("urls") else [],
            width=opt_int("width"),
            height=opt_int("height"),
            metadata=orjson.loads(h["metadata"]) if h.get("metadata") else {},
            error=h.get("error") or None,
            attempts=int(h.get("attempts", 0)),
            upstream=orjson.loads(h["upstream"]) if h.get("upstream") else None,
            refunded=int(h.get("refunded", 0)),
            cache_key=h.get("cache_key") or None,
            token=h.get("token") or None,
            webhook_shape=orjson.loads(h["webhook_shape"]) if h.get("webhook_shape") else None,
            trace=h.get("trace") or None,
        )

    def to_hash(self) -> dict[str, Any]:
        """The fields written when the job is created."""
        out: dict[str, Any] = {
            "id": self.id,
            "account": self.account,
            "status": self.status,
            "provider": self.provider,
            "type": self.type,
            "params": orjson.dumps(self.params).decode(),
            "cost": self.cost,
            "created_at": self.created_at,
        }
        # Written only when set: every reader takes a missing field for none.
        if self.webhook_url:
            out["webhook_url"] = self.webhook_url
        if self.cache_key:
            out["cache_key"] = self.cache_key
        if self.token:
            out["token"] = self.token
        if self.webhook_shape:
            out["webhook_shape"] = orjson.dumps(self.webhook_shape).decode()
        if self.trace:
            out["trace"] = self.trace
        if self.ended:
            out.update(outcome_fields(self.urls, self.width, self.height, self.metadata))
            out["completed_at"] = self.completed_at
        return out

    def public(self) -> dict[str, Any]:
        """The `Generation` as REST and webhooks send it (GraphQL's fields, camelCase)."""
        return {
            "id": self.id,
            "status": self.status,
            "type": self.type,
            "provider": self.provider,
            "url": self.urls[0] if self.urls else None,
            "urls": self.urls,
            "width": self.width,
            "height": self.height,
            "metadata": self.metadata or None,
            "creditCost": self.credit_cost,
            "createdAt": iso(self.created_at),
            "completedAt": iso(self.completed_at),
            "webhookUrl": self.webhook_url,
            "error": self.error,
            "duration": self.duration,
        }


def outcome_fields(
    urls: list[str], width: int | None, height: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    return {
        "urls": orjson.dumps(urls).decode(),
        "width": width or "",
        "height": height or "",
        "metadata": orjson.dumps(metadata).decode(),
    }
