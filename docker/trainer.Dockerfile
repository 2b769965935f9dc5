# foldserve trainer image: torch (CPU build), the trainer and folding. Runs train -> fold -> verify into a
# mounted model repository:
#
#   docker build -f docker/trainer.Dockerfile -t foldserve-trainer .
#   docker run -v $PWD/model_repository:/models foldserve-trainer
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE}
ARG PIP_NO_INDEX=
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_INDEX=${PIP_NO_INDEX} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/foldserve
COPY pyproject.toml README.md constraints.txt ./
COPY foldserve/ foldserve/
COPY trainer/ trainer/
COPY folding/ folding/
COPY server/ server/
COPY bench/ bench/
COPY cli/ cli/
COPY docker/wheels/ /tmp/wheels/
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --find-links /tmp/wheels --extra-index-url "${TORCH_INDEX}" -c constraints.txt ".[train]" \
 && rm -rf /tmp/wheels \
 && groupadd --system --gid 10001 foldserve \
 && useradd --system --uid 10001 --gid foldserve --create-home foldserve \
 && mkdir -p /models /runs && chown foldserve:foldserve /models /runs
ENV PATH=/opt/venv/bin:$PATH
USER 10001:10001
VOLUME ["/models", "/runs"]
ENTRYPOINT ["foldserve", "pipeline", "--repository", "/models", "--runs", "/runs"]
CMD ["--name", "digits_resnet"]
