"""Backends: one small class per upstream behind the `Provider` protocol."""

from __future__ import annotations

from gateway.config import Settings
from gateway.providers.base import CallbackInbox, Provider
from gateway.providers.fluxkrea import FluxKreaProvider
from gateway.providers.http import UpstreamClient
from gateway.providers.krea import KreaProvider
from gateway.providers.local import LocalProvider
from gateway.providers.segmind import SegmindProvider


def _secret(value: object) -> str | None:
    return value.get_secret_value() if value is not None else None  # type: ignore[attr-defined]


def build_providers(
    settings: Settings, client: UpstreamClient, inbox: CallbackInbox | None = None
) -> dict[str, Provider]:
    """Every backend, configured from settings; those without credentials say so.

    With an inbox (the gateway has a public URL), flux-krea and Krea report by callback."""
    timeout = settings.upstream_timeout
    return {
        "fluxkrea": FluxKreaProvider(
            client,
            base_url=settings.fluxkrea_api_base,
            api_key=_secret(settings.fluxkrea_api_key),
            timeout=timeout,
            inbox=inbox,
        ),
        "segmind": SegmindProvider(
            client,
            base_url=settings.segmind_api_base,
            api_key=_secret(settings.segmind_api_key),
            model=settings.segmind_model,
            timeout=timeout,
        ),
        "krea": KreaProvider(
            client,
            base_url=settings.krea_api_base,
            token=_secret(settings.krea_api_token),
            model_path=settings.krea_model_path,
            timeout=timeout,
            inbox=inbox,
        ),
        "local": LocalProvider(),
    }
