#!/usr/bin/env bash
# Make a local Debian bookworm base image with Python 3 (for machines that cannot pull python:3.11-slim).
#   docker/make-base.sh [IMAGE_NAME]      (root; needs debootstrap and a running docker engine)
set -euo pipefail
name=${1:-foldserve-base:bookworm}
docker=${DOCKER:-docker}
root=$(mktemp -d /tmp/foldserve-rootfs.XXXXXX)
chmod 755 "$root"  # it becomes the image's /: mktemp made it 0700
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" >/dev/null
# trim what a runtime image does not need: package caches and lists, docs, man pages, locales
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
tar -C "$root" -c . | "$docker" import -c 'ENV LANG=C.UTF-8' - "$name" >/dev/null
echo "$name"
