# foldserve GPU server image: onnxruntime-gpu (CUDA 13 + cuDNN 9) picks the CUDA execution provider when the
# container runs with --gpus. No torch.
#
#   docker build -f docker/server-gpu.Dockerfile -t foldserve-server-gpu .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -v $PWD/model_repository:/models:ro foldserve-server-gpu
ARG BASE_IMAGE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=
ENV PIP_NO_INDEX=${PIP_NO_INDEX} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml constraints.txt README.md /src/
COPY foldserve/ /src/foldserve/
COPY server/ /src/server/
COPY cli/ /src/cli/
# the `serve` extra: onnxruntime-gpu, pinned by constraints.txt
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --find-links /tmp/wheels -c /src/constraints.txt "/src[serve]"

FROM ${BASE_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 foldserve \
 && useradd --system --uid 10001 --gid foldserve --no-create-home --shell /usr/sbin/nologin foldserve \
 && mkdir -p /models && chown foldserve:foldserve /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    FOLDSERVE_HOST=0.0.0.0 FOLDSERVE_REPOSITORY=/models FOLDSERVE_PROVIDER=auto \
    NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('FOLDSERVE_HTTP_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["foldserve", "serve"]
