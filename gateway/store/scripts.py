"""The Lua scripts (`gateway/store/*.lua`), each behind a typed call.

Every script has a wrapper class here named after it (`Admit` runs `admit.lua`): its
KEYS and ARGV go in as keyword-only arguments named as the script's header names them,
and its reply comes out decoded into a `NamedTuple` built by keyword. A caller never
lists arguments or indexes a reply by position: those positions are written once, in
the wrapper, as the header of its script (KEYS, ARGV, Returns) states them.

`Scripts` holds one of each, as attributes named after their files; it checks at
start-up that each attribute runs the file of its own name. A wrapper sends one EVALSHA
and nothing else: admission, the hottest path, stays one round trip.

A script's source is its file, wrapped in `once.lua` for the scripts that change one
job record, with its includes spliced in (`-- include: NAME.lua` lines: `limits.lua`,
shared by admit.lua and auth.lua; `record.lua`, by those that read or write a job
record; `entry_write.lua`, by settle.lua and entry.lua; `read_record.lua`, by read.lua
and auth.lua; `ledger.lua`, by the four that write a ledger entry). A file or a marker
that is not there fails at start-up, not at the first call.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from gateway.store import keys

HERE = Path(__file__).parent
INCLUDE = re.compile(r"^-- include: ([a-z_]+)\.lua\n", re.MULTILINE)
BODY = "-- BODY\n"  # where once.lua takes the script it wraps


class ScriptSourceError(RuntimeError):
    """A script's file, an included file or once.lua's marker is missing."""


def _read(name: str) -> str:
    path = HERE / f"{name}.lua"
    if not path.is_file():
        raise ScriptSourceError(f"no Lua script {path}")
    return path.read_text()


@functools.cache
def source(name: str) -> str:
    """The Lua source Redis runs for the script `name` (what its SHA-1 is taken of)."""
    if name not in BY_NAME:
        raise ScriptSourceError(f"no script named {name!r}; the scripts are {NAMES}")
    text = _read(name)
    if BY_NAME[name].once:
        wrapper = _read("once")
        if wrapper.count(BODY) != 1:
            raise ScriptSourceError(f"once.lua must hold one {BODY.strip()!r} line, for {name}.lua")
        text = wrapper.replace(BODY, text)
    return INCLUDE.sub(lambda m: _read(m[1]), text)


class Script:
    """One Lua script run by EVALSHA, loaded again when the server has lost it (NOSCRIPT).

    redis-py's `AsyncScript` does the same, but imports and checks for a pipeline on
    every call, on the hottest path there is. EVALSHA goes to `execute_command` itself,
    past the two wrappers of redis-py's `evalsha`.

    A subclass names its file (`name`) and whether it runs inside once.lua (`once`), and
    gives the typed `__call__` that builds the arguments and decodes the reply."""

    name: ClassVar[str]
    once: ClassVar[bool] = False  # changes one job record: each call carries a token

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.source = source(self.name)
        self.sha = hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest()

    async def load(self) -> None:
        self.sha = str(await self.client.script_load(self.source))

    async def run(self, numkeys: int, argv: list[Any], client: aioredis.Redis | None) -> Any:
        """EVALSHA with the first `numkeys` of `argv` as KEYS, the rest as ARGV."""
        client = client or self.client
        if self.once:  # one token per call: a re-send of the same command carries it too
            argv.append(os.urandom(8).hex())
        try:
            return await client.execute_command("EVALSHA", self.sha, numkeys, *argv)
        except NoScriptError:  # a restarted or flushed server; another node of a Cluster
            self.sha = str(await client.script_load(self.source))
            return await client.execute_command("EVALSHA", self.sha, numkeys, *argv)


# -- admit.lua -----------------------------------------------------------------------


class Hit(NamedTuple):
    """A cache hit's outcome, as the cache entry stores it."""

    urls: str  # JSON list
    width: str
    height: str
    metadata: str  # JSON: what a hit's job says (cached, duration 0)


