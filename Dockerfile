# The gateway: `gateway serve` by default; `gateway worker` for worker-only containers.
# Runtime dependencies only (requirements.lock; the test tools are in requirements-dev.lock).
FROM python:3.11-slim AS build
WORKDIR /app
COPY requirements.lock ./
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY schema ./schema
RUN /venv/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home /data gateway && mkdir -p /data/outputs \
    && chown -R gateway /data
COPY --from=build /venv /venv
ENV PATH=/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_STORAGE_DIR=/data/outputs
USER gateway
WORKDIR /data
EXPOSE 8000
# `gateway serve`'s /healthz, or a worker's on GATEWAY_METRICS_PORT (which a worker-only
# container must set for its health to be known).
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "gateway.healthcheck"]
STOPSIGNAL SIGTERM
CMD ["gateway", "serve"]
