"""The `gateway` command (docs/api.md#command-line): serve, worker, keys, credits, usage,
generate."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

import httpx
import orjson
import redis.exceptions
import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from gateway.accounts import Accounts
from gateway.config import Settings, load_settings
from gateway.errors import GatewayError
from gateway.store import shards
from gateway.store.redis import RefusedRedis, Scripts, connect

app = typer.Typer(no_args_is_help=True, help="Image-generation gateway.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys.")
credits_app = typer.Typer(no_args_is_help=True, help="Change a key's credit balance.")
app.add_typer(keys_app, name="keys")
app.add_typer(credits_app, name="credits")
ledger_app = typer.Typer(no_args_is_help=True, help="Read a key's ledger.")
app.add_typer(ledger_app, name="ledger")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")


def _configure_logging() -> None:
    # The libraries' own lines (uvicorn's, Strawberry's: an unexpected error with its
    # traceback) as JSON lines too, with the request's id when one is bound, on stderr.
    stdlib = logging.StreamHandler(sys.stderr)
    stdlib.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                structlog.stdlib.add_logger_name,
                structlog.processors.TimeStamper(fmt="iso"),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    logging.basicConfig(level=logging.INFO, handlers=[stdlib], force=True)
    # httpx logs every request it sends at INFO (a webhook's, in plain text): the gateway's
    # own JSON lines already say what each attempt did (docs/api.md#logs-and-traces).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,  # a crash is logged with its traceback
            # orjson, written as bytes (the `request` lines are rendered alike, in one
            # step: gateway/telemetry_http.py)
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.BytesLoggerFactory(),
    )


def _configure_tracing() -> None:
    """OpenTelemetry traces when the standard OTEL_* variables ask (gateway/telemetry.py)."""
    from gateway import telemetry

    try:
        telemetry.configure_from_env()
    except ValueError as exc:
        err.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from None


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:  # each setting by its variable's name, one a line
        for error in exc.errors():
            name = f"GATEWAY_{str(error['loc'][0]).upper()}" if error["loc"] else "settings"
            inner = ".".join(str(part) for part in error["loc"][1:])  # a plan's limit, say
            said = f"{name}: {inner}: {error['msg']}" if inner else f"{name}: {error['msg']}"
            said = escape(said)  # it may quote what was typed: no markup
            err.print(f"[red]configuration error:[/red] {said}", soft_wrap=True)
        raise typer.Exit(2) from None
    except (ValueError, OSError) as exc:
        err.print(f"[red]configuration error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


def _storage_directory(settings: Settings) -> None:
    """The outputs' directory made now (it is where no bucket is named): one that cannot
    be is a configuration error, not a traceback from the app's start-up."""
    if settings.storage_url:
        return
    try:
        settings.storage_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        err.print(
            f"[red]configuration error:[/red] GATEWAY_STORAGE_DIR {settings.storage_dir} "
            f"cannot be made: {exc.strerror}",
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


def _shared_store(settings: Settings) -> None:
    if not settings.redis_url:
        err.print(
            "[red]GATEWAY_REDIS_URL is not set.[/red] Without it the gateway uses an embedded "
            "store inside one process, which this command cannot reach or share. "
            "Point GATEWAY_REDIS_URL at the Redis your gateway uses."
        )
        raise typer.Exit(2)


@contextlib.contextmanager
def _reaching_redis(settings: Settings) -> Iterator[None]:
    """A Redis that cannot be reached or refuses the credentials: one line and exit 1,
    not a traceback. It names the server, never the URL's password."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        where = urlsplit(settings.redis_url or "")
        server = where.hostname or where.path
        if where.port:
            server = f"{server}:{where.port}"
        err.print(f"[red]cannot use the Redis at {server}:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def _with_accounts(
    settings: Settings, action: Callable[[Accounts], Awaitable[T]], *, places: bool = False
) -> T:
    """`places`: the action makes an account, on a shard below this process's count,
    which must be one the workers read (`shards.for_placing`)."""
    _shared_store(settings)

    async def run() -> T:
        redis = await connect(settings.redis_url)
        try:
            if places:
                await shards.for_placing(redis, settings.redis_shards)
            scripts = Scripts.register(redis)
            return await action(Accounts(redis, scripts, settings))
        finally:
            await redis.aclose()

    try:
        with _usable_redis(settings):
            return asyncio.run(run())
    except GatewayError as exc:
        err.print(f"[red]{exc.code}:[/red] {exc.message}")
        raise typer.Exit(1) from None


#: listen addresses that are no address a client can use
WILDCARDS = ("0.0.0.0", "::", "")  # noqa: S104 (compared with, not bound to)


def _warn_without_public_url(settings: Settings, worker: bool) -> None:
    """Output URLs name `GATEWAY_PUBLIC_URL`, else this process's own host and port: a
    worker's (which serves nothing) or a wildcard address no client can reach."""
    if settings.public_url or not (worker or settings.host in WILDCARDS):
        return
    err.print(
        f"[yellow]GATEWAY_PUBLIC_URL is not set: output URLs will name {settings.base_url}, "
        "which clients may not reach; set it to where they reach `gateway serve`.[/yellow]",
        soft_wrap=True,
    )


def _tune_gc() -> None:
    """Never scan what start-up made (modules, schema, scripts), and collect cycles only
    every 50,000 allocations.

    With CPython's default (a young collection every 700 allocations) the collector ran
    over and over through the objects of the work in flight, which reference counting
    frees anyway: a worker with 10,000 jobs in flight spent over half its CPU in it
    (0.51 ms per upstream poll, against 0.21-0.23 ms), and a served process ~8% of a
    request's CPU (`python -m bench`, BENCHMARKS.md). Requests make no reference cycles
    (the GraphQL view breaks the one it had), so a served process holds no more memory
    for it."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@contextlib.contextmanager
def _usable_redis(settings: Settings) -> Iterator[None]:
    """`_reaching_redis`, and a Redis the gateway will not use (`RefusedRedis`: it may
    evict keys, or its keyspace has more shards than this process reads): one line
    saying why and what to change, and exit 1."""
    try:
        with _reaching_redis(settings):
            yield
    except RefusedRedis as exc:
        err.print(f"[red]refused:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def _refuse_unusable_redis(settings: Settings) -> None:
    """`runtime`'s checks of the Redis, made before uvicorn starts (`serve`), so that a
    refusal is one line, not a traceback from the app's start-up."""
    from gateway.runtime import check_eviction_policy

    async def check() -> None:
        redis = await connect(settings.redis_url)
        try:
            await check_eviction_policy(redis)
            await shards.at_start(redis, settings.redis_shards)
        finally:
            await redis.aclose()

    with _usable_redis(settings):
        asyncio.run(check())


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="listen address")] = None,
    port: Annotated[int | None, typer.Option(help="listen port")] = None,
) -> None:
    """Serve the API (GraphQL and REST); runs in-process workers too."""
    import uvicorn

    from gateway.app import build_app, server_limits

    settings = _settings(host=host, port=port)
    _configure_logging()
    _configure_tracing()
    if not settings.redis_url:
        err.print(
            "[yellow]GATEWAY_REDIS_URL is not set: embedded store, one process, "
            "nothing kept after exit.[/yellow]"
        )
    _storage_directory(settings)
    if settings.redis_url:
        _refuse_unusable_redis(settings)
    _warn_without_public_url(settings, worker=False)
    app = build_app(settings)
    _tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        # Public URLs come from GATEWAY_PUBLIC_URL (without it, the request's own scheme
        # and host: docs/api.md#configuration): uvicorn's X-Forwarded-* rewriting, on by
        # default, would cost every request (~2% of a REST generation's CPU).
        log_level="warning",
        log_config=None,  # its lines through the JSON handler `_configure_logging` set up
        access_log=False,
        proxy_headers=False,
        server_header=False,
        loop="uvloop",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
        **server_limits(settings),
    )


