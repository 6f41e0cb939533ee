#!/usr/bin/env bash
# Build a Python base image without any container registry: a minimal Debian rootfs with python3 and venv,
# made by debootstrap from Debian's package mirror, imported as an image. Needs root, debootstrap, Docker.
#
# Real users normally do not need this: the Dockerfile's default base is the official Python image.
set -euo pipefail
tag="${1:-mtls-mesh-base:local}"
suite="${DEBIAN_SUITE:-bookworm}"   # bookworm's python3 is 3.11

if docker image inspect "$tag" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
    echo "$tag already exists (FORCE=1 to rebuild)"
else
    [ "$(id -u)" = 0 ] || { echo "base-image: debootstrap needs root (try: sudo make base-image)" >&2; exit 1; }
    command -v debootstrap >/dev/null || { echo "base-image: install debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs="$(mktemp -d)"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    # An imported rootfs has no environment at all; give it the PATH every image has.
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' - "$tag" >/dev/null
    echo "built $tag ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%d MB", $1/1e6}'))"
fi
echo "use it with: PYTHON_IMAGE=$tag make up"
