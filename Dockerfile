# syntax=docker/dockerfile:1
# llm-gateway image: `docker build -t llm-gateway:0.1.0 .`
# The base is pinned to an exact release; pin it by digest too where you build (the digest of the
# multi-architecture index: `docker buildx imagetools inspect python:3.11.14-slim-bookworm`), e.g.
# --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- build: install the package and its runtime dependencies into a virtualenv ---------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the lock (runtime only, no [dev] extra, exact versions): this layer is
# reused until requirements.lock changes, so a code change rebuilds only the layers below. Every
# native dependency (uvloop, httptools, orjson, pydantic-core) ships manylinux wheels.
COPY requirements.lock ./
RUN pip install --no-deps -r requirements.lock
# The request path is compiled with mypyc (setup.py; docs/benchmarks.md, "The compiled build": about a
# third fewer instructions per request); --build-arg LLMGW_COMPILE=0 builds the pure-Python package.
# Compiling needs a C compiler: in this stage only, before the source, so a code change reuses the layer.
ARG LLMGW_COMPILE=1
RUN if [ "$LLMGW_COMPILE" = 1 ]; then \
      apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
# Then the package itself, without resolving anything again; `pip check` fails the build when the
# lock no longer satisfies pyproject.toml. pip leaves the venv afterwards.
COPY pyproject.toml README.md setup.py ./
COPY scripts/compile ./scripts/compile
COPY gateway ./gateway
RUN LLMGW_COMPILE=$LLMGW_COMPILE pip install --no-deps . \
 && pip check \
 && pip uninstall --yes pip \
 && python -m compileall -q /opt/venv/lib

# ---- runtime: the venv on a clean slim base, as a non-root user -----------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 llmgw \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin llmgw
COPY --from=build /opt/venv /opt/venv
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# Docker and Compose use this; Kubernetes uses the chart's probes instead. Override the URL when the
# config moves the port: -e LLMGW_HEALTHCHECK_URL=http://127.0.0.1:9090/healthz
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('LLMGW_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=2)"]
ENTRYPOINT ["llmgw"]
CMD ["serve", "--config", "/etc/llmgw/config.yaml", "--host", "0.0.0.0", "--port", "8080"]
