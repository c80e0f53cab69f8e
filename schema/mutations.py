"""Mutation resolvers: turn the input into a `GenerationRequest`, call the gateway."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import strawberry

from gateway.errors import GatewayError
from gateway.params import GenerationRequest, from_generate_input, from_image_input
from schema.context import Context
from schema.inputs import GenerateInput, ImageGenerationInput, as_dict
from schema.types import ApiKey, CreatedKey, Generation

Info = strawberry.Info[Context, None]


async def _generate(ctx: Context, parse: Callable[[], GenerationRequest]) -> Generation:
    """Key check and admission in one round trip (see `Gateway.generate`)."""

    async def parsed() -> GenerationRequest:
        return parse()

    try:
        job, principal = await ctx.gateway.generate(ctx.api_key(), parsed)
    except GatewayError as exc:
        ctx.add_headers(exc.headers)
        raise
    ctx.set_principal(principal)
    return Generation.of(job)


async def generate(ctx: Context, args: dict[str, Any]) -> Generation:
    return await _generate(ctx, lambda: from_generate_input(args["input"]))


async def generate_image(ctx: Context, args: dict[str, Any]) -> Generation:
    return await _generate(ctx, lambda: from_image_input(args["input"]))


# Root fields resolved from graphql-core's coerced arguments as they are, by graphql-core
# (`install_raw_resolvers`) and by a prepared document (`schema.prepared`).
RAW_MUTATIONS: dict[str, Callable[[Context, dict[str, Any]], Awaitable[Generation]]] = {
    "generate": generate,
    "generateImage": generate_image,
}


def install_raw_resolvers(schema: strawberry.Schema) -> None:
    """`generate` and `generateImage` take graphql-core's coerced input as it is.

    Strawberry would first build its input objects from it (and `as_dict` take them
    apart again): the largest cost of a generation request after its Redis round trip
    (BENCHMARKS.md). The types, validation and errors are the schema's as declared below.
    """
    fields = schema._schema.mutation_type.fields
    for name, resolve in RAW_MUTATIONS.items():
        fields[name].resolve = lambda _root, info, _resolve=resolve, **args: _resolve(
            info.context, args
        )


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Doitong's form: {type, provider, input: {text}, options}.")
    async def generate(self, info: Info, input: GenerateInput) -> Generation:
        return await _generate(info.context, lambda: from_generate_input(as_dict(input)))

    @strawberry.mutation(description="The flat form: {service, prompt, width, height, ...}.")
    async def generate_image(self, info: Info, input: ImageGenerationInput) -> Generation:
        return await _generate(info.context, lambda: from_image_input(as_dict(input)))

    @strawberry.mutation(description="Cancel a job that has not ended; refunded in full.")
    async def cancel_job(self, info: Info, id: strawberry.ID) -> Generation:
        ctx = info.context
        return Generation.of(await ctx.gateway.cancel(await ctx.caller(), str(id)))

    @strawberry.mutation(description="Deliver an ended job's webhook again.")
    async def resend_webhook(self, info: Info, id: strawberry.ID) -> bool:
        ctx = info.context
        await ctx.gateway.resend_webhook(await ctx.caller(), str(id))
        return True

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
        return CreatedKey(
            id=strawberry.ID(made["id"]),
            key=made["key"],
            plan=made["plan"],
            credits=made["credits"],
            webhook_secret=made["webhookSecret"],
        )

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
        return ApiKey(
            id=strawberry.ID(a.id),
            name=a.name,
            plan=a.plan,
            credits=a.credits,
            revoked=a.revoked,
            rpm=a.rpm,
            concurrency=a.concurrency,
            daily=a.daily,
        )

    @strawberry.mutation(description="Admin: add (or, negative, remove) credits; the balance.")
    async def add_credits(self, info: Info, id: strawberry.ID, amount: int) -> int:
        info.context.require_admin()
        return await info.context.gateway.accounts.add_credits(str(id), amount, "admin")

    @strawberry.mutation(description="Admin: revoke an API key.")
    async def revoke_key(self, info: Info, id: strawberry.ID) -> bool:
        info.context.require_admin()
        await info.context.gateway.accounts.revoke(str(id))
        return True
