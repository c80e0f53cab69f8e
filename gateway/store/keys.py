"""Every Redis key in one place, laid out for Redis Cluster.

The keyspace is cut into `shards` (setting `redis_shards`, default 1). Every key of
an account, and every shared structure its requests touch (the job queue, the webhook
schedule, the in-flight coalescing state, the result cache), carries its shard's hash
tag `{sN}`, so each Lua script and each MULTI touches one slot: one admission is one
slot. An account's shard is part of its id (`<hex>s<N>`; a plain hex id is shard 0), so
raising the setting later never moves an existing account.

Why shards and not a tag per account: the queue, the schedule and the cache are shared
by many accounts, and a script can only write keys of one slot. A shard is the unit a
Cluster spreads over its nodes; with more shards than nodes, load spreads evenly.
Only four kinds of key live outside any shard: the account index, the callback inbox,
the shard count itself and the leads of identical requests across shards (`leading`),
each touched one key at a time. Persisted queries (APQ
documents, shared by every account) have a slot of their own, the tag `{apq}`: their
two keys change together.
"""

from __future__ import annotations

import functools

PREFIX = "gw"
ACCOUNTS = f"{PREFIX}:accounts"  # set of account ids (single-key commands only)
#: the keyspace's shard count, the highest any server or worker was set to
#: (`store/shards.py`): a sorted set of one member, so that ZADD GT keeps the highest
#: in one command
SHARDS, SHARDS_MEMBER = f"{PREFIX}:shards", "keyspace"
QUEUE_GROUP = "workers"


def shard_of(account_id: str) -> int:
    """The shard written into an account id (`<hex>s<N>`); 0 for a plain id."""
    _, sep, tail = account_id.rpartition("s")
    return int(tail) if sep and tail.isascii() and tail.isdigit() and len(tail) < 5 else 0


def shard_of_key(key: str) -> int:
    """The shard of any key made here (its `{sN}` tag)."""
    start = key.find("{s")
    end = key.find("}", start)
    tag = key[start + 2 : end] if start >= 0 and end > start else ""
    return int(tag) if tag.isascii() and tag.isdigit() else 0


def account_id(random_hex: str, shard: int) -> str:
    return random_hex if shard == 0 else f"{random_hex}s{shard}"


# Cached: an admission builds about eight keys of one account and one shard.
@functools.lru_cache(maxsize=256)
def _shard(shard: int) -> str:
    return f"{PREFIX}:{{s{shard}}}"


@functools.lru_cache(maxsize=4096)
def _tag(account: str) -> str:
    return f"{_shard(shard_of(account))}:a:{account}"


# -- shared by the accounts of one shard -----------------------------------------------


def queue(shard: int) -> str:
    """Stream of jobs to run, read through the consumer group `QUEUE_GROUP`."""
    return f"{_shard(shard)}:queue"


def webhooks(shard: int) -> str:
    """Sorted set: job key -> when its next webhook delivery is due (ms)."""
    return f"{_shard(shard)}:webhooks"


def cancellations(shard: int) -> str:
    """Sorted set: job key -> when it was cancelled while running (ms), for workers."""
    return f"{_shard(shard)}:cancellations"


def coalescing(shard: int) -> str:
    """Set: in-flight leader keys that have followers waiting."""
    return f"{_shard(shard)}:coalescing"


def cache_entry(shard: int, digest: str) -> str:
    """Hash: the outcome of a completed cacheable request. Written into every shard, so
    the cache is shared by all keys."""
    return f"{_shard(shard)}:cache:{digest}"


def inflight(shard: int, digest: str) -> str:
    """String: the job key of the identical request now running (the leader)."""
    return f"{_shard(shard)}:inflight:{digest}"


def followers(shard: int, digest: str) -> str:
    """List: job keys waiting for the leader's outcome."""
    return f"{_shard(shard)}:followers:{digest}"


def leading(digest: str) -> str:
    """String: the job key of the job whose upstream call the identical requests of every
    shard wait for (lead.lua); outside any shard, its slot its own."""
    return f"{PREFIX}:leading:{digest}"


# -- one account ---------------------------------------------------------------------


def account(account_id: str) -> str:
    return f"{_tag(account_id)}:account"


def rate(account_id: str) -> str:
    """Sorted set: one member per admitted generation in the last 60 s (score: ms)."""
    return f"{_tag(account_id)}:rate"


