"""Credits per request: by each image's pixel count, times the number of images."""

from __future__ import annotations

import itertools
import math

#: (pixels, credits): the price at each size, linear in pixels between two of them
#: (and beyond the ends, along the nearest pair)
POINTS = ((512 * 512, 10), (1024 * 1024, 20), (2048 * 2048, 30))
_PAIRS = tuple(itertools.pairwise(POINTS))


def image_cost(width: int, height: int) -> int:
    """10 at 512x512, linear in pixels to 20 at 1024x1024, then to 30 at 2048x2048;
    rounded to the nearest integer, halves up."""
    px = width * height
    (p0, c0), (p1, c1) = next((pair for pair in _PAIRS if px <= pair[1][0]), _PAIRS[-1])
    credits = c0 + (c1 - c0) * (px - p0) / (p1 - p0)
    return math.floor(credits + 0.5)


def cost(width: int, height: int, num_images: int = 1) -> int:
    return image_cost(width, height) * num_images
