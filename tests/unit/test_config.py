"""Settings read from the environment (docs/api.md#configuration)."""

from __future__ import annotations

import pytest

from gateway.config import Settings


def test_an_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose forwards each setting as `${X:-}`: one the operator left out arrives empty,
    and must mean its default (an empty admin token turned the admin API on, refusing
    every caller, instead of off)."""
    for name in ("ADMIN_TOKEN", "WORKERS", "CORS_ORIGINS", "RETENTION_DAYS", "ACCESS_LOG"):
        monkeypatch.setenv(f"GATEWAY_{name}", "")
    settings = Settings()
    assert settings.admin_token is None
    assert settings.workers == 64 and settings.retention_days == 7.0
    assert settings.allowed_origins == () and settings.access_log is True
