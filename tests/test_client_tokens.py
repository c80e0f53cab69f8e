"""Client tokens (docs/api.md#client-tokens): minted by a key for a web page, spending
the key's credits within their own budget, seeing only their own jobs.

Each rule is checked through the public API (GraphQL, REST, SSE, WebSocket) against a
real Redis; the budget under a storm of requests across two real gateway processes.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from gateway.accounts import Accounts
from gateway.config import load_settings
from gateway.store import keys as rkeys
from gateway.store.redis import Scripts, connect
from tests.harness import GENERATE, Harness, gateway, reads_limited
from tests.test_admission import check_books, error_of, storm
from tests.test_live_updates import subscribe

MINT = """mutation($input: ClientTokenInput!) {
  createClientToken(input: $input) { token expiresAt maxCredits } }"""
REVOKE = "mutation($t: String!) { revokeClientToken(token: $t) }"
ME = """{ me { credits plan name webhookSecret cache { hits creditsSaved } clientToken {
  maxCredits spent jobs maxJobs origins services expiresAt } } }"""
JOBS = "{ jobs(first: 20) { nodes { id } } }"
JOB = "query($id: ID!) { job(id: $id) { id status creditCost } }"
CANCEL = "mutation($id: ID!) { cancelJob(id: $id) { status creditCost } }"
APP = "https://app.example"


async def mint(gw: Harness, key: str, **rules: Any) -> str:
    r = await gw.gql(MINT, {"input": {"maxCredits": 100, **rules}}, key)
    assert r.status_code == 200, r.text
    token = r.json()["data"]["createClientToken"]["token"]
    assert token.startswith("gct_")
    return str(token)


async def gql(
    gw: Harness, query: str, variables: dict[str, Any], token: str, origin: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if origin:
        headers["Origin"] = origin
    return await gw.http.post(
        "/graphql", json={"query": query, "variables": variables}, headers=headers
    )


def generate_input(provider: str = "local", **options: Any) -> dict[str, Any]:
    return {
        "input": {
            "type": "IMAGE",
            "provider": provider,
            "input": {"text": "a lighthouse"},
            "options": {"width": 512, "height": 512, **options},
        }
    }


def code_of(response: httpx.Response) -> str:
    return str(error_of(response)["code"])


def created(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["generate"]["id"])


async def me(gw: Harness, token: str, origin: str | None = None) -> dict[str, Any]:
    r = await gql(gw, ME, {}, token, origin)
    assert r.status_code == 200, r.text
    return dict(r.json()["data"]["me"])


# -- minting ---------------------------------------------------------------------------


async def test_a_key_mints_a_token_that_spends_its_credits_within_its_budget(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        r = await gw.gql(MINT, {"input": {"maxCredits": 25}}, key)
        minted = r.json()["data"]["createClientToken"]
        assert minted["maxCredits"] == 25
        token = minted["token"]
        # Only a hash of its secret is stored.
        stored = await gw.accounts.redis.hgetall(rkeys.client_token(account, token.split("_")[2]))
        assert token.split("_", 3)[3] not in json.dumps(stored)

        view = await me(gw, token)
        assert view["credits"] == 25  # the token's budget, not the account's 1000
        assert view["clientToken"]["maxCredits"] == 25 and view["clientToken"]["jobs"] == 0
        assert view["webhookSecret"] is None  # the key's, never a page's

        first = created(await gql(gw, GENERATE, generate_input(), token))  # 10 credits
        assert (await me(gw, token))["credits"] == 15
        assert (await gw.accounts.get(account)).credits == 990
        created(await gql(gw, GENERATE, generate_input(seed=2), token))
        refused = await gql(gw, GENERATE, generate_input(seed=3), token)
        assert refused.status_code == 402
        error = error_of(refused)
        assert (error["creditsRequired"], error["creditsAvailable"]) == (10, 5)
        assert (await gw.accounts.get(account)).credits == 980  # nothing more taken

        # A refund gives the budget back too.
        await gw.wait(key, first)
        job = (await gql(gw, JOB, {"id": first}, token)).json()["data"]["job"]
        assert job["status"] == "completed"


async def test_a_token_on_an_account_short_of_credits_is_told_so_not_the_balance(
    redis_url: str, storage_dir: Path
) -> None:
    """CONTRACT §11: `creditsAvailable` is the token's remaining budget, as `me` shows
    it; the account's balance is the backend's, never the page's."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=7)
        token = await mint(gw, key, maxCredits=100)
        refused = await gql(gw, GENERATE, generate_input(), token)  # 10 credits
        assert refused.status_code == 402
        error = error_of(refused)
        assert (error["creditsRequired"], error["creditsAvailable"]) == (10, 100)
        assert "account behind this client token" in error["message"]
        assert "7" not in error["message"]
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 7


