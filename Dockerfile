# syntax=docker/dockerfile:1
#
# One image for every role: `rebasin serve` (default), `rebasin worker` and
# `rebasin db upgrade`.
#
#   CPU build (API, migrations, CPU workers):
#     docker build -t rebasin:0.1.0-cpu .
#   CUDA build (GPU workers); the CUDA runtime libraries come with PyTorch's
#   CUDA wheels, the driver comes from the host (NVIDIA container toolkit):
#     docker build --build-arg TORCH_VARIANT=cu128 -t rebasin:0.1.0-cuda .
#
# Base images are pinned by tag; pin them by digest too in your registry
# mirror (`python:3.12.8-slim-bookworm@sha256:...`) for reproducible builds.

ARG PYTHON_IMAGE=python:3.12.8-slim-bookworm

# --------------------------------------------------------------------------
# Stage 1: build a self-contained virtual environment.
# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# cpu | cu126 | cu128 | ... : the PyTorch wheel index to install torch from.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index that matches the variant, so that the
# application's `torch>=...` requirement is already satisfied and never pulls
# the multi-GB default wheel.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /src
COPY . /src
# pip compiles bytecode at install time; it is kept, since the runtime root
# filesystem is read-only and imports (torch) would otherwise recompile on
# every start.
RUN pip install /src \
    && pip check \
    && rm -rf /opt/venv/lib/python*/site-packages/torch/include

# --------------------------------------------------------------------------
# Stage 2: runtime. No compilers, no build tools, no source tree.
# --------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu
LABEL org.opencontainers.image.title="rebasin" \
      org.opencontainers.image.description="Merge neural-network checkpoints modulo permutation symmetries (Git Re-Basin)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.rebasin.torch-variant="${TORCH_VARIANT}"

# Fixed numeric ids: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 rebasin \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/rebasin \
       --create-home --shell /usr/sbin/nologin rebasin \
    && mkdir -p /var/lib/rebasin /app \
    && chown 10001:10001 /var/lib/rebasin

COPY --from=builder /opt/venv /opt/venv

# Caches go to /tmp so that the root filesystem can be mounted read-only
# (the Helm chart mounts emptyDirs on /tmp and /var/lib/rebasin).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/rebasin \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    REBASIN_DATA_DIR=/var/lib/rebasin

# An empty working directory: pydantic-settings reads ./.env, and none should
# be picked up by accident.
WORKDIR /app
USER 10001:10001
EXPOSE 8000
VOLUME ["/var/lib/rebasin"]

# Python-based, no curl in the image. Only meaningful for `serve`; worker and
# migration containers override or disable it (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('HEALTHCHECK_URL', 'http://127.0.0.1:8000/healthz'), timeout=4)"]

ENTRYPOINT ["rebasin"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
