"""The pages the gateway serves to a browser: the playground at `/` and its assets.

Plain HTML, CSS and JavaScript in `gateway/static/` (no framework, no build step),
read once at import. Nothing a page loads comes from another host: every asset is
served here, and each page carries a Content-Security-Policy that tells the browser so.
`schema/view.py` serves the same page, on its console tab, as `/graphql`'s IDE.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

MEDIA_TYPES = {
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
# An asset asked for with its current version (`?v=`) never changes: cache it for good.
IMMUTABLE = "public, max-age=31536000, immutable"
REVALIDATE = "no-cache"  # anything else: use the cached copy only while its ETag holds
TABS = ("generate", "console")
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    version: str  # the start of the body's SHA-256: its URL changes when it does

    @property
    def etag(self) -> str:
        return f'"{self.version}"'


def _load_assets() -> dict[str, Asset]:
    assets = {}
    for entry in (resources.files("gateway") / "static").iterdir():
        kind = entry.name.rpartition(".")[2]
        if entry.is_file() and kind in MEDIA_TYPES:
            body = entry.read_bytes()
            version = hashlib.sha256(body).hexdigest()[:16]
            assets[entry.name] = Asset(body, MEDIA_TYPES[kind], version)
    return assets


ASSETS = _load_assets()


def _template() -> str:
    html = (resources.files("gateway") / "static" / "playground.html").read_text("utf-8")
    for name, asset in ASSETS.items():
        html = html.replace("{{asset:" + name + "}}", f"/static/{name}?v={asset.version}")
    return html


TEMPLATE = _template()
TITLES = {"generate": "Playground", "console": "GraphQL console"}


def _policy(request: Request) -> str:
    """Scripts, styles, fonts and frames from this origin only; images from here or
    where the gateway's outputs are (its public URL, a bucket's public URL or endpoint,
    and any https host for AWS's presigned URLs, whose host AWS chooses); fetch and
    WebSocket to here."""
    images = ["'self'", "data:", "blob:"]
    try:
        settings = request.app.state.gateway.settings
    except (AttributeError, KeyError):  # no app, or served before the runtime started
        settings = None
    if settings is not None:
        for url in (settings.base_url, settings.storage_public_url, settings.s3_endpoint_url):
            origin = urlsplit(url or "")
            if origin.scheme in ("http", "https") and _HOST.fullmatch(origin.netloc):
                images.append(f"{origin.scheme}://{origin.netloc}")
        if settings.storage_url and not settings.storage_public_url:
            images.append("https:")  # redirected to a presigned URL on the bucket's host
    connect = ["'self'"]
    host = request.headers.get("host", "")
    if _HOST.fullmatch(host):  # older browsers do not count ws: as 'self'
        connect += [f"ws://{host}", f"wss://{host}"]
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {' '.join(images)}",
            f"connect-src {' '.join(connect)}",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


def page(request: Request, tab: str = "generate") -> Response:
    """The playground, opened on `tab` (`generate`, or `console` for the GraphQL IDE)."""
    assert tab in TABS
    html = TEMPLATE.replace("{{tab}}", tab).replace("{{title}}", TITLES[tab])
    return HTMLResponse(
        html,
        headers={
            "Cache-Control": REVALIDATE,
            "Content-Security-Policy": _policy(request),
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Vary": "Accept",  # /graphql answers JSON to the same URL
        },
    )


async def playground(request: Request) -> Response:
    return page(request)


async def static(request: Request) -> Response:
    asset = ASSETS.get(request.path_params["name"])
    if asset is None:
        raise HTTPException(404)
    versioned = request.query_params.get("v") == asset.version
    headers = {
        "Cache-Control": IMMUTABLE if versioned else REVALIDATE,
        "ETag": asset.etag,
        "X-Content-Type-Options": "nosniff",
    }
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


routes = [
    Route("/", playground, methods=["GET"]),
    Route("/static/{name}", static, methods=["GET"]),
]
