#!/usr/bin/env bash
# CI only: build the local base images that stand in for python:3.11-slim,
# since no container registry is reachable here.
#
#   loss-service-ci/base:bookworm     Debian bookworm minbase (debootstrap) with
#                                     python3 + venv and the CA bundle pip trusts
#                                     on this machine (to reach PyPI from builds).
#   loss-service-ci/builder:bookworm  the base plus the local torch CPU wheel(s)
#                                     in /wheels, PIP_FIND_LINKS=/wheels.
#
# Idempotent: an image whose inputs (CA bundle, wheels, this script) are
# unchanged is kept. FORCE=1 rebuilds.
# Env: DOCKER (docker client), CI_WORK (scratch dir), WHEEL_DIR (default /opt/wheels),
#      DEBIAN_MIRROR (default: the one apt uses here).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DOCKER=${DOCKER:-docker}
CI_WORK=${CI_WORK:-/var/tmp/loss-service-ci}
WHEEL_DIR=${WHEEL_DIR:-/opt/wheels}
BASE_TAG=loss-service-ci/base:bookworm
BUILDER_TAG=loss-service-ci/builder:bookworm

ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -n "$ca" ] && [ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
if [ -z "${DEBIAN_MIRROR:-}" ]; then
  DEBIAN_MIRROR=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
fi
shopt -s nullglob
wheels=("$WHEEL_DIR"/torch-*-cp311-*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no torch cp311 wheel in $WHEEL_DIR" >&2; exit 1; }

label() { "$DOCKER" image inspect -f '{{ index .Config.Labels "ci.inputs" }}' "$1" 2>/dev/null || true; }

base_inputs=$( { sha256sum "$ca" "$here/build-base-images.sh" | cut -d' ' -f1; echo "$DEBIAN_MIRROR"; } | sha256sum | cut -c1-16)
if [ "${FORCE:-0}" != 1 ] && [ "$(label "$BASE_TAG")" = "$base_inputs" ]; then
  echo "base image $BASE_TAG is up to date"
else
  need=()
  command -v debootstrap >/dev/null || need+=(debootstrap)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  rootfs="$CI_WORK/rootfs"
  rm -rf "$rootfs"; mkdir -p "$CI_WORK"
  echo "debootstrap bookworm from $DEBIAN_MIRROR"
  t0=$(date +%s)
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$DEBIAN_MIRROR" > "$CI_WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$CI_WORK/debootstrap.log"; exit 1; }
  echo "debootstrap took $(( $(date +%s) - t0 ))s"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  cp "$ca" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  tar -C "$rootfs" --numeric-owner -c . | "$DOCKER" import \
    --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" \
    --change "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt" \
    --change "LABEL ci.inputs=$base_inputs" \
    --change 'CMD ["python3"]' \
    - "$BASE_TAG" >/dev/null
  rm -rf "$rootfs"
  echo "built $BASE_TAG"
fi

builder_inputs=$( { echo "$base_inputs"; ls -l --time-style=+%s "${wheels[@]}"; sha256sum "$here/builder.Dockerfile" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
if [ "${FORCE:-0}" != 1 ] && [ "$(label "$BUILDER_TAG")" = "$builder_inputs" ]; then
  echo "builder image $BUILDER_TAG is up to date"
else
  ctx="$CI_WORK/builder-context"
  rm -rf "$ctx"; mkdir -p "$ctx/wheels"
  cp "${wheels[@]}" "$ctx/wheels/"
  DOCKER_BUILDKIT=0 "$DOCKER" build -q -f "$here/builder.Dockerfile" \
    --build-arg BASE_IMAGE="$BASE_TAG" --label "ci.inputs=$builder_inputs" \
    -t "$BUILDER_TAG" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "built $BUILDER_TAG"
fi