class AdmitReply(NamedTuple):
    # ok | limited | credits | duplicate | idempotency_mismatch | forbidden | unauthenticated
    verdict: str
    # The key as admission saw it (every verdict but unauthenticated):
    rpm: int = -1  # its limits: its plan's with its own overrides (-1: none)
    concurrency: int = -1
    daily: int = -1
    window_used: int = 0  # generations admitted in the last 60 s (this one included)
    window_reset: int = 0  # unix seconds when the oldest of those leaves the window
    balance: int = 0  # credits after this admission's charge (a token's: its budget's)
    plan: str = ""
    # By verdict:
    mode: str = ""  # ok: run | hit (served from cache) | follow (waits for an identical job)
    hit: Hit | None = None  # ok, mode hit: the stored outcome
    limit: str = ""  # limited: minute | day | concurrency
    wait_ms: int = 0  # limited: until there is room
    cost: int = 0  # credits: what the job costs
    job_id: str = ""  # duplicate: the earlier job's id
    rule: str = ""  # forbidden: the client token's rule refused (origin | service | jobs)


UNAUTHENTICATED = AdmitReply(verdict="unauthenticated")


class Admit(Script):
    """admit.lua: check the key and every limit, charge, record and queue the job."""

    name = "admit"

    async def __call__(
        self,
        *,
        account: str,
        rate: str,
        day: str,
        running: str,
        ledger: str,
        job: str,
        jobs: str,
        idempotency: str,
        queue: str,
        cache_entry: str,
        inflight: str,
        followers: str,
        coalescing: str,
        client_token: str,
        token_jobs: str,
        webhooks: str,
        now_ms: int,
        secret_hash: str,
        plans: str,
        cost: int,
        job_id: str,
        lease_ms: int,
        ms_to_day_end: int,
        idempotency_hash: str,
        cacheable: bool,
        retention_ms: int,
        token: bool,
        origin: str,
        service: str,
        record_head: bytes,
        record_rest: bytes,
        webhook: bool,
        ledger_keep_ms: int = 0,
        idempotency_only: bool = False,
        client: aioredis.Redis | None = None,
    ) -> AdmitReply:
        argv = [
            account,
            rate,
            day,
            running,
            ledger,
            job,
            jobs,
            idempotency,
            queue,
            cache_entry,
            inflight,
            followers,
            coalescing,
            client_token,
            token_jobs,
            webhooks,
            now_ms,
            secret_hash,
            plans,
            cost,
            job_id,
            lease_ms,
            ms_to_day_end,
            idempotency_hash,
            1 if cacheable else 0,
            retention_ms,
            1 if token else 0,
            origin,
            service,
            ledger_keep_ms,
            record_head,
            record_rest,
            1 if webhook else 0,
            1 if idempotency_only else 0,
        ]
        return self.decode(await self.run(16, argv, client))

    @staticmethod
    def decode(reply: list[Any]) -> AdmitReply:
        """admit.lua's reply (its integers come as ints, its strings as strs)."""
        if len(reply) == 1:
            return UNAUTHENTICATED
        verdict, rpm, concurrency, daily, window_used, window_reset, balance, plan, *tail = reply
        mode = limit = job_id = rule = ""
        hit = None
        wait_ms = cost = 0
        if verdict == "ok":
            mode = tail[0]
            if len(tail) > 1:
                urls, width, height, metadata = tail[1:]
                hit = Hit(urls=urls, width=width, height=height, metadata=metadata)
        elif verdict == "limited":
            limit, wait_ms = tail
        elif verdict == "credits":
            (cost,) = tail
        elif verdict == "duplicate":
            (job_id,) = tail
        elif verdict == "forbidden":
            (rule,) = tail
        return AdmitReply(
            verdict=verdict,
            rpm=rpm,
            concurrency=concurrency,
            daily=daily,
            window_used=window_used,
            window_reset=window_reset,
            balance=balance,
            plan=plan,
            mode=mode,
            hit=hit,
            limit=limit,
            wait_ms=wait_ms,
            cost=cost,
            job_id=job_id,
            rule=rule,
        )