@app.command()
def worker() -> None:
    """Run jobs only (several may share one Redis with any number of gateways)."""
    from gateway.metrics_http import worker_metrics
    from gateway.runtime import runtime

    settings = _settings()
    _shared_store(settings)
    _storage_directory(settings)
    _configure_logging()
    _configure_tracing()
    _warn_without_public_url(settings, worker=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with runtime(settings) as rt, worker_metrics(rt.worker, settings):
            _tune_gc()
            structlog.get_logger("gateway").info("worker started", consumer=rt.worker.consumer)
            await rt.worker.run(stop, grace=settings.shutdown_grace_seconds)
            if rt.worker.refused is not None:  # the keyspace outgrew it while it ran
                raise rt.worker.refused

    import uvloop  # the loop `serve` runs on too: about half the loop's CPU per poll

    with _usable_redis(settings):
        uvloop.run(main())


@keys_app.command("create")
def keys_create(
    plan: Annotated[str, typer.Option(help="free, starter, pro or enterprise")] = "free",
    credits: Annotated[int, typer.Option(help="initial credits")] = 0,
    name: Annotated[str, typer.Option(help="a label")] = "",
    rpm: Annotated[int | None, typer.Option(help="own generations/minute")] = None,
    concurrency: Annotated[int | None, typer.Option(help="own concurrent jobs")] = None,
    daily: Annotated[int | None, typer.Option(help="own generations/day")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Create a key; it is printed once and stored only as a hash."""
    made = _with_accounts(
        _settings(),
        lambda a: a.create(plan, credits, name, rpm=rpm, concurrency=concurrency, daily=daily),
        places=True,
    )
    _print_key(made, as_json)


def _print_key(made: dict[str, Any], as_json: bool) -> None:
    """A key just made (`keys create`, `keys rotate`): shown this once."""
    if as_json:
        print(json.dumps(made))
        return
    console.print(f"API key: {made['key']}", soft_wrap=True)  # shown once: whole
    console.print(  # one line, however narrow: scripts read the secret from it
        f"id {made['id']}, plan {made['plan']}, {made['credits']} credits, "
        f"webhook secret {made['webhookSecret']}",
        soft_wrap=True,
    )
    console.print("[dim]The key is shown once; only its hash is stored.[/dim]")


@keys_app.command("list")
def keys_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (never the keys themselves)."""
    infos = _with_accounts(_settings(), lambda a: a.all())
    if as_json:
        print(json.dumps([i.as_dict() for i in infos]))
        return
    # The id whole, however narrow the terminal: `keys revoke ID` and the others take it.
    widest = max((len(i.id) for i in infos), default=2)
    table = Table(
        Column("id", no_wrap=True, min_width=widest),
        *("name", "plan", "credits", "rpm", "concurrency", "daily", "revoked"),
    )
    for i in infos:
        table.add_row(
            i.id,
            escape(i.name),  # a name is the user's text, not rich's markup
            i.plan,
            str(i.credits),
            *("" if v is None else str(v) for v in (i.rpm, i.concurrency, i.daily)),
            "yes" if i.revoked else "",
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Revoke a key: it is refused from the next request on."""
    _with_accounts(_settings(), lambda a: a.revoke(key_id))
    console.print(f"revoked {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    webhook_secret: Annotated[
        bool, typer.Option("--webhook-secret", help="a new webhook secret too")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A new key for ID (the old one, and the client tokens it minted, refused at once;
    a revoked key live again): its balance, limits, ledger and jobs stay."""
    _print_key(_with_accounts(_settings(), lambda a: a.rotate(key_id, webhook_secret)), as_json)


@keys_app.command("update")
def keys_update(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    plan: Annotated[str | None, typer.Option()] = None,
    rpm: Annotated[int | None, typer.Option(help="negative: unlimited")] = None,
    concurrency: Annotated[int | None, typer.Option(help="negative: unlimited")] = None,
    daily: Annotated[int | None, typer.Option(help="negative: unlimited")] = None,
) -> None:
    """Change a key's plan or its own limits."""
    info = _with_accounts(
        _settings(),
        lambda a: a.update(key_id, plan=plan, rpm=rpm, concurrency=concurrency, daily=daily),
    )
    print(json.dumps(info.as_dict()))  # not rich's: it would wrap lines and read markup


@credits_app.command("add", context_settings={"ignore_unknown_options": True})
def credits_add(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    amount: Annotated[int, typer.Argument(metavar="N", help="negative: a correction")],
) -> None:
    """Add credits to a key (recorded in its ledger)."""
    balance = _with_accounts(_settings(), lambda a: a.add_credits(key_id, amount))
    console.print(f"balance of {key_id}: {balance}")


@app.command("usage")
def usage_report(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    start: Annotated[
        str | None, typer.Option("--from", help="UTC date or datetime; default 29 days ago")
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="UTC date (that day included) or datetime")
    ] = None,
    group_by: Annotated[str, typer.Option(help="day, service or backend")] = "day",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A key's requests, images and credits by day, service or backend (docs/api.md#usage)."""
    from gateway import usage

    first, last = usage.default_range()

    async def read(accounts: Accounts) -> usage.Report:
        start_ms, end_ms = usage.parse_range(start or first, end or last)
        await accounts.get(key_id)
        return await usage.report(accounts.redis, key_id, start_ms, end_ms, group_by.lower())

    report = _with_accounts(_settings(), read).public()
    if as_json:
        print(json.dumps(report))
        return
    names = ("requests", "images", "creditsSpent", "creditsRefunded", "cacheHits", "creditsSaved")
    table = Table(
        report["groupBy"].lower(),
        "requests",
        "images",
        "spent",
        "refunded",
        "cache hits",
        "saved",
        title=f"usage of {key_id}, {report['from']} to {report['to']}",
    )
    for row in report["rows"]:
        table.add_row(row["key"], *(str(row[n]) for n in names))
    table.add_section()
    table.add_row("total", *(str(report["totals"][n]) for n in names), style="bold")
    console.print(table)
    if report["truncated"]:
        err.print("[yellow]truncated: the range holds too much to read at once; ask less[/yellow]")


def _since_ms(value: str) -> int:
    """`--since`: unix milliseconds, or an ISO 8601 date or time (UTC unless it says)."""
    if value.strip().lstrip("-").isdigit():
        return int(value)
    try:
        when = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"not unix ms nor an ISO date: {value!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp() * 1000)


@ledger_app.command("export")
def ledger_export(
    key_id: Annotated[str, typer.Argument(metavar="ID")],
    since: Annotated[
        str, typer.Option(help="from this time on: unix ms or ISO 8601 (UTC unless it says)")
    ] = "0",
) -> None:
    """Print a key's ledger entries as JSON lines, oldest first: {id, at, delta, reason,
    job, balance}. Entries older than GATEWAY_LEDGER_RETENTION_DAYS are trimmed: export
    them before, to keep the history."""
    since_ms = _since_ms(since)

    async def export(accounts: Accounts) -> int:
        count = 0
        async for entry in accounts.ledger_since(key_id, since_ms):
            sys.stdout.write(json.dumps(entry) + "\n")
            count += 1
        sys.stdout.flush()
        return count

    _with_accounts(_settings(), export)


GENERATE = """mutation($input: ImageGenerationInput!) {
  generateImage(input: $input) { id status creditCost }
}"""
POLL = "query($id: ID!) { job(id: $id) { id status url error metadata } }"


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument()],
    provider: Annotated[str, typer.Option(help="service or backend")] = "flux-krea",
    width: Annotated[int, typer.Option()] = 1024,
    height: Annotated[int, typer.Option()] = 1024,
    seed: Annotated[int | None, typer.Option()] = None,
    out: Annotated[Path | None, typer.Option(help="where to save the image")] = None,
) -> None:
    """Generate an image through a running gateway (GATEWAY_URL, GATEWAY_API_KEY)."""
    base = os.environ.get("GATEWAY_URL", "http://127.0.0.1:8000").rstrip("/")
    key = os.environ.get("GATEWAY_API_KEY")
    if not key:
        err.print("[red]GATEWAY_API_KEY is not set[/red]")
        raise typer.Exit(2)
    variables = {
        "input": {
            "service": provider,
            "prompt": prompt,
            "width": width,
            "height": height,
            "seed": seed,
        }
    }
    with httpx.Client(
        base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        try:
            job = _graphql(client, GENERATE, variables)["generateImage"]
            with Progress(
                SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err
            ) as progress:
                task = progress.add_task(f"{job['id']}: {job['status']}")
                while job["status"] in ("queued", "processing"):
                    time.sleep(1.0)
                    job = _graphql(client, POLL, {"id": job["id"]})["job"]
                    progress.update(task, description=f"{job['id']}: {job['status']}")
            if job["status"] != "completed":
                err.print(f"[red]{job['status']}:[/red] {job.get('error') or ''}")
                raise typer.Exit(1)
        except httpx.HTTPError as exc:
            err.print(f"[red]cannot reach the gateway at {base}:[/red] {exc}")
            raise typer.Exit(1) from None
    # Outputs are public, and may be on another host (GATEWAY_PUBLIC_URL, a bucket or a
    # CDN, the gateway's URL a redirect to it): fetched without the key.
    try:
        image = httpx.get(job["url"], follow_redirects=True, timeout=30)
        image.raise_for_status()
    except httpx.HTTPError as exc:
        err.print(f"[red]cannot download the image at {job['url']}:[/red] {exc}")
        raise typer.Exit(1) from None
    target = out or Path(job["url"].rsplit("/", 1)[-1])
    target.write_bytes(image.content)
    meta = job.get("metadata") or {}
    console.print(
        f"saved {target} ({meta.get('width')}x{meta.get('height')}, "
        f"backend {meta.get('backend')}, seed {meta.get('seed')})"
    )


def _graphql(client: httpx.Client, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/graphql", json={"query": query, "variables": variables})
    with contextlib.suppress(ValueError):
        body = response.json()
        if body.get("errors"):
            first = body["errors"][0]
            code = (first.get("extensions") or {}).get("code", "")
            err.print(f"[red]{code}:[/red] {first.get('message')}")
            raise typer.Exit(1)
        if body.get("data"):
            return dict(body["data"])
    response.raise_for_status()
    raise typer.Exit(1)
