"""The job record as stored in Redis (a hash) and as clients see it (a `Generation`)."""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.params import ImageParams

#: a job id as admission makes it: 12 random bytes, in hex (`Gateway._generate`)
JOB_ID = re.compile(r"[0-9a-f]{24}")
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
    #: its webhook's delivery: delivered, retrying or failed (set by gateway/webhooks.py)
    webhook_status: str | None = None
    urls: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    rejected: bool = False  # failed because the upstream refused its input (400/422)
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
    def from_record(cls, r: dict[str, Any]) -> Job:
        """The job of a record as read (gateway/store/record.lua: one JSON object, `id`
        and `account` added from its key). A record written as a hash, before that
        format, holds every value as a string: each is taken either way."""
        params = _params(r.get("params"))
        width, height = _int(r.get("width")), _int(r.get("height"))
        metadata = _json(r.get("metadata")) or {}
        if "meta" in r and isinstance(params, dict):  # a completed run's (`compact_metadata`)
            width = width or _int(params.get("width"))
            height = height or _int(params.get("height"))
            meta = _json(r["meta"])
            metadata = expand_metadata(meta, {**r, "width": width, "height": height})
        return cls(
            id=r["id"],
            account=r["account"],
            status=r["status"],
            provider=r["provider"],
            type=r.get("type") or "IMAGE",
            params=params,
            cost=int(r.get("cost") or 0),
            created_at=int(r["created_at"]),
            started_at=_int(r.get("started_at")),
            completed_at=_int(r.get("completed_at")),
            webhook_url=r.get("webhook_url") or None,
            webhook_status=r.get("webhook_status") or None,
            urls=_json(r.get("urls")) or [],
            width=width,
            height=height,
            metadata=metadata,
            error=r.get("error") or None,
            rejected=bool(r.get("rejected")),
            attempts=int(r.get("attempts") or 0),
            upstream=_json(r.get("upstream")) or None,
            refunded=int(r.get("refunded") or 0),
            cache_key=r.get("cache_key") or None,
            token=r.get("token") or None,
            webhook_shape=_json(r.get("webhook_shape")) or None,
            trace=r.get("trace") or None,
        )

    def to_record(self) -> dict[str, Any]:
        """The record written when the job is created: what is unset, or the default, or
        its key's (`id`, `account`) left out; every reader takes a missing field for it."""
        head, rest = self.record_parts()
        return {**head, **rest}

    def record_parts(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """`to_record` in two: its status, params and cost, and the rest. Admission sends
        them apart, as JSON each: admit.lua makes a cache hit's record of the rest alone,
        without decoding it."""
        head: dict[str, Any] = {
            "status": self.status,
            "params": {
                k: v
                for k, v in self.params.items()
                if k not in _PARAM_DEFAULTS or _PARAM_DEFAULTS[k] != v
            },
        }
        if self.cost:
            head["cost"] = self.cost
        rest: dict[str, Any] = {"provider": self.provider, "created_at": self.created_at}
        if self.type != "IMAGE":
            rest["type"] = self.type
        if self.webhook_url:
            rest["webhook_url"] = self.webhook_url
        if self.cache_key:  # and what it costs, should a hit or a wait make it free
            rest["cache_key"], rest["price"] = self.cache_key, self.cost
        if self.token:
            rest["token"] = self.token
        if self.webhook_shape:
            rest["webhook_shape"] = text(self.webhook_shape)
        if self.trace:
            rest["trace"] = self.trace
        if self.ended:
            rest.update(outcome_fields(self.urls, self.width, self.height, self.metadata))
            rest["completed_at"] = self.completed_at
        return head, rest

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
            "webhookStatus": self.webhook_status,
            "error": self.error,
            "duration": self.duration,
        }


def outcome_fields(
    urls: list[str], width: int | None, height: int | None, metadata: dict[str, Any]
) -> dict[str, Any]:
    """A record's outcome fields (those unset left out)."""
    out: dict[str, Any] = {"urls": urls} if urls else {}
    if width:
        out["width"] = width
    if height:
        out["height"] = height
    if metadata:
        out["metadata"] = text(metadata)
    return out


