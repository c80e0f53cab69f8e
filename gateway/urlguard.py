"""Refuse user-supplied URLs (a job's `webhookUrl`) that are malformed or point inside
our network: a guard against server-side request forgery.

A URL is accepted only in one plain spelling, so that this module, the HTTP client and
the receiving server cannot read it three different ways:

- `http://` or `https://`, then a host, an optional port (1-65535), then a path and
  query made of RFC 3986 characters only (unreserved, sub-delimiters, `:@/?`, and
  well-formed `%XX` escapes). Refused: control characters, spaces, DEL, backslashes,
  non-ASCII (write a host in its `xn--` form and percent-encode the rest), any other
  character an HTTP client would re-encode, credentials (`user@`) and fragments (`#`,
  which is never sent).
- The host is a bracketed IPv6 literal without a zone id, an IPv4 address written as
  four decimal numbers, or a DNS name (labels of 1-63 letters, digits, `-` or `_`, at
  most 253 characters). Other IPv4 spellings (`2130706433`, `0177.0.0.1`, `0x7f.1`,
  `127.1`), which the system resolver reads as addresses, are refused, as is any name
  whose last label is a number.

The host's addresses (the literal, or what the name resolves to) are then refused when
any is loopback, private, link-local, site-local, multicast, reserved, unspecified, not
globally reachable or a cloud-metadata address, unless it falls inside the operator's
allow list (`GATEWAY_URL_ALLOW_CIDRS`). IPv6 addresses that carry an IPv4 address are
judged by it too: IPv4-mapped (`::ffff:a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`, which a
DNS64 resolver gives for IPv4-only names) by that address alone; 6to4 (`2002::/16`),
Teredo (`2001::/32`: server and client) and IPv4-compatible (`::a.b.c.d`) are refused
when what they carry is. The local-use NAT64 prefix (`64:ff9b:1::/48`) reaches a
translator inside the operator's network, so it is refused unless allowed.

`parse_url` gives the one reading every caller uses: the webhook deliverer sends the
request target (`path?query`) exactly as written and the Host header as written.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import re
import socket
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

from yarl import URL

from gateway.errors import BadUserInput, ServiceUnavailable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Cloud hosts' own services: the metadata address (AWS, GCP, Azure; EC2's IPv6 one), and
#: Azure's WireServer, a public address that a VM inside Azure reaches (its agent's
#: configuration and extension settings).
METADATA = (
    ipaddress.ip_network("169.254.169.254/32"),
    ipaddress.ip_network("fd00:ec2::254/128"),
    ipaddress.ip_network("168.63.129.16/32"),
)
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix
NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215 local-use prefix
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # RFC 4291 §2.5.5.1, deprecated
#: IANA's special-purpose ranges that are not globally reachable, where Python's
#: `ipaddress` tables miss them: 192.0.0.0/24 but its two anycast addresses (.9, .10)
#: before 3.11.10 and 3.12.4 (`192.0.0.8` counted as global), RFC 9637's documentation
#: prefix, and the deprecated 6to4 relay anycast prefix (RFC 7526).
NOT_GLOBAL = (
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("3fff::/20"),
    ipaddress.ip_network("192.88.99.0/24"),
)
GLOBAL_EXCEPTIONS = (ipaddress.ip_address("192.0.0.9"), ipaddress.ip_address("192.0.0.10"))

MAX_URL_LENGTH = 2048
DEFAULT_PORTS = {"http": 80, "https": 443}

_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_SUB_DELIMS = "!$&'()*+,;="
#: What may follow the authority: RFC 3986 pchar, "/" and "?" ("%" checked as escapes).
_TARGET_CHARS = frozenset(_UNRESERVED + _SUB_DELIMS + ":@/?%")
#: What a URL may contain at all: the above and the brackets of an IPv6 literal.
_URL_CHARS = _TARGET_CHARS | frozenset("[]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SHAPE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?]*)(?P<rest>.*)\Z")
_PORT = re.compile(r"[0-9]{1,5}\Z")
_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")


@dataclass(frozen=True)
class ParsedUrl:
    """A URL `parse_url` accepted, in the one reading every caller uses."""

    scheme: str  # "http" or "https", lower case
    host: str  # as written; an IPv6 literal without its brackets
    port: int | None  # as written, None when the URL has none
    literal: Address | None  # the host, when it is an IP address
    authority: str  # host[:port] exactly as written: the Host header
    target: str  # path and query exactly as written, "/" first: the request target

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.scheme]


def parse_url(url: str, field: str = "webhookUrl", max_length: int = MAX_URL_LENGTH) -> ParsedUrl:
    """Parse a user-supplied http(s) URL strictly; anything else is `BadUserInput`."""
    refuse = _refusal(field)
    if not isinstance(url, str) or not url:
        raise refuse("must be an http(s) URL")
    if len(url) > max_length:
        raise refuse(f"must be at most {max_length} characters")
    for position, char in enumerate(url):
        if char in _URL_CHARS:
            continue
        if char == "#":
            raise refuse("must not have a fragment ('#')")
        if not char.isascii():
            raise refuse(
                f"contains a non-ASCII character at position {position}: percent-encode it"
                " (and write a host name in its xn-- form)"
            )
        if not char.isprintable() or char == " ":
            raise refuse(f"contains a control character or space at position {position}")
        raise refuse(f"contains {char!r} at position {position}, which a URL may not hold")
    if _BAD_ESCAPE.search(url):
        raise refuse("contains a '%' that is not followed by two hex digits")
    shape = _SHAPE.match(url)
    if shape is None or shape["scheme"].lower() not in DEFAULT_PORTS:
        raise refuse("must be an http(s) URL of the form http(s)://host/path")
    scheme, authority, rest = shape["scheme"].lower(), shape["authority"], shape["rest"]
    if "[" in rest or "]" in rest:
        raise refuse("may hold '[' and ']' only around an IPv6 address")
    if "@" in authority:
        raise refuse("must not carry credentials")

    if authority.startswith("["):
        inside, bracket, after = authority[1:].partition("]")
        if not bracket or (after and not after.startswith(":")):
            raise refuse("has a malformed IPv6 address")
        host, port_text = inside, after[1:] if after else None
        if "%" in host:
            raise refuse("must not give an IPv6 zone id")
        try:
            literal: Address | None = ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse("has a malformed IPv6 address") from None
    else:
        host, colon, port_text_ = authority.partition(":")
        port_text = port_text_ if colon else None
        literal = _host_name(host, refuse)

    port: int | None = None
    if port_text is not None:
        if not _PORT.match(port_text) or not 1 <= int(port_text) <= 65535:
            raise refuse("has a port that is not a number from 1 to 65535")
        port = int(port_text)
    target = rest if rest.startswith("/") else "/" + rest
    return ParsedUrl(scheme, host, port, literal, authority, target)


def _refusal(field: str) -> Callable[[str], BadUserInput]:
    def refuse(reason: str) -> BadUserInput:
        return BadUserInput(f"{field} {reason}", field=field)

    return refuse


def _host_name(host: str, refuse: Callable[[str], BadUserInput]) -> Address | None:
    """A host that is not an IPv6 literal: a dotted-quad IPv4 address, or a DNS name."""
    if not host:
        raise refuse("has no host")
    if not _NAME.match(host):
        raise refuse("has a host name with characters other than letters, digits, '-', '_', '.'")
    try:
        return ipaddress.IPv4Address(host)  # four decimal numbers, no leading zeros
    except ValueError:
        pass
    labels = host.removesuffix(".").split(".")
    if _NUMERIC_LABEL.match(labels[-1]) or _inet_aton_reads(host):
        raise refuse("must write an IPv4 address as four decimal numbers (a.b.c.d)")
    if len(host.removesuffix(".")) > 253 or not all(_LABEL.match(label) for label in labels):
        raise refuse("has a malformed host name")
    return None


def _inet_aton_reads(host: str) -> bool:
    """Whether the C library reads `host` as an IPv4 address (`127.1`, `0x7f.1`, ...)."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def embedded_ipv4(addr: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 transition address carries."""
    found: list[ipaddress.IPv4Address] = []
    if addr.ipv4_mapped:
        found.append(addr.ipv4_mapped)
    if addr.sixtofour:
        found.append(addr.sixtofour)
    if addr.teredo:
        found.extend(addr.teredo)  # (server, client), the client already un-obfuscated
    if addr in NAT64 or addr in NAT64_LOCAL or addr in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return found