# -- auth.lua ------------------------------------------------------------------------


class AuthReply(NamedTuple):
    account: dict[str, str]  # the account's hash; empty for an unknown account
    window_used: int = 0  # generations admitted in the last 60 s
    window_reset: int = 0  # unix seconds when the oldest of those leaves the window
    reads: int = 0  # reads counted this minute (this one included); 0 when not counted
    rpm: int = -1  # the key's limits: its plan's with its own overrides (-1: none)
    concurrency: int = -1
    daily: int = -1
    token: dict[str, str] = {}  # a client token's hash; empty for a key or none found
    read_limit: int = 0  # the reads a minute the key, and each of its tokens, may make
    tokens_reads: int = 0  # all the key's tokens' reads this minute; 0 when not counted
    record: dict[str, Any] = {}  # the job record asked for, as `Read` reads it; {}: none


class Auth(Script):
    """auth.lua: the account behind a key, its limits and window; counts a read."""

    name = "auth"

    async def __call__(
        self,
        *,
        account: str,
        rate: str,
        reads: str,
        client_token: str,
        tokens_reads: str,
        now_ms: int,
        count_read: bool,
        secret_hash: str,
        plans: str,
        token: bool,
        read_rpm: int,
        read_rpm_per_job: int,
        job: str = "",
        client: aioredis.Redis | None = None,
    ) -> AuthReply:
        """`job`: a job record of the account to read in the same call (a poll's)."""
        argv: list[Any] = [account, rate, reads, client_token, tokens_reads]
        if job:
            argv.append(job)
        argv += [now_ms, 1 if count_read else 0, secret_hash, plans, 1 if token else 0]
        argv += [keys.READS_KEPT_MS, read_rpm, read_rpm_per_job]
        return self.decode(await self.run(6 if job else 5, argv, client), job)

    @staticmethod
    def decode(reply: list[Any], job: str = "") -> AuthReply:
        raw = reply[0]
        account = dict(zip(raw[::2], raw[1::2], strict=True))
        if len(reply) == 1:  # an unknown account
            return AuthReply(account=account)
        _, window_used, window_reset, reads, rpm, concurrency, daily, token, *rest = reply
        read_limit, tokens_reads, *read = rest
        return AuthReply(
            account=account,
            window_used=window_used,
            window_reset=window_reset,
            reads=reads,
            rpm=rpm,
            concurrency=concurrency,
            daily=daily,
            token=dict(zip(token[::2], token[1::2], strict=True)),
            read_limit=read_limit,
            tokens_reads=tokens_reads,
            record=Read.record(job, read[0]) if read else {},
        )


# -- start.lua -----------------------------------------------------------------------


class StartReply(NamedTuple):
    status: str  # the job's status before this call; 'missing' when there is no record,
    # 'left' for a queued one its waiting client left (not started)
    attempts: int  # counting this one; 0 when the job was not started
    record: dict[str, Any]  # the record as started (record.lua); empty when not started,
    # but for 'left': the record as it is


class Start(Script):
    """start.lua: a worker takes a job: processing, an attempt counted, its slot leased."""

    name = "start"
    once = True

    async def __call__(
        self,
        *,
        job: str,
        running: str,
        now_ms: int,
        lease_ms: int,
        job_id: str,
        client: aioredis.Redis | None = None,
    ) -> StartReply:
        return self.decode(await self.run(2, [job, running, now_ms, lease_ms, job_id], client))

    @staticmethod
    def decode(reply: list[Any]) -> StartReply:
        return StartReply(
            status=str(reply[0]),
            attempts=int(reply[1]),
            record=orjson.loads(reply[2]) if len(reply) > 2 else {},
        )


# -- finish.lua ----------------------------------------------------------------------


class FinishReply(NamedTuple):
    ended: bool  # this call ended the job (or was the call that had, sent again)
    balance: int = 0  # ended: the account's credits after any refund
    status: str = ""  # not ended: why ('missing', the status it had ended with, or the
    # one it had instead of `only_from`)