def day(account_id: str, yyyymmdd: str) -> str:
    return f"{_tag(account_id)}:day:{yyyymmdd}"


def running(account_id: str) -> str:
    """Sorted set: job id -> lease expiry (ms). Counts the concurrency slots in use."""
    return f"{_tag(account_id)}:running"


def ledger(account_id: str) -> str:
    """Stream: every charge, refund and top-up with the balance after it."""
    return f"{_tag(account_id)}:ledger"


def job(account_id: str, job_id: str) -> str:
    return f"{_tag(account_id)}:job:{job_id}"


def job_parts(job_key: str) -> tuple[str, str]:
    """(account id, job id) of a key made by `job` (the queue carries job keys)."""
    tag, _, job_id = job_key.rpartition(":job:")
    return tag.rpartition(":a:")[2], job_id


def jobs(account_id: str) -> str:
    """Sorted set: job id -> created (ms), newest last."""
    return f"{_tag(account_id)}:jobs"


def idempotency(account_id: str, key: str) -> str:
    return f"{_tag(account_id)}:idem:{key}"


def left(account_id: str, token: str, fingerprint: str) -> str:
    """String, the job's id, for LEFT_MS: the job a client waiting on its answer
    left (its own timeout ran out first); the same request sent again with the same key
    or client token (`token`: its id, '' for a key) joins it, once."""
    return f"{_tag(account_id)}:left:{token}:{fingerprint}"


#: past the backoff of the clients that send a request again (flux-krea's guide: at most
#: 60 s; OpenAI's and Segmind's SDKs: seconds), short of a deliberate second request
LEFT_MS = 2 * 60_000


def topup(account_id: str, topup_id: str) -> str:
    """String, for a day: this top-up was applied (so a re-sent one is not applied twice)."""
    return f"{_tag(account_id)}:topup:{topup_id}"


def client_token(account_id: str, token_id: str) -> str:
    """Hash: one client token minted by the account's key (docs/api.md#client-tokens)."""
    return f"{_tag(account_id)}:ct:{token_id}"


def client_tokens(account_id: str) -> str:
    """Sorted set: the account's live client tokens, token id -> expires (ms)."""
    return f"{_tag(account_id)}:cts"


def token_jobs(account_id: str, token_id: str) -> str:
    """Sorted set: the jobs made with one client token, job id -> created (ms)."""
    return f"{_tag(account_id)}:ct:{token_id}:jobs"


def reads(account_id: str, now_ms: int, token: str = "") -> str:
    """Counter: the reads of the account's key (or of its client token `token`, each its
    own: one page's visitor cannot use up the reads of the others, nor the backend's) in
    the clock minute of `now_ms`, kept READS_KEPT_MS."""
    if token:
        return f"{_tag(account_id)}:reads:{token}:{now_ms // 60_000}"
    return f"{_tag(account_id)}:reads:{now_ms // 60_000}"


def tokens_reads(account_id: str, now_ms: int) -> str:
    """Counter: the reads of all the account's client tokens together in the clock minute
    of `now_ms` (those each token's own limit allowed), kept READS_KEPT_MS."""
    return f"{_tag(account_id)}:reads-of-tokens:{now_ms // 60_000}"


READS_KEPT_MS = 61_000  # a minute's read counter, from its first read


def events(account_id: str, job_id: str) -> str:
    """Pub/sub channel of one job's updates."""
    return f"{_tag(account_id)}:events:{job_id}"


def webhook_log(account_id: str, job_id: str) -> str:
    """List: every delivery attempt of one job's webhook (JSON)."""
    return f"{_tag(account_id)}:whlog:{job_id}"


# -- outside any shard -----------------------------------------------------------------


def callback(token: str) -> str:
    """String: what an upstream reported to the callback URL carrying `token`."""
    return f"{PREFIX}:callback:{token}"


#: pub/sub channel: the token of each delivered callback (wakes the worker waiting on it)
CALLBACKS = f"{PREFIX}:callbacks"


# -- persisted queries (APQ): one slot of their own ----------------------------------------

APQ = f"{PREFIX}:{{apq}}"


def apq_documents() -> str:
    """Hash: SHA-256 (hex) -> a persisted query's document."""
    return f"{APQ}:docs"


def apq_used() -> str:
    """Sorted set: SHA-256 -> when the document was last stored or fetched (ms); the
    least recent go first when there are more than `apq_max_documents`."""
    return f"{APQ}:used"
