"""`query usage` and `gateway usage` (docs/api.md#usage): real jobs over two fake days."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway import usage
from gateway.errors import BadUserInput
from gateway.jobs.model import iso
from gateway.store import keys
from gateway.store.redis import connect
from tests.harness import Clock, Harness, gateway, reads_limited
from tests.test_admission import error_of
from tests.test_cli import run
from tests.test_client_tokens import mint

USAGE = """query($from: String!, $to: String!, $by: UsageGroup, $id: ID) {
  usage(from: $from, to: $to, groupBy: $by, accountId: $id) {
    accountId from to groupBy truncated
    rows { key requests images creditsSpent creditsRefunded cacheHits creditsSaved }
    totals { requests images creditsSpent creditsRefunded cacheHits creditsSaved }
  }
}"""
# Jobs from 22:00 UTC yesterday (day 1) to 02:00 today (day 2), on the gateway's clock.
TODAY = int(time.time() // 86_400 * 86_400)
DAY1, DAY2 = (datetime.fromtimestamp(TODAY + d, UTC).date().isoformat() for d in (-86_400, 0))


def row(key: str, *counts: int) -> dict[str, Any]:
    names = ("requests", "images", "creditsSpent", "creditsRefunded", "cacheHits", "creditsSaved")
    return {"key": key, **dict(zip(names, counts, strict=True))}


def totals(*counts: int) -> dict[str, int]:
    return {k: v for k, v in row("", *counts).items() if k != "key"}


async def ask(
    gw: Harness, key: str, start: str, end: str, by: str | None = None, account: str | None = None
) -> Any:
    variables = {"from": start, "to": end, "by": by, "id": account}
    return await gw.gql(USAGE, variables, key)


async def generated(gw: Harness, key: str, provider: str, **options: Any) -> dict[str, Any]:
    r = await gw.generate(key, f"usage {provider} {options}", provider=provider, **options)
    assert r.status_code == 200, r.text
    job = r.json()["data"]["generate"]
    return await gw.wait(key, job["id"])


async def two_days_of_jobs(gw: Harness, clock: Clock, key: str) -> None:
    """Day 1: flux-dev (on `local`) completes, flux-krea fails and is refunded, two local
    images; day 2: the flux-dev request again (a cache hit), one more local image."""
    clock.advance(TODAY - 2 * 3600 - clock())
    assert (await generated(gw, key, "flux-dev", seed=1, width=512, height=512))[
        "status"
    ] == "completed"
    failed = await generated(gw, key, "flux-krea", width=512, height=512)
    assert failed["status"] == "failed" and failed["creditCost"] == 0
    two = await generated(gw, key, "local", width=1024, height=1024, numImages=2)
    assert two["status"] == "completed" and two["creditCost"] == 40
    clock.advance(4 * 3600)  # 02:00 the next day
    hit = await generated(gw, key, "flux-dev", seed=1, width=512, height=512)
    assert hit["metadata"]["cached"] is True and hit["creditCost"] == 0
    assert (await generated(gw, key, "local", width=512, height=512))["creditCost"] == 10


def settings() -> dict[str, Any]:
    return {
        "admin_token": "adm",
        # flux-krea on a backend that cannot be reached (fails, refunded); flux-dev on local
        "fluxkrea_api_key": "k",
        "fluxkrea_api_base": "http://127.0.0.1:9/v1",
        "routes": {"flux-krea": ["fluxkrea"], "flux-dev": ["local"]},
    }


async def test_usage_by_day_service_and_backend(redis_url: str, storage_dir: Path) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, **settings()) as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        await two_days_of_jobs(gw, clock, key)
        everything = totals(5, 5, 70, 10, 1, 10)

        r = await ask(gw, key, DAY1, DAY2)
        assert r.status_code == 200, r.text
        by_day = r.json()["data"]["usage"]
        assert by_day["accountId"] == account and by_day["groupBy"] == "DAY"
        assert (by_day["from"], by_day["to"]) == (
            f"{DAY1}T00:00:00.000Z",
            iso((TODAY + 86_400) * 1000),
        )
        assert by_day["rows"] == [
            row(DAY1, 3, 3, 60, 10, 0, 0),
            row(DAY2, 2, 2, 10, 0, 1, 10),
        ]
        assert by_day["totals"] == everything and by_day["truncated"] is False

        by_service = (await ask(gw, key, DAY1, DAY2, "SERVICE")).json()
        assert by_service["data"]["usage"]["rows"] == [
            row("flux-dev", 2, 2, 10, 0, 1, 10),
            row("flux-krea", 1, 0, 10, 10, 0, 0),
            row("local", 2, 3, 50, 0, 0, 0),
        ]
        by_backend = (await ask(gw, key, DAY1, DAY2, "BACKEND")).json()
        assert by_backend["data"]["usage"]["rows"] == [
            row("local", 4, 5, 60, 0, 1, 10),
            row("none", 1, 0, 10, 10, 0, 0),
        ]
        assert by_backend["data"]["usage"]["totals"] == everything
        # What was spent less what came back is what the balance lost.
        me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
        assert me["credits"] == 1000 - (70 - 10)

        # Datetimes narrow the range: day 2 only, then the first hour of day 1 (nothing).
        day2 = (await ask(gw, key, f"{DAY2}T00:00:00Z", DAY2)).json()["data"]
        assert day2["usage"]["rows"] == [row(DAY2, 2, 2, 10, 0, 1, 10)]
        quiet = (await ask(gw, key, f"{DAY1}T00:00", f"{DAY1}T01:00+00:00")).json()
        assert quiet["data"]["usage"]["rows"] == [] and quiet["data"]["usage"]["totals"] == (
            totals(0, 0, 0, 0, 0, 0)
        )

        # The same through the command line, as JSON.
        cli = run(
            "usage",
            account,
            "--from",
            DAY1,
            "--to",
            DAY2,
            "--group-by",
            "service",
            "--json",
            env={"GATEWAY_REDIS_URL": redis_url},
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout) == by_service["data"]["usage"]
        table = run(
            "usage",
            account,
            "--from",
            DAY1,
            "--to",
            DAY2,
            env={"GATEWAY_REDIS_URL": redis_url},
        )
        assert table.returncode == 0, table.stderr
        assert DAY2 in table.stdout and "total" in table.stdout
        for bad, says in (
            (("--group-by", "week"), "BAD_USER_INPUT"),
            (("--from", "2031-13-01"), "BAD_USER_INPUT"),
        ):
            refused = run("usage", account, *bad, env={"GATEWAY_REDIS_URL": redis_url})
            assert refused.returncode == 1 and says in refused.stderr
        unknown = run("usage", "nope", env={"GATEWAY_REDIS_URL": redis_url})
        assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stderr

        # A job whose record expired: its charge still counts, from the ledger, at the
        # ledger entry's own time (Redis's clock, not the gateway's fake one).
        two = next(
            j
            for j in (
                await gw.gql("{ jobs(first: 10) { nodes { id creditCost } } }", key=key)
            ).json()["data"]["jobs"]["nodes"]
            if j["creditCost"] == 40
        )
        await gw.accounts.redis.delete(keys.job(account, two["id"]))
        today = datetime.now(UTC).date().isoformat()
        if today != DAY2:
            pytest.skip("ran across midnight: the expired record's day has moved")
        after = (await ask(gw, key, DAY1, DAY2, "SERVICE")).json()["data"]["usage"]
        assert after["rows"] == [
            row("expired", 0, 0, 40, 0, 0, 0),
            row("flux-dev", 2, 2, 10, 0, 1, 10),
            row("flux-krea", 1, 0, 10, 10, 0, 0),
            row("local", 1, 1, 10, 0, 0, 0),
        ]
        assert after["totals"] == totals(4, 3, 70, 10, 1, 10)
        # By day: the expired job's charge at the ledger entry's own time (Redis's
        # clock, now), not its request's (the gateway's fake clock: day 1).
        days = (await ask(gw, key, DAY1, DAY2)).json()["data"]["usage"]["rows"]
        assert days == [row(DAY1, 2, 1, 20, 10, 0, 0), row(DAY2, 2, 2, 50, 0, 1, 10)]


async def test_own_key_admin_and_client_token(redis_url: str, storage_dir: Path) -> None:
    clock = Clock()
    async with gateway(redis_url, storage_dir, clock, **settings()) as gw:
        key, other = await gw.key(credits=1000), await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        await two_days_of_jobs(gw, clock, key)
        span = (DAY1, DAY2)

        # Another key sees its own usage (none), never this one's.
        own = (await ask(gw, other, *span)).json()["data"]["usage"]
        assert own["accountId"] == gw.keys[other]["id"] and own["rows"] == []
        denied = await ask(gw, other, *span, account=account)
        assert denied.status_code == 403 and error_of(denied)["code"] == "FORBIDDEN"
        # The admin token reads any key's; an unknown id is NOT_FOUND.
        admin = (await ask(gw, "adm", *span, "SERVICE", account)).json()["data"]["usage"]
        assert admin["accountId"] == account and admin["totals"] == totals(5, 5, 70, 10, 1, 10)
        missing = await ask(gw, "adm", *span, account="nope")
        assert error_of(missing)["code"] == "NOT_FOUND"
        unauthenticated = await ask(gw, "", *span)
        assert error_of(unauthenticated)["code"] == "UNAUTHENTICATED"
        # A client token (a web page's) may not read its account's usage.
        token = await mint(gw, key)
        refused = await ask(gw, token, *span)
        assert refused.status_code == 403 and error_of(refused)["code"] == "FORBIDDEN"


@pytest.mark.parametrize(
    ("start", "end", "field"),
    [
        ("yesterday", "2031-05-02", "from"),
        ("2031-05-01", "2031-02-30", "to"),
        ("2031-05-02", "2031-05-01", "to"),  # to before from
        ("2031-05-01T12:00Z", "2031-05-01T12:00Z", "to"),  # empty
        ("2030-01-01", "2031-01-02", "to"),  # 367 days
        ("1969-12-31", "1970-01-01", "from"),  # before any ledger entry's time (was a 500)
        ("9999-12-01", "9999-12-31", "to"),  # the day after it is past datetime's range
    ],
)
async def test_bad_ranges_name_the_field(
    redis_url: str, storage_dir: Path, start: str, end: str, field: str
) -> None:
    async with gateway(redis_url, storage_dir, inprocess_workers=False, admin_token="adm") as gw:
        key = await gw.key()
        for caller, account in ((key, None), ("adm", gw.keys[key]["id"])):
            r = await ask(gw, caller, start, end, account=account)
            assert r.status_code == 400, r.text
            assert error_of(r)["code"] == "BAD_USER_INPUT" and error_of(r)["field"] == field
        fine = await ask(gw, key, "2030-01-01", "2030-12-31T23:59:59")  # 365 days: fine
        assert fine.status_code == 200, fine.text


def test_range_parsing() -> None:
    M = 1_935_360_000_000  # 2031-05-01T00:00:00Z
    assert usage.parse_range("2031-05-01", "2031-05-01") == (M, M + 86_400_000)
    # a datetime with an offset is taken in UTC; a naive one is UTC
    assert usage.parse_range("2031-05-01T02:00+02:00", "2031-05-01T01:00") == (
        M,
        M + 3_600_000,
    )
    assert usage.parse_range("2030-05-01", "2031-05-01")[1] - M == 86_400_000
    with pytest.raises(BadUserInput):
        usage.parse_range("2030-04-30", "2031-05-01")  # 367 days


async def test_pages_ties_and_the_cap(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pages: jobs sharing one ms across page ends are each counted once; past the
    cap the answer says it is truncated."""
    redis = await connect(redis_url)
    try:
        account = "abc123"
        scores = {f"j{i:02d}": 1_000 + (i // 4) for i in range(10)}  # four per ms
        async with redis.pipeline(transaction=False) as pipe:
            for job_id, ms in scores.items():
                pipe.zadd(keys.jobs(account), {job_id: ms})
                pipe.hset(
                    keys.job(account, job_id),
                    mapping={
                        "provider": "local",
                        "status": "completed",
                        "cost": 10,
                        "params": '{"num_images": 1}',
                        "metadata": '{"backend": "local"}',
                    },
                )
            # a cache hit's record as admission once wrote it: the outcome copied, priced
            pipe.zadd(keys.jobs(account), {"hit": 1_002})
            pipe.hset(
                keys.job(account, "hit"),
                mapping={
                    "provider": "local",
                    "status": "completed",
                    "cost": 0,
                    "price": 10,
                    "params": '{"num_images": 1}',
                    "metadata": '{"backend": "local", "cached": true}',
                },
            )
            await pipe.execute()
        monkeypatch.setattr(usage, "PAGE", 3)
        got = await usage.report(redis, account, 1_000, 1_003, "backend")
        assert got.rows[0][0] == "local" and got.totals.requests == 11
        assert got.totals.credits_spent == 100 and not got.truncated
        assert (got.totals.cache_hits, got.totals.credits_saved) == (1, 10)
        assert (await usage.report(redis, account, 1_001, 1_002, "service")).totals.requests == 4
        monkeypatch.setattr(usage, "MAX_JOBS", 5)
        capped = await usage.report(redis, account, 1_000, 1_003, "day")
        assert capped.truncated and 5 <= capped.totals.requests < 10
    finally:
        await redis.aclose()


async def test_a_report_counts_a_read_for_each_page_it_reads(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report may read 100,000 rows: counted as one read, a key could ask for hundreds
    a minute. Each page read (of `PAGE`) counts; past the key's reads, the next wait."""
    monkeypatch.setattr(usage, "PAGE", 2)
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        key = await gw.key(credits=1000)
        for i in range(7):
            body = {"service": "local", "prompt": f"page {i}", "width": 512, "height": 512}
            r = await gw.http.post("/v1/text_to_image", json=body, headers={"X-API-Key": key})
            assert r.status_code == 202, r.text
        today = datetime.fromtimestamp(gw.clock(), UTC).date().isoformat()
        report = (await ask(gw, key, today, today)).json()["data"]["usage"]
        assert report["totals"]["requests"] == 7
        # seven charges and seven jobs, two a page: four pages each, six beyond the
        # first of each: seven reads, over the five a minute
        refused = await gw.gql("{ me { credits } }", key=key)
        assert refused.status_code == 429, refused.text
        assert (error_of(refused)["code"], error_of(refused)["limit"]) == ("RATE_LIMITED", "read")