class Finish(Script):
    """finish.lua: a job ends once; its slot is freed and, when asked, its charge refunded."""

    name = "finish"
    once = True

    async def __call__(
        self,
        *,
        job: str,
        running: str,
        account: str,
        ledger: str,
        webhooks: str,
        cancellations: str,
        client_token: str,
        status: str,
        now_ms: int,
        job_id: str,
        refund: bool,
        retention_ms: int,
        fields: dict[str, Any],
        ledger_keep_ms: int = 0,
        only_from: str = "",
        joined: bool = False,
        client: aioredis.Redis | None = None,
    ) -> FinishReply:
        argv = [
            job,
            running,
            account,
            ledger,
            webhooks,
            cancellations,
            client_token,
            status,
            now_ms,
            job_id,
            1 if refund else 0,
            retention_ms,
            ledger_keep_ms,
            orjson.dumps(fields),
            only_from,
            1 if joined else 0,
        ]
        return self.decode(await self.run(7, argv, client))

    @staticmethod
    def decode(reply: list[Any]) -> FinishReply:
        if int(reply[0]) == 1:
            return FinishReply(ended=True, balance=int(reply[1]))
        return FinishReply(ended=False, status=str(reply[1]))


# -- credit.lua ----------------------------------------------------------------------


class CreditReply(NamedTuple):
    outcome: str  # ok | unknown (no such account) | negative (refused: below zero) |
    # too_large (refused: above the largest balance)
    balance: int  # the balance after it (ok), or as it stays (negative)


class Credit(Script):
    """credit.lua: a top-up or a correction, applied once, in the ledger."""

    name = "credit"

    async def __call__(
        self,
        *,
        account: str,
        ledger: str,
        topup: str,
        delta: int,
        reason: str,
        most: int,
        now_ms: int = 0,
        ledger_keep_ms: int = 0,
        client: aioredis.Redis | None = None,
    ) -> CreditReply:
        argv = [account, ledger, topup, delta, reason, now_ms, ledger_keep_ms, most]
        return self.decode(await self.run(3, argv, client))

    @staticmethod
    def decode(reply: list[Any]) -> CreditReply:
        return CreditReply(outcome=str(reply[0]), balance=int(reply[1]))


# -- forget.lua ----------------------------------------------------------------------


class ForgetReply(NamedTuple):
    deleted: int  # consumers deleted from the group


class Forget(Script):
    """forget.lua: delete a stream group's consumers gone (no entry held, idle a while)."""

    name = "forget"

    async def __call__(
        self,
        *,
        stream: str,
        group: str,
        idle_ms: int,
        keep: str,
        client: aioredis.Redis | None = None,
    ) -> ForgetReply:
        return ForgetReply(deleted=int(await self.run(1, [stream, group, idle_ms, keep], client)))


# -- mint.lua ------------------------------------------------------------------------


class MintReply(NamedTuple):
    minted: bool
    soonest_expiry_ms: int  # not minted: when a place frees up (the soonest live token ends)
    replaced: bool = False  # not minted: the key it was asked with is no longer the key


class Mint(Script):
    """mint.lua: write a client token's record, unless its account holds `cap` live."""

    name = "mint"

    async def __call__(
        self,
        *,
        account: str,
        record: str,
        live: str,
        now_ms: int,
        token_id: str,
        expires_ms: int,
        keep_ms: int,
        cap: int,
        secret_hash: str,
        max_credits: int,
        max_jobs: int,
        origins: str,
        services: str,
        key_hash: str,
        client: aioredis.Redis | None = None,
    ) -> MintReply:
        argv = [account, record, live, now_ms, token_id, expires_ms, keep_ms, cap, secret_hash]
        argv += [max_credits, max_jobs, origins, services, key_hash]
        minted, soonest = await self.run(3, argv, client)
        return MintReply(
            minted=int(minted) == 1, soonest_expiry_ms=int(soonest), replaced=int(minted) < 0
        )


# -- claim.lua -----------------------------------------------------------------------


class ClaimReply(NamedTuple):
    due: list[str]  # the job keys whose webhook delivery is due, now leased


