"""Query resolvers: thin, typed; the work is in `gateway.service`."""

from __future__ import annotations

from typing import Annotated, Any

import strawberry

from gateway.params import from_generate_input
from gateway.service import PAGE, page_size
from schema.context import Context
from schema.inputs import GenerateInput
from schema.prepared import graphql_value, resolved_by
from schema.types import (
    ApiKey,
    Estimate,
    Generation,
    GenerationPage,
    Me,
    PageInfo,
    ProviderInfo,
    Usage,
    UsageGroup,
    WebhookDelivery,
)

Info = strawberry.Info[Context, None]


async def resolve_job(ctx: Context, args: dict[str, Any]) -> Generation | None:
    """`Query.job`, the poll: `args` as graphql-core coerced them (`schema.prepared`)."""
    job = await ctx.job(str(args["id"]))
    return Generation.of(job) if job else None


@strawberry.type
class Query:
    # A prepared document calls the same resolver, with graphql-core's arguments.
    @strawberry.field(
        description="One of the caller's jobs; null for another key's or none.",
        metadata=resolved_by(resolve_job),
    )
    async def job(self, info: Info, id: strawberry.ID) -> Generation | None:
        return await resolve_job(info.context, {"id": graphql_value(info, id)})

    @strawberry.field(description="The caller's jobs, newest first.")
    async def jobs(
        self,
        info: Info,
        first: int | None = PAGE,
        after: str | None = None,
        status: str | None = None,
    ) -> GenerationPage:
        first = page_size(first, after, status)
        ctx = info.context
        caller = await ctx.caller(read=True)
        jobs, more, cursor = await ctx.gateway.jobs(caller, first, after, status)
        return GenerationPage(
            nodes=[Generation.of(j) for j in jobs],
            page_info=PageInfo(has_next_page=more, end_cursor=cursor),
        )

    @strawberry.field(description="Plan, credit balance, and each limit's use.")
    async def me(self, info: Info) -> Me:
        ctx = info.context
        return Me.of(await ctx.gateway.me(await ctx.caller(read=True)))

    @strawberry.field(description="The credit cost of a request, without running it.")
    async def estimate(self, info: Info, input: GenerateInput) -> Estimate:
        ctx = info.context
        caller = await ctx.caller(read=True)
        e = ctx.gateway.estimate(caller, from_generate_input(graphql_value(info, input)))
        return Estimate(
            credits=e.credits,
            width=e.width,
            height=e.height,
            num_images=e.num_images,
            backends=e.backends,
        )

    @strawberry.field(description="Services and backends, enabled or not, and why.")
    def providers(self, info: Info) -> list[ProviderInfo]:
        return [ProviderInfo(**p) for p in info.context.gateway.providers()]

    @strawberry.field(description="Every delivery attempt of a job's webhook.")
    async def webhook_deliveries(self, info: Info, id: strawberry.ID) -> list[WebhookDelivery]:
        ctx = info.context
        rows = await ctx.gateway.webhook_deliveries(await ctx.caller(read=True), str(id))
        return [
            WebhookDelivery(
                attempt=r["attempt"],
                at=r["at"],
                status_code=r["statusCode"],
                error=r["error"],
                success=r["success"],
                duration_ms=r["durationMs"],
            )
            for r in rows
        ]

    @strawberry.field(
        description="Requests, images and credits over [from, to) (UTC; a date `to` "
        "includes its day; at most 366 days), by day, service or backend: the caller's "
        "key's own, or with accountId and the admin token any key's (docs/api.md#usage)."
    )
    async def usage(
        self,
        info: Info,
        from_: Annotated[str, strawberry.argument(name="from")],
        to: str,
        group_by: UsageGroup | None = UsageGroup.DAY,
        account_id: strawberry.ID | None = None,
    ) -> Usage:
        ctx = info.context
        group_by = group_by or UsageGroup.DAY
        if account_id is not None:
            ctx.require_admin()
            report = await ctx.gateway.usage(from_, to, group_by.value, account=str(account_id))
        else:
            principal = await ctx.caller(read=True)
            report = await ctx.gateway.usage(from_, to, group_by.value, principal=principal)
        return Usage.of(report)

    @strawberry.field(description="Admin: every API key (needs GATEWAY_ADMIN_TOKEN).")
    async def keys(self, info: Info) -> list[ApiKey]:
        info.context.require_admin()
        accounts = await info.context.gateway.accounts.all()
        return [ApiKey.of(a) for a in accounts]
