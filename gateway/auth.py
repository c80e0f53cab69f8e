"""API key or client token -> Principal: one round trip, hashed, constant-time comparison.

A key reads `gk_<account>_<secret>`, a client token `gct_<account>_<id>_<secret>`
(docs/api.md#client-tokens). Only SHA-256 of a secret is stored; a secret carries at
least 192 random bits, so a fast hash is enough (no password stretching needed).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as aioredis

from gateway.config import PlanLimits, Settings
from gateway.errors import Forbidden, RateLimited, Unauthenticated
from gateway.jobs.model import iso
from gateway.params import INT_MAX
from gateway.store import keys
from gateway.store.scripts import Scripts

KEY_PREFIX = "gk"
TOKEN_PREFIX = "gct"  # noqa: S105 (a prefix, not a secret)


class Credential(NamedTuple):  # made per request: faster made than a frozen dataclass
    """What a well-formed key or token says, before any lookup."""

    account: str
    secret_hash: str  # SHA-256 of its secret
    token: str = ""  # a client token's id; '' for an API key


@dataclass(frozen=True)
class TokenGrant:
    """A client token as its record stood when the request was authenticated."""

    id: str
    max_credits: int
    spent: int
    max_jobs: int | None
    jobs: int
    expires_ms: int
    origins: tuple[str, ...]  # empty: any
    services: tuple[str, ...]  # empty: any

    def public(self) -> dict[str, Any]:
        """Its rules and use as REST answers them (GraphQL's `ClientTokenInfo`)."""
        return {
            "expiresAt": iso(self.expires_ms),
            "maxCredits": self.max_credits,
            "spent": self.spent,
            "maxJobs": self.max_jobs,
            "jobs": self.jobs,
            "origins": list(self.origins),
            "services": list(self.services),
        }

    @classmethod
    def admitted(cls, token_id: str) -> TokenGrant:
        """A token as admission reports it: its id (the rest is not read back)."""
        return cls(token_id, 0, 0, None, 0, 0, (), ())

    @classmethod
    def of(cls, token_id: str, record: dict[str, str]) -> TokenGrant:
        max_jobs = int(record.get("max_jobs", -1))
        return cls(
            id=token_id,
            max_credits=int(record.get("max_credits", 0)),
            spent=int(record.get("spent", 0)),
            max_jobs=None if max_jobs < 0 else max_jobs,
            jobs=int(record.get("jobs", 0)),
            expires_ms=int(record.get("expires", 0)),
            origins=tuple(o for o in record.get("origins", "").split(",") if o),
            services=tuple(o for o in record.get("services", "").split(",") if o),
        )


class Principal(NamedTuple):  # made per request, as Credential
    account: str
    name: str
    plan: str
    credits: int  # the account's balance; a client token's: what is left of its budget
    limits: PlanLimits
    webhook_secret: str
    window_used: int  # generations admitted in the last 60 s
    window_reset: int  # unix seconds when the oldest of those leaves the window
    token: TokenGrant | None = None  # set when the caller holds a client token
    # Reads a clock minute (the key's, and each of its tokens' own): GATEWAY_READ_RPM, or
    # more as auth.lua decides (the key's own higher rpm; its jobs at once, each polled)
    read_limit: int = 0
    # The account's key hash the request was checked against ('' when admission made it):
    # a token minted is bound to it, not to a key that replaced it meanwhile.
    key_hash: str = ""

    def token_id(self) -> str:
        return self.token.id if self.token else ""

    def require_key(self, what: str) -> None:
        """Refuse a client token what only the key itself may do."""
        if self.token is not None:
            raise Forbidden(f"a client token cannot {what}")

    def rate_headers(self) -> dict[str, str]:
        """The per-minute limit's headers; a key with none says INT_MAX, a number any
        client reads (docs/api.md#rate-limit-headers)."""
        rpm = INT_MAX if self.limits.rpm is None else self.limits.rpm
        return {
            "X-RateLimit-Limit": str(rpm),
            "X-RateLimit-Remaining": str(max(0, rpm - self.window_used)),
            "X-RateLimit-Reset": str(self.window_reset),
        }


def api_key_from(headers: Any, params: dict[str, Any] | None = None) -> str | None:
    """`Authorization: Bearer KEY` or `X-API-Key: KEY` (or the same in connection params)."""
    sources = [headers]
    if params:
        sources.insert(0, {str(k).lower(): v for k, v in params.items()})
    for source in sources:
        auth = source.get("authorization")
        if isinstance(auth, str) and auth[:7].lower() == "bearer " and auth[7:].strip():
            return auth[7:].strip()
        key = source.get("x-api-key")  # also when `Authorization` names no key
        if isinstance(key, str) and key.strip():
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
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not _account_like(parts[1]):
        return None
    return parts[1], parts[2]


def _account_like(part: str) -> bool:
    return part.isascii() and part.isalnum() and len(part) <= 32


def credentials(key: str | None) -> Credential:
    """What a well-formed key or client token names; Unauthenticated if it is neither."""
    if not key:
        raise Unauthenticated("Missing API key: send Authorization: Bearer KEY or X-API-Key")
    if key.startswith(TOKEN_PREFIX + "_"):
        parts = key.strip().split("_", 3)
        if len(parts) != 4 or not _account_like(parts[1]) or not _account_like(parts[2]):
            raise Unauthenticated("Invalid client token")
        return Credential(parts[1], hash_secret(parts[3]), token=parts[2])
    parsed = parse_key(key)
    if parsed is None:
        raise Unauthenticated("Invalid API key")
    return Credential(parsed[0], hash_secret(parsed[1]))


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
    origin: str | None = None,
    job_id: str = "",
) -> tuple[Principal, dict[str, Any]]:
    """The caller behind `key` (one round trip), and the record of its account's job
    `job_id` read in the same round trip (a poll's; {} when there is none or no
    `job_id`). `plans`: admission's `plan_table` of the settings' plans; `origin`: the
    request's Origin header, which a client token restricted to origins must carry."""
    cred = credentials(key)
    account = cred.account
    reply = await scripts.auth(
        account=keys.account(account),
        rate=keys.rate(account),
        reads=keys.reads(account, now_ms, cred.token),
        client_token=keys.client_token(account, cred.token),
        tokens_reads=keys.tokens_reads(account, now_ms),
        now_ms=now_ms,
        count_read=read,
        secret_hash=cred.secret_hash,
        plans=plans,
        token=bool(cred.token),
        read_rpm=settings.read_rpm,
        read_rpm_per_job=settings.read_rpm_per_job,
        job=keys.job(account, job_id) if job_id else "",
        client=redis,
    )
    fields = reply.account
    stored = fields.get("key_hash", "")
    grant = None
    if cred.token:
        # compare_digest runs even for unknown tokens, so timing tells nothing.
        ok = hmac.compare_digest(reply.token.get("hash") or "0" * 64, cred.secret_hash)
        grant = TokenGrant.of(cred.token, reply.token)
        if not ok or reply.token.get("revoked") == "1" or reply.token.get("key_hash") != stored:
            raise Unauthenticated("Invalid or revoked client token")
        if grant.expires_ms <= now_ms:
            raise Unauthenticated("This client token has expired")
    else:
        ok = hmac.compare_digest(stored or "0" * 64, cred.secret_hash)
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
        token=grant,
        read_limit=reply.read_limit,
        key_hash=stored,
    )
    if grant is not None:
        principal = principal._replace(credits=grant.max_credits - grant.spent, webhook_secret="")
        if grant.origins and (origin or "").lower() not in grant.origins:
            raise Forbidden("this client token is not valid from this origin")
    wait = 60 - (now_ms // 1000) % 60  # to the next clock minute, when reads count anew
    if read and reply.reads > reply.read_limit:
        # the headers describe the limit that refused it: the read limit's, used up
        raise RateLimited("read", wait, allowed=reply.read_limit, reset=now_ms // 1000 + wait)
    ceiling = reply.read_limit * settings.client_tokens_read_factor
    if read and grant is not None and reply.tokens_reads > ceiling:
        raise RateLimited(
            "read",
            wait,
            f"this key's client tokens together have used their {ceiling} reads of this "
            f"minute; retry after {wait} s",
            allowed=ceiling,
            reset=now_ms // 1000 + wait,
        )
    return principal, reply.record
