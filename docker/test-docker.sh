#!/usr/bin/env bash
# `make test-docker`: build the CPU server image from a locally made base, run it with a model repository,
# infer over gRPC and REST from outside, stop it with SIGTERM, clean up. Needs a container engine: uses
# $DOCKER_HOST if it answers, else (as root) installs Debian's docker.io and starts dockerd with the vfs
# storage driver. Without any engine it says so loudly and fails under CI=true (never a silent pass).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
work=/tmp/foldserve-docker
image=foldserve-server:test
base=foldserve-base:bookworm
started_daemon=

fail_no_engine() {
  echo "======================================================================" >&2
  echo "NO CONTAINER ENGINE: $1" >&2
  echo "test-docker did NOT run. Install docker (or run as root so it can be installed)." >&2
  echo "======================================================================" >&2
  if [ "${CI:-}" = "true" ]; then exit 1; fi
  exit 0
}

docker_cli() { if [ -x /usr/bin/docker ]; then /usr/bin/docker "$@"; else docker "$@"; fi; }

cleanup() {
  docker_cli rm -f foldserve-test >/dev/null 2>&1 || true
  [ -n "${KEEP_IMAGE:-}" ] || docker_cli rmi -f "$image" >/dev/null 2>&1 || true
  if [ -n "$started_daemon" ] && [ -f "$work/docker.pid" ]; then
    kill "$(cat "$work/docker.pid")" 2>/dev/null || true
    sleep 2
  fi
}
trap cleanup EXIT

if ! docker_cli info >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then fail_no_engine "no engine answers and we are not root to start one"; fi
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/docker ]; then
    command -v apt-get >/dev/null || fail_no_engine "no dockerd and no apt-get to install it"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io debootstrap >/dev/null; } \
      || fail_no_engine "apt-get could not install docker.io"
  fi
  mkdir -p "$work"
  export DOCKER_HOST="unix://$work/docker.sock"
  dockerd --storage-driver vfs --iptables=false -H "$DOCKER_HOST" --data-root "$work/data" \
    --exec-root "$work/exec" --pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
  started_daemon=1
  for _ in $(seq 60); do docker_cli info >/dev/null 2>&1 && break; sleep 1; done
  docker_cli info >/dev/null 2>&1 || { tail -20 "$work/dockerd.log" >&2; fail_no_engine "dockerd did not start"; }
fi
echo "container engine: $(docker_cli version --format '{{.Server.Version}}')"

command -v debootstrap >/dev/null || fail_no_engine "debootstrap is missing (needed to make a base image offline)"
BASE_IMAGE="$base" PY="$PY" docker/build-image.sh "$image"       # what `make image` runs

# docker-compose 1.29 (Debian's) checks docker/compose.yaml against its schema in tests/docker
if ! command -v docker-compose >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null 2>&1; } \
    || echo "docker-compose could not be installed: the compose check will fail" >&2
fi

FOLDSERVE_DOCKER_IMAGE="$image" FOLDSERVE_DOCKER_CLI="$(command -v /usr/bin/docker || command -v docker)" \
  "$PY" -m pytest -q -m docker tests/docker
