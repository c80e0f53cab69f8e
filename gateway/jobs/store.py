"""Reading and changing job records. State changes that must be atomic go through Lua."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from gateway.errors import BadUserInput
from gateway.jobs.model import Job, compact_metadata, outcome_fields, text
from gateway.store import keys
from gateway.store.redis import decoded_members
from gateway.store.scripts import Scripts

#: records a page filtered by status reads at most, and per script call
SCAN_MOST = 1_000
SCAN_BATCH = 100
#: jobs whose slots one lease.lua call renews (Redis runs nothing else meanwhile)
LEASE_BATCH = 500


class JobStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        scripts: Scripts,
        retention_days: float = 7.0,
        ledger_keep_ms: int = 0,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.retention_ms = int(retention_days * 86_400_000)
        self.ledger_keep_ms = ledger_keep_ms  # 0: keep all

    @staticmethod
    def plausible(job_id: str) -> bool:
        """Could be a job's id (else no record is looked for)."""
        return 0 < len(job_id) <= 64

    async def get(self, account: str, job_id: str) -> Job | None:
        if not self.plausible(job_id):
            return None
        return await self.get_by_key(keys.job(account, job_id))

    async def get_by_key(self, job_key: str) -> Job | None:
        """The record, whole: a cache hit's outcome is read from the cache entry it refers
        to, in the same round trip (read.lua)."""
        (record,) = (await self.scripts.read(jobs=[job_key], client=self.redis)).records
        return Job.from_record(record) if record else None

    async def page(
        self, account: str, first: int, after: str | None, status: str | None, token: str = ""
    ) -> tuple[list[Job], bool, str | None]:
        """Newest first: the jobs, whether more may follow, and the cursor to go on from
        (`after`: the id of the last job the previous page went through); `token`: only
        the jobs made with this client token.

        A page filtered by `status` reads at most `SCAN_MOST` records: a status rare in a
        long history is answered with what was found so far, more to follow from the
        last job read (Relay allows a short page), not by reading the whole index.
        Records expire with their outputs; their index entries are dropped here."""
        index = keys.token_jobs(account, token) if token else keys.jobs(account)
        start = 0
        if after:
            rank = await self.redis.zrevrank(index, after)
            if not isinstance(rank, int):  # not in the index (no score asked: never a list)
                # An empty last page would read as the end of the list: the pages after
                # a cursor whose job expired (or is another caller's) are not known.
                raise BadUserInput(
                    "after names no job of yours (expired since, or another key's): "
                    "start again without it",
                    field="after",
                )
            start = rank + 1
        found: list[Job] = []
        batch = max(first, 20) if status is None else SCAN_BATCH
        read, last = 0, after
        while len(found) <= first:
            if read >= SCAN_MOST:
                return found, True, last
            ids = decoded_members(await self.redis.zrevrange(index, start, start + batch - 1))
            if not ids:
                break
            # One script call for the page (its keys share the account's slot).
            jobs = [keys.job(account, job_id) for job_id in ids]
            rows = (await self.scripts.read(jobs=jobs, client=self.redis)).records
            gone = [job_id for job_id, row in zip(ids, rows, strict=True) if not row]
            if gone:
                await self.redis.zrem(index, *gone)
                start -= len(gone)
            for job_id, row in zip(ids, rows, strict=True):
                if row and (status is None or row.get("status") == status):
                    found.append(Job.from_record(row))
                    if len(found) > first:
                        break
                if row:
                    last = job_id
            read += len(ids)
            start += batch
        page = found[:first]
        return page, len(found) > first, page[-1].id if page else None

    async def start(self, job_key: str, now_ms: int, lease_ms: int) -> Job | None:
        """Take the job (one round trip): its record as started, `attempts` counting this
        one; None for a job that is missing or has ended. A queued job its waiting client
        left (`mark_left`) is not started: it comes back as it is, still queued."""
        account, job_id = keys.job_parts(job_key)
        reply = await self.scripts.start(
            job=job_key,
            running=keys.running(account),
            now_ms=now_ms,
            lease_ms=lease_ms,
            job_id=job_id,
            client=self.redis,
        )
        if not reply.record:
            return None
        return Job.from_record({**reply.record, "account": account, "id": job_id})

    async def mark_left(self, account_id: str, job_id: str, left: bool = True) -> None:
        """Count a client that waited on the job leaving it (or, `left` False, coming back
        for it: the same request again). A worker that takes it while every one of them
        is away cancels it instead of starting it (`left_by_all` in record.lua: start.lua,
        finish.lua's 'left'). Counted once a call, however often it is sent."""
        await self.scripts.patch(
            job=keys.job(account_id, job_id),
            fields={},
            count="left" if left else "back",
            client=self.redis,
        )

    async def save_upstream(self, job: Job, upstream: dict[str, Any]) -> None:
        """Record the upstream's job id before waiting on it, so a takeover resumes it."""
        job.upstream = upstream
        await self.scripts.patch(
            job=keys.job(job.account, job.id),
            fields={"upstream": text(upstream)},
            client=self.redis,
        )

    async def save_progress(self, job: Job, metadata: dict[str, Any]) -> None:
        job.metadata = metadata
        await self.scripts.patch(
            job=keys.job(job.account, job.id),
            fields={"metadata": text(metadata)},
            client=self.redis,
        )

    async def finish(
        self,
        job: Job,
        status: str,
        now_ms: int,
        *,
        refund: bool,
        urls: list[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        metadata: dict[str, Any] | None = None,
        error: str | None = None,
        rejected: bool = False,
        only_from: str = "",
        joined: bool = False,
    ) -> bool:
        """End the job once; True when this call ended it (False: it had already ended,
        or had another status than `only_from`, when given: 'left', queued and still
        marked by `mark_left`, is one too). `rejected`: it failed
        because the upstream refused its input (`Job.rejected`). `joined`: it completed
        with another shard's identical job's images (finish.lua)."""
        fields: dict[str, Any] = {}
        if urls is not None:
            fields.update(outcome_fields(urls, width, height, metadata or {}))
            ended = {
                **fields,
                "params": job.params,
                "created_at": job.created_at,
                "completed_at": now_ms,
                "attempts": job.attempts,
            }
            meta = compact_metadata(metadata or {}, ended)
            if metadata and meta is not None:
                fields["meta"], fields["metadata"] = text(meta), None  # (a progress report's)
                for side in ("width", "height"):  # the size asked for: read from params
                    if fields.get(side) == job.params.get(side):
                        del fields[side]
        elif metadata is not None:
            fields["metadata"] = text(metadata)
        if error:
            fields["error"] = error
        if rejected:
            fields["rejected"] = 1
        shard = keys.shard_of(job.account)
        reply = await self.scripts.finish(
            job=keys.job(job.account, job.id),
            running=keys.running(job.account),
            account=keys.account(job.account),
            ledger=keys.ledger(job.account),
            webhooks=keys.webhooks(shard),
            cancellations=keys.cancellations(shard),
            client_token=keys.client_token(job.account, job.token or ""),
            status=status,
            now_ms=now_ms,
            job_id=job.id,
            refund=refund,
            retention_ms=self.retention_ms,
            fields=fields,
            ledger_keep_ms=self.ledger_keep_ms,
            only_from=only_from,
            joined=joined,
            client=self.redis,
        )
        return reply.ended

    async def recently_cancelled(self, shards: int, now_ms: int) -> set[str]:
        """Keys of jobs cancelled while running in the last minute (a window wide enough
        for clocks that differ between processes); the log keeps ten minutes."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(shards):
                log = keys.cancellations(shard)
                pipe.zrangebyscore(log, now_ms - 60_000, "+inf")
                pipe.zremrangebyscore(log, "-inf", now_ms - 600_000)
            replies: list[Any] = await pipe.execute()
        return {str(k) for got in replies[::2] for k in got}

    async def renew_leases(self, jobs: list[Job], until_ms: int) -> None:
        """Keep the concurrency slots of running jobs, taking again any that lapsed
        while the job still runs (lease.lua): one script call per account and
        `LEASE_BATCH` jobs, issued together, so they go out as one pipeline
        (`store/batching.py`; a worker may run thousands of one account's jobs)."""
        by_account: dict[str, list[str]] = {}
        for job in jobs:
            by_account.setdefault(job.account, []).append(job.id)
        await asyncio.gather(
            *(
                self.scripts.lease(
                    running=keys.running(account),
                    jobs=[keys.job(account, job_id) for job_id in ids[at : at + LEASE_BATCH]],
                    until_ms=until_ms,
                    job_ids=ids[at : at + LEASE_BATCH],
                    client=self.redis,
                )
                for account, ids in by_account.items()
                for at in range(0, len(ids), LEASE_BATCH)
            )
        )