async def test_a_cancelled_job_refunds_the_token_budget(redis_url: str, storage_dir: Path) -> None:
    # No workers: the job stays queued until cancelled.
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key(credits=1000)
        token = await mint(gw, key, maxCredits=10)
        job_id = created(await gql(gw, GENERATE, generate_input(), token))
        assert (await me(gw, token))["credits"] == 0
        r = await gql(gw, CANCEL, {"id": job_id}, token)
        assert r.json()["data"]["cancelJob"] == {"status": "cancelled", "creditCost": 0}
        assert (await me(gw, token))["credits"] == 10
        assert (await gw.accounts.get(gw.keys[key]["id"])).credits == 1000
        created(await gql(gw, GENERATE, generate_input(seed=9), token))  # spendable again


async def test_minting_input_is_checked(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        for rules, field in [
            ({"maxCredits": -1}, "maxCredits"),
            ({"maxCredits": 10, "ttlSeconds": 86_401}, "ttlSeconds"),
            ({"maxCredits": 10, "ttlSeconds": 0}, "ttlSeconds"),
            ({"maxCredits": 10, "maxJobs": 0}, "maxJobs"),
            ({"maxCredits": 10, "origins": ["not an origin"]}, "origins"),
            ({"maxCredits": 10, "origins": ["https://a.example/path"]}, "origins"),
            ({"maxCredits": 10, "origins": []}, "origins"),
            ({"maxCredits": 10, "services": ["no-such-service"]}, "services"),
        ]:
            r = await gw.gql(MINT, {"input": rules}, key)
            assert r.status_code == 400, (rules, r.text)
            error = error_of(r)
            assert error["code"] == "BAD_USER_INPUT"
            if field:
                assert error["field"] == field
        # Without a key: 401, whatever the input.
        r = await gw.gql(MINT, {"input": {"maxCredits": -1}})
        assert r.status_code == 401

        # REST: the same names in JSON, 201.
        headers = {"Authorization": f"Bearer {key}"}
        r = await gw.http.post(
            "/v1/client_tokens",
            # As a browser spells it: lower case, without the scheme's default port.
            json={"maxCredits": 50, "ttlSeconds": 60, "origins": [APP.upper() + ":443"]},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["token"].startswith("gct_") and body["maxCredits"] == 50
        assert (await me(gw, body["token"], APP))["clientToken"]["origins"] == [APP]
        for bad in ({"maxCredits": "5"}, {}, {"maxCredits": 5, "origins": "x"}, {"x": 1}, []):
            r = await gw.http.post("/v1/client_tokens", json=bad, headers=headers)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "BAD_USER_INPUT"


async def test_a_key_holds_at_most_its_cap_of_live_tokens(
    redis_url: str, storage_dir: Path
) -> None:
    """Each token is a record in Redis until it ends, and Redis runs without eviction:
    a key minting without bound would fill it for every account. Past the cap, a mint
    is told when a place frees up; revoking one, or one ending, frees it."""
    async with gateway(redis_url, storage_dir, client_tokens_max=2) as gw:
        key, other = await gw.key(), await gw.key()
        first = await mint(gw, key, ttlSeconds=60)
        await mint(gw, key, ttlSeconds=600)
        graphql = await gw.gql(MINT, {"input": {"maxCredits": 1}}, key)
        rest = await gw.http.post(
            "/v1/client_tokens", json={"maxCredits": 1}, headers={"X-API-Key": key}
        )
        for r, error in ((graphql, error_of(graphql)), (rest, rest.json()["error"])):
            assert r.status_code == 429, r.text
            assert (error["code"], error["limit"]) == ("RATE_LIMITED", "tokens")
            assert 55 <= error["retryAfter"] <= 60  # when the first one ends
            assert r.headers["Retry-After"] == str(error["retryAfter"])
            assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == (
                "2",
                "0",
            )
        await mint(gw, other)  # another key's cap is its own

        assert (await gw.gql(REVOKE, {"t": first}, key)).json()["data"]["revokeClientToken"]
        third = await mint(gw, key, ttlSeconds=1)
        assert (await gw.gql(MINT, {"input": {"maxCredits": 1}}, key)).status_code == 429
        gw.clock.advance(2)  # the third has ended
        await mint(gw, key)
        assert code_of(await gql(gw, ME, {}, third)) == "UNAUTHENTICATED"


# -- what a token may not do -------------------------------------------------------------


async def test_a_token_cannot_mint_set_a_webhook_or_reach_admin_operations(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, admin_token="the-admin-token") as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        token = await mint(gw, key)
        r = await gql(gw, MINT, {"input": {"maxCredits": 1}}, token)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        r = await gw.http.post(
            "/v1/client_tokens", json={"maxCredits": 1}, headers={"X-API-Key": token}
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "FORBIDDEN"
        # Refused as a token whatever it asks: input a key would be told to mend (§11)
        r = await gql(gw, MINT, {"input": {"maxCredits": -1, "ttlSeconds": 0}}, token)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        for bad in ({"maxCredits": -1}, {"nonsense": 1}, {}):
            r = await gw.http.post("/v1/client_tokens", json=bad, headers={"X-API-Key": token})
            assert (r.status_code, r.json()["error"]["code"]) == (403, "FORBIDDEN"), bad

        hooked = generate_input()
        hooked["input"]["webhookUrl"] = "https://hooks.example.com/x"
        r = await gql(gw, GENERATE, hooked, token)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        assert (await gw.accounts.get(account)).credits == 1000  # nothing charged
        r = await gw.http.post(
            "/v1/text_to_image",
            json={"service": "local", "prompt": "x", "webhookUrl": "https://hooks.example.com/"},
            headers={"X-API-Key": token},
        )
        assert r.status_code == 403

        r = await gql(gw, 'mutation { createKey(plan: "pro") { key } }', {}, token)
        assert code_of(r) == "FORBIDDEN"
        r = await gql(gw, "{ keys { id } }", {}, token)
        assert code_of(r) == "FORBIDDEN"
        job_id = created(await gql(gw, GENERATE, generate_input(), token))
        r = await gql(
            gw, "query($id: ID!) { webhookDeliveries(id: $id) { attempt } }", {"id": job_id}, token
        )
        assert code_of(r) == "FORBIDDEN"
        r = await gql(gw, REVOKE, {"t": token}, token)
        assert code_of(r) == "FORBIDDEN"


async def test_a_token_sees_only_its_own_jobs(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000)
        mine, other = await mint(gw, key), await mint(gw, key)
        job_id = created(await gql(gw, GENERATE, generate_input(), mine))
        by_key = created(await gw.generate(key, "the key's own", width=512, height=512))

        assert (await gql(gw, JOB, {"id": job_id}, mine)).json()["data"]["job"]["id"] == job_id
        assert (await gql(gw, JOB, {"id": job_id}, other)).json()["data"]["job"] is None
        assert (await gql(gw, JOB, {"id": by_key}, mine)).json()["data"]["job"] is None
        assert await gw.job(key, job_id) is not None  # the key sees its tokens' jobs

        listed = (await gql(gw, JOBS, {}, mine)).json()["data"]["jobs"]["nodes"]
        assert [j["id"] for j in listed] == [job_id]
        assert (await gql(gw, JOBS, {}, other)).json()["data"]["jobs"]["nodes"] == []

        r = await gw.http.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": other})
        assert r.status_code == 404
        r = await gw.http.post(f"/v1/jobs/{job_id}/cancel", headers={"X-API-Key": other})
        assert r.status_code == 404
        r = await gql(gw, CANCEL, {"id": job_id}, other)
        assert code_of(r) == "NOT_FOUND"
        refused = await subscribe(gw.base, other, job_id)
        assert refused[0]["errors"][0]["extensions"]["code"] == "NOT_FOUND"

        # The same idempotency key from two tokens: two jobs, each its own.
        again = generate_input(seed=5)
        again["input"]["idempotencyKey"] = "order-1"
        a = created(await gql(gw, GENERATE, again, mine))
        b = created(await gql(gw, GENERATE, again, other))
        assert a != b
        assert created(await gql(gw, GENERATE, again, mine)) == a


# -- origins, services, job cap ------------------------------------------------------------


async def test_a_token_bound_to_origins_services_and_a_job_cap(
    redis_url: str, storage_dir: Path
) -> None:
    # dev mode: `flux-krea` is routed (to `local`, offline), so only the token refuses it
    async with gateway(redis_url, storage_dir, dev=True) as gw:
        key = await gw.key(credits=1000)
        account = gw.keys[key]["id"]
        token = await mint(gw, key, origins=[APP], services=["local"], maxJobs=2)

        for origin in (None, "https://evil.example", "https://app.example:444", "null"):
            r = await gql(gw, GENERATE, generate_input(), token, origin)
            assert (r.status_code, code_of(r)) == (403, "FORBIDDEN"), origin
            r = await gql(gw, ME, {}, token, origin)
            assert code_of(r) == "FORBIDDEN"
        assert (await gw.accounts.get(account)).credits == 1000

        r = await gql(gw, GENERATE, generate_input("flux-krea"), token, APP)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        assert "service" in error_of(r)["message"]
        # Nor is it priced for it (docs/api.md#client-tokens: a service outside `services` is
        # refused).
        estimate = "query($input: GenerateInput!) { estimate(input: $input) { credits } }"
        r = await gql(gw, estimate, generate_input("flux-krea"), token, APP)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        assert error_of(r)["message"] == "this client token may not use this service"
        r = await gql(gw, estimate, generate_input(), token, APP)
        assert r.json()["data"]["estimate"]["credits"] == 10, r.text

        created(await gql(gw, GENERATE, generate_input(), token, APP))
        created(await gql(gw, GENERATE, generate_input(seed=1), token, APP))
        r = await gql(gw, GENERATE, generate_input(seed=2), token, APP)
        assert (r.status_code, code_of(r)) == (403, "FORBIDDEN")
        assert "maxJobs" in error_of(r)["message"]
        assert (await gw.accounts.get(account)).credits == 980
        assert (await me(gw, token, APP))["clientToken"]["jobs"] == 2


async def test_a_token_bound_to_an_origin_reads_from_its_pages_that_send_no_origin(
    redis_url: str, storage_dir: Path
) -> None:
    """Browsers leave `Origin` off a GET to their own origin: a page served beside a
    proxied gateway polls its job with the page in `Referer` only. That page is let in;
    another page, or a request naming neither, is not, and `Origin` wins over `Referer`."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000)
        token = await mint(gw, key, origins=[APP])
        job_id = created(await gql(gw, GENERATE, generate_input(), token, APP))
        bearer = {"Authorization": f"Bearer {token}"}
        query = {
            "query": "query($id: ID!) { job(id: $id) { id } }",
            "variables": f'{{"id": "{job_id}"}}',
        }
        cases = [
            ({"Referer": f"{APP}/gallery?page=2"}, 200),
            ({"Referer": f"{APP.upper()}:443/"}, 200),
            ({"Referer": "https://evil.example/app.example"}, 403),
            ({}, 403),
            ({"Origin": "https://evil.example", "Referer": f"{APP}/"}, 403),
        ]
        for sent, status in cases:
            r = await gw.http.get(f"/v1/jobs/{job_id}", headers={**bearer, **sent})
            assert r.status_code == status, (sent, r.text)
            r = await gw.http.get("/graphql", params=query, headers={**bearer, **sent})
            assert r.status_code == status, (sent, r.text)
            if status == 200:
                assert r.json()["data"]["job"]["id"] == job_id


# -- expiry and revocation -----------------------------------------------------------------


async def test_expired_and_revoked_tokens_are_refused(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000)
        short = await mint(gw, key, ttlSeconds=60)
        assert (await me(gw, short))["credits"] == 100
        gw.clock.advance(61)
        for r in (
            await gql(gw, ME, {}, short),
            await gql(gw, GENERATE, generate_input(), short),
        ):
            assert (r.status_code, code_of(r)) == (401, "UNAUTHENTICATED")

        # Revoked by its key: the next request is refused (revocation is read by every
        # request, so it takes effect at once, on every process).
        token = await mint(gw, key)
        other = await mint(gw, key)
        job_id = created(await gql(gw, GENERATE, generate_input(), token))
        r = await gw.gql(REVOKE, {"t": token}, key)
        assert r.json()["data"]["revokeClientToken"] is True
        for r in (
            await gql(gw, ME, {}, token),
            await gql(gw, JOB, {"id": job_id}, token),
            await gql(gw, GENERATE, generate_input(seed=4), token),
        ):
            assert (r.status_code, code_of(r)) == (401, "UNAUTHENTICATED"), r.text
        assert (await me(gw, other))["credits"] == 100  # its sibling lives on
        # Another key cannot revoke it, nor can a token that is not one.
        stranger = await gw.key()
        assert (await gw.gql(REVOKE, {"t": other}, stranger)).json()["data"] == {
            "revokeClientToken": False
        }
        assert (await gw.gql(REVOKE, {"t": "gct_x"}, key)).json()["data"] == {
            "revokeClientToken": False
        }
        r = await gw.http.post(
            "/v1/client_tokens/revoke", json={"token": other}, headers={"X-API-Key": key}
        )
        assert r.json() == {"revoked": True}
        assert (await gql(gw, ME, {}, other)).status_code == 401

        # Revoking the key revokes its tokens.
        live = await mint(gw, key)
        assert (await me(gw, live))["credits"] == 100
        await gw.accounts.revoke(gw.keys[key]["id"])
        assert (await gql(gw, ME, {}, live)).status_code == 401
        assert (await gql(gw, GENERATE, generate_input(seed=8), live)).status_code == 401


async def test_malformed_tokens_are_unauthenticated(redis_url: str, storage_dir: Path) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key()
        token = await mint(gw, key)
        _, account, token_id, secret = token.split("_", 3)
        for bad in (
            "gct_",
            "gct_a_b",
            f"gct_{account}_{token_id}_{secret}x",
            f"gct_{account}_{'0' * 16}_{secret}",
            f"gct_{account}_{token_id}_",
            f"gct_{account}_../../x_{secret}",
            "gct_" + "a" * 5000,
        ):
            r = await gql(gw, ME, {}, bad)
            assert (r.status_code, code_of(r)) == (401, "UNAUTHENTICATED"), bad
            r = await gql(gw, GENERATE, generate_input(), bad)
            assert r.status_code == 401, bad


# -- a page's other channels: SSE and WebSocket --------------------------------------------


async def test_a_page_follows_its_job_with_a_token_in_the_url_or_connection_init(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000)
        token = await mint(gw, key)
        job_id = created(await gql(gw, GENERATE, generate_input(), token))

        updates = await asyncio.wait_for(subscribe(gw.base, token, job_id), 30)
        assert updates[-1]["data"]["jobUpdates"]["status"] == "completed"

        events: list[dict[str, Any]] = []
        async with gw.http.stream("GET", f"/v1/jobs/{job_id}/events?token={token}") as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[-1]["status"] == "completed"

        # Never an API key in a URL.
        r = await gw.http.get(f"/v1/jobs/{job_id}/events?token={key}")
        assert r.status_code == 401 and r.json()["error"]["code"] == "UNAUTHENTICATED"
        other = await mint(gw, key)
        r = await gw.http.get(f"/v1/jobs/{job_id}/events?token={other}")
        assert r.status_code == 404


async def test_a_token_bound_to_an_origin_opens_a_socket_only_from_it(
    redis_url: str, storage_dir: Path
) -> None:
    async with gateway(redis_url, storage_dir, cors_origins=f"{APP},https://evil.example") as gw:
        key = await gw.key()
        token = await mint(gw, key, origins=[APP])
        url = gw.base.replace("http://", "ws://") + "/graphql"
        init = {"type": "connection_init", "payload": {"Authorization": f"Bearer {token}"}}
        async with websockets.connect(url, subprotocols=["graphql-transport-ws"], origin=APP) as ws:
            await ws.send(json.dumps(init))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
        async with websockets.connect(
            url, subprotocols=["graphql-transport-ws"], origin="https://evil.example"
        ) as ws:
            await ws.send(json.dumps(init))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4403
            assert closed.value.rcvd.reason.startswith("FORBIDDEN: ")


# -- the budget under a storm, across processes -----------------------------------------------


async def test_fifty_concurrent_requests_across_two_processes_spend_exactly_the_budget(
    redis_url: str, two_gateways: list[str]
) -> None:
    settings = load_settings(redis_url=redis_url)
    redis = await connect(redis_url)
    accounts = Accounts(redis, Scripts.register(redis), settings)
    try:
        made = await accounts.create("enterprise", 10_000, rpm=1000, concurrency=1000, daily=1000)
        async with httpx.AsyncClient(base_url=two_gateways[0]) as http:
            r = await http.post(
                "/v1/client_tokens",
                json={"maxCredits": 95},  # nine images of 10, and 5 left over
                headers={"X-API-Key": made["key"]},
            )
        token = r.json()["token"]
        replies = await storm(two_gateways, token, 50)
        statuses = [r.status_code for r in replies]
        assert statuses.count(200) == 9, sorted(set(statuses))
        assert statuses.count(402) == 41
        refused = {error_of(r)["creditsAvailable"] for r in replies if r.status_code == 402}
        assert refused == {5}
        balance = await check_books(accounts, made["id"], admitted=9, cost=10)
        assert balance == 10_000 - 90
        token_id = token.split("_")[2]
        record = await redis.hgetall(rkeys.client_token(made["id"], token_id))
        assert (record["spent"], record["jobs"]) == ("90", "9")
        assert await redis.zcard(rkeys.token_jobs(made["id"], token_id)) == 9
    finally:
        await redis.aclose()


async def test_each_client_token_reads_within_a_limit_of_its_own(
    redis_url: str, storage_dir: Path
) -> None:
    """A page's visitor polling as hard as it can uses up its own token's reads: never
    another visitor's, nor those of the backend holding the key (each token counts its
    reads apart, against a limit as large as the key's)."""
    async with reads_limited(redis_url, storage_dir, 5) as gw:
        key = await gw.key("pro", credits=1000)
        greedy, other = await mint(gw, key), await mint(gw, key)
        for _ in range(5):
            assert (await gql(gw, "{ me { plan } }", {}, greedy)).status_code == 200
        refused = await gql(gw, "{ me { plan } }", {}, greedy)
        assert refused.status_code == 429, refused.text
        assert error_of(refused)["limit"] == "read"
        assert refused.headers["X-RateLimit-Limit"] == "5"

        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200
        assert (await gql(gw, "{ me { plan } }", {}, other)).status_code == 200
        me = await gql(gw, "{ me { limits { name used limit } } }", {}, other)
        [read] = [u for u in me.json()["data"]["me"]["limits"] if u["name"] == "read"]
        assert (read["used"], read["limit"]) == (2, 5)  # its own two, not the others'


async def test_a_keys_client_tokens_together_read_within_a_ceiling(
    redis_url: str, storage_dir: Path
) -> None:
    """Minting more tokens buys no more reads: all of a key's tokens together read at
    most GATEWAY_CLIENT_TOKENS_READ_FACTOR times its read limit a minute. Reads a token's
    own limit refused do not count toward that ceiling (one visitor polling hard still
    uses up no one else's), and the key's own reads are not under it."""
    async with reads_limited(redis_url, storage_dir, 5, client_tokens_read_factor=2) as gw:
        key = await gw.key("pro", credits=1000)
        greedy, second, third = [await mint(gw, key) for _ in range(3)]
        for _ in range(5):
            assert (await gql(gw, "{ me { plan } }", {}, greedy)).status_code == 200
        for _ in range(20):  # past its own limit: refused, and no one else's loss
            assert (await gql(gw, "{ me { plan } }", {}, greedy)).status_code == 429
        for _ in range(5):
            assert (await gql(gw, "{ me { plan } }", {}, second)).status_code == 200

        refused = await gw.http.get(
            "/v1/jobs/nothing", headers={"Authorization": f"Bearer {third}"}
        )
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["limit"] == "read"
        assert "client tokens together" in refused.json()["error"]["message"]
        assert refused.headers["X-RateLimit-Limit"] == "10"
        assert refused.headers["X-RateLimit-Remaining"] == "0"
        assert 0 < int(refused.headers["Retry-After"]) <= 60
        assert (await gw.gql("{ me { plan } }", key=key)).status_code == 200

        gw.clock.advance(60)  # the next minute: every token reads again
        assert (await gql(gw, "{ me { plan } }", {}, third)).status_code == 200


async def test_a_token_sees_neither_its_accounts_name_nor_its_cache_statistics(
    redis_url: str, storage_dir: Path
) -> None:
    """A token is a page's visitor's: `me` shows its own budget and rules, not the name
    the operator gave the account nor what its cache saved it (the backend's key sees
    both)."""
    async with gateway(redis_url, storage_dir) as gw:
        key = await gw.key(credits=1000, name="acme-internal-billing")
        await gw.wait(key, created(await gw.gql(GENERATE, generate_input(seed=9), key)))
        hit = await gw.job(key, created(await gw.gql(GENERATE, generate_input(seed=9), key)))
        assert hit is not None and hit["status"] == "completed"  # from the cache
        mine = (await gw.gql("{ me { name cache { hits creditsSaved } } }", key=key)).json()
        assert mine["data"]["me"]["name"] == "acme-internal-billing"
        assert mine["data"]["me"]["cache"]["hits"] == 1

        view = await me(gw, await mint(gw, key))
        assert (view["name"], view["cache"]) == ("", {"hits": 0, "creditsSaved": 0})
