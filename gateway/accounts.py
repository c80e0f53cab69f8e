"""API keys and their accounts: create, list, revoke, change plan, add credits."""

from __future__ import annotations

import base64
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.typing import EncodableT, FieldT

from gateway.auth import new_key
from gateway.config import Settings
from gateway.errors import BadUserInput, NotFound
from gateway.params import INT_MAX
from gateway.store import keys
from gateway.store.redis import decoded, decoded_hash
from gateway.store.scripts import Scripts


@dataclass
class AccountInfo:
    id: str
    name: str
    plan: str
    credits: int
    revoked: bool
    created_at: int
    rpm: int | None = None
    concurrency: int | None = None
    daily: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


#: how long a webhook secret replaced by `rotate` still signs beside the new one: a day
#: for its receivers to be given the new one
SECRET_OVERLAP_MS = 24 * 3600 * 1000


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


#: The largest balance or per-key limit: a larger one could not be read back through
#: GraphQL (`me`, `keys`, `addCredits` would fail after the change was made).
MOST = INT_MAX


def _limit_field(value: int | None, name: str) -> str:
    if value is not None and value > MOST:
        raise BadUserInput(f"{name} must be at most {MOST}", field=name)
    return "" if value is None else str(value)


class Accounts:
    def __init__(
        self,
        redis: aioredis.Redis,
        scripts: Scripts,
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.scripts = scripts
        self.settings = settings
        self.clock = clock

    async def create(
        self,
        plan: str,
        credits: int = 0,
        name: str = "",
        rpm: int | None = None,
        concurrency: int | None = None,
        daily: int | None = None,
        shard: int | None = None,
    ) -> dict[str, Any]:
        """Create an account and its key; the key is returned here and never again.

        The account lands in `shard`, or in a random one of the configured shards."""
        if plan not in self.settings.plans:
            raise BadUserInput(f"unknown plan {plan!r}", field="plan")
        if credits < 0:
            raise BadUserInput("credits must not be negative", field="credits")
        if credits > MOST:
            raise BadUserInput(f"credits must be at most {MOST}", field="credits")
        if shard is None:
            shard = secrets.randbelow(self.settings.redis_shards)
        account = keys.account_id(secrets.token_hex(6), shard)
        key, key_hash = new_key(account)
        webhook_secret = new_webhook_secret()
        fields: dict[FieldT, EncodableT] = {
            "id": account,
            "name": name,
            "plan": plan,
            "key_hash": key_hash,
            "webhook_secret": webhook_secret,
            "credits": 0,
            "revoked": "0",
            "created_at": int(time.time()),
            "rpm": _limit_field(rpm, "rpm"),
            "concurrency": _limit_field(concurrency, "concurrency"),
            "daily": _limit_field(daily, "daily"),
        }
        # Two slots on a Cluster, so no MULTI: indexed first, and `all` skips an id
        # whose record was never written.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(keys.ACCOUNTS, account)
            pipe.hset(keys.account(account), mapping=fields)
            await pipe.execute()
        if credits:
            await self.add_credits(account, credits, "initial")
        return {
            "id": account,
            "key": key,
            "plan": plan,
            "credits": credits,
            "webhookSecret": webhook_secret,
        }

    async def get(self, account: str) -> AccountInfo:
        fields = decoded_hash(await self.redis.hgetall(keys.account(account)))
        if not fields:
            raise NotFound(f"no key with id {account}")
        return _info(fields)

    async def all(self) -> list[AccountInfo]:
        """Every account, oldest first."""
        ids = sorted(decoded(i) for i in await self.redis.smembers(keys.ACCOUNTS))
        async with self.redis.pipeline(transaction=False) as pipe:
            for account in ids:
                pipe.hgetall(keys.account(account))
            rows: list[dict[str, str]] = await pipe.execute()
        return sorted((_info(r) for r in rows if r), key=lambda a: a.created_at)

    async def rotate(self, account: str, webhook_secret: bool = False) -> dict[str, Any]:
        """A new key for the account (a leaked one, say): the old one and the client
        tokens it minted are refused from the next request on, and a revoked key is live
        again under its new one; its balance, limits, ledger and jobs stay. With
        `webhook_secret`, a new one of those too; the old one also signs the Standard
        Webhooks signature for `SECRET_OVERLAP_MS` (`webhooks.signed_headers`), so that a
        receiver is not refused everything until it has the new one. Returned here and
        never again, as `create`'s."""
        current = decoded_hash(await self.redis.hgetall(keys.account(account)))
        if not current:
            raise NotFound(f"no key with id {account}")
        key, key_hash = new_key(account)
        secret = current.get("webhook_secret", "")
        fields: dict[FieldT, EncodableT] = {"key_hash": key_hash, "revoked": "0"}
        if webhook_secret:
            fields |= {"webhook_secret": new_webhook_secret(), "webhook_secret_before": secret}
            until = int(self.clock() * 1000) + SECRET_OVERLAP_MS
            fields["webhook_secret_before_until"] = str(until)
        async with self.redis.pipeline(transaction=False) as pipe:  # one slot: the account's
            pipe.hset(keys.account(account), mapping=fields)
            # the old key's tokens, refused from now on, no longer count toward the cap
            pipe.delete(keys.client_tokens(account))
            await pipe.execute()
        info = _info(current)
        return {
            "id": account,
            "key": key,
            "plan": info.plan,
            "credits": info.credits,
            "webhookSecret": str(fields.get("webhook_secret", secret)),
        }

    async def revoke(self, account: str) -> None:
        await self.get(account)
        await self.redis.hset(keys.account(account), "revoked", "1")

    async def update(
        self,
        account: str,
        plan: str | None = None,
        rpm: int | None = None,
        concurrency: int | None = None,
        daily: int | None = None,
    ) -> AccountInfo:
        """Change a key's plan and per-key limits (a negative limit means unlimited)."""
        await self.get(account)
        fields: dict[FieldT, EncodableT] = {}
        if plan is not None:
            if plan not in self.settings.plans:
                raise BadUserInput(f"unknown plan {plan!r}", field="plan")
            fields["plan"] = plan
        for name, value in (("rpm", rpm), ("concurrency", concurrency), ("daily", daily)):
            if value is not None:
                fields[name] = _limit_field(value, name)
        if fields:
            await self.redis.hset(keys.account(account), mapping=fields)
        return await self.get(account)

    async def add_credits(self, account: str, amount: int, reason: str | None = None) -> int:
        """Credits added (a top-up) or taken (a correction, when negative), in the ledger
        as such unless `reason` names another (`initial`)."""
        if reason is None:
            reason = "topup" if amount >= 0 else "correction"
        reply = await self.scripts.credit(
            account=keys.account(account),
            ledger=keys.ledger(account),
            topup=keys.topup(account, os.urandom(12).hex()),
            delta=amount,
            reason=reason,
            most=MOST,
            now_ms=int(self.clock() * 1000),
            ledger_keep_ms=self.settings.ledger_keep_ms,
            client=self.redis,
        )
        if reply.outcome == "unknown":
            raise NotFound(f"no key with id {account}")
        if reply.outcome == "negative":
            raise BadUserInput("balance would go below zero", field="amount")
        if reply.outcome == "too_large":
            raise BadUserInput(f"balance would go above {MOST}", field="amount")
        return reply.balance

    async def ledger(self, account: str) -> list[dict[str, str]]:
        entries = await self.redis.xrange(keys.ledger(account)) or []
        return [decoded_hash(fields) for _, fields in entries if fields]

    async def ledger_since(
        self, account: str, since_ms: int = 0, batch: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every ledger entry from `since_ms` (unix ms) on, oldest first, read `batch` at a
        time: `{id, at, delta, reason, job, balance}` (`id` the stream id, `at` its ms).
        Entries older than `ledger_retention_days` are trimmed as new ones are added:
        export them before (`gateway ledger export`)."""
        await self.get(account)
        start = f"{max(since_ms, 0)}-0"
        while True:
            read: Any = await self.redis.xrange(keys.ledger(account), min=start, count=batch)
            entries: list[Any] = read or []
            for entry_id, fields in entries:
                f = decoded_hash(fields)
                ident = decoded(entry_id)
                yield {
                    "id": ident,
                    "at": int(ident.partition("-")[0]),
                    "delta": int(f.get("delta", 0)),
                    "reason": f.get("reason", ""),
                    "job": f.get("job") or None,
                    "balance": int(f.get("balance", 0)),
                }
            if not entries or len(entries) < batch:
                return
            start = "(" + decoded(entries[-1][0])  # exclusive: after the last one read


def _info(fields: dict[str, str]) -> AccountInfo:
    def opt(name: str) -> int | None:
        raw = fields.get(name, "")
        return int(raw) if raw not in ("", None) else None

    return AccountInfo(
        id=fields["id"],
        name=fields.get("name", ""),
        plan=fields.get("plan", ""),
        credits=int(fields.get("credits", 0)),
        revoked=fields.get("revoked") == "1",
        created_at=int(fields.get("created_at", 0)),
        rpm=opt("rpm"),
        concurrency=opt("concurrency"),
        daily=opt("daily"),
    )
