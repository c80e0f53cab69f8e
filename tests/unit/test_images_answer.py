"""OpenAI's `b64_json` answers are written a slice of an image at a time, so that a few
megabytes of base64 do not hold the event loop (gateway/openai_api.py, `ImagesAnswer`):
the bytes a client reads are exactly the JSON of the whole answer, and as long as its
Content-Length says."""

from __future__ import annotations

import asyncio
import base64
import os
from typing import Any

import orjson

from gateway.openai_api import SLICE, Base64, ImagesAnswer, _completed


def _received(
    answer: ImagesAnswer, client_leaves: bool = False
) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """The answer's head, and the body messages sent; the client reading to the end, or
    leaving as soon as the answer starts."""
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    async def receive() -> dict[str, Any]:
        if not client_leaves:
            await asyncio.Event().wait()  # still there
        return {"type": "http.disconnect"}

    asyncio.run(answer({"type": "http"}, receive, send))
    start, *body = messages
    return {k.decode(): v.decode() for k, v in start["headers"]}, body


def _whole(body: list[dict[str, Any]]) -> list[bytes]:
    assert body[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    return [m["body"] for m in body[:-1]]


def test_a_large_answer_is_its_json_written_in_slices() -> None:
    images = [os.urandom(SLICE * 3 + 1), os.urandom(2), b""]  # lengths not multiples of 3
    # A prompt may hold anything, a marker's look-alike included.
    prompt = 'a "quoted" prompt b64-0123456789abcdef01234567-0 \u2603'
    answer = {
        "created": 1,
        "data": [{"b64_json": Base64(image), "revised_prompt": prompt} for image in images],
        "size": "1024x1024",
    }
    expected = orjson.dumps(
        {
            **answer,
            "data": [
                {"b64_json": base64.b64encode(image).decode(), "revised_prompt": prompt}
                for image in images
            ],
        }
    )
    headers, body = _received(ImagesAnswer(answer, {"X-Gateway-Job-Id": "j"}))
    chunks = _whole(body)
    assert b"".join(chunks) == expected
    assert int(headers["content-length"]) == len(expected)
    assert headers["content-type"] == "application/json"
    assert headers["x-gateway-job-id"] == "j"
    assert max(len(chunk) for chunk in chunks) <= SLICE // 3 * 4  # no image whole at once
    assert orjson.loads(b"".join(chunks))["data"][1]["revised_prompt"] == prompt


def test_a_client_gone_is_sent_no_more_slices() -> None:
    image = os.urandom(SLICE * 20)
    _, body = _received(ImagesAnswer({"data": [{"b64_json": Base64(image)}]}, {}), True)
    assert len(body) < 20  # the slices it would have taken, not encoded for nobody


def test_a_streamed_event_carries_the_whole_image() -> None:
    image = os.urandom(SLICE + 5)
    answer = {"background": "opaque", "created": 2, "output_format": "png", "size": "1x1"}
    pieces = _completed(answer, {"b64_json": Base64(image)})
    written = b"".join(
        piece if isinstance(piece, bytes) else base64.b64encode(piece.data) for piece in pieces
    )
    name, data, end = written.split(b"\n", 2)
    assert name == b"event: image_generation.completed" and end == b"\n"
    event = orjson.loads(data.removeprefix(b"data: "))
    assert base64.b64decode(event["b64_json"]) == image
    assert event["type"] == "image_generation.completed" and event["created_at"] == 2
