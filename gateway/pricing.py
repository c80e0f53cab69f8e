"""Credits per request (CONTRACT §7)."""

from __future__ import annotations

import math

_SMALL, _MID, _LARGE = 512 * 512, 1024 * 1024, 2048 * 2048


def image_cost(width: int, height: int) -> int:
    """10 at 512x512, linear in pixels to 20 at 1024x1024, then to 30 at 2048x2048."""
    px = width * height
    if px <= _MID:
        credits = 10 + 10 * (px - _SMALL) / (_MID - _SMALL)
    else:
        credits = 20 + 10 * (px - _MID) / (_LARGE - _MID)
    return math.floor(credits + 0.5)  # nearest integer, halves up


def cost(width: int, height: int, num_images: int = 1) -> int:
    return image_cost(width, height) * num_images
