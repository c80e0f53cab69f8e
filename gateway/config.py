"""Settings, read once from the environment (and an optional TOML file) and passed in."""

from __future__ import annotations

import functools
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.origins import origin


class PlanLimits(BaseModel):
    """Limits of a plan; `None` means unlimited."""

    model_config = ConfigDict(extra="forbid")  # a misspelt limit is refused, not unlimited

    rpm: int | None = None
    concurrency: int | None = None
    daily: int | None = None


DEFAULT_PLANS: dict[str, PlanLimits] = {
    "free": PlanLimits(rpm=10, concurrency=1, daily=100),
    "starter": PlanLimits(rpm=30, concurrency=3, daily=1_000),
    "pro": PlanLimits(rpm=60, concurrency=10, daily=10_000),
    # Enterprise limits are set per key; without them a key is unlimited.
    "enterprise": PlanLimits(),
}

#: seconds before each retry of a webhook: thirteen attempts over about three days (a
#: receiver down overnight still gets them)
WEBHOOK_RETRY_DELAYS: tuple[float, ...] = (5, 30, 120, 600, 1800, 3600, 7200, 18000, 36000, 36000)
WEBHOOK_RETRY_DELAYS += (86400, 86400)

DEFAULT_ROUTES: dict[str, list[str]] = {
    "flux-krea": ["fluxkrea", "segmind", "krea"],
    "flux-dev": ["krea"],
    "local": ["local"],
}

BACKENDS = ("fluxkrea", "krea", "segmind", "local")


