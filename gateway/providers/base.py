"""The protocol every backend implements, and the values it exchanges with the worker.

A backend knows its upstream's protocol and nothing else: no Redis, credits or GraphQL.
It receives its `UpstreamClient` (so tests can point it at an emulator) and raises
only the `ProviderError` subclasses of `gateway.errors`. What HTTP backends share is
`gateway.providers.http.HTTPBackend`; the helpers at the end write an upstream's
request body from our `ImageParams`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from gateway.params import ImageParams

__all__ = [
    "CallbackInbox",
    "ImageParams",  # declared with the request it comes from, in `gateway.params`
    "Output",
    "Polled",
    "Provider",
    "Submitted",
    "clamp",
    "only_set",
]

T = TypeVar("T")


@dataclass(slots=True)
class Output:
    """One produced image: bytes made in-process, or an upstream URL to download."""

    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None


@dataclass(slots=True)
class Submitted:
    """What `submit` returns: either an upstream job id to poll, or outputs at once."""

    upstream_id: str | None = None
    outputs: list[Output] | None = None
    sent: dict[str, Any] = field(default_factory=dict)  # the parameters actually sent
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Polled:
    state: Literal["pending", "completed", "failed", "cancelled"]
    upstream_status: str = ""
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Provider(Protocol):
    name: str
    #: seconds between polls the provider recommends
    poll_interval: float

    def status(self) -> tuple[bool, str]:
        """(enabled, reason): a backend without credentials is disabled and says why."""
        ...

    def serves(self, params: ImageParams) -> bool:
        """Whether it draws what `params` asks (its size and shape): a route passes over
        a backend that does not while another of its backends does."""
        ...

    async def submit(self, params: ImageParams) -> Submitted: ...

    async def poll(self, upstream_id: str) -> Polled: ...

    def callbacks(self, upstream_id: str) -> list[str]:
        """Tokens of the callbacks that announce this job's end ([] when it has none):
        the worker waits for them instead of polling at the provider's pace."""
        ...

    def shown_id(self, upstream_id: str) -> str | None:
        """The upstream's own job id(s) as a job's metadata shows them (`upstreamId`):
        never a callback token stored beside them, which is a capability (a report to
        its URL is trusted) and metadata reaches the job's owner and, through the cache,
        other accounts. None: nothing to show."""
        ...

    async def cancel(self, upstream_id: str) -> None: ...

    async def fetch(self, output: Output) -> bytes:
        """The bytes of an output (download it when the upstream gave a URL)."""
        ...


class CallbackInbox(Protocol):
    """Where upstream callbacks (webhooks to us) wait for the job that expects them.

    A backend whose upstream reports by callback `expect`s a token before submitting,
    gives the upstream a URL carrying it, names it in `callbacks`, and may `take` the
    delivered body when polling.
    """

    def url_for(self, backend: str, token: str) -> str: ...

    async def expect(self, token: str) -> None: ...

    async def take(self, token: str) -> dict[str, Any] | None: ...


# -- mapping our parameters to an upstream's -----------------------------------------------


def clamp(value: float | None, low: float, high: float, kind: Callable[[float], T]) -> T | None:
    """`value` brought into [low, high] as `kind`; None (not sent) when it is unset."""
    return None if value is None else kind(max(low, min(high, value)))


def only_set(fields: Mapping[str, Any]) -> dict[str, Any]:
    """An upstream request body: the fields that are set (None: left to its default)."""
    return {name: value for name, value in fields.items() if value is not None}
