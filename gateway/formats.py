"""Output image formats: the one table of what each is called where.

A format has our name (what a client asks for and a job stores), a media type (what
an output is served as), Pillow's name (what it is drawn or converted with), and the
file-name extensions that mean it (how an upstream's output URL says what it is).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

OutputFormat = Literal["png", "jpg", "webp"]


@dataclass(frozen=True, slots=True)
class ImageFormat:
    name: OutputFormat
    content_type: str
    pil: str
    #: lower case, without the dot; also the spellings a client may ask for
    extensions: tuple[str, ...]


FORMATS: dict[str, ImageFormat] = {
    f.name: f
    for f in (
        ImageFormat("png", "image/png", "PNG", ("png",)),
        ImageFormat("jpg", "image/jpeg", "JPEG", ("jpg", "jpeg")),
        ImageFormat("webp", "image/webp", "WEBP", ("webp",)),
    )
}
DEFAULT_FORMAT: OutputFormat = "png"

_BY_EXTENSION = {ext: f for f in FORMATS.values() for ext in f.extensions}


def format_named(name: str) -> ImageFormat | None:
    """The format a name or extension means, in any case ("JPEG" is jpg); None if none."""
    return _BY_EXTENSION.get(name.lower())


def content_type_of_url(url: str) -> str | None:
    """The media type the extension of a URL's last path segment says; None if none."""
    segment = urlsplit(url).path.rsplit("/", 1)[-1]
    _, dot, extension = segment.rpartition(".")
    found = format_named(extension) if dot else None
    return found.content_type if found else None
