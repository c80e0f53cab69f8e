"""The URL guard on user-supplied `webhookUrl`s: hostile spellings are refused as bad
input naming the field (never a 500, never charged), and a webhook is delivered to
exactly the URL that was stored."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.errors import BadUserInput
from gateway.urlguard import Lookups, check_url, embedded_ipv4, parse_url, pinned, resolve
from tests.harness import GENERATE, Harness, gateway, until
from tests.servers import hanging, resolving, serve

PUBLIC = "93.184.216.34"  # a public address: these URLs are refused for one reason only

HOSTILE: list[str] = [
    # Not http(s), or not of the form scheme://host/...
    "file:///etc/passwd",
    f"gopher://{PUBLIC}:70/_GET%20/",
    f"ftp://{PUBLIC}/x",
    "javascript:alert(1)",
    "data:text/plain,hello",
    f"dict://{PUBLIC}:11211/stat",
    f"ws://{PUBLIC}/h",
    f"http:/{PUBLIC}/h",
    f"http:{PUBLIC}/h",
    f"//{PUBLIC}/h",
    f"{PUBLIC}/h",
    "",
    "http://",
    "https://",
    "http:///x",
    f"http:///{PUBLIC}/h",
    "http://:80/h",
    "http://?x=1",
    # Control characters, spaces, DEL: header injection or a different URL delivered
    f"http://{PUBLIC}/h\r\nX-Injected: 1",
    f"http://{PUBLIC}/h\nX-Injected: 1",
    f"http://{PUBLIC}/h\r",
    f"http://{PUBLIC}/h h",
    f"http://{PUBLIC}/h?q=a b",
    f"http://{PUBLIC}/h\t",
    f"\thttp://{PUBLIC}/h",
    f" http://{PUBLIC}/h",
    f"http://{PUBLIC}/h ",
    f"http://{PUBLIC}/h\x00",
    f"http://{PUBLIC}/h\x7f",
    f"http://{PUBLIC}/h\x0b",
    f"http://{PUBLIC}/h\x1b[31m",
    f"http://{PUBLIC}\r\n/h",
    f"http://{PUBLIC}/h\u0085",
    f"http://{PUBLIC}/h\u2028",
    # Characters a client would re-encode or a parser would read another way
    f"http://{PUBLIC}/h\\x",
    f"http://{PUBLIC}\\@127.0.0.1/h",
    f"http://{PUBLIC}/ä",
    f"http://{PUBLIC}/h?q=ü",
    f'http://{PUBLIC}/h"x',
    f"http://{PUBLIC}/<script>",
    f"http://{PUBLIC}/{{x}}",
    f"http://{PUBLIC}/a|b",
    f"http://{PUBLIC}/a^b",
    f"http://{PUBLIC}/a`b",
    f"http://{PUBLIC}/a[0]",
    f"http://{PUBLIC}/h%zz",
    f"http://{PUBLIC}/h%4",
    f"http://{PUBLIC}/h%",
    f"http://{PUBLIC}/h#frag",
    f"http://{PUBLIC}/h#",
    f"http://{PUBLIC}/" + "a" * 2100,
    # Credentials and userinfo confusion
    f"http://user@{PUBLIC}/h",
    f"http://user:pw@{PUBLIC}/h",
    f"http://@{PUBLIC}/h",
    f"http://:@{PUBLIC}/h",
    "http://example.com@127.0.0.1/h",
    f"http://{PUBLIC}@127.0.0.1/h",
    f"http://127.0.0.1#@{PUBLIC}/h",
    f"http://127.0.0.1?@{PUBLIC}/h",
    f"http://{PUBLIC}%40127.0.0.1/h",
    # Ports
    f"http://{PUBLIC}:0/h",
    f"http://{PUBLIC}:65536/h",
    f"http://{PUBLIC}:99999/h",
    f"http://{PUBLIC}:123456/h",
    f"http://{PUBLIC}:-1/h",
    f"http://{PUBLIC}:+80/h",
    f"http://{PUBLIC}:/h",
    f"http://{PUBLIC}:80:80/h",
    f"http://{PUBLIC}:0x50/h",
    f"http://{PUBLIC}:\uff18\uff10/h",
    "http://[2606:4700::1111]:/h",
    "http://[2606:4700::1111]x/h",
    # Malformed host names (the IDNA codec used to raise UnicodeError on some: a 500)
    "http://" + "a" * 64 + ".example.test/h",
    "http://a..example.test/h",
    "http://.example.test/h",
    "http://example.test../h",
    "http://-a.example.test/h",
    "http://a-.example.test/h",
    "http://" + ".".join(["a" * 63] * 4) + "/h",
    "http://exa%6dple.test/h",
    "http://%6c%6f%63%61%6c%68%6f%73%74/h",
    "http://ex!ample.test/h",
    "http://[127.0.0.1]/h",
    "http://[v1.fe80::1]/h",
    "http://[::1/h",
    "http://::1/h",
    "http://[2606:4700::1111%25eth0]/h",
    "http://[fe80::1%25eth0]/h",
    "http://[fe80::1%eth0]/h",
    # Unicode hosts that IDNA would map onto local names or addresses
    "http://ⓛocalhost/h",
    "http://localhost\uff0e/h",
    "http://" + "".join(chr(0xFEE0 + ord(c)) for c in "localhost") + "/h",  # full width
    "http://local\u00adhost/h",
    "http://127\uff0e0\uff0e0\uff0e1/h",
    "http://①②⑦.0.0.1/h",
    # Local names
    "http://localhost/h",
    "http://LOCALHOST/h",
    "http://LocalHost:8080/h",
    "http://localhost./h",
    "HTTP://LOCALHOST/h",
    # IPv4 spellings the resolver reads as 127.0.0.1 (or others), and loopback itself
    "http://127.0.0.1/h",
    "http://127.0.0.1:6379/",
    "http://127.1/h",
    "http://127.0.1/h",
    "http://2130706433/h",
    "http://0x7f000001/h",
    "http://0177.0.0.1/h",
    "http://0x7f.0.0.1/h",
    "http://0x7f.1/h",
    "http://017700000001/h",
    "http://127.000.000.001/h",
    "http://127.0.0.1./h",
    "http://0/h",
    "http://1572395042/h",  # the public address above, as one number: refused all the same
    "http://93.184.216.034/h",
    "http://1.2.3.4.5/h",
    "http://example.123/h",
    # Private, reserved and metadata IPv4
    "http://0.0.0.0/h",
    "http://10.0.0.1/h",
    "http://172.16.0.1/h",
    "http://192.168.1.1/h",
    "http://169.254.169.254/latest/meta-data/",
    "http://169.254.0.1/h",
    "http://100.64.0.1/h",
    "http://192.0.0.170/h",
    "http://192.0.0.8/h",  # not global, though Python before 3.11.10 says it is
    "http://168.63.129.16/machine?comp=goalstate",  # Azure's WireServer: public, yet inside
    "http://192.88.99.1/h",  # the deprecated 6to4 relay anycast prefix
    "http://192.0.0.100/h",
    "http://198.18.0.1/h",
    "http://192.0.2.1/h",
    "http://240.0.0.1/h",
    "http://255.255.255.255/h",
    "http://224.0.0.1/h",
    "http://0.1.2.3/h",
    # IPv6: loopback, private, link- and site-local, multicast, documentation, metadata
    "http://[::1]/h",
    "http://[0:0:0:0:0:0:0:1]/h",
    "http://[::]/h",
    "http://[fc00::1]/h",
    "http://[fd12:3456::1]/h",
    "http://[fe80::1]/h",
    "http://[fec0::1]/h",
    "http://[ff02::1]/h",
    "http://[fd00:ec2::254]/latest",
    "http://[2001:db8::1]/h",
    "http://[100::1]/h",
    # IPv6 carrying a private IPv4: mapped, 6to4, Teredo, NAT64, IPv4-compatible
    "http://[::ffff:127.0.0.1]/h",
    "http://[::ffff:7f00:1]/h",
    "http://[::ffff:169.254.169.254]/h",
    "http://[::ffff:10.0.0.1]/h",
    "http://[2002:7f00:1::]/h",
    "http://[2002:7f00:0001::1]/h",
    "http://[2002:a9fe:a9fe::]/h",
    "http://[2002:c0a8:101::]/h",
    "http://[2001:0:7f00:1:0:0:a247:2fdd]/h",  # Teredo: server 127.0.0.1
    "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/h",  # Teredo: client 127.0.0.1
    "http://[64:ff9b::127.0.0.1]/h",
    "http://[64:ff9b::7f00:1]/h",
    "http://[64:ff9b::a9fe:a9fe]/h",
    "http://[64:ff9b:1::a00:1]/h",
    "http://[64:ff9b:1::5db8:d822]/h",  # local-use NAT64: a translator inside our network
    "http://[::127.0.0.1]/h",
    "http://[::a9fe:a9fe]/h",
    "http://[::ffff:0:127.0.0.1]/h",
    "http://[3fff::1]/h",  # RFC 9637 documentation
]

ALLOWED: list[tuple[str, list[str]]] = [
    (f"http://{PUBLIC}/h", [PUBLIC]),
    (f"https://{PUBLIC}:8443/a/./b/../%7Euser?x=%2F&y=~z&empty=", [PUBLIC]),
    (f"HTTP://{PUBLIC}?only=query", [PUBLIC]),
    ("https://[2606:4700::1111]/h", ["2606:4700::1111"]),
    ("http://[::ffff:93.184.216.34]/h", ["::ffff:5db8:d822"]),
    # NAT64's well-known prefix stands for the IPv4 address it carries (DNS64 gives it).
    ("http://[64:ff9b::5db8:d822]/h", ["64:ff9b::5db8:d822"]),
    ("http://192.0.0.9/h", ["192.0.0.9"]),  # Port Control Protocol anycast: global
]


def ids(urls: list[str]) -> list[str]:
    return [f"{i:03d}:{u[:60]!r}" for i, u in enumerate(urls)]


def test_the_table_is_large_and_has_no_duplicates() -> None:
    assert len(HOSTILE) >= 80
    assert len(set(HOSTILE)) == len(HOSTILE)


@pytest.mark.parametrize("url", HOSTILE, ids=ids(HOSTILE))
async def test_hostile_urls_are_bad_input_naming_the_field(url: str) -> None:
    started = time.monotonic()
    for field in ("webhookUrl", "callbackUrl"):
        with pytest.raises(BadUserInput) as refused:
            await check_url(url, [], field=field)
        assert refused.value.extensions == {"code": "BAD_USER_INPUT", "field": field}
        assert refused.value.message.startswith(field)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(("url", "addresses"), ALLOWED, ids=[u for u, _ in ALLOWED])
async def test_public_addresses_are_allowed(url: str, addresses: list[str]) -> None:
    assert [str(a) for a in await check_url(url, [])] == addresses


async def test_the_allow_list_exempts_addresses_but_not_spellings() -> None:
    allow = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    assert [str(a) for a in await check_url("http://127.0.0.1:9/x", allow)] == ["127.0.0.1"]
    assert [str(a) for a in await check_url("http://10.1.2.3/h", allow)] == ["10.1.2.3"]
    mapped = await check_url("http://[::ffff:127.0.0.1]/x", allow)
    assert [str(a) for a in mapped] == ["::ffff:7f00:1"]
    for url in (
        "http://127.1:9/x",
        "http://2130706433/x",
        "http://0x7f.1/x",
        "http://10.1/x",
        "http://127.0.0.1:9/x\r\nX: 1",
        "http://[::1]/x",
        "http://192.168.0.1/x",
    ):
        with pytest.raises(BadUserInput):
            await check_url(url, allow)


async def test_a_name_the_resolver_cannot_encode_resolves_to_nothing() -> None:
    """Behind `parse_url`'s host check: the IDNA codec's UnicodeError is no crash either."""
    assert await resolve("a..example.test", 80) == []
    assert await resolve("a" * 64 + ".example.test", 80) == []
    assert "127.0.0.1" in [str(a) for a in await resolve("localhost", 80)]


def test_transition_addresses_give_up_the_ipv4_they_carry() -> None:
    def carried(address: str) -> list[str]:
        return [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))]

    assert carried("::ffff:127.0.0.1") == ["127.0.0.1"]
    assert carried("2002:7f00:1::") == ["127.0.0.1"]
    assert carried("2001:0:4136:e378:8000:63bf:80ff:fffe") == ["65.54.227.120", "127.0.0.1"]
    assert carried("64:ff9b::a9fe:a9fe") == ["169.254.169.254"]
    assert carried("64:ff9b:1::a00:1") == ["10.0.0.1"]
    assert carried("::10.0.0.1") == ["10.0.0.1"]
    assert carried("2606:4700::1111") == []


def test_delivery_sends_the_stored_target_and_host_byte_for_byte() -> None:
    """URL parsers resolve dot segments, urlsplit and yarl drop an empty query: neither
    may change it (aiohttp writes `raw_path_qs` on the request line)."""
    url = "http://Hooks.Example.test:8080/a/./b/../%7e?"
    target, headers, server_name = pinned(url, ipaddress.IPv4Address(PUBLIC))
    assert target.raw_path_qs == "/a/./b/../%7e?"
    assert headers == {"Host": "Hooks.Example.test:8080"}
    assert str(target).startswith(f"http://{PUBLIC}:8080/")
    assert server_name is None  # no TLS
    target, _, server_name = pinned("https://Hooks.Example.test./h", ipaddress.IPv6Address("::1"))
    assert (target.raw_host, target.port, target.raw_path_qs) == ("::1", 443, "/h")
    assert server_name == "hooks.example.test"
    assert parse_url("http://[::1]:81?q").target == "/?q"


async def test_hostile_webhook_urls_are_400_over_graphql_and_rest_and_charge_nothing(
    redis_url: str, storage_dir: Path
) -> None:
    # An empty webhookUrl means "no webhook" to the API, so it is not in this table.
    hostile = [url for url in HOSTILE if url]
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        key = await gw.key("enterprise", credits=10_000)

        async def credits() -> int:
            me = (await gw.gql("{ me { credits } }", key=key)).json()["data"]["me"]
            return int(me["credits"])

        for url in hostile:
            variables = {
                "input": {
                    "type": "IMAGE",
                    "provider": "local",
                    "input": {"text": "x"},
                    "options": {},
                    "webhookUrl": url,
                }
            }
            r = await gw.gql(GENERATE, variables, key)
            assert r.status_code == 400, (url, r.text)
            error = r.json()["errors"][0]
            assert error["extensions"]["code"] == "BAD_USER_INPUT", (url, error)
            assert error["extensions"]["field"] == "webhookUrl", (url, error)
        for url in [*hostile[::7], "http://a..example.test/h", f"http://{PUBLIC}/h h"]:
            rest = await gw.http.post(
                "/v1/text_to_image",
                headers={"X-API-Key": key},
                json={"service": "local", "prompt": "x", "webhookUrl": url},
            )
            assert rest.status_code == 400, (url, rest.text)
            assert rest.headers["content-type"] == "application/json"
            error = rest.json()["error"]
            assert (error["code"], error["field"]) == ("BAD_USER_INPUT", "webhookUrl"), url
        assert await credits() == 10_000

        charged = 0
        for i, (url, _) in enumerate(ALLOWED):
            variables = {
                "input": {
                    "type": "IMAGE",
                    "provider": "local",
                    "input": {"text": f"control {i}"},
                    "options": {},
                    "webhookUrl": url,
                }
            }
            r = await gw.gql(GENERATE, variables, key)
            assert r.status_code == 200, (url, r.text)
            job = r.json()["data"]["generate"]
            assert job["webhookUrl"] == url and job["creditCost"] > 0
            charged += job["creditCost"]
        rest = await gw.http.post(
            "/v1/text_to_image",
            headers={"X-API-Key": key},
            json={"service": "local", "prompt": "control rest", "webhookUrl": ALLOWED[0][0]},
        )
        assert rest.status_code == 202, rest.text
        charged += rest.json()["creditCost"]
        assert await credits() == 10_000 - charged


class TargetRecorder:
    """A webhook receiver that records the request target as it arrives."""

    def __init__(self) -> None:
        self.calls: dict[str, tuple[bytes, bytes, str]] = {}  # job id -> raw path, query, Host
        self.app = Starlette(routes=[Route("/{rest:path}", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        job_id = orjson.loads(await request.body())["id"]
        scope = request.scope
        self.calls[job_id] = (scope["raw_path"], scope["query_string"], request.headers["host"])
        return Response(status_code=200)


async def test_a_webhook_is_delivered_to_exactly_the_stored_url(
    redis_url: str, storage_dir: Path
) -> None:
    receiver = TargetRecorder()
    fast: dict[str, Any] = {"url_allow_cidrs": "127.0.0.0/8", "webhook_retry_delays": [0.05]}
    async with serve(receiver.app) as base, gateway(redis_url, storage_dir, **fast) as gw:
        authority = base.removeprefix("http://")
        urls = [
            f"{base}/hook/%7Euser/%41%2f?x=%2F&y=~z&empty=&%e2%9c%93",
            f"{base}/a/./b/../c/?q=1",
            f"{base}/x/..",
            f"{base}//double//slash/",
            f"{base}?only=query",
            f"{base}/sub;p=1,2/(x)*!$'+=:@end?a=b&c=d;e=/?",
            f"HTTP://{authority}/Upper/Case/%2E%2e/?Q=V",
        ]
        key = await gw.key()
        query = "query($id: ID!) { job(id: $id) { webhookUrl } }"
        stored: dict[str, str] = {}
        for i, url in enumerate(urls):
            variables = {
                "input": {
                    "type": "IMAGE",
                    "provider": "local",
                    "input": {"text": f"exact {i}"},
                    "webhookUrl": url,
                }
            }
            r = await gw.gql(GENERATE, variables, key)
            job_id = r.json()["data"]["generate"]["id"]
            stored[job_id] = (await gw.gql(query, {"id": job_id}, key)).json()["data"]["job"][
                "webhookUrl"
            ]
            assert stored[job_id] == url

        await until(lambda: len(receiver.calls) == len(urls))
        for job_id, url in stored.items():
            parts = urlsplit(url)
            raw_path, query_string, host = receiver.calls[job_id]
            assert raw_path == (parts.path or "/").encode(), url
            assert query_string == parts.query.encode(), url
            assert host == parts.netloc, url


async def test_a_webhook_url_s_name_is_looked_up_only_for_a_valid_key(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No one without a key can make the gateway query DNS: the key is checked before a
    webhookUrl's name is looked up."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        asked = resolving(monkeypatch, [PUBLIC], name="hooks.example")
        key = await gw.key()
        body = {"service": "local", "prompt": "x", "webhookUrl": "http://hooks.example/h"}
        _, account, secret = key.split("_", 2)
        wrong = secret[:-4] + ("yyyy" if secret.endswith("zzzz") else "zzzz")
        for bad in ("gk_nobody_" + secret, f"gk_{account}_{wrong}"):
            rest = await gw.http.post("/v1/text_to_image", headers={"X-API-Key": bad}, json=body)
            assert rest.status_code == 401, rest.text
            variables = {
                "input": {
                    "type": "IMAGE",
                    "provider": "local",
                    "input": {"text": "x"},
                    "webhookUrl": body["webhookUrl"],
                }
            }
            graphql = (await gw.gql(GENERATE, variables, bad)).json()
            assert graphql["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"
        assert asked == []
        good = await gw.http.post("/v1/text_to_image", headers={"X-API-Key": key}, json=body)
        assert good.status_code == 202, good.text
        assert asked == [PUBLIC]
        private = {**body, "webhookUrl": "http://127.0.0.1/h"}
        refused = await gw.http.post("/v1/text_to_image", headers={"X-API-Key": key}, json=private)
        assert refused.status_code == 400  # with the key's headers, as any refused input
        assert refused.headers["X-RateLimit-Limit"] == good.headers["X-RateLimit-Limit"]


async def post_hook(gw: Harness, key: str, host: str) -> Any:
    """A generation whose webhookUrl names `host`, with `key`."""
    body = {"service": "local", "prompt": host, "webhookUrl": f"http://{host}/h"}
    return await gw.http.post("/v1/text_to_image", headers={"X-API-Key": key}, json=body)


async def test_names_that_never_resolve_hold_two_lookups_at_most_one_a_key(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhookUrl whose name servers never answer costs its caller a short wait and a
    400. Such lookups go on after it: two at most in the process, one per key. While
    they run, the next name waits for a place and is told to retry (503), instead of
    stalling every lookup of the process; a key's own slow name holds up only its own
    next one."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        assert service.lookups is service.webhooks.lookups  # one set for the process
        lookups = service.lookups = Lookups(at_once=2, wait=0.3, rest=0)
        resolving(monkeypatch, [PUBLIC], name="hooks.example")
        answers = hanging(monkeypatch, ".hang.example")  # each name: when it answers
        one, two, three = await gw.key(), await gw.key(), await gw.key()

        def refused_for_now(response: Any) -> bool:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            return int(response.headers["Retry-After"]) >= 1

        slow = await asyncio.gather(
            post_hook(gw, one, "a.hang.example"), post_hook(gw, two, "b.hang.example")
        )
        for response in slow:
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["field"] == "webhookUrl" and "did not resolve within" in error["message"]
        assert refused_for_now(await post_hook(gw, three, "c.hang.example"))
        assert sorted(answers) == ["a.hang.example", "b.hang.example"]

        for name in ("a.hang.example", "b.hang.example"):
            answers[name].set()  # the system resolver gives up on them at last
        await until(lambda: not lookups._places.locked())
        assert (await post_hook(gw, one, "hooks.example")).status_code == 202

        assert (await post_hook(gw, one, "d.hang.example")).status_code == 400
        assert refused_for_now(await post_hook(gw, one, "hooks.example"))  # its own still runs
        assert (await post_hook(gw, two, "hooks.example")).status_code == 202  # another's does not
        answers["d.hang.example"].set()
        await until(lambda: not lookups._owners)  # nothing kept of a key once it is done


async def test_a_key_whose_name_outlasted_the_wait_gets_no_lookup_for_a_while(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused request counts against no limit, so a key could send silent names back
    to back and keep its place for good (two keys: every place of the process). Once one
    of its names outlasted the wait, its names are not looked up for a while: told so
    at once (503, with when), no query made; an IP address still works, and so does
    every other key."""
    async with gateway(redis_url, storage_dir, inprocess_workers=False) as gw:
        service = gw.app.state.gateway
        now = [1000.0]
        lookups = Lookups(at_once=2, wait=0.3, rest=30, clock=lambda: now[0])
        service.lookups = service.webhooks.lookups = lookups
        asked = resolving(monkeypatch, [PUBLIC], name="hooks.example")
        answers = hanging(monkeypatch, ".hang.example")
        one, two = await gw.key(), await gw.key()

        assert (await post_hook(gw, one, "a.hang.example")).status_code == 400  # did not resolve
        now[0] += 20  # the system resolver gives up 20 s later: the rest counts from then
        answers["a.hang.example"].set()
        await until(lambda: not lookups._owners)  # its lookup ended: no place held

        resting = await post_hook(gw, one, "hooks.example")
        assert resting.status_code == 503, resting.text
        assert "did not resolve in time" in resting.json()["error"]["message"]
        assert resting.headers["Retry-After"] == "30"
        assert asked == []  # not looked up
        assert (await post_hook(gw, one, PUBLIC)).status_code == 202
        assert (await post_hook(gw, two, "hooks.example")).status_code == 202 and asked == [PUBLIC]

        now[0] += 30.5
        assert (await post_hook(gw, one, "hooks.example")).status_code == 202


