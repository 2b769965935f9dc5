# foldserve CPU server image: onnxruntime, gRPC :8001 and REST :8000, no torch.
#
#   docker build -f docker/server.Dockerfile -t foldserve-server .
#   docker run -p 8000:8000 -p 8001:8001 -v $PWD/model_repository:/models:ro foldserve-server
#
# The image installs the project's `serve-cpu` extra (pyproject.toml) pinned by constraints.txt: the same
# dependency list as `pip install 'foldserve[serve-cpu]'`, no hand-kept copy. Only the ground layer, the
# server and the CLI are copied in, so the train/fold commands say they are not installed.
# BASE_IMAGE is a build argument so the image builds from any Debian-like Python 3 base (our tests build it
# from a locally made one, as no registry is reachable there). docker/wheels/ may hold a wheelhouse for
# offline builds (with --build-arg PIP_NO_INDEX=1); it is empty in the repository.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_NO_INDEX=
ENV PIP_NO_INDEX=${PIP_NO_INDEX} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY docker/wheels/ /tmp/wheels/
COPY pyproject.toml constraints.txt README.md /src/
COPY foldserve/ /src/foldserve/
COPY server/ /src/server/
COPY cli/ /src/cli/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --find-links /tmp/wheels -c /src/constraints.txt "/src[serve-cpu]" \
 && find /opt/venv -name "__pycache__" -type d -prune -exec rm -rf {} + \
 && rm -rf /opt/venv/lib/python3*/site-packages/onnx/backend/test/data

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="foldserve-server" \
      org.opencontainers.image.description="KServe v2 gRPC/REST server for BN-folded ONNX models (CPU)"
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 foldserve \
 && useradd --system --uid 10001 --gid foldserve --no-create-home --shell /usr/sbin/nologin foldserve \
 && mkdir -p /models && chown foldserve:foldserve /models
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    FOLDSERVE_HOST=0.0.0.0 FOLDSERVE_REPOSITORY=/models FOLDSERVE_PROVIDER=cpu
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('FOLDSERVE_HTTP_PORT', '8000'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["foldserve", "serve"]
