"""API key -> Principal: one round trip, hashed keys, constant-time comparison.

A key reads `gk_<account>_<secret>`. Only SHA-256 of the secret is stored; the secret
carries 256 random bits, so a fast hash is enough (no password stretching needed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from gateway.config import PlanLimits, Settings
from gateway.errors import RateLimited, Unauthenticated
from gateway.store import keys
from gateway.store.scripts import Scripts

KEY_PREFIX = "gk"


@dataclass(frozen=True)
class Principal:
    account: str
    name: str
    plan: str
    credits: int
    limits: PlanLimits
    webhook_secret: str
    window_used: int  # generations admitted in the last 60 s
    window_reset: int  # unix seconds when the oldest of those leaves the window

    def rate_headers(self) -> dict[str, str]:
        if self.limits.rpm is None:
            return {}
        return {
            "X-RateLimit-Limit": str(self.limits.rpm),
            "X-RateLimit-Remaining": str(max(0, self.limits.rpm - self.window_used)),
            "X-RateLimit-Reset": str(self.window_reset),
        }


def api_key_from(headers: Any, params: dict[str, Any] | None = None) -> str | None:
    """`Authorization: Bearer KEY` or `X-API-Key: KEY` (or the same in connection params)."""
    sources = [headers]
    if params:
        sources.insert(0, {str(k).lower(): v for k, v in params.items()})
    for source in sources:
        auth = source.get("authorization")
        if isinstance(auth, str) and auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        key = source.get("x-api-key")
        if isinstance(key, str) and key:
            return key.strip()
    return None


def new_key(account: str) -> tuple[str, str]:
    """(the key to show once, the hash to store)."""
    secret = secrets.token_urlsafe(32)
    return f"{KEY_PREFIX}_{account}_{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(key: str) -> tuple[str, str] | None:
    parts = key.strip().split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not parts[1].isalnum() or len(parts[1]) > 32:
        return None
    return parts[1], parts[2]


def credentials(key: str | None) -> tuple[str, str]:
    """(account id, SHA-256 of the secret) of a well-formed key; Unauthenticated if not."""
    if not key:
        raise Unauthenticated("Missing API key: send Authorization: Bearer KEY or X-API-Key")
    parsed = parse_key(key)
    if parsed is None:
        raise Unauthenticated("Invalid API key")
    return parsed[0], hash_secret(parsed[1])


@functools.lru_cache(maxsize=256)  # a few plans: one model each, not one per request
def plan_limits(rpm: int, concurrency: int, daily: int) -> PlanLimits:
    """A key's limits as admit.lua and auth.lua report them (-1: none). Which apply to a
    key (its plan's, or its own overrides) is decided there, in `store/limits.lua`."""

    def limit(v: int) -> int | None:
        return None if v < 0 else v

    return PlanLimits(rpm=limit(rpm), concurrency=limit(concurrency), daily=limit(daily))


async def authenticate(
    redis: aioredis.Redis,
    scripts: Scripts,
    settings: Settings,
    key: str | None,
    now_ms: int,
    *,
    plans: str,
    read: bool = False,
) -> Principal:
    """The caller behind `key` (one round trip). `plans`: admission's `plan_table` of
    the settings' plans."""
    account, given = credentials(key)
    minute = now_ms // 60000
    reply = await scripts.auth(
        account=keys.account(account),
        rate=keys.rate(account),
        reads=keys.reads(account, minute),
        now_ms=now_ms,
        count_read=read,
        secret_hash=given,
        plans=plans,
        client=redis,
    )
    fields = reply.account
    stored = fields.get("key_hash", "")
    # compare_digest runs even for unknown accounts, so timing tells nothing.
    ok = hmac.compare_digest(stored or "0" * 64, given)
    if not ok or not stored or fields.get("revoked") == "1":
        raise Unauthenticated("Invalid API key")
    principal = Principal(
        account=account,
        name=fields.get("name", ""),
        plan=fields.get("plan", ""),
        credits=int(fields.get("credits", 0)),
        limits=plan_limits(reply.rpm, reply.concurrency, reply.daily),
        webhook_secret=fields.get("webhook_secret", ""),
        window_used=reply.window_used,
        window_reset=reply.window_reset,
    )
    if read and reply.reads > settings.read_rpm:
        refused = RateLimited("read", 60 - (now_ms // 1000) % 60)
        refused.headers = principal.rate_headers()
        raise refused
    return principal