def is_forbidden(addr: Address, allow: list[Network]) -> bool:
    if any(addr in net for net in allow):
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        if addr in NAT64_LOCAL:
            return True
        if any(is_forbidden(inner, allow) for inner in embedded_ipv4(addr)):
            return True
        if addr.ipv4_mapped or addr in NAT64:  # stand-ins for the IPv4 address they carry
            return False
        if addr.is_site_local:
            return True
    return (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or any(addr in net for net in METADATA)
        or not addr.is_global
        or (any(addr in net for net in NOT_GLOBAL) and addr not in GLOBAL_EXCEPTIONS)
    )


async def resolve(host: str, port: int) -> list[Address]:
    """The addresses of a host name; none when it does not resolve or cannot be looked up."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):  # gaierror is an OSError; IDNA a UnicodeError
        return []
    addresses: list[Address] = []
    for info in infos:
        try:
            addresses.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
        except ValueError:
            continue
    return addresses


class _Owner:
    """One owner's place (one lookup at a time) and the callers holding or awaiting it."""

    __slots__ = ("place", "users")

    def __init__(self) -> None:
        self.place = asyncio.Semaphore(1)
        self.users = 0


class Lookups:
    """The name lookups of user-supplied URLs (a `webhookUrl`, at admission and at each
    delivery), one set per process: at most `at_once` in flight and one per owner (an
    account); a caller waits at most `wait` seconds for a place, and its lookup at most
    `wait` more. An owner one of whose lookups outlasted `wait` gets none for `rest`
    seconds after.

    A lookup runs on the loop's resolver threads (uvloop: libuv's pool of four, which
    every other lookup of the process shares: upstream calls, Redis, S3). A name whose
    servers never answer holds its thread until the system resolver gives up, tens of
    seconds, whether or not anyone still waits; so a few such names sent at once would
    stall every lookup of the process. Here they hold at most `at_once` threads, and
    one owner's names one of them: a place is given back when the lookup itself ends,
    not when its caller stops waiting. (Semaphores, not a thread pool of our own: the
    loop's own `getaddrinfo` stays the one every lookup goes through.)

    A refused request counts against no limit (docs/api.md#limits), so without `rest` a
    key could send silent names back to back and hold its place for good: two keys
    would hold every place of the process. With it, a key whose lookup outlasted `wait`
    gets none from then until `rest` seconds after that lookup ended and gave its place
    back: its silent names hold a place at most one system resolver's give-up time in
    each such time plus `rest`."""

    def __init__(
        self,
        at_once: int = 2,
        wait: float = 5.0,
        rest: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.wait, self.rest, self.clock = wait, rest, clock
        self._places = asyncio.Semaphore(at_once)
        self._owners: dict[str, _Owner] = {}  # those with a lookup in flight or awaited
        self._resting: dict[str, float] = {}  # owner -> when its lookups may start again
        self._running: set[asyncio.Future[list[Address]]] = set()

    async def resolve(
        self, host: str, port: int, field: str, owner: str, wait: float | None = None
    ) -> list[Address]:
        """`resolve`, bounded (`wait`: this call's, else the set's). Raises
        `ServiceUnavailable` when no place freed up in time (other names, or this
        owner's last one, still being looked up; or its names resting), and
        `BadUserInput` naming `field` when the name's own lookup took too long."""
        wait = self.wait if wait is None else wait
        self._refuse_resting(owner, field)
        own = self._owners.get(owner)
        if own is None:
            own = self._owners[owner] = _Owner()
        own.users += 1
        try:
            async with asyncio.timeout(wait):
                await own.place.acquire()
                try:
                    await self._places.acquire()
                except BaseException:
                    own.place.release()
                    raise
        except BaseException as exc:
            self._leave(owner, own)
            if isinstance(exc, TimeoutError):
                raise ServiceUnavailable(
                    f"other {field} names are still being looked up; retry shortly",
                    retry_after=max(1, round(wait)),
                ) from None
            raise
        try:  # its last name may have outlasted its wait while this one waited for it
            self._refuse_resting(owner, field)
        except ServiceUnavailable:
            self._give_back(owner, own)
            raise
        lookup = asyncio.ensure_future(resolve(host, port))
        self._running.add(lookup)  # held until it ends, whoever still waits for it
        ended = functools.partial(self._ended, owner, own, self.clock(), wait)
        lookup.add_done_callback(ended)
        try:
            async with asyncio.timeout(wait):
                return await asyncio.shield(lookup)
        except TimeoutError:
            self._rest(owner)
            raise BadUserInput(
                f"{field}: host {host!r} did not resolve within {wait:g} s", field=field
            ) from None

    def _ended(
        self,
        owner: str,
        own: _Owner,
        started: float,
        wait: float,
        lookup: asyncio.Future[list[Address]],
    ) -> None:
        self._running.discard(lookup)
        if not lookup.cancelled():
            lookup.exception()  # retrieved, for a caller gone: `resolve` raises none it knows
        if self.clock() - started > wait:  # the rest counts from the place given back
            self._rest(owner)
        self._give_back(owner, own)

    def _give_back(self, owner: str, own: _Owner) -> None:
        """The process's place and the owner's, taken for one lookup."""
        self._places.release()
        own.place.release()
        self._leave(owner, own)

    def _refuse_resting(self, owner: str, field: str) -> None:
        resting = self._resting.get(owner, 0.0) - self.clock()
        if resting > 0:
            raise ServiceUnavailable(
                f"{field}: a host name of this account's did not resolve in time; none "
                f"is looked up for it for {resting:.0f} s more (an IP address needs no "
                "lookup)",
                retry_after=math.ceil(resting),
            )

    def _rest(self, owner: str) -> None:
        """`owner`'s lookups rest from now on. (Few rest at once: each outlasted `wait`
        on one of `at_once` places. Those whose rest is over are dropped here.)"""
        now = self.clock()
        self._resting = {o: t for o, t in self._resting.items() if t > now}
        self._resting[owner] = now + self.rest

    def _leave(self, owner: str, own: _Owner) -> None:
        own.users -= 1
        if not own.users:
            del self._owners[owner]


async def check_url(
    url: str,
    allow: list[Network],
    field: str = "webhookUrl",
    max_length: int = MAX_URL_LENGTH,
    lookups: Lookups | None = None,
    owner: str = "",
    wait: float | None = None,
) -> list[Address]:
    """Validate a user-supplied URL; return the addresses it may be fetched from.

    Raises `BadUserInput` naming `field` for anything `parse_url` refuses, a host that
    does not resolve, or one with any address that `is_forbidden`. `lookups`: bounds on
    the name's lookup (one at a time for `owner`; `wait`: `Lookups.resolve`'s)."""
    parsed = parse_url(url, field, max_length)
    if parsed.literal is not None:
        addresses = [parsed.literal]
    elif lookups is not None:
        addresses = await lookups.resolve(parsed.host, parsed.effective_port, field, owner, wait)
    else:
        addresses = await resolve(parsed.host, parsed.effective_port)
    if not addresses:
        raise BadUserInput(f"{field}: host {parsed.host!r} does not resolve", field=field)
    if any(is_forbidden(a, allow) for a in addresses):
        raise BadUserInput(
            f"{field} points at a private, loopback or metadata address", field=field
        )
    return addresses


#: The most of a name's checked addresses one request tries, in the order the name gave
#: them: one that cannot be connected to passes the request to the next. A name with a
#: hundred would make one webhook attempt a hundred connections, each with a sliver of
#: the time.
ADDRESSES_TRIED = 4


def pinned(
    url: str, address: Address, max_length: int = MAX_URL_LENGTH
) -> tuple[URL, dict[str, str], str | None]:
    """The URL rewritten to the checked address, the Host header of the URL, and the name
    TLS sends (SNI) and checks the certificate against (None for http).

    The request target (path and query) goes out byte for byte as the URL was accepted:
    it is given to yarl whole, as an already-encoded path, which aiohttp writes on the
    request line as it is. Parsed as a URL, `.` and `..` segments could be resolved and
    an empty query (a trailing `?`) would be dropped, and the receiver be called at
    another URL than the one stored."""
    parsed = parse_url(url, max_length=max_length)
    host = str(address) if address.version == 4 else f"[{address}]"
    target = URL.build(
        scheme=parsed.scheme, host=host, port=parsed.port, path=parsed.target, encoded=True
    )
    server_name = parsed.host.removesuffix(".").lower() if parsed.scheme == "https" else None
    return target, {"Host": parsed.authority}, server_name