class Claim(Script):
    """claim.lua: take due webhook deliveries, each leased for a while."""

    name = "claim"

    async def __call__(
        self,
        *,
        schedule: str,
        now_ms: int,
        lease_ms: int,
        count: int,
        client: aioredis.Redis | None = None,
    ) -> ClaimReply:
        return self.decode(await self.run(1, [schedule, now_ms, lease_ms, count], client))

    @staticmethod
    def decode(reply: list[Any]) -> ClaimReply:
        return ClaimReply(due=[str(k) for k in reply])


# -- resend.lua ----------------------------------------------------------------------


class Resend(Script):
    """resend.lua: deliver an ended job's webhook again now, unless an attempt is under
    way. Its reply: now | sending | again | missing (resend.lua)."""

    name = "resend"

    async def __call__(
        self,
        *,
        schedule: str,
        job: str,
        now_ms: int,
        lease_ms: int,
        client: aioredis.Redis | None = None,
    ) -> str:
        return str(await self.run(2, [schedule, job, now_ms, lease_ms], client))


# -- settle.lua ----------------------------------------------------------------------


class SettleReply(NamedTuple):
    more: bool  # waiters are left: call again (`first` False)
    completed: list[str]  # the keys of the waiting jobs it completed


class Settle(Script):
    """settle.lua: a cacheable job completed: store the entry, complete its followers."""

    name = "settle"

    async def __call__(
        self,
        *,
        cache_entry: str,
        inflight: str,
        followers: str,
        webhooks: str,
        coalescing: str,
        leader: str,
        now_ms: int,
        retention_ms: int,
        urls: str,
        width: int,
        height: int,
        metadata: str,
        hit_metadata: str,
        params: str,
        count: int,
        keep: bool = True,
        first: bool = True,
        client: aioredis.Redis | None = None,
    ) -> SettleReply:
        argv = [
            cache_entry,
            inflight,
            followers,
            webhooks,
            coalescing,
            leader,
            now_ms,
            retention_ms,
            urls,
            width,
            height,
            metadata,
            hit_metadata,
            params,
            1 if keep else 0,
            count,
            1 if first else 0,
        ]
        return self.decode(await self.run(5, argv, client))

    @staticmethod
    def decode(reply: list[Any]) -> SettleReply:
        return SettleReply(more=int(reply[0]) == 1, completed=[str(k) for k in reply[1:]])


# -- entry.lua -----------------------------------------------------------------------


class Entry(Script):
    """entry.lua: a cache entry copied into another shard, the one it replaces kept."""

    name = "entry"

    async def __call__(
        self,
        *,
        cache_entry: str,
        urls: str,
        width: int,
        height: int,
        metadata: str,
        hit_metadata: str,
        params: str,
        now_ms: int,
        retention_ms: int,
        client: aioredis.Redis | None = None,
    ) -> None:
        argv = [
            cache_entry,
            urls,
            width,
            height,
            metadata,
            hit_metadata,
            params,
            now_ms,
            retention_ms,
        ]
        await self.run(1, argv, client)


# -- promote.lua ---------------------------------------------------------------------


class PromoteReply(NamedTuple):
    # promoted | poor (failed: its account or token cannot pay) | left (cancelled: its
    # waiting client left it) | skip (it had ended) |
    # moved (another release of the same leader promoted a waiter already) | completed
    # (the leader completed after all: settle.lua completes the waiters)
    verdict: str


class Promote(Script):
    """promote.lua: a job that waited for a failed leader runs in its place."""

    name = "promote"
    once = True

    async def __call__(
        self,
        *,
        job: str,
        account: str,
        ledger: str,
        queue: str,
        inflight: str,
        webhooks: str,
        client_token: str,
        running: str,
        now_ms: int,
        lease_ms: int,
        job_id: str,
        retention_ms: int,
        leader: str,
        ledger_keep_ms: int = 0,
        client: aioredis.Redis | None = None,
    ) -> PromoteReply:
        argv = [
            job,
            account,
            ledger,
            queue,
            inflight,
            webhooks,
            client_token,
            running,
            now_ms,
            lease_ms,
            job_id,
            retention_ms,
            ledger_keep_ms,
            leader,
        ]
        argv.insert(8, leader or inflight)  # KEYS 9: the leader's record, to read its status
        return self.decode(await self.run(9, argv, client))

    @staticmethod
    def decode(reply: Any) -> PromoteReply:
        return PromoteReply(verdict=str(reply))


