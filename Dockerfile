# syntax=docker/dockerfile:1
# clipia-proxy image: a builder stage makes a virtualenv from the wheel; the final stage is
# python:3.11-slim with that venv only (no compilers, no pip cache), running as uid 10001.
#   docker build -t clipia-proxy:0.1.0 .
#   docker run --rm -e CLIPIA_API_KEY -v "$PWD/config.yaml:/etc/clipia-proxy/config.yaml:ro" \
#     -p 8080:8080 -p 9090:9090 clipia-proxy:0.1.0
# The Helm chart (deploy/helm/clipia-proxy) runs it with a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers only for dependencies without a wheel for this platform; they stay in this stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clipia_proxy ./clipia_proxy
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && wheel="$(ls /wheels/clipia_proxy-*.whl)" \
    && /opt/venv/bin/pip install "${wheel}[redis,postgres]" \
    && /opt/venv/bin/clipia-proxy --version \
    && /opt/venv/bin/pip uninstall -y pip setuptools

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="clipia-proxy" \
      org.opencontainers.image.description="A company gateway in front of Clipia AI Gateway" \
      org.opencontainers.image.licenses="Proprietary"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CLIPIA_PROXY_ADMIN_PORT=9090
RUN groupadd --system --gid 10001 clipia \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin clipia \
    && mkdir -p /etc/clipia-proxy /var/lib/clipia-proxy \
    && chown 10001:10001 /var/lib/clipia-proxy
COPY --from=builder /opt/venv /opt/venv
# A relative store.sqlite_path (the default ./clipia-proxy.db) lands in this writable directory.
WORKDIR /var/lib/clipia-proxy
USER 10001:10001
EXPOSE 8080 9090
# No curl in slim: python asks the admin port. Kubernetes ignores this and uses the chart's probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CLIPIA_PROXY_ADMIN_PORT', '9090') + '/healthz', timeout=2)"]
ENTRYPOINT ["clipia-proxy"]
CMD ["serve", "--config", "/etc/clipia-proxy/config.yaml"]
