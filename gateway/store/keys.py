"""Every Redis key in one place.

Everything that belongs to one account is hash-tagged `{a:ID}` so that a single Lua
script may touch it all (one slot in Redis Cluster). The job queue is global.
"""

from __future__ import annotations

PREFIX = "gw"
ACCOUNTS = f"{PREFIX}:accounts"  # set of account ids
QUEUE = f"{PREFIX}:queue"  # stream of jobs to run
QUEUE_GROUP = "workers"
COALESCING = f"{PREFIX}:coalescing"  # set: in-flight keys that have followers
WEBHOOKS = f"{PREFIX}:webhooks"  # sorted set: job key -> when its next delivery is due (ms)


def _tag(account: str) -> str:
    return f"{PREFIX}:{{a:{account}}}"


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


def jobs(account_id: str) -> str:
    """Sorted set: job id -> created (ms), newest last."""
    return f"{_tag(account_id)}:jobs"


def idempotency(account_id: str, key: str) -> str:
    return f"{_tag(account_id)}:idem:{key}"


def reads(account_id: str, minute: int) -> str:
    return f"{_tag(account_id)}:reads:{minute}"


def events(account_id: str, job_id: str) -> str:
    """Pub/sub channel of one job's updates."""
    return f"{_tag(account_id)}:events:{job_id}"


def webhook_log(account_id: str, job_id: str) -> str:
    """List: every delivery attempt of one job's webhook (JSON)."""
    return f"{_tag(account_id)}:whlog:{job_id}"


def cache_entry(digest: str) -> str:
    """Hash: the outcome of a completed cacheable request (shared by all keys)."""
    return f"{PREFIX}:cache:{digest}"


def inflight(digest: str) -> str:
    """String: the job key of the identical request now running (the leader)."""
    return f"{PREFIX}:inflight:{digest}"


def followers(digest: str) -> str:
    """List: job keys waiting for the leader's outcome."""
    return f"{PREFIX}:followers:{digest}"


def callback(token: str) -> str:
    """String: what an upstream reported to the callback URL carrying `token`."""
    return f"{PREFIX}:callback:{token}"