# -- renew.lua -----------------------------------------------------------------------


class Renew(Script):
    """renew.lua: renew the queue entries this worker holds; those it no longer does."""

    name = "renew"

    async def __call__(
        self,
        *,
        stream: str,
        group: str,
        consumer: str,
        entry_ids: list[str],
        client: aioredis.Redis | None = None,
    ) -> list[str]:
        lost = await self.run(1, [stream, group, consumer, *entry_ids], client)
        return [str(entry_id) for entry_id in lost]


# -- lease.lua -----------------------------------------------------------------------


class Lease(Script):
    """lease.lua: renew an account's running jobs' slots; take a lapsed one again."""

    name = "lease"

    async def __call__(
        self,
        *,
        running: str,
        jobs: list[str],
        until_ms: int,
        job_ids: list[str],
        client: aioredis.Redis | None = None,
    ) -> int:
        return int(await self.run(1 + len(jobs), [running, *jobs, until_ms, *job_ids], client))


# -- vacate.lua ----------------------------------------------------------------------


class Vacate(Script):
    """vacate.lua: no waiter left: the in-flight key goes, while it names `leader`."""

    name = "vacate"

    async def __call__(
        self,
        *,
        inflight: str,
        coalescing: str,
        leader: str,
        client: aioredis.Redis | None = None,
    ) -> bool:
        return bool(await self.run(2, [inflight, coalescing, leader], client))


# -- lead.lua ------------------------------------------------------------------------


class Lead(Script):
    """lead.lua: the job that leads identical requests across shards; `lease_ms` 0 gives
    this job's lead up."""

    name = "lead"

    async def __call__(
        self,
        *,
        leading: str,
        job: str,
        lease_ms: int,
        instead_of: str = "",
        client: aioredis.Redis | None = None,
    ) -> str:
        return str(await self.run(1, [leading, job, lease_ms, instead_of], client))


# -- read.lua ------------------------------------------------------------------------


class ReadReply(NamedTuple):
    # One per key, in order (record.lua's fields with `id` and `account` from the key, and
    # a cache hit's outcome from its entry); empty for a record that is gone.
    records: list[dict[str, Any]]


class Read(Script):
    """read.lua: job records, a cache hit's filled from the cache entry it refers to."""

    name = "read"

    async def __call__(self, *, jobs: list[str], client: aioredis.Redis | None = None) -> ReadReply:
        return self.decode(jobs, await self.run(len(jobs), list(jobs), client))

    @staticmethod
    def decode(jobs: list[str], reply: list[Any]) -> ReadReply:
        return ReadReply(records=[Read.record(k, row) for k, row in zip(jobs, reply, strict=True)])

    @staticmethod
    def record(key: str, row: list[Any]) -> dict[str, Any]:
        """One record as read_record.lua returns it ({} when gone)."""
        if not row:
            return {}
        record: dict[str, Any] = orjson.loads(row[0])
        record["account"], record["id"] = keys.job_parts(key)
        if len(row) > 1:  # a hit: what its entry holds, and what a hit is
            urls, width, height, metadata, params = row[1:]
            record.setdefault("urls", urls)
            record.setdefault("width", width)
            record.setdefault("height", height)
            record.setdefault("metadata", metadata)
            record.setdefault("params", params)
            record.setdefault("completed_at", record.get("created_at"))
        return record


# -- patch.lua -----------------------------------------------------------------------


class PatchReply(NamedTuple):
    found: bool  # False: the record is gone (nothing was set)
    counted: int  # the counted field's new value (0 when none was asked)


