"""GraphQL output types: `Generation` (a job as clients see it) and friends."""

from __future__ import annotations

from enum import Enum
from typing import Any

import strawberry
from strawberry.scalars import JSON

from gateway.accounts import AccountInfo
from gateway.auth import TokenGrant
from gateway.jobs.model import Job, iso
from gateway.usage import Counts, Report


@strawberry.enum
class GenerationType(Enum):
    IMAGE = "IMAGE"


@strawberry.type
class Generation:
    id: strawberry.ID
    status: str = strawberry.field(description="queued, processing, completed, failed or cancelled")
    type: GenerationType
    provider: str = strawberry.field(description="the service or backend the request named")
    url: str | None = strawberry.field(description="the first output")
    urls: list[str]
    width: int | None
    height: int | None
    metadata: JSON | None = strawberry.field(
        description="width, height, seed, backend, cached, duration, upstream details"
    )
    credit_cost: int = strawberry.field(description="credits charged (0 once refunded)")
    created_at: str
    completed_at: str | None
    webhook_url: str | None
    webhook_status: str | None = strawberry.field(
        description="its webhook's delivery: delivered, retrying (an attempt failed, more "
        "to come) or failed (the retries ended); null before the first attempt, or with "
        "no webhookUrl"
    )
    error: str | None = strawberry.field(description="why the job failed, when it did")
    duration: float | None = strawberry.field(description="seconds from request to completion")

    @classmethod
    def of(cls, job: Job) -> Generation:
        return cls(
            id=strawberry.ID(job.id),
            status=job.status,
            type=GenerationType(job.type),
            provider=job.provider,
            url=job.urls[0] if job.urls else None,
            urls=job.urls,
            width=job.width,
            height=job.height,
            metadata=JSON(job.metadata) if job.metadata else None,
            credit_cost=job.credit_cost,
            created_at=iso(job.created_at) or "",
            completed_at=iso(job.completed_at),
            webhook_url=job.webhook_url,
            webhook_status=job.webhook_status,
            error=job.error,
            duration=job.duration,
        )


@strawberry.type
class PageInfo:
    has_next_page: bool
    end_cursor: str | None


@strawberry.type
class GenerationPage:
    nodes: list[Generation]
    page_info: PageInfo


@strawberry.type
class LimitUsage:
    name: str = strawberry.field(description="minute, day, concurrency or read")
    limit: int | None = strawberry.field(description="null: unlimited")
    used: int
    remaining: int | None
    reset: int | None = strawberry.field(description="unix seconds when use falls back")


@strawberry.type
class CacheStats:
    hits: int
    misses: int
    coalesced: int = strawberry.field(description="requests that waited for an identical one")
    credits_saved: int


@strawberry.type(description="The client token the caller holds: its rules and its use.")
class ClientTokenInfo:
    expires_at: str
    max_credits: int
    spent: int = strawberry.field(description="credits charged through it, refunds deducted")
    max_jobs: int | None = strawberry.field(description="null: no cap")
    jobs: int
    origins: list[str] = strawberry.field(description="empty: any")
    services: list[str] = strawberry.field(description="empty: any")

    @classmethod
    def of(cls, grant: TokenGrant) -> ClientTokenInfo:
        return cls(
            expires_at=iso(grant.expires_ms) or "",
            max_credits=grant.max_credits,
            spent=grant.spent,
            max_jobs=grant.max_jobs,
            jobs=grant.jobs,
            origins=list(grant.origins),
            services=list(grant.services),
        )


@strawberry.type
class Me:
    id: strawberry.ID
    name: str
    plan: str
    credits: int = strawberry.field(
        description="the balance; for a client token, what is left of its budget"
    )
    limits: list[LimitUsage]
    cache: CacheStats
    client_token: ClientTokenInfo | None = strawberry.field(
        description="set when the caller holds a client token"
    )
    webhook_secret: str | None = strawberry.field(
        description="the key's webhook signing secret (whsec_...), to verify its webhooks; "
        "null for a client token"
    )

    @classmethod
    def of(cls, data: dict[str, Any]) -> Me:
        grant = data["client_token"]
        return cls(
            id=strawberry.ID(data["id"]),
            name=data["name"],
            plan=data["plan"],
            credits=data["credits"],
            limits=[LimitUsage(**u) for u in data["limits"]],
            cache=CacheStats(**data["cache"]),
            client_token=ClientTokenInfo.of(grant) if grant else None,
            webhook_secret=data["webhook_secret"],
        )