async def test_a_delivery_whose_name_may_not_be_looked_up_yet_is_put_off_not_failed(
    redis_url: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery refused a lookup by the process's own bound (its account's names
    resting, or no place free) is not the receiver's failure: it spends no attempt and
    is sent once the lookup may run."""
    receiver = TargetRecorder()
    fast: dict[str, Any] = {"url_allow_cidrs": "127.0.0.0/8", "webhook_retry_delays": [0.05]}
    async with serve(receiver.app) as base, gateway(redis_url, storage_dir, **fast) as gw:
        service = gw.app.state.gateway
        lookups = Lookups(at_once=2, wait=0.3, rest=1.0)
        service.webhooks.lookups = lookups  # admission's own set is not resting
        resolving(monkeypatch, ["127.0.0.1"], name="hooks.example")
        key = await gw.key()
        lookups._rest(gw.keys[key]["id"])  # as after one of its names outlasted the wait
        port = urlsplit(base).port
        made = await post_hook(gw, key, f"hooks.example:{port}")
        assert made.status_code == 202, made.text
        job_id = made.json()["id"]

        query = "query($id: ID!) { webhookDeliveries(id: $id) { attempt success error } }"

        async def logged() -> list[dict[str, Any]]:  # once its POST is answered
            reply = await gw.gql(query, {"id": job_id}, key)
            return list(reply.json()["data"]["webhookDeliveries"])

        deliveries = await until(logged)
        assert deliveries == [{"attempt": 1, "success": True, "error": None}]
        assert job_id in receiver.calls
