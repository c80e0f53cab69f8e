"""Request bodies: read as a JSON object, and a generation's parsed once per distinct body.

A cache hit is a request made again, and a client making one again sends the same
bytes (the same code, the same prompt, the same seed). Decoding its JSON and validating
it into the parameter model are then a large part of what the gateway's own code
spends on it (BENCHMARKS.md: "a generation's body parsed once"). `memoized` keeps the
outcome by the body's bytes: `GenerationRequest` is frozen, so one instance serves every
request that sent them. Only a body that parsed is kept (one refused is refused again
each time, with its error), and only a short one, so the memory held is bounded (`ENTRIES`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import orjson

from gateway.errors import BadUserInput

#: Longer bodies are parsed each time (a prompt of a few thousand characters still fits).
MAX_BYTES = 4096
#: Bodies kept per route, least recently used first out. An entry holds the body and
#: the model (its prompt again): at most ~8 KB, so ~2 MB a route at worst.
ENTRIES = 256

T = TypeVar("T")
P = ParamSpec("P")


def json_object(body: bytes) -> dict[str, Any]:
    """A body that must be a JSON object, or the BAD_USER_INPUT saying why not."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadUserInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadUserInput("the body must be a JSON object")
    return data


def memoized(parse: Callable[Concatenate[bytes, P], T]) -> Callable[Concatenate[bytes, P], T]:
    """`parse(body, *args)`, its outcome kept by its arguments (all hashable) for a body
    of at most MAX_BYTES. `parse` must depend on nothing else and return an immutable
    value: every later request with the same bytes gets the very same object."""
    cached = functools.lru_cache(maxsize=ENTRIES)(parse)

    @functools.wraps(parse)
    def parsed(body: bytes, *args: P.args, **kwargs: P.kwargs) -> T:
        if len(body) > MAX_BYTES:
            return parse(body, *args, **kwargs)
        return cached(body, *args, **kwargs)  # type: ignore[arg-type]  # hashable: above

    return parsed
