"""A generation's body is parsed once per distinct bytes (gateway/bodies.py)."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from gateway.bodies import MAX_BYTES, json_object, memoized
from gateway.compat import krea
from gateway.errors import BadUserInput, NotFound
from gateway.openai_api import images_request
from gateway.rest import flat_request


def test_the_same_bytes_give_the_same_frozen_request_and_other_bytes_their_own() -> None:
    body = b'{"service":"local","prompt":"a gull","seed":7}'
    first = flat_request(body)
    assert flat_request(bytes(bytearray(body))) is first  # equal bytes, another object: kept
    respelled = flat_request(b'{"prompt":"a gull","seed":7,"service":"local"}')
    assert respelled is not first and respelled.cache_key == first.cache_key
    assert flat_request(b'{"service":"local","prompt":"a gull","seed":8}').seed == 8
    # A copy that changes the picture has its own key (Segmind's v1 copies to one image).
    assert first.model_copy(update={"num_images": 2}).cache_key != first.cache_key
    with pytest.raises(ValidationError, match="frozen"):
        first.seed = 9
    # OpenAI's: kept by the body and the models the gateway serves.
    openai = b'{"model":"local","prompt":"a gull","response_format":"b64_json"}'
    asked = images_request(openai, ("local",), ())
    assert images_request(openai, ("local",), ()) is asked and asked.response_format == "b64_json"
    with pytest.raises(NotFound, match="model `local` does not exist"):
        images_request(openai, ("flux",), ())
    # Krea's: by the body and the headers that are part of the request.
    model, said = "bfl/flux-1-dev", b'{"prompt":"a gull"}'
    plain = krea.asked(said, model, None, None)
    hooked = krea.asked(said, model, "https://example.com/hook", None)
    assert plain.webhook_url is None and hooked.webhook_url == "https://example.com/hook"
    assert krea.asked(said, model, None, "order-1").idempotency_key == "order-1"
    assert krea.asked(said, model, None, None) is plain


def test_a_refused_body_is_refused_each_time_and_a_long_one_is_not_kept() -> None:
    calls: list[bytes] = []

    @memoized
    def parse(body: bytes) -> dict[str, object]:
        calls.append(body)
        data = json_object(body)
        if "prompt" not in data:
            raise BadUserInput("prompt is required", field="prompt")
        return data

    for _ in range(2):
        with pytest.raises(BadUserInput, match="prompt is required"):
            parse(b"{}")
        with pytest.raises(BadUserInput, match="not valid JSON"):
            parse(b"{")
        with pytest.raises(BadUserInput, match="must be a JSON object"):
            parse(b"[]")
    assert len(calls) == 6  # nothing refused was kept
    short = b'{"prompt":"a gull"}'
    long = orjson.dumps({"prompt": "a gull " * (MAX_BYTES // 7)})
    assert len(long) > MAX_BYTES
    for _ in range(3):
        parse(short)
        parse(long)
    assert calls[6:] == [short, long, long, long]

    @memoized
    def flagged(body: bytes, *, loud: bool = False) -> str:
        return body.decode().upper() if loud else body.decode()

    assert (flagged(b"x"), flagged(b"x", loud=True)) == ("x", "X")  # keywords are kept too
