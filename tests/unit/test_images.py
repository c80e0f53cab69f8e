"""An upstream's bytes: converted when they are an image, refused when they are not."""

from __future__ import annotations

import io
import os

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


def noise(mode: str = "RGB", size: tuple[int, int] = (256, 192)) -> Image.Image:
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode)))


def saved(image: Image.Image, pil: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, pil, **options)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "pil"), [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")])
def test_an_image_cut_short_in_the_asked_format_is_unreadable(fmt: str, pil: str) -> None:
    """Its header and checksums may be whole: only decoding every pixel tells. Kept as
    sent, it was stored, charged and cached, and no browser could show it."""
    whole = saved(noise(), pil)
    assert normalize_image(whole, fmt)[1:] == (256, 192)
    with pytest.raises(UnreadableImage):
        normalize_image(whole[: len(whole) * 2 // 3], fmt)


def test_a_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = saved(Image.new("L", (13_000, 13_000)), "PNG")  # ~0.5 MB, 169 megapixels
    assert len(bomb) < 1_000_000
    with pytest.raises(UnreadableImage, match="13000x13000 is over"):
        normalize_image(bomb, "jpg")


def test_other_modes_convert_without_losing_the_picture() -> None:
    grey16 = Image.new("I;16", (64, 64), 32_768)  # mid-grey, 16 bits
    data, _, _ = normalize_image(saved(grey16, "PNG"), "jpg")
    with Image.open(io.BytesIO(data)) as image:
        assert 120 <= image.convert("L").getpixel((5, 5)) <= 136  # not clipped to white
    cmyk = saved(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")
    data, width, height = normalize_image(cmyk, "png")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGB" and (width, height) == (64, 48)
        red, green, blue = image.getpixel((5, 5))
        assert red > 200 and green < 60 and blue < 60
    clear = Image.new("RGBA", (16, 16), (0, 0, 255, 0))
    data, _, _ = normalize_image(saved(clear, "PNG"), "webp")
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "RGBA" and image.getpixel((3, 3))[3] == 0


def test_exif_orientation_is_applied_and_the_colour_profile_kept() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: shown turned a quarter clockwise
    icc = srgb_profile()
    stored = Image.new("RGB", (300, 100), "blue")
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # a mark in the stored top-left corner
    data = saved(stored, "JPEG", exif=exif, icc_profile=icc)
    for fmt in ("jpg", "png", "webp"):
        out, width, height = normalize_image(data, fmt)
        assert (width, height) == (100, 300), fmt
        with Image.open(io.BytesIO(out)) as image:
            assert image.size == (100, 300)
            assert image.getexif().get(0x0112, 1) == 1
            shown = image.convert("RGB")
            assert shown.getpixel((90, 10))[0] > 200, fmt  # now top-right, as displayed
            assert shown.getpixel((10, 10))[0] < 60, fmt
            assert image.info.get("icc_profile") == icc, fmt
    # A profile for another colour space than the pixels end in is not carried over.
    cmyk = saved(Image.new("CMYK", (32, 32)), "JPEG", icc_profile=icc)
    out, _, _ = normalize_image(cmyk, "png")
    with Image.open(io.BytesIO(out)) as image:
        assert image.mode == "RGB" and "icc_profile" not in image.info


def srgb_profile() -> bytes:
    from PIL import ImageCms

    return bytes(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
