"""The protocol every backend implements, and the values it exchanges with the worker.

A backend knows its upstream's protocol and nothing else: no Redis, credits or GraphQL.
It receives its `UpstreamClient` (so tests can point it at an emulator) and raises
only the `ProviderError` subclasses of `gateway.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

OutputFormat = Literal["png", "jpg", "webp"]

CONTENT_TYPES: dict[str, str] = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True)
class ImageParams:
    """Normalized request, in the gateway's own names and ranges (CONTRACT §4)."""

    prompt: str
    width: int = 1024
    height: int = 1024
    num_images: int = 1
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    output_format: OutputFormat = "png"
    aspect_ratio: str | None = None
    quality: str | None = None


@dataclass
class Output:
    """One produced image: bytes made in-process, or an upstream URL to download."""

    url: str | None = None
    data: bytes | None = None
    content_type: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None


@dataclass
class Submitted:
    """What `submit` returns: either an upstream job id to poll, or outputs at once."""

    upstream_id: str | None = None
    outputs: list[Output] | None = None
    sent: dict[str, Any] = field(default_factory=dict)  # the parameters actually sent
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
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

    async def submit(self, params: ImageParams) -> Submitted: ...

    async def poll(self, upstream_id: str) -> Polled: ...

    def callbacks(self, upstream_id: str) -> list[str]:
        """Tokens of the callbacks that announce this job's end ([] when it has none):
        the worker waits for them instead of polling at the provider's pace."""
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