class Settings(BaseSettings):
    # An empty variable is unset (compose passes `${X:-}` for every one it forwards).
    # A refusal does not quote the value given (it may hold a password, a Redis URL's, or a
    # key); only the validators that name the part they could not read quote that part.
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_", extra="ignore", env_ignore_empty=True, hide_input_in_errors=True
    )

    redis_url: str | None = None
    redis_shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="hash-tag shards of the keyspace; on Redis Cluster, several per node",
    )
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = None
    # Where upstreams can reach the gateway to call back (Krea's X-Webhook-URL, flux-krea's
    # async webhook_url); unset: none is asked to (flux-krea answers synchronously, Krea is
    # polled). Not `public_url`: the base of output URLs may be one no upstream reaches
    # (compose's default, a private network), and flux-krea has no status to poll.
    callback_url: str | None = None
    storage_dir: Path = Path("./data/outputs")
    # Outputs in an S3-compatible bucket instead of `storage_dir` (gateway/artifacts_s3.py);
    # credentials and, unless `s3_region` says, the region from botocore's standard chain
    # (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role, ...).
    storage_url: str | None = Field(
        default=None, description="s3://BUCKET/PREFIX; unset: outputs in storage_dir"
    )
    storage_public_url: str | None = Field(
        default=None,
        description="public base serving object PREFIX/NAME as BASE/NAME (a CDN in front of "
        "the bucket); unset: URLs of the gateway's that redirect to presigned ones",
    )
    storage_presign_seconds: int = Field(
        default=3600, ge=1, le=7 * 86400, description="life of a presigned output URL"
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, R2, ...); unset: AWS S3"
    )
    s3_region: str | None = Field(default=None, description="unset: AWS_REGION and co.")
    admin_token: SecretStr | None = None
    dev: bool = False
    config: Path | None = None

    krea_api_base: str = "https://api.krea.ai"
    krea_api_token: SecretStr | None = None
    krea_model_path: str = "bfl/flux-1-dev"
    segmind_api_base: str = "https://api.segmind.com"
    segmind_api_key: SecretStr | None = None
    segmind_model: str = "flux-krea-dev"
    fluxkrea_api_base: str = "https://api.flux-krea.pro/v1"
    fluxkrea_api_key: SecretStr | None = None

    url_allow_cidrs: str = ""
    cors_origins: str = Field(
        default="",
        description="origins whose pages may call the API (comma-separated, or *); "
        "unset: none, or any in dev mode",
    )

    # Workers and jobs
    workers: int = Field(default=64, ge=1, description="jobs one process runs at once")
    job_lease_seconds: float = Field(default=30.0, gt=0)
    job_max_tries: int = Field(default=3, ge=1)
    upstream_timeout: float = Field(default=30.0, gt=0)
    job_deadline_seconds: float = Field(default=900.0, gt=0)
    retention_days: float = Field(default=7.0, gt=0)
    ledger_retention_days: float = Field(
        default=90.0,
        gt=0,
        description="ledger entries older are trimmed (`gateway ledger export` first)",
    )
    backend_concurrency: int = Field(
        default=256, ge=1, description="upstream calls in flight per backend"
    )
    breaker_threshold: int = Field(default=3, ge=1, description="failures in a row that open")
    breaker_cooldown_seconds: float = Field(default=30.0, gt=0)
    poll_interval: float | None = Field(
        default=None, gt=0, description="override every backend's recommended poll pace (s)"
    )
    callback_fallback_seconds: float = Field(
        default=30.0,
        gt=0,
        description="poll a job whose upstream calls back this often anyway (s)",
    )
    inprocess_workers: bool = Field(default=True, description="`gateway serve` runs jobs too")
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)

    # Result cache (docs/api.md#cache)
    cache_enabled: bool = True
    cache_disabled_services: list[str] = Field(default_factory=list)

    # Webhooks: attempt n+1 waits webhook_retry_delays[n] seconds (jittered), the job's
    # record kept longer (retention)
    webhook_retry_delays: list[float] = Field(default_factory=lambda: list(WEBHOOK_RETRY_DELAYS))
    webhook_timeout: float = Field(default=10.0, gt=0)
    webhook_concurrency: int = Field(default=64, ge=1)
    # of those, at most this many for one account's receivers (a dead one holds each for
    # the whole timeout): the rest wait, not the other accounts' webhooks
    webhook_account_concurrency: int = Field(default=8, ge=1)

    # OpenAI's images API (docs/api.md#openai): its own model names, as served here. A
    # name or a `prefix*` -> a service or backend; exact names win, then the longest
    # prefix. Code written for OpenAI keeps its `model` when it switches.
    openai_models: dict[str, str] = Field(
        default_factory=lambda: dict.fromkeys(
            ("gpt-image-*", "chatgpt-image-*", "dall-e-*"), "flux-krea"
        ),
        description="OpenAI model names (or prefixes ending in *) -> a service or backend",
    )

    # Answers that wait for their job (docs/api.md#waiting)
    sync_wait_seconds: float = Field(
        default=300.0, gt=0, le=3600, description="longest an OpenAI-style request waits"
    )

    # HTTP guards
    max_body_bytes: int = 64 * 1024
    client_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="a request's headers must arrive within this, and its body within this "
        "of its headers; a client that reads nothing of an answer waiting on it for this "
        "long is dropped (gateway/client_deadlines.py)",
    )
    read_rpm: int = Field(default=600, ge=1, description="reads (job, jobs, me) per key a minute")
    client_tokens_max: int = Field(
        default=100_000,
        ge=1,
        description="client tokens a key may hold live at once (each a record in Redis "
        "until it expires)",
    )
    read_rpm_per_job: int = Field(
        default=70,
        ge=0,
        description="the read limit is at least this times the jobs a key may run at once "
        "(each polled every second, as Segmind's SDK does, and its result fetched)",
    )
    client_tokens_read_factor: int = Field(
        default=100,
        ge=1,
        description="all of a key's client tokens together read at most this many times "
        "the key's read limit a minute (each token also reads within that limit alone)",
    )

    # Automatic persisted queries (docs/api.md#persisted-queries), shared in Redis
    apq_max_documents: int = Field(
        default=5_000, ge=1, description="documents kept; the least recently used go first"
    )
    apq_max_document_bytes: int = Field(
        default=16 * 1024, ge=1, description="a longer document is refused (413), not stored"
    )

    # Prometheus metrics (docs/api.md#metrics): GET /metrics of `gateway serve`, and
    # `gateway worker` on its own port
    metrics_enabled: bool = Field(default=True, description="count and serve the metrics")
    metrics_token: SecretStr | None = Field(
        default=None, description="bearer token GET /metrics asks for; unset: none asked"
    )
    metrics_port: int | None = Field(
        default=None, ge=1, le=65535, description="`gateway worker` serves /metrics here"
    )
    metrics_refresh_seconds: float = Field(
        default=5.0, ge=0, description="the gauges read from Redis are read at most this often"
    )

    # Logs (docs/api.md#logs-and-traces): the `request` line of every HTTP answer
    access_log: bool = Field(default=True, description="one JSON log line per HTTP request")

    # Filled from the TOML file named by GATEWAY_CONFIG
    plans: dict[str, PlanLimits] = Field(default_factory=lambda: dict(DEFAULT_PLANS))
    routes: dict[str, list[str]] = Field(default_factory=lambda: dict(DEFAULT_ROUTES))

    @field_validator(
        "public_url", "callback_url", "storage_public_url", "s3_endpoint_url", "s3_region"
    )
    @classmethod
    def _strip_slash(cls, v: str | None) -> str | None:
        return v.rstrip("/") if v else None  # empty (compose's `${X:-}`) is unset

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, v: str) -> str:
        """Each entry as browsers spell an Origin (`gateway/origins.py`), or `*`."""
        spelled = []
        for listed in filter(None, (o.strip() for o in v.split(","))):
            as_sent = listed if listed == "*" else origin(listed)
            if as_sent is None:
                raise ValueError(f"{listed!r} is not an origin like https://app.example.com")
            spelled.append(as_sent)
        return ",".join(dict.fromkeys(spelled))

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str | None) -> str | None:
        """redis-py's URL schemes, checked here: redis-py's own refusal comes only when the
        first process connects, as a traceback."""
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @field_validator("url_allow_cidrs")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        _networks(v)  # refused at start-up, not at the first webhook
        return v

    @field_validator("storage_url")
    @classmethod
    def _s3_url(cls, v: str | None) -> str | None:
        if not v:
            return None
        scheme, _, rest = v.partition("://")
        if scheme != "s3" or not rest.partition("/")[0]:
            raise ValueError(f"must be s3://BUCKET or s3://BUCKET/PREFIX, not {v!r}")
        return v.rstrip("/")

    @property
    def ledger_keep_ms(self) -> int:
        """How long a ledger entry is kept (ledger_retention_days), in ms."""
        return int(self.ledger_retention_days * 86_400_000)

    @property
    def storage_bucket(self) -> tuple[str, str]:
        """`storage_url`'s bucket and key prefix (no slash at either end; may be empty)."""
        bucket, _, prefix = (self.storage_url or "").removeprefix("s3://").partition("/")
        return bucket, prefix.strip("/")

    @property
    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"

    @property
    def allowed_origins(self) -> tuple[str, ...]:
        """`cors_origins` (spelled as browsers send them); ("*",) for any."""
        origins = tuple(o for o in self.cors_origins.split(",") if o)
        if "*" in origins or (not origins and self.dev):
            return ("*",)
        return origins

    @functools.cached_property
    def allow_cidrs(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """`url_allow_cidrs` parsed, once (read at each webhook's check)."""
        return _networks(self.url_allow_cidrs)


def _networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """A comma-separated list of addresses or networks."""
    networks = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(
                    f"{part[:64]!r} is not an address or network (comma-separated, "
                    "like 10.0.0.0/8,fd00::/8)"
                ) from None
    return networks


#: Where Docker and Kubernetes mount secrets: a file there named as a setting's variable
#: (`gateway_admin_token`, any case) holds its value, unless the environment sets it.
SECRETS_DIR = "/run/secrets"


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and the secrets directory, GATEWAY_SECRETS_DIR or
    SECRETS_DIR, when there is one) once; merge plans and routes from the TOML file if
    one is named."""
    secrets = os.environ.get("GATEWAY_SECRETS_DIR") or SECRETS_DIR
    found = secrets if Path(secrets).is_dir() else None  # (pydantic warns of a missing one)
    # BaseSettings' own init options are not among the fields mypy sees.
    settings = Settings(_secrets_dir=found, **overrides)  # type: ignore[call-arg]
    if settings.config:
        data = tomllib.loads(Path(settings.config).read_text())
        if other := sorted(set(data) - {"plans", "routes"}):
            raise ValueError(
                f"{other[0]} in {settings.config}: not a table it takes (plans, routes)"
            )
        plans = dict(settings.plans)
        for name, limits in (data.get("plans") or {}).items():
            if not isinstance(limits, dict):
                raise ValueError(f"plans.{name} in {settings.config} must be a table of limits")
            try:
                plans[name] = PlanLimits(**limits)
            except ValidationError as exc:  # named as the file names it, not as a variable
                first = exc.errors()[0]
                where = ".".join(str(part) for part in (name, *first["loc"]))
                raise ValueError(f"plans.{where} in {settings.config}: {first['msg']}") from None
        routes = dict(settings.routes)
        routes.update(data.get("routes") or {})
        settings = settings.model_copy(update={"plans": plans, "routes": routes})
    for service, backends in settings.routes.items():
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"route {service!r} names unknown backends {unknown}")
    return settings
