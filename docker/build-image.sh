#!/usr/bin/env bash
# `make image`: the CPU server image, built where no image registry is reachable: its base is a Debian image made
# locally (docker/make-base.sh, with debootstrap; BASE_IMAGE=... to use another) and its Python packages come
# from a wheelhouse of the serve-cpu extra (docker/wheels), so the build itself needs no network.
#   docker/build-image.sh [IMAGE]        (a running container engine: $DOCKER_HOST or the default socket)
# `make test-docker` builds its image with this script, then runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
image=${1:-foldserve-server:latest}
base=${BASE_IMAGE:-foldserve-base:bookworm}

docker_cli() { if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi; }

if ! docker_cli info >/dev/null 2>&1; then
  echo "make image: no container engine answers (DOCKER_HOST=${DOCKER_HOST:-unset}): start one, or run" \
       "\`make test-docker\` as root, which installs and starts dockerd itself" >&2
  exit 2
fi
if ! docker_cli image inspect "$base" >/dev/null 2>&1; then
  if [ "$base" != "foldserve-base:bookworm" ]; then
    echo "make image: base image $base is not here, and no registry may be reachable to pull it" >&2
    exit 2
  fi
  command -v debootstrap >/dev/null || { echo "make image: making the base image needs debootstrap (apt-get install debootstrap)" >&2; exit 2; }
  echo "making base image $base with debootstrap (about 2 minutes)"
  DOCKER=$(command -v /usr/bin/docker || command -v docker) docker/make-base.sh "$base"
fi

# a wheelhouse of the `serve-cpu` extra (and the build backend), so the image builds without network access
"$PY" -m pip download -q --only-binary=:all: -d docker/wheels -c constraints.txt setuptools wheel >/dev/null
"$PY" -m pip wheel -q -w docker/wheels -c constraints.txt ".[serve-cpu]" >/dev/null
rm -f docker/wheels/foldserve-*.whl  # the image builds the project from its source
t0=$(date +%s)
DOCKER_BUILDKIT=1 docker_cli build -q --network host -f docker/server.Dockerfile \
  --build-arg BASE_IMAGE="$base" --build-arg PIP_NO_INDEX=1 -t "$image" . >/dev/null
echo "built $image in $(( $(date +%s) - t0 )) s, size $(docker_cli image inspect "$image" --format '{{.Size}}' | awk '{printf "%.0f MB", $1/1e6}')"
