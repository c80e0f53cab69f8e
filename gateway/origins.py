"""An origin as a browser sends it in `Origin`: `scheme://host[:port]`.

One spelling for every place that compares one (CORS, WebSocket handshakes, client
tokens bound to origins): the scheme and host in lower case, no trailing slash, and no
port when it is the scheme's default (browsers leave out `:443` and `:80`, so an origin
configured as `https://app.example.com:443` would otherwise match nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(value: str) -> str | None:
    """`value` as a browser's `Origin`, or None when it is not an http(s) origin alone
    (a path, query, fragment, user name or a non-ASCII host)."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if (
        scheme not in DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not parts.hostname.isascii()
        or any(c in parts.hostname for c in ",; \t")
    ):
        return None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        host = f"{host}:{port}"
    return f"{scheme}://{host}"


def page_origin(headers: Mapping[str, str]) -> str:
    """The page a request comes from, for a client token bound to origins: its `Origin`,
    or, when it has none, its `Referer`'s origin: browsers leave `Origin` off a GET or
    HEAD to their own origin (the Fetch standard's "serializing a request origin"), as a
    page served beside a proxied gateway polls its job; '' when it names neither."""
    sent = headers.get("origin")
    if sent is not None:
        return sent
    referer = headers.get("referer")
    if not referer:
        return ""
    try:
        parts = urlsplit(referer)
    except ValueError:
        return ""
    return origin(f"{parts.scheme}://{parts.netloc}") or ""
