"""Each backend's mapping of our parameters to its upstream's request body (a pure
function per backend, `translate`), and the shared tables it reads."""

from __future__ import annotations

import itertools

import pytest

from gateway.errors import ProviderRejected
from gateway.formats import FORMATS, content_type_of_url, format_named
from gateway.params import ASPECT_RATIOS
from gateway.providers import fluxkrea, krea, local, segmind
from gateway.providers.base import ImageParams, clamp, only_set

FULL = ImageParams(
    prompt="a lighthouse at dusk",
    width=1024,
    height=576,
    num_images=3,
    seed=42,
    steps=28,
    guidance=3.5,
    output_format="webp",
    aspect_ratio="16:9",
    quality="high",
)
MINIMAL = ImageParams(prompt="p")


# -- Krea ----------------------------------------------------------------------------------


def test_krea_names() -> None:
    assert krea.translate(FULL) == {
        "prompt": "a lighthouse at dusk",
        "width": 1024,
        "height": 576,
        "steps": 28,
        "guidance_scale_flux": 3.5,
    }  # the seed is per job (seed + i), set when submitting; one job per image


def test_krea_ranges() -> None:
    body = krea.translate(ImageParams("p", width=3000, height=256, steps=150, guidance=30))
    assert body == {"prompt": "p", "width": 2368, "height": 512, "steps": 100,
                    "guidance_scale_flux": 24.0}  # fmt: skip
    body = krea.translate(ImageParams("p", steps=0, guidance=-1))
    assert (body["steps"], body["guidance_scale_flux"]) == (1, 0.0)
    assert isinstance(krea.translate(ImageParams("p", guidance=7))["guidance_scale_flux"], float)


def test_krea_leaves_unset_values_to_its_defaults() -> None:
    assert krea.translate(MINIMAL) == {"prompt": "p", "width": 1024, "height": 1024}


def test_krea_prompt_limit() -> None:
    assert krea.translate(ImageParams("x" * 1800))["prompt"] == "x" * 1800
    with pytest.raises(ProviderRejected, match="1800"):
        krea.translate(ImageParams("x" * 1801))


# -- Segmind -------------------------------------------------------------------------------


def test_segmind_names() -> None:
    assert segmind.translate(FULL) == {
        "prompt": "a lighthouse at dusk",
        "aspect_ratio": "16:9",
        "megapixels": "1",
        "num_outputs": 3,
        "output_format": "webp",
        "output_quality": 100,
        "guidance": 3.5,
        "num_inference_steps": 28,
        "seed": 42,
        "go_fast": False,  # its default is "less deterministic"
    }


def test_segmind_ranges_and_defaults() -> None:
    body = segmind.translate(ImageParams("p", num_images=9, steps=80, guidance=15))
    assert (body["num_outputs"], body["num_inference_steps"], body["guidance"]) == (4, 50, 10.0)
    body = segmind.translate(ImageParams("p", num_images=0, steps=0, guidance=-3))
    assert (body["num_outputs"], body["num_inference_steps"], body["guidance"]) == (1, 1, 0.0)
    assert segmind.translate(MINIMAL) == {
        "prompt": "p",
        "aspect_ratio": "1:1",
        "megapixels": "1",
        "num_outputs": 1,  # never Segmind's default of 2
        "output_format": "png",
        "output_quality": 90,  # Segmind's default
        "go_fast": False,
    }


@pytest.mark.parametrize(
    ("quality", "output_quality"),
    [("high", 100), ("standard", 90), ("low", 75), (None, 90), ("other", 90)],
)
def test_segmind_quality(quality: str | None, output_quality: int) -> None:
    assert segmind.translate(ImageParams("p", quality=quality))["output_quality"] == output_quality


@pytest.mark.parametrize("output_format", sorted(FORMATS))
def test_segmind_output_format_is_ours(output_format: str) -> None:
    params = ImageParams("p", output_format=output_format)  # type: ignore[arg-type]
    assert segmind.translate(params)["output_format"] == output_format


@pytest.mark.parametrize(
    ("width", "height", "aspect_ratio", "megapixels"),
    [
        (1024, 1024, "1:1", "1"),
        (512, 512, "1:1", "0.25"),
        (1024, 576, "16:9", "1"),
        (576, 1024, "9:16", "1"),
        (1536, 640, "21:9", "1"),
        (1216, 832, "3:2", "1"),
        (2048, 2048, "1:1", "1"),
    ],
)
def test_segmind_size(width: int, height: int, aspect_ratio: str, megapixels: str) -> None:
    body = segmind.translate(ImageParams("p", width=width, height=height))
    assert (body["aspect_ratio"], body["megapixels"]) == (aspect_ratio, megapixels)


