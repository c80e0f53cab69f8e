"""`local`: a built-in offline preview renderer. No network, deterministic, fast.

The same prompt, seed and size always give the same bytes. The picture is an abstract
preview (colours and shapes drawn from a hash of the prompt and seed) labelled
"local preview"; it is never presented as a Flux output.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from gateway.formats import FORMATS
from gateway.providers.base import ImageParams, Output, Polled, Submitted


def render(prompt: str, seed: int, width: int, height: int, fmt: str) -> bytes:
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    rng = random.Random(digest)
    # Draw small, then scale: a smooth picture at any size in a few milliseconds.
    scale = max(width, height) / 256
    sw, sh = max(8, round(width / scale)), max(8, round(height / scale))
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    base = Image.new("RGB", (1, 2))
    base.putpixel((0, 0), top)
    base.putpixel((0, 1), bottom)
    small = base.resize((sw, sh), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(small, "RGBA")
    for _ in range(6 + digest[0] % 6):
        x, y = rng.randrange(sw), rng.randrange(sh)
        r = rng.randrange(8, max(9, min(sw, sh) // 2))
        colour = (*(rng.randrange(256) for _ in range(3)), rng.randrange(60, 180))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
    image = small.resize((width, height), Image.Resampling.BILINEAR)
    label = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(14, width // 40))
    text = f"local preview · seed {seed}\n{prompt[:60]}"
    label.multiline_text(
        (width // 40, height // 40),
        text,
        fill=(255, 255, 255),
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    out = io.BytesIO()
    if fmt == "png":
        image.save(out, "PNG", compress_level=1)
    else:
        image.save(out, FORMATS[fmt].pil, quality=90)
    return out.getvalue()


def translate(params: ImageParams) -> dict[str, Any]:
    """What `render` draws (image i with seed + i): the size and format exactly as asked."""
    return {
        "prompt": params.prompt,
        "seed": params.seed if params.seed is not None else 0,
        "width": params.width,
        "height": params.height,
        "format": params.output_format,
    }


class LocalProvider:
    name = "local"
    poll_interval = 0.0

    def serves(self, params: ImageParams) -> bool:
        return True  # draws any size

    def status(self) -> tuple[bool, str]:
        return True, "built in (offline preview renderer, not Flux)"

    async def submit(self, params: ImageParams) -> Submitted:
        sent = translate(params)
        seed, width, height, fmt = sent["seed"], sent["width"], sent["height"], sent["format"]
        outputs = []
        for i in range(params.num_images):
            data = await asyncio.to_thread(render, sent["prompt"], seed + i, width, height, fmt)
            outputs.append(
                Output(
                    data=data,
                    content_type=FORMATS[fmt].content_type,
                    width=width,
                    height=height,
                    seed=seed + i,
                )
            )
        return Submitted(outputs=outputs, sent=sent, metadata={"model": "local-preview"})

    async def poll(self, upstream_id: str) -> Polled:  # pragma: no cover - never has a job
        return Polled(state="failed", error="local renders synchronously")

    def callbacks(self, upstream_id: str) -> list[str]:
        return []

    def shown_id(self, upstream_id: str) -> str | None:
        return upstream_id

    async def cancel(self, upstream_id: str) -> None:
        return None

    async def fetch(self, output: Output) -> bytes:
        assert output.data is not None
        return output.data
