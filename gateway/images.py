"""An upstream's image bytes, checked and converted to the format the client asked for.

Pillow decodes, so this is CPU work: the worker runs it in a thread.
"""

from __future__ import annotations

import io

from PIL import ExifTags, Image, ImageOps

from gateway.formats import FORMATS, format_named

#: The most pixels an upstream's image may have: well above the largest any backend draws
#: (Krea's 2368x2368). A larger one (a decompression bomb: a few hundred kilobytes that
#: decode to gigabytes) is refused from its header, before it is decoded.
MAX_PIXELS = 4096 * 4096
#: What is read at all: the formats the gateway serves, not every one Pillow knows.
READABLE = tuple(f.pil for f in FORMATS.values())
# The gateway's own limit, lower, replaces Pillow's process-wide one (which warns past 89
# megapixels and fails past twice that): only this module opens bytes from elsewhere.
Image.MAX_IMAGE_PIXELS = None
#: The modes each format stores; an image in another is converted (`_storable`).
STORED_MODES = {"png": {"1", "L", "LA", "P", "RGB", "RGBA"}, "jpg": {"L", "RGB"}}


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can read whole."""


def normalize_image(data: bytes, fmt: str) -> tuple[bytes, int, int]:
    """Check the bytes are a whole image (every pixel decoded: a cut or damaged file is
    refused, not stored, charged and cached); in the requested format, upright, as they
    came; else converted; return its size as displayed."""
    try:
        with Image.open(io.BytesIO(data), formats=READABLE) as probe:
            if probe.width * probe.height > MAX_PIXELS:
                raise UnreadableImage(f"{probe.width}x{probe.height} is over {MAX_PIXELS} pixels")
            probe.verify()  # a PNG's checksums, which decoding does not read
        with Image.open(io.BytesIO(data), formats=READABLE) as image:
            image.load()
            found = format_named(image.format or "")
            turned = image.getexif().get(ExifTags.Base.Orientation, 1) not in (0, 1)
            if found is not None and found.name == fmt and not turned:
                return data, image.width, image.height
            upright = ImageOps.exif_transpose(image)
            converted = _storable(upright, fmt)
            # Its colours as the upstream meant them (a wide-gamut profile, say), while
            # the colour space is the same: a CMYK or grey profile on RGB pixels is wrong.
            same = _space(converted.mode) == _space(image.mode)
            icc = image.info.get("icc_profile") if same else None
            out = io.BytesIO()
            converted.save(out, FORMATS[fmt].pil, quality=92, icc_profile=icc)
            return out.getvalue(), converted.width, converted.height
    except UnreadableImage:
        raise
    # Pillow reports a damaged PNG chunk as SyntaxError, truncated data as OSError.
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(str(exc)) from exc


def _space(mode: str) -> str:
    """The colour space of a Pillow mode, as an ICC profile describes it."""
    if mode == "CMYK":
        return "cmyk"
    return "grey" if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;") else "rgb"


def _storable(image: Image.Image, fmt: str) -> Image.Image:
    """`image` in a mode `fmt` stores: 16- and 32-bit grey scaled to 8 bits (not clipped
    to white), CMYK and the rest to RGB, with their transparency where it can be kept."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    elif image.mode == "F":
        image = image.convert("L")
    modes = STORED_MODES.get(fmt, {"RGB", "RGBA"})  # webp: RGB or RGBA
    if image.mode in modes:
        return image
    alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if alpha and "RGBA" in modes:
        return image.convert("RGBA")
    return image.convert("RGB")
