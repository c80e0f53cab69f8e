"""Floors for the HTTP benchmarks: the least a framework can do for the same request.

Each is served like the gateway (`python -m uvicorn bench.floors:NAME`, one worker,
uvloop and httptools when installed) so that a ratio against it measures the gateway's
own work, not the framework's:

- `starlette_app`: a bare Starlette JSON POST route at `/v1/text_to_image` (parse the
  body, answer a small JSON object with 202), the floor of `POST /v1/text_to_image`.
- `strawberry_app`: a trivial Strawberry schema at `/graphql` with only the
  `ParserCache` and `ValidationCache` extensions, whose `generate` mutation and `job`
  query accept the very documents the gateway's clients send (Doitong's
  `generate`, the polling client's `job`) and answer constants: the floor of the
  gateway's GraphQL endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from enum import Enum
from typing import Any

import strawberry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from strawberry.asgi import GraphQL
from strawberry.extensions import ParserCache, ValidationCache
from strawberry.scalars import JSON

# -- bare Starlette -----------------------------------------------------------------------


async def text_to_image(request: Request) -> Response:
    body = await request.json()
    return JSONResponse(
        {
            "id": secrets.token_hex(12),
            "status": "queued",
            "type": "IMAGE",
            "provider": body.get("service"),
            "url": None,
            "urls": [],
            "creditCost": 20,
            "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        status_code=202,
    )


starlette_app = Starlette(routes=[Route("/v1/text_to_image", text_to_image, methods=["POST"])])


# -- trivial Strawberry ---------------------------------------------------------------------


@strawberry.enum
class GenerationType(Enum):
    IMAGE = "IMAGE"


@strawberry.input
class TextInput:
    text: str


@strawberry.input
class GenerateOptions:
    width: int | None = None
    height: int | None = None


@strawberry.input
class GenerateInput:
    type: GenerationType
    provider: str
    input: TextInput
    options: GenerateOptions | None = None


@strawberry.type
class Generation:
    id: strawberry.ID
    status: str
    type: GenerationType
    provider: str
    url: str | None
    metadata: JSON | None
    credit_cost: int
    error: str | None


def constant(provider: str, id: str | None = None) -> Generation:
    return Generation(
        id=strawberry.ID(id or secrets.token_hex(12)),
        status="queued",
        type=GenerationType.IMAGE,
        provider=provider,
        url=None,
        metadata=None,
        credit_cost=20,
        error=None,
    )


@strawberry.type
class Query:
    @strawberry.field
    async def job(self, id: strawberry.ID) -> Generation | None:
        return constant("local", str(id))


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def generate(self, input: GenerateInput) -> Generation:
        return constant(input.provider)


schema = strawberry.Schema(
    query=Query,
    mutation=Mutation,
    extensions=[lambda: ParserCache(maxsize=512), lambda: ValidationCache(maxsize=512)],
)
strawberry_app = Starlette(
    routes=[Route("/graphql", GraphQL(schema, graphql_ide=None), methods=["GET", "POST"])]
)


async def upstream_job(request: Request) -> Response:
    """What a provider answers a poll with (Krea's `GET /jobs/{id}` shape; see
    docs/providers/krea.md)."""
    return JSONResponse(
        {
            "job_id": request.path_params["job_id"],
            "status": "processing",
            "created_at": "2026-12-01T00:00:00Z",
            "result": None,
        }
    )


upstream_app = Starlette(routes=[Route("/jobs/{job_id}", upstream_job, methods=["GET"])])


async def openai_images(request: Request) -> Response:
    """OpenAI's `POST /v1/images/generations`, answered at once: the upstream a LiteLLM
    proxy calls for the peer case (`bench/peer.py`)."""
    await request.body()
    return JSONResponse(
        {"created": int(time.time()), "data": [{"url": "http://127.0.0.1/images/bench.png"}]}
    )


openai_app = Starlette(
    routes=[
        Route("/v1/images/generations", openai_images, methods=["POST"]),
    ]
)


class SlowKrea:
    """Krea's job protocol (docs/providers/krea.md) with every job taking `SLOW_KREA_SECONDS`
    (default 20): what thousands of jobs waiting upstream look like to a worker. A job
    submitted with `X-Webhook-URL` is reported there when it is done."""

    def __init__(self, seconds: float) -> None:
        import io

        from PIL import Image

        self.seconds = seconds
        self.created: dict[str, float] = {}
        self.polls = 0
        self.callbacks = 0
        self.session: Any = None  # an aiohttp session for the callbacks, opened on first use
        out = io.BytesIO()
        Image.new("RGB", (64, 64), (40, 90, 160)).save(out, "PNG")
        self.png = out.getvalue()
        self.app = Starlette(
            routes=[
                Route("/generate/image/{model:path}", self.submit, methods=["POST"]),
                Route("/jobs/{job_id}", self.job, methods=["GET"]),
                Route("/files/{name}", self.file, methods=["GET"]),
                Route("/stats", self.stats, methods=["GET"]),
            ]
        )

    async def submit(self, request: Request) -> Response:
        job_id = f"j{len(self.created)}"
        self.created[job_id] = time.monotonic()
        hook = request.headers.get("x-webhook-url")
        if hook:
            body = self.view(job_id, str(request.url_for("file", name=f"{job_id}.png")), True)
            asyncio.get_running_loop().call_later(
                self.seconds, lambda: asyncio.ensure_future(self.call_back(hook, body))
            )
        return JSONResponse(
            {"job_id": job_id, "status": "queued", "created_at": "2026-12-01T00:00:00Z"}
        )

    async def call_back(self, url: str, body: dict[str, Any]) -> None:
        import aiohttp

        if self.session is None:
            # Thousands of callbacks fall due together: they queue for a connection with
            # no time limit (a callback lost in the queue would only measure the fallback)
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60),
            )
        self.callbacks += 1
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.post(url, json=body) as response:
                await response.read()

    def view(self, job_id: str, url: str, done: bool) -> dict[str, Any]:
        return {
            "job_id": job_id,
            "status": "completed" if done else "processing",
            "created_at": "2026-12-01T00:00:00Z",
            "completed_at": "2026-12-01T00:00:20Z" if done else None,
            "result": {"urls": [url]} if done else None,
        }

    async def job(self, request: Request) -> Response:
        self.polls += 1
        job_id = request.path_params["job_id"]
        done = time.monotonic() - self.created.get(job_id, 0.0) >= self.seconds
        return JSONResponse(
            self.view(job_id, str(request.url_for("file", name=f"{job_id}.png")), done)
        )

    async def file(self, request: Request) -> Response:
        return Response(self.png, media_type="image/png")

    async def stats(self, request: Request) -> Response:
        return JSONResponse(
            {"submitted": len(self.created), "polls": self.polls, "callbacks": self.callbacks}
        )


slow_krea_app = SlowKrea(float(os.environ.get("SLOW_KREA_SECONDS", "20"))).app