def text(value: Any) -> Any:
    """A record's nested value that no script reads (metadata, the upstream's job, the
    webhook's shape) as the record keeps it: as it is when Lua's cjson, decoding and saving
    the record again, writes it back unchanged; else as JSON text (cjson writes a number
    of more than 14 digits rounded, a whole float as an integer, an empty list as {})."""
    return value if _survives_cjson(value) else orjson.dumps(value).decode()


def _survives_cjson(value: Any) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(_survives_cjson(v) for v in value.values())
    if isinstance(value, list):
        return bool(value) and all(_survives_cjson(v) for v in value)
    if isinstance(value, bool | str) or value is None:
        return True
    if isinstance(value, int):
        return abs(value) < 10**14
    if isinstance(value, float):
        return not value.is_integer() and float(f"{value:.14g}") == value
    return False


# A completed job's metadata restates much of its record (the size, the seed, the prompt
# sent, how long it took): the record keeps the rest, as `meta`, and the metadata is
# made again when it is read. Only when that gives back the same metadata, key for key;
# otherwise the record keeps it whole (`metadata`). Such a record leaves out its size
# too when it is the one asked for (`Job.from_record`). docs/api.md#redis-memory


def compact_metadata(metadata: dict[str, Any], record: dict[str, Any]) -> dict[str, Any] | None:
    """`metadata` less what `record` (the fields the job ends with) restates; None when
    `expand_metadata` would not give it back."""
    derived = _derived({}, record)
    meta = {k: v for k, v in metadata.items() if k not in derived or derived[k] != v}
    if "seed" in meta:  # not the one asked for: the seeds follow from it
        derived = _derived(meta, record)
        meta = {k: v for k, v in metadata.items() if k not in derived or derived[k] != v}
        meta["seed"] = metadata["seed"]
    sent = metadata.get("sent")
    if isinstance(sent, dict):
        # What was sent holds the prompt, the size and the seed as they were asked (most
        # backends): those left out, when they are all there.
        again = _sent(meta, record)
        if all(k in sent and sent[k] == v for k, v in again.items()):
            meta["sent"] = {k: v for k, v in sent.items() if k not in again}
            if expand_metadata(meta, record) == metadata:
                return meta
            meta["sent"] = sent
    return meta if expand_metadata(meta, record) == metadata else None


def expand_metadata(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    metadata = {**_derived(meta, record), **meta}
    sent = meta.get("sent")
    if isinstance(sent, dict) and "prompt" not in sent:
        metadata["sent"] = {**_sent(meta, record), **sent}
    return metadata


def _derived(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    params = _json(record.get("params")) or {}
    seed = meta.get("seed", params.get("seed"))
    created, completed = _int(record.get("created_at")), _int(record.get("completed_at"))
    return {
        "width": _int(record.get("width")),
        "height": _int(record.get("height")),
        "seed": seed,
        "seeds": [seed] * len(_json(record.get("urls")) or ()),
        "cached": False,
        "duration": round((completed - created) / 1000, 3) if completed and created else None,
        "attempts": _int(record.get("attempts")),
    }


def _sent(meta: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    derived = _derived(meta, record)
    prompt = (_json(record.get("params")) or {}).get("prompt")
    return {
        "prompt": prompt,
        "width": derived["width"],
        "height": derived["height"],
        "seed": derived["seed"],
    }


# A request's parameters as a record keeps them: those at their default left out.
_PARAM_DEFAULTS: dict[str, Any] = {
    f.name: f.default
    for f in dataclasses.fields(ImageParams)
    if f.default is not dataclasses.MISSING
}


def _params(value: Any) -> Any:
    params = _json(value)
    return {**_PARAM_DEFAULTS, **params} if isinstance(params, dict) else params or {}


def _int(value: Any) -> int | None:
    return int(value) if value not in (None, "") else None


def _json(value: Any) -> Any:
    """A nested value, or the JSON text a record written as a hash held (or a hit's
    entry). Text that is not JSON is kept as it is: a damaged record fails where it is
    read, as any other wrong value does."""
    if isinstance(value, str) and value:
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
    return value