@strawberry.type
class Estimate:
    credits: int
    width: int
    height: int
    num_images: int
    backends: list[str]


@strawberry.type
class ProviderInfo:
    name: str
    kind: str = strawberry.field(description="service or backend")
    enabled: bool
    reason: str
    backends: list[str] = strawberry.field(description="a service's route, in order")
    circuit: str = strawberry.field(description="closed, open (cooling down) or half-open")


@strawberry.type
class ApiKey:
    id: strawberry.ID
    name: str
    plan: str
    credits: int
    revoked: bool
    rpm: int | None
    concurrency: int | None
    daily: int | None

    @classmethod
    def of(cls, a: AccountInfo) -> ApiKey:
        return cls(
            id=strawberry.ID(a.id),
            name=a.name,
            plan=a.plan,
            credits=a.credits,
            revoked=a.revoked,
            rpm=a.rpm,
            concurrency=a.concurrency,
            daily=a.daily,
        )


@strawberry.type(description="A client token for a web page (shown once, never stored).")
class ClientToken:
    token: str
    expires_at: str
    max_credits: int


@strawberry.type
class CreatedKey:
    id: strawberry.ID
    key: str = strawberry.field(description="shown once, never stored")
    plan: str
    credits: int
    webhook_secret: str

    @classmethod
    def of(cls, made: dict[str, Any]) -> CreatedKey:
        """From `Accounts.create`'s or `rotate`'s answer."""
        return cls(
            id=strawberry.ID(made["id"]),
            key=made["key"],
            plan=made["plan"],
            credits=made["credits"],
            webhook_secret=made["webhookSecret"],
        )


@strawberry.type
class WebhookDelivery:
    attempt: int
    at: str | None
    status_code: int | None
    error: str | None
    success: bool
    duration_ms: int


@strawberry.enum(description="What `usage` rows are keyed by.")
class UsageGroup(Enum):
    DAY = "day"
    SERVICE = "service"
    BACKEND = "backend"


def _counts(counts: Counts) -> dict[str, int]:
    return {
        "requests": counts.requests,
        "images": counts.images,
        "credits_spent": counts.credits_spent,
        "credits_refunded": counts.credits_refunded,
        "cache_hits": counts.cache_hits,
        "credits_saved": counts.credits_saved,
    }


@strawberry.type
class UsageTotals:
    requests: int = strawberry.field(description="jobs created, by their record")
    images: int = strawberry.field(description="images of the jobs that completed")
    credits_spent: int = strawberry.field(description="credits charged")
    credits_refunded: int = strawberry.field(
        description="credits given back (failed or cancelled jobs)"
    )
    cache_hits: int = strawberry.field(
        description="jobs served by the cache or by an identical request in flight, for nothing"
    )
    credits_saved: int = strawberry.field(description="what those would have cost")


@strawberry.type
class UsageRow(UsageTotals):
    """The totals' counts, for one day, service or backend."""

    key: str = strawberry.field(
        description="the UTC day (YYYY-MM-DD), service or backend; `expired`: credits of "
        "jobs whose record is gone; backend `none`: a job that reached none"
    )


@strawberry.type(description="One account's use over [from, to), docs/api.md#usage.")
class Usage:
    account_id: strawberry.ID
    from_: str = strawberry.field(name="from", description="UTC, inclusive")
    to: str = strawberry.field(description="UTC, exclusive")
    group_by: UsageGroup
    rows: list[UsageRow]
    totals: UsageTotals
    truncated: bool = strawberry.field(
        description="the range held more jobs or ledger entries than one answer reads "
        "(50,000 each): the earliest were counted; ask a shorter range"
    )

    @classmethod
    def of(cls, report: Report) -> Usage:
        return cls(
            account_id=strawberry.ID(report.account),
            from_=iso(report.start_ms) or "",
            to=iso(report.end_ms) or "",
            group_by=UsageGroup(report.group_by),
            rows=[UsageRow(key=key, **_counts(c)) for key, c in report.rows],
            totals=UsageTotals(**_counts(report.totals)),
            truncated=report.truncated,
        )
