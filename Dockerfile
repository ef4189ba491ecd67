# loss-service container image.
#
#   docker build -t loss-service:0.1.0 .                        # CPU (default)
#   docker build -t loss-service:0.1.0-cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 \
#     --build-arg TORCH_VARIANT=cu128 .                         # CUDA
#
# Build arguments:
#   BASE_IMAGE       image both stages start from (default python:3.11-slim);
#                    one without Python (a CUDA runtime image) gets the
#                    distribution's python3 installed.
#   BUILDER_IMAGE    image of the build stage (default BASE_IMAGE); it must
#                    have Python at the same path as BASE_IMAGE (e.g. BASE_IMAGE
#                    plus a local wheel directory named by PIP_FIND_LINKS).
#   TORCH_VERSION    torch release to install (default 2.13.0).
#   TORCH_VARIANT    cpu (default) or a CUDA tag of the PyTorch wheel index
#                    (cu126, cu128, cu130, ...).
#   TORCH_INDEX_URL  index torch comes from (default: the PyTorch wheel index
#                    for TORCH_VARIANT).
#
# The final stage holds the base image, the virtualenv /opt/venv and nothing
# else: no compiler, no source tree, no tests. It runs as UID 10001.

ARG BASE_IMAGE=python:3.11-slim
ARG BUILDER_IMAGE=${BASE_IMAGE}

# ---------------------------------------------------------------- build stage
FROM ${BUILDER_IMAGE} AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive

# A CUDA runtime base has no Python: take the distribution's.
# hadolint ignore=DL3008
RUN if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from its own index, so that the service's `torch>=...` is
# already satisfied by the build chosen here.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN echo "torch==${TORCH_VERSION}" > /tmp/torch-pin.txt \
    && pip install --no-cache-dir --constraint /tmp/torch-pin.txt . \
    && python -c "import torch, service.main; print('torch', torch.__version__)"

# -------------------------------------------------------------- final stage
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /tmp --shell /usr/sbin/nologin app

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    LOSS_SERVICE_HOST=0.0.0.0 \
    LOSS_SERVICE_PORT=8000 \
    LOSS_SERVICE_GRPC_PORT=8001 \
    LOSS_SERVICE_WORKERS=1

USER 10001:10001
WORKDIR /tmp
# HTTP (v1 JSON, OIP REST) and OIP gRPC
EXPOSE 8000 8001

HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LOSS_SERVICE_PORT', '8000'), timeout=4)"]

# Exec form: the server is PID 1 and receives SIGTERM itself.
ENTRYPOINT ["/opt/venv/bin/loss-service"]
CMD ["serve"]
