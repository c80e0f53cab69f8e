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
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('GATEWAY_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["gateway", "serve"]
