"""Client tokens: short-lived credentials a backend mints for a page (docs/api.md#client-tokens).

A token is opaque, `gct_<account>_<id>_<secret>`, backed by a Redis hash of its
account's shard (`keys.client_token`) that holds the SHA-256 of its secret, never the
secret. Opaque rather than signed: every request reads the record anyway (admission and
auth are one Lua call each, which now read the token's hash too), so revocation takes
effect on the next request, and the budget it carries is spent atomically there.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway.auth import TOKEN_PREFIX, credentials, hash_secret
from gateway.errors import BadUserInput, RateLimited, Unauthenticated
from gateway.origins import origin
from gateway.store import keys
from gateway.store.redis import decoded
from gateway.store.scripts import Scripts

TTL_DEFAULT = 900
TTL_MAX = 86_400
MAX_CREDITS = 1_000_000_000
MAX_LISTED = 20  # origins or services one token may name
EXPIRY_SLACK_MS = 60_000  # the record outlives `expires` a little: clocks differ


@dataclass(frozen=True)
class TokenSpec:
    """What a token may do, as its minter asked (validated by `spec`)."""

    max_credits: int
    ttl_seconds: int
    origins: tuple[str, ...]
    services: tuple[str, ...]
    max_jobs: int | None


@dataclass(frozen=True)
class Minted:
    token: str  # shown once, never stored
    expires_ms: int
    max_credits: int


def origin_of(value: str) -> str:
    """`value` as a browser sends `Origin` (`gateway/origins.py`); else BadUserInput."""
    spelled = origin(value)
    if spelled is None:
        raise BadUserInput(
            f"origins: {value[:100]!r} is not an origin like https://app.example.com",
            field="origins",
        )
    return spelled


#: What only a key may do (`Principal.require_key`): a token is refused it before its
#: input is read.
MINTING = "mint client tokens"


def spec(
    *,
    max_credits: int,
    ttl_seconds: int | None,
    origins: list[str] | None,
    services: list[str] | None,
    max_jobs: int | None,
) -> TokenSpec:
    """The minter's input checked: clear BAD_USER_INPUT naming the field."""
    if not 0 <= max_credits <= MAX_CREDITS:
        raise BadUserInput(f"maxCredits must be between 0 and {MAX_CREDITS}", field="maxCredits")
    ttl = TTL_DEFAULT if ttl_seconds is None else ttl_seconds
    if not 1 <= ttl <= TTL_MAX:
        raise BadUserInput(f"ttlSeconds must be between 1 and {TTL_MAX}", field="ttlSeconds")
    if max_jobs is not None and max_jobs < 1:
        raise BadUserInput("maxJobs must be at least 1", field="maxJobs")
    for name, listed in (("origins", origins), ("services", services)):
        if listed is not None and not 1 <= len(listed) <= MAX_LISTED:
            raise BadUserInput(f"{name} must list 1 to {MAX_LISTED} entries", field=name)
    return TokenSpec(
        max_credits=max_credits,
        ttl_seconds=ttl,
        origins=tuple(dict.fromkeys(origin_of(o) for o in origins or ())),
        services=tuple(dict.fromkeys(services or ())),
        max_jobs=max_jobs,
    )


class ClientTokens:
    """Tokens minted and revoked; an account holds at most `cap` live at once
    (GATEWAY_CLIENT_TOKENS_MAX)."""

    def __init__(self, redis: aioredis.Redis, scripts: Scripts, cap: int) -> None:
        self.redis = redis
        self.scripts = scripts
        self.cap = cap

    async def mint(self, account: str, key_hash: str, wanted: TokenSpec, now_ms: int) -> Minted:
        """A new token of `account`, bound to its key (`key_hash`: the one the request
        was checked with; a new or revoked key ends the token): one round trip.
        `Unauthenticated` when the key was replaced meanwhile (`Accounts.rotate`);
        `RateLimited` when the account holds `cap` live tokens, until the soonest ends."""
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(24)
        expires = now_ms + wanted.ttl_seconds * 1000
        reply = await self.scripts.mint(
            account=keys.account(account),
            record=keys.client_token(account, token_id),
            live=keys.client_tokens(account),
            now_ms=now_ms,
            token_id=token_id,
            expires_ms=expires,
            keep_ms=wanted.ttl_seconds * 1000 + EXPIRY_SLACK_MS,
            cap=self.cap,
            secret_hash=hash_secret(secret),
            max_credits=wanted.max_credits,
            max_jobs=-1 if wanted.max_jobs is None else wanted.max_jobs,
            # ',a,b,': admit.lua finds ',x,' in it
            origins=_listed(wanted.origins),
            services=_listed(wanted.services),
            key_hash=key_hash,
        )
        if reply.replaced:
            raise Unauthenticated("Invalid API key")  # as the next request with it hears
        if not reply.minted:
            wait = max(1, -(-(reply.soonest_expiry_ms - now_ms) // 1000))
            raise RateLimited(
                "tokens",
                wait,
                f"this key holds {self.cap} live client tokens, the most it may; the "
                f"soonest ends in {wait} s (revoking one frees its place at once)",
                allowed=self.cap,
                reset=now_ms // 1000 + wait,
            )
        token = f"{TOKEN_PREFIX}_{account}_{token_id}_{secret}"
        return Minted(token=token, expires_ms=expires, max_credits=wanted.max_credits)

    async def revoke(self, account: str, token: str) -> bool:
        """End `token` at once, when it is one of `account`'s and still known; whether it was."""
        try:
            cred = credentials(token)
        except Unauthenticated:
            return False
        if not cred.token or cred.account != account:
            return False
        record = keys.client_token(account, cred.token)
        stored = await self.redis.hget(record, "hash")
        if stored is None or not secrets.compare_digest(decoded(stored), cred.secret_hash):
            return False
        # HSET on a record that expired meanwhile would leave one field for ever: the TTL
        # is set again in the same transaction.
        ttl = await self.redis.pttl(record)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(record, "revoked", "1")
            pipe.pexpire(record, max(int(ttl), 1))
            pipe.zrem(keys.client_tokens(account), cred.token)  # its place is free
            await pipe.execute()
        return True


def _listed(values: tuple[str, ...]) -> str:
    return f",{','.join(values)}," if values else ""
