"""compose.yaml passes every setting through (docs/api.md#configuration), so that an
operator's `.env` reaches both services, empty meaning the default."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway.config import Settings

ROOT = Path(__file__).resolve().parents[2]
#: set by the image (Dockerfile: its address, port and outputs' directory), per service
#: (the worker's endpoint) or never in a container (the embedded store of `make run`)
NOT_FORWARDED = {"GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_METRICS_PORT", "GATEWAY_DEV"}


def test_compose_passes_every_setting_to_both_services() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    passed = compose["x-gateway-env"]
    wanted = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields} - NOT_FORWARDED
    assert sorted(wanted - passed.keys()) == []
    for service in ("gateway", "worker"):
        assert compose["services"][service]["environment"].keys() >= passed.keys()
    # An empty value would be read as unset, overriding the image's own: never for these.
    assert not (NOT_FORWARDED - {"GATEWAY_METRICS_PORT"}) & passed.keys()
    # Only the gateway's own settings take empty as unset: botocore reads AWS_PROFILE=""
    # as a profile named "" (and S3 storage fails to start), OpenTelemetry an empty
    # exporter as none. Those are passed only when set (no value here).
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "OTEL_TRACES_EXPORTER"):
        assert passed[name] is None, name
    assert all(passed[n] is None for n in passed if n.startswith("OTEL_"))


def test_with_the_s3_profile_the_gateway_starts_once_its_bucket_is_made() -> None:
    """The first uploads would fail until the one-off container made the bucket; without
    the profile that container does not run, so the dependency is optional."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["minio-bucket"]["profiles"] == ["s3"]
    for name in ("gateway", "worker"):
        bucket = services[name]["depends_on"]["minio-bucket"]
        assert bucket == {"condition": "service_completed_successfully", "required": False}


def test_long_running_services_restart_and_publish_on_loopback_by_default() -> None:
    """After a reboot or a crash nothing came back; and the gateways' ports, `/metrics`
    open without a token among them, were published on every interface of the host."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name in ("redis", "gateway", "worker", "minio"):
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["logging"]["options"]["max-size"], name  # rotated, bounded
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published and all(p.startswith("${PUBLISH_ADDRESS:-127.0.0.1}:") for p in published)
