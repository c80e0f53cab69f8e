"""Mutation resolvers: turn the input into a `GenerationRequest`, call the gateway.

`generate` and `generateImage` each have one resolver body, `resolve_*`, taking the
arguments as graphql-core coerced them: the input keyed by the schema's names
(`webhookUrl`, `numImages`), the only spelling `gateway.params` gets from GraphQL.
Strawberry's field (its permissions, extensions and argument conversion intact) calls it
with the input it built given back in that form; a prepared document (`schema.prepared`)
with graphql-core's own, building no input objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import strawberry

from gateway.errors import GatewayError
from gateway.jobs.model import iso
from gateway.params import GenerationRequest, from_generate_input, from_image_input
from gateway.tokens import MINTING, spec
from schema.context import Context
from schema.inputs import ClientTokenInput, GenerateInput, ImageGenerationInput
from schema.prepared import graphql_value, resolved_by
from schema.types import ApiKey, ClientToken, CreatedKey, Generation

Info = strawberry.Info[Context, None]


async def _generate(ctx: Context, parse: Callable[[], GenerationRequest]) -> Generation:
    """Key check and admission in one round trip (see `Gateway.generate`)."""

    async def parsed() -> GenerationRequest:
        return parse()

    try:
        job, principal = await ctx.gateway.generate(ctx.api_key(), parsed, ctx.origin())
    except GatewayError as exc:
        ctx.add_headers(exc.headers)
        raise
    ctx.set_principal(principal)
    return Generation.of(job)


async def resolve_generate(ctx: Context, args: dict[str, Any]) -> Generation:
    """`Mutation.generate`: `args` as graphql-core coerced them (`schema.prepared`)."""
    return await _generate(ctx, lambda: from_generate_input(args["input"]))


async def resolve_generate_image(ctx: Context, args: dict[str, Any]) -> Generation:
    """`Mutation.generateImage`: `args` as graphql-core coerced them (`schema.prepared`)."""
    return await _generate(ctx, lambda: from_image_input(args["input"]))


@strawberry.type
class Mutation:
    # A prepared document calls the same resolvers, with graphql-core's arguments.
    @strawberry.mutation(
        description="Doitong's form: {type, provider, input: {text}, options}.",
        metadata=resolved_by(resolve_generate),
    )
    async def generate(self, info: Info, input: GenerateInput) -> Generation:
        return await resolve_generate(info.context, {"input": graphql_value(info, input)})

    @strawberry.mutation(
        description="The flat form: {service, prompt, width, height, ...}.",
        metadata=resolved_by(resolve_generate_image),
    )
    async def generate_image(self, info: Info, input: ImageGenerationInput) -> Generation:
        return await resolve_generate_image(info.context, {"input": graphql_value(info, input)})

    @strawberry.mutation(description="Cancel a job that has not ended; refunded in full.")
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Generation:
        ctx = info.context
        return Generation.of(await ctx.gateway.cancel(await ctx.caller(), str(id)))

    @strawberry.mutation(
        description="Deliver an ended job's webhook again (once a delivery under way has ended)."
    )
    async def resend_webhook(self, info: Info, id: strawberry.ID) -> bool:
        ctx = info.context
        await ctx.gateway.resend_webhook(await ctx.caller(), str(id))
        return True

    @strawberry.mutation(
        description="A short-lived token for a web page, spending this key's credits "
        "within its own budget (shown once)."
    )
    async def create_client_token(self, info: Info, input: ClientTokenInput) -> ClientToken:
        ctx = info.context
        principal = await ctx.caller()
        principal.require_key(MINTING)  # a token is refused as one, whatever it asks
        wanted = spec(
            max_credits=input.max_credits,
            ttl_seconds=input.ttl_seconds,
            origins=input.origins,
            services=input.services,
            max_jobs=input.max_jobs,
        )
        try:
            minted = await ctx.gateway.create_client_token(principal, wanted)
        except GatewayError as exc:
            ctx.add_headers(exc.headers)  # a refusal's own (the token cap's)
            raise
        return ClientToken(
            token=minted.token,
            expires_at=iso(minted.expires_ms) or "",
            max_credits=minted.max_credits,
        )

    @strawberry.mutation(description="End one of this key's client tokens now.")
    async def revoke_client_token(self, info: Info, token: str) -> bool:
        ctx = info.context
        return await ctx.gateway.revoke_client_token(await ctx.caller(), token)

    @strawberry.mutation(description="Admin: create an API key (shown once).")
    async def create_key(
        self,
        info: Info,
        plan: str,
        credits: int = 0,
        name: str = "",
        rpm: int | None = None,
        concurrency: int | None = None,
        daily: int | None = None,
    ) -> CreatedKey:
        info.context.require_admin()
        made = await info.context.gateway.accounts.create(
            plan, credits, name, rpm=rpm, concurrency=concurrency, daily=daily
        )
        return CreatedKey.of(made)

    @strawberry.mutation(
        description="Admin: change a key's plan and limits (a negative limit: unlimited)."
    )
    async def update_key(
        self,
        info: Info,
        id: strawberry.ID,
        plan: str | None = None,
        rpm: int | None = None,
        concurrency: int | None = None,
        daily: int | None = None,
    ) -> ApiKey:
        info.context.require_admin()
        a = await info.context.gateway.accounts.update(
            str(id), plan=plan, rpm=rpm, concurrency=concurrency, daily=daily
        )
        return ApiKey.of(a)

    @strawberry.mutation(description="Admin: add (or, negative, remove) credits; the balance.")
    async def add_credits(self, info: Info, id: strawberry.ID, amount: int) -> int:
        info.context.require_admin()
        return await info.context.gateway.accounts.add_credits(str(id), amount)

    @strawberry.mutation(
        description="Admin: a new key for the account (shown once): the old one and the "
        "client tokens it minted are refused at once, a revoked key is live again; with "
        "webhookSecret, a new webhook secret too."
    )
    async def rotate_key(
        self, info: Info, id: strawberry.ID, webhook_secret: bool = False
    ) -> CreatedKey:
        info.context.require_admin()
        made = await info.context.gateway.accounts.rotate(str(id), webhook_secret)
        return CreatedKey.of(made)

    @strawberry.mutation(description="Admin: revoke an API key.")
    async def revoke_key(self, info: Info, id: strawberry.ID) -> bool:
        info.context.require_admin()
        await info.context.gateway.accounts.revoke(str(id))
        return True
