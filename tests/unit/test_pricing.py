"""Credits (`gateway/pricing.py`): 10 at 512x512, linear in pixels to 20 at 1024x1024,
then linear to 30 at 2048x2048, rounded to the nearest integer (halves up), times the
number of images."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from gateway.pricing import cost, image_cost

SIDES = range(512, 2049, 16)  # every size a request may have


def formula(width: int, height: int) -> int:
    """The price, computed exactly (no floating point) from the stated rule."""
    px = width * height
    small, mid, large = 512 * 512, 1024 * 1024, 2048 * 2048
    if px <= mid:
        credits = 10 + Fraction(10 * (px - small), mid - small)
    else:
        credits = 20 + Fraction(10 * (px - mid), large - mid)
    return math.floor(credits + Fraction(1, 2))


@pytest.mark.parametrize(
    ("width", "height", "credits"),
    [
        (512, 512, 10),
        (1024, 1024, 20),
        (2048, 2048, 30),
        (768, 768, 14),  # 14.17
        (1024, 768, 17),  # 16.67
        (512, 896, 13),  # exactly 12.5: halves round up
        (1024, 1792, 23),  # exactly 22.5
        (1536, 1536, 24),
        (2048, 1024, 23),
        (1360, 768, 20),
        (640, 512, 11),
    ],
)
def test_known_prices(width: int, height: int, credits: int) -> None:
    assert image_cost(width, height) == credits == formula(width, height)
    assert image_cost(height, width) == credits


def test_every_size_matches_the_formula() -> None:
    for width, height in itertools.product(SIDES, SIDES):
        assert image_cost(width, height) == formula(width, height), (width, height)


def test_price_grows_with_pixels() -> None:
    sizes = sorted(itertools.product(SIDES, SIDES), key=lambda s: s[0] * s[1])
    prices = [image_cost(w, h) for w, h in sizes]
    assert prices == sorted(prices)
    assert (prices[0], prices[-1]) == (10, 30)


@pytest.mark.parametrize("num_images", [1, 2, 3, 4])
def test_each_image_costs_its_own_price(num_images: int) -> None:
    for width, height in ((512, 512), (1024, 768), (2048, 2048), (512, 896)):
        assert cost(width, height, num_images) == num_images * formula(width, height)
    assert cost(1024, 1024) == 20
