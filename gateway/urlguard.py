"""Refuse user-supplied URLs that point inside our network (SSRF guard, CONTRACT §8).

A URL is refused when its host is, or resolves to, a loopback, private, link-local,
multicast, reserved or cloud-metadata address (IPv4 and IPv6, IPv4-mapped included),
unless the address falls inside GATEWAY_URL_ALLOW_CIDRS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from gateway.errors import BadUserInput

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA = (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("fd00:ec2::254/128"))


def is_forbidden(addr: Address, allow: list[Network]) -> bool:
    if any(addr in net for net in allow):
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return is_forbidden(addr.ipv4_mapped, allow)
    return (
        addr.is_loopback
        or addr.is_private
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
        or any(addr in net for net in METADATA)
        or not addr.is_global
    )


async def resolve(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


async def check_url(url: str, allow: list[Network], field: str = "webhookUrl") -> list[Address]:
    """Validate a user-supplied URL; return the addresses it may be fetched from."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise BadUserInput(f"{field} is not a valid URL", field=field) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadUserInput(f"{field} must be an http(s) URL", field=field)
    if parts.username or parts.password:
        raise BadUserInput(f"{field} must not carry credentials", field=field)
    addresses = await resolve(parts.hostname, port)
    if not addresses:
        raise BadUserInput(f"{field}: host {parts.hostname!r} does not resolve", field=field)
    if any(is_forbidden(a, allow) for a in addresses):
        raise BadUserInput(
            f"{field} points at a private, loopback or metadata address", field=field
        )
    return addresses
