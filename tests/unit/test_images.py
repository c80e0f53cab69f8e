"""An upstream's bytes: converted when they are an image, refused when they are not."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from gateway.images import UnreadableImage, normalize_image


def png(width: int = 8, height: int = 6) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), "red").save(out, "PNG")
    return out.getvalue()


def test_an_image_in_the_asked_format_is_kept_as_sent() -> None:
    data = png()
    assert normalize_image(data, "png") == (data, 8, 6)


@pytest.mark.parametrize(("fmt", "pil"), [("jpg", "JPEG"), ("webp", "WEBP")])
def test_an_image_is_converted_to_the_asked_format(fmt: str, pil: str) -> None:
    data, width, height = normalize_image(png(), fmt)
    assert (width, height) == (8, 6)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == pil


def damaged_crc() -> bytes:
    data = bytearray(png())
    data[-13] ^= 0xFF  # the IDAT chunk's CRC: Pillow's verify raises SyntaxError
    return bytes(data)


@pytest.mark.parametrize(
    "data", [b"", b"not an image", png()[:40], damaged_crc()], ids=["empty", "text", "cut", "crc"]
)
def test_bytes_that_are_not_a_whole_image_are_unreadable(data: bytes) -> None:
    with pytest.raises(UnreadableImage):
        normalize_image(data, "png")
