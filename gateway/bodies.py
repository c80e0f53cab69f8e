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


#: The deepest a request's JSON may nest. The gateway's own shapes nest a few levels
#: (GraphQL variables, flux-krea's `callback_data`); orjson writes no value nested past
#: 254 levels back (a job's record, a stored callback), and what echoes a value in an
#: error would recurse through all of them.
MAX_DEPTH = 32


class TooDeep(orjson.JSONDecodeError):
    """JSON nested deeper than MAX_DEPTH: a JSONDecodeError, so that every reader of a
    request's JSON refuses it as it refuses malformed JSON."""


def loads(raw: bytes | str) -> Any:
    """A request's JSON (`orjson.loads`), nested at most MAX_DEPTH levels."""
    data = orjson.loads(raw)
    brackets = (
        raw.count(b"[") + raw.count(b"{")
        if isinstance(raw, bytes)
        else (raw.count("[") + raw.count("{"))
    )
    if brackets > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):  # counted first: cheap
        raise TooDeep(f"JSON nested deeper than {MAX_DEPTH} levels", "", 0)
    return data


def _deeper_than(data: Any, limit: int) -> bool:
    level, depth = [data], 0
    while level:
        containers = [v for v in level if type(v) is dict or type(v) is list]
        if not containers:
            return False
        depth += 1
        if depth > limit:
            return True
        level = [x for v in containers for x in (v.values() if type(v) is dict else v)]
    return False


def json_object(body: bytes) -> dict[str, Any]:
    """A body that must be a JSON object, or the BAD_USER_INPUT saying why not."""
    try:
        data = loads(body)
    except TooDeep as exc:
        raise BadUserInput(f"the body's {exc.msg}") from None
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