@pytest.mark.parametrize(
    ("asked", "sent"),
    [("4:5", "4:5"), ("9:21", "9:21"), ("7:3", "21:9"), ("2:1", "16:9"), ("nonsense", "1:1"),
     ("0:1", "1:1"), ("inf:1", "1:1")],
)  # fmt: skip
def test_segmind_aspect_ratio(asked: str, sent: str) -> None:
    assert segmind.translate(ImageParams("p", aspect_ratio=asked))["aspect_ratio"] == sent


def test_segmind_sends_only_documented_ratios() -> None:
    sides = (256, 512, 640, 1024, 1536, 2048, 4096)
    for width, height in itertools.product(sides, sides):
        body = segmind.translate(ImageParams("p", width=width, height=height))
        assert body["aspect_ratio"] in ASPECT_RATIOS
        assert body["megapixels"] in segmind.MEGAPIXELS


# -- flux-krea -----------------------------------------------------------------------------


def test_fluxkrea_names() -> None:
    assert fluxkrea.translate(FULL) == {
        "prompt": "a lighthouse at dusk",
        "width": 1024,
        "height": 576,
        "guidance_scale": 3.5,
        "num_inference_steps": 28,
        "seed": 42,
        "num_images": 3,
    }


def test_fluxkrea_ranges() -> None:
    params = ImageParams("p", width=256, height=4096, guidance=0.2, steps=0, seed=-1, num_images=9)
    assert fluxkrea.translate(params) == {
        "prompt": "p",
        "width": 512,
        "height": 2048,
        "guidance_scale": 1.0,
        "num_inference_steps": 1,
        "seed": 2_147_483_647,  # modulo 2**31
        "num_images": 4,
    }
    assert fluxkrea.translate(ImageParams("p", seed=2**31 + 5))["seed"] == 5
    body = fluxkrea.translate(ImageParams("p", guidance=25, steps=80))
    assert (body["guidance_scale"], body["num_inference_steps"]) == (20.0, 50)


def test_fluxkrea_leaves_unset_values_to_its_defaults() -> None:
    assert fluxkrea.translate(MINIMAL) == {
        "prompt": "p",
        "width": 1024,
        "height": 1024,
        "num_images": 1,
    }


@pytest.mark.parametrize("prompt", ["", "x" * 1001])
def test_fluxkrea_prompt_limits(prompt: str) -> None:
    with pytest.raises(ProviderRejected, match="1-1000 characters"):
        fluxkrea.translate(ImageParams(prompt))
    assert fluxkrea.translate(ImageParams("x" * 1000))["prompt"] == "x" * 1000


# -- local ---------------------------------------------------------------------------------


def test_local_draws_exactly_what_was_asked() -> None:
    assert local.translate(FULL) == {
        "prompt": "a lighthouse at dusk",
        "seed": 42,
        "width": 1024,
        "height": 576,
        "format": "webp",
    }
    assert local.translate(MINIMAL)["seed"] == 0


# -- shared tables and helpers -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "content_type"),
    [
        ("https://cdn.test/a/b.jpg", "image/jpeg"),
        ("https://cdn.test/a/b.JPEG", "image/jpeg"),
        ("https://cdn.test/b.png?sig=x.webp", "image/png"),
        ("https://cdn.test/b.webp#x.png", "image/webp"),
        ("http://cdn.test/p.Png", "image/png"),
        ("https://cdn.test/b", None),
        ("https://cdn.test/b.", None),
        ("https://cdn.test/b.gif", None),
        ("https://cdn.test/x.png/b", None),
        ("https://cdn.test", None),
    ],
)
def test_content_type_of_url(url: str, content_type: str | None) -> None:
    assert content_type_of_url(url) == content_type


def test_format_table() -> None:
    assert {name: f.content_type for name, f in FORMATS.items()} == {
        "png": "image/png",
        "jpg": "image/jpeg",
        "webp": "image/webp",
    }
    assert {name: f.pil for name, f in FORMATS.items()} == {
        "png": "PNG",
        "jpg": "JPEG",
        "webp": "WEBP",
    }
    for spelling, name in (("JPEG", "jpg"), ("jpeg", "jpg"), ("Png", "png"), ("webp", "webp")):
        found = format_named(spelling)
        assert found is not None and found.name == name
    assert format_named("gif") is None


def test_clamp_and_only_set() -> None:
    assert clamp(None, 1, 4, int) is None
    assert (clamp(0, 1, 4, int), clamp(9, 1, 4, int), clamp(3, 1, 4, float)) == (1, 4, 3.0)
    assert only_set({"a": 0, "b": None, "c": ""}) == {"a": 0, "c": ""}
