"""Usage reports (docs/api.md#usage): one account's requests, images and credits over a
range of UTC time, by day, service or backend.

Read, never written: the job records in range (the `jobs` index by score, the creation
time in ms) and the ledger (`XRANGE` by ms ids), page by page, each page one read and
one pipeline, nothing kept but the counts. At most `MAX_JOBS` jobs and `MAX_LEDGER`
ledger entries are read; a range holding more is answered for its earliest ones, with
`truncated` set.

Each job is counted at its creation time, from its own record: its request, its
images (when it completed), what it was charged and refunded (its `cost` and
`refunded`, so a refund that came after the range still counts with its request), and,
served by the cache or an identical request in flight, what it would have cost (its
`price`). A record lives `GATEWAY_RETENTION_DAYS`; the ledger longer. A charge or
refund in range whose job record is gone is counted from the ledger, at the entry's
own time, under the key `expired` (by service or backend: its record said which, and is
no more); such a job's request and images are no longer known.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from gateway import pricing
from gateway.errors import BadUserInput
from gateway.jobs.model import iso
from gateway.store import keys
from gateway.store.redis import decoded_hash
from gateway.store.scripts import Read

GROUPS = ("day", "service", "backend")
MAX_DAYS = 366
PAGE = 1000
MAX_JOBS = 50_000
MAX_LEDGER = 50_000
EXPIRED = "expired"  # the key of credits whose job record has expired
NO_BACKEND = "none"  # a job that never reached a backend (failed at once, say)
DAY_MS = 86_400_000


@dataclass
class Counts:
    requests: int = 0
    images: int = 0
    credits_spent: int = 0
    credits_refunded: int = 0
    cache_hits: int = 0
    credits_saved: int = 0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.images += other.images
        self.credits_spent += other.credits_spent
        self.credits_refunded += other.credits_refunded
        self.cache_hits += other.cache_hits
        self.credits_saved += other.credits_saved

    def public(self) -> dict[str, int]:
        """camelCase, as GraphQL and `gateway usage --json` name them."""
        return {
            "requests": self.requests,
            "images": self.images,
            "creditsSpent": self.credits_spent,
            "creditsRefunded": self.credits_refunded,
            "cacheHits": self.cache_hits,
            "creditsSaved": self.credits_saved,
        }


@dataclass
class Report:
    account: str
    start_ms: int
    end_ms: int  # exclusive
    group_by: str
    rows: list[tuple[str, Counts]] = field(default_factory=list)
    totals: Counts = field(default_factory=Counts)
    truncated: bool = False
    pages: int = 0  # pages read (`PAGE` entries or records each): what it cost, in reads

    def public(self) -> dict[str, Any]:
        return {
            "accountId": self.account,
            "from": iso(self.start_ms),
            "to": iso(self.end_ms),
            "groupBy": self.group_by.upper(),
            "rows": [{"key": key, **counts.public()} for key, counts in self.rows],
            "totals": self.totals.public(),
            "truncated": self.truncated,
        }


def _instant(value: str, name: str, *, end: bool) -> int:
    """UTC ms of an ISO date or datetime; a date `to` means the end of that day."""
    text = value.strip()
    try:
        if len(text) == 10:  # YYYY-MM-DD
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if end:
                moment += timedelta(days=1)
        else:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except OverflowError:  # the end of 9999-12-31 is past what datetime holds
        raise BadUserInput(f"{name} must be on or before 9999-12-30", field=name) from None
    except ValueError:
        raise BadUserInput(
            f"{name} must be an ISO date (2025-01-31) or datetime (2025-01-31T12:00:00Z)",
            field=name,
        ) from None
    ms = int(moment.timestamp() * 1000)
    if ms < 0:  # a ledger's entries are named by their time: none is before 1970
        raise BadUserInput(f"{name} must be in 1970 or later", field=name)
    return ms


def parse_range(start: str, end: str) -> tuple[int, int]:
    """[from, to) in UTC ms; `to` a date includes that whole day. At most `MAX_DAYS`."""
    start_ms = _instant(start, "from", end=False)
    end_ms = _instant(end, "to", end=True)
    if end_ms <= start_ms:
        raise BadUserInput("to must come after from", field="to")
    if end_ms - start_ms > MAX_DAYS * DAY_MS:
        raise BadUserInput(f"the range may span at most {MAX_DAYS} days", field="to")
    return start_ms, end_ms


def default_range(now: float | None = None) -> tuple[str, str]:
    """The last 30 UTC days, today included."""
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date()
    return (today - timedelta(days=29)).isoformat(), today.isoformat()


def _day(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


def _object(value: Any) -> dict[str, Any]:
    """A record's nested object (or the JSON text of one: a hit's entry's, an old record's)."""
    if isinstance(value, str) and value:
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return {}
    return value if isinstance(value, dict) else {}


def _int(raw: Any) -> int:
    try:
        return int(raw or 0)
    except ValueError:
        return 0


def _job_counts(record: dict[str, Any]) -> tuple[str, str, Counts]:
    """(service, backend, counts) of one job record (as `Read` returns it)."""
    # a completed run's record keeps its metadata less what it restates (`meta`): its
    # backend stays, `cached` (false) goes (gateway/jobs/model.py)
    meta = _object(record.get("metadata") or record.get("meta"))
    params = _object(record.get("params"))
    cost, price = _int(record.get("cost")), _int(record.get("price"))
    counts = Counts(requests=1, credits_spent=cost, credits_refunded=_int(record.get("refunded")))
    if record["status"] == "completed":
        counts.images = _int(str(params.get("num_images") or 1))
        # Served by the cache or by an identical request in flight: charged nothing.
        if _int(record.get("hit")) >= 1 or meta.get("cached") is True or (cost == 0 and price > 0):
            counts.cache_hits = 1
            if not price and params.get("width") and params.get("height"):
                # a hit's record that refers to its cache entry holds no price
                price = pricing.cost(
                    _int(str(params["width"])), _int(str(params["height"])), counts.images
                )
            counts.credits_saved = price
    backend = meta.get("backend") or _object(record.get("upstream")).get("backend") or NO_BACKEND
    return record.get("provider") or "", str(backend), counts


async def _records(redis: aioredis.Redis, account: str, ids: list[str]) -> list[dict[str, Any]]:
    """Each job's record, a cache hit's with its entry's params and metadata (empty: the
    record is gone): one script call for the page (read.lua)."""
    jobs = [keys.job(account, job_id) for job_id in ids]
    return (await Read(redis)(jobs=jobs)).records


class _Tally:
    def __init__(self, group_by: str) -> None:
        self.group_by = group_by
        self.groups: dict[str, Counts] = {}
        self.pages = 0  # pages of up to PAGE ledger entries or job records read

    def add(self, ms: int, service: str, backend: str, counts: Counts) -> None:
        key = _day(ms) if self.group_by == "day" else service
        if self.group_by == "backend":
            key = backend
        self.groups.setdefault(key, Counts()).add(counts)


async def _scan_ledger(
    redis: aioredis.Redis, account: str, start_ms: int, end_ms: int, tally: _Tally
) -> bool:
    """Charges and refunds in range whose job record has expired; True when capped."""
    stream = keys.ledger(account)
    low, high = f"{start_ms}-0", str(end_ms - 1)  # a bare ms: every entry of that ms
    read = 0
    while True:
        entries = await redis.xrange(stream, min=low, max=high, count=PAGE) or []
        tally.pages += 1
        moved: list[tuple[int, dict[str, str]]] = []
        for entry_id, raw in entries:
            fields = decoded_hash(raw or {})
            if fields.get("reason") in ("charge", "refund") and fields.get("job"):
                moved.append((int(str(entry_id).partition("-")[0]), fields))
        if moved:
            async with redis.pipeline(transaction=False) as pipe:
                for _, fields in moved:
                    pipe.exists(keys.job(account, fields["job"]))
                exists: list[int] = await pipe.execute()
            for (ms, fields), alive in zip(moved, exists, strict=True):
                if alive:
                    continue  # counted from its record, at its creation time
                delta = _int(fields.get("delta"))
                counts = Counts()
                if fields["reason"] == "charge":
                    counts.credits_spent = -delta
                else:
                    counts.credits_refunded = delta
                tally.add(ms, EXPIRED, EXPIRED, counts)
        read += len(entries)
        if len(entries) < PAGE:
            return False
        if read >= MAX_LEDGER:
            return True
        last_ms, _, seq = str(entries[-1][0]).partition("-")
        low = f"{last_ms}-{int(seq) + 1}"


async def _scan_jobs(
    redis: aioredis.Redis, account: str, start_ms: int, end_ms: int, tally: _Tally
) -> bool:
    """Every job created in range, from its record; True when capped."""
    index = keys.jobs(account)
    low = start_ms
    seen_at_low: set[str] = set()  # ids of score `low` already read (ties across pages)
    read = 0
    while True:
        want = PAGE + len(seen_at_low)
        got = cast(
            list[tuple[str, float]],
            await redis.zrangebyscore(index, low, f"({end_ms}", start=0, num=want, withscores=True),
        )
        fresh = [(m, int(s)) for m, s in got if not (int(s) == low and m in seen_at_low)]
        tally.pages += 1
        if fresh:
            records = await _records(redis, account, [job_id for job_id, _ in fresh])
            for (_, ms), record in zip(fresh, records, strict=True):
                if not record:  # expired: its credits came from the ledger
                    continue
                service, backend, counts = _job_counts(record)
                tally.add(ms, service, backend, counts)
        read += len(fresh)
        if len(got) < want:
            return False
        if read >= MAX_JOBS:
            return True
        last = int(got[-1][1])
        if last != low:
            low, seen_at_low = last, set()
        seen_at_low |= {m for m, s in got if int(s) == last}


async def report(
    redis: aioredis.Redis, account: str, start_ms: int, end_ms: int, group_by: str
) -> Report:
    """The usage of `account` in [start_ms, end_ms), grouped by `group_by` (`GROUPS`).

    The ledger is read first: a record that expires between the two reads is then
    missed, never counted twice."""
    if group_by not in GROUPS:
        raise BadUserInput(f"groupBy must be one of {list(GROUPS)}", field="groupBy")
    tally = _Tally(group_by)
    capped = await _scan_ledger(redis, account, start_ms, end_ms, tally)
    capped = await _scan_jobs(redis, account, start_ms, end_ms, tally) or capped
    out = Report(account, start_ms, end_ms, group_by, truncated=capped, pages=tally.pages)
    out.rows = sorted(tally.groups.items())
    for _, counts in out.rows:
        out.totals.add(counts)
    return out
