"""`jobUpdates`: the job's current state, then every change, ending with the last."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import strawberry

from schema.context import Context
from schema.types import Generation

Info = strawberry.Info[Context, None]


@strawberry.type
class Subscription:
    @strawberry.subscription(description="Every status change of one of the caller's jobs.")
    async def job_updates(self, info: Info, id: strawberry.ID) -> AsyncGenerator[Generation, None]:
        ctx = info.context
        principal = await ctx.caller(read=True)
        async for job in ctx.gateway.follow(principal, str(id), ctx.api_key(), ctx.origin()):
            yield Generation.of(job)
