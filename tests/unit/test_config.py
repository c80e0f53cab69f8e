"""Settings read from the environment (docs/api.md#configuration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Settings, load_settings


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


def test_a_secret_comes_from_a_file_in_the_secrets_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Docker's and Kubernetes' secrets are files (/run/secrets/NAME), kept out of the
    environment that `docker inspect` and /proc show; the environment still wins."""
    (tmp_path / "gateway_admin_token").write_text("s3cret\n")
    (tmp_path / "GATEWAY_KREA_API_TOKEN").write_text("krea-token")
    monkeypatch.setenv("GATEWAY_SECRETS_DIR", str(tmp_path))
    settings = load_settings()
    assert settings.admin_token is not None and settings.krea_api_token is not None
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert settings.krea_api_token.get_secret_value() == "krea-token"
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "from-env")
    assert load_settings().admin_token.get_secret_value() == "from-env"  # type: ignore[union-attr]
    monkeypatch.setenv("GATEWAY_SECRETS_DIR", str(tmp_path / "none"))  # none there: none read
    assert load_settings().krea_api_token is None
