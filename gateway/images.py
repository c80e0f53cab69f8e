"""An upstream's image bytes, checked and converted to the format the client asked for.

Pillow decodes, so this is CPU work: the worker runs it in a thread.
"""

from __future__ import annotations

import io

from PIL import Image

from gateway.formats import FORMATS, format_named


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can read whole."""


def normalize_image(data: bytes, fmt: str) -> tuple[bytes, int, int]:
    """Check the bytes are an image; convert to the requested format; return its size."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            found = format_named(image.format or "")
            if found is not None and found.name == fmt:
                image.verify()
                return data, width, height
            out = io.BytesIO()
            converted = image.convert("RGB") if fmt == "jpg" else image
            converted.save(out, FORMATS[fmt].pil, quality=92)
            return out.getvalue(), width, height
    # Pillow reports a damaged PNG chunk as SyntaxError, truncated data as OSError.
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnreadableImage(str(exc)) from exc