class Patch(Script):
    """patch.lua: set fields of a job record, and count one, in one step."""

    name = "patch"

    async def __call__(
        self,
        *,
        job: str,
        fields: dict[str, Any],
        count: str = "",
        client: aioredis.Redis | None = None,
    ) -> PatchReply:
        token = os.urandom(8).hex() if count else ""  # one a call: a re-send carries it
        reply = int(await self.run(1, [job, orjson.dumps(fields), count, token], client))
        return PatchReply(found=reply >= 0, counted=max(reply, 0))


# -- apq_put.lua, apq_get.lua ---------------------------------------------------------


class ApqPutReply(NamedTuple):
    evicted: int  # documents evicted to stay within the limit


class ApqPut(Script):
    """apq_put.lua: store a persisted query's document; evict the least recently used."""

    name = "apq_put"

    async def __call__(
        self,
        *,
        documents: str,
        used: str,
        sha: str,
        document: str,
        now_ms: int,
        max_documents: int,
        client: aioredis.Redis | None = None,
    ) -> ApqPutReply:
        argv = [documents, used, sha, document, now_ms, max_documents]
        return self.decode(await self.run(2, argv, client))

    @staticmethod
    def decode(reply: Any) -> ApqPutReply:
        return ApqPutReply(evicted=int(reply))


class ApqGetReply(NamedTuple):
    document: str | None  # None: not stored (never, or evicted)


class ApqGet(Script):
    """apq_get.lua: a persisted query's document, marked as used."""

    name = "apq_get"

    async def __call__(
        self,
        *,
        documents: str,
        used: str,
        sha: str,
        now_ms: int,
        client: aioredis.Redis | None = None,
    ) -> ApqGetReply:
        return self.decode(await self.run(2, [documents, used, sha, now_ms], client))

    @staticmethod
    def decode(reply: Any) -> ApqGetReply:
        return ApqGetReply(document=None if reply is None else str(reply))


# -- the set -------------------------------------------------------------------------

BY_NAME: dict[str, type[Script]] = {
    kind.name: kind
    for kind in (
        Admit,
        Start,
        Finish,
        Credit,
        Auth,
        Claim,
        Resend,
        Settle,
        Entry,
        Promote,
        Renew,
        Lease,
        Vacate,
        Lead,
        Read,
        Patch,
        ApqPut,
        ApqGet,
        Forget,
        Mint,
    )
}
NAMES = tuple(BY_NAME)
ONCE = frozenset(name for name, kind in BY_NAME.items() if kind.once)


class Scripts:
    """Every script, as an attribute named after its file (`scripts.admit` runs
    admit.lua). Made at start-up: reads each file, and fails if one is missing."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.admit = Admit(client)
        self.start = Start(client)
        self.finish = Finish(client)
        self.credit = Credit(client)
        self.auth = Auth(client)
        self.claim = Claim(client)
        self.resend = Resend(client)
        self.settle = Settle(client)
        self.entry = Entry(client)
        self.promote = Promote(client)
        self.renew = Renew(client)
        self.lease = Lease(client)
        self.vacate = Vacate(client)
        self.lead = Lead(client)
        self.read = Read(client)
        self.patch = Patch(client)
        self.apq_put = ApqPut(client)
        self.apq_get = ApqGet(client)
        self.forget = Forget(client)
        self.mint = Mint(client)
        self.by_name: dict[str, Script] = {
            name: value for name, value in vars(self).items() if isinstance(value, Script)
        }
        for name, script in self.by_name.items():
            if script.name != name or type(script) is not BY_NAME.get(name):
                raise ScriptSourceError(f"Scripts.{name} runs {script.name}.lua")
        if self.by_name.keys() != BY_NAME.keys():
            raise ScriptSourceError(f"Scripts holds {sorted(self.by_name)}, not {NAMES}")

    @classmethod
    def register(cls, client: aioredis.Redis) -> Scripts:
        return cls(client)

    async def load(self) -> None:
        """SCRIPT LOAD each once at start-up, so requests send only EVALSHA."""
        for script in self.by_name.values():
            await script.load()
