#!/usr/bin/env bash
# Make the base image that agent images (examples/agents/*/Dockerfile) and the gateway's own
# image build FROM: Debian bookworm with python3 (with venv) and coreutils' `timeout`.
#
# First tries `docker pull python:3.11-slim-bookworm` (short timeout) and tags it; where no
# Docker registry is reachable, builds the same kind of image locally with debootstrap from
# Debian's package mirror and `docker import` (about a minute).
#
# Usage: scripts/build-base-image.sh [--force] [--no-pull]
#   --force    rebuild even when the image already exists
#   --no-pull  skip the registry and build with debootstrap straight away
# Environment:
#   AGENT_GATEWAY_BASE_IMAGE  image to produce (default agent-gateway/python-base:bookworm)
#   AGENT_GATEWAY_PULL_IMAGE  image tried first (default python:3.11-slim-bookworm)
#   DEBIAN_MIRROR             mirror for debootstrap (default http://deb.debian.org/debian)
#   PULL_TIMEOUT              seconds allowed for the pull (default 20)
set -euo pipefail

IMAGE="${AGENT_GATEWAY_BASE_IMAGE:-agent-gateway/python-base:bookworm}"
PULL_IMAGE="${AGENT_GATEWAY_PULL_IMAGE:-python:3.11-slim-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PULL_TIMEOUT="${PULL_TIMEOUT:-20}"
SUITE="bookworm"

log() { printf 'build-base-image: %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

force=0
pull=1
for arg in "$@"; do
    case "$arg" in
    --force) force=1 ;;
    --no-pull) pull=0 ;;
    -h | --help)
        sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument: $arg (try --help)" ;;
    esac
done

command -v docker >/dev/null 2>&1 || die "the docker CLI is not installed (run scripts/setup.sh)"
docker version --format '{{.Server.APIVersion}}' >/dev/null 2>&1 ||
    die "no Docker engine answers (run scripts/setup.sh, or start dockerd)"

if [ "$force" -eq 0 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists (use --force to rebuild)"
    exit 0
fi

# The image must run `python3` (with venv and ssl) and `timeout` from PATH.
check_image() {
    docker run --rm --network none --entrypoint /bin/sh "$1" -c \
        'command -v python3 >/dev/null && command -v timeout >/dev/null &&
         timeout 10 python3 -c "import venv, ssl, sqlite3, json"' >/dev/null
}

if [ "$pull" -eq 1 ]; then
    log "trying docker pull $PULL_IMAGE (timeout ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" docker pull --quiet "$PULL_IMAGE" >/dev/null 2>&1; then
        docker tag "$PULL_IMAGE" "$IMAGE"
        check_image "$IMAGE" || die "$PULL_IMAGE lacks python3 or timeout"
        log "tagged $PULL_IMAGE as $IMAGE"
        exit 0
    fi
    log "pull failed (no registry reachable?); building $IMAGE with debootstrap instead"
fi

[ "$(id -u)" -eq 0 ] || die "building the base image with debootstrap needs root"
if ! command -v debootstrap >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "debootstrap is not installed and there is no apt-get"
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null 2>&1 ||
        { apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; } ||
        die "could not install debootstrap"
fi

# /var/tmp rather than /tmp: /tmp may be a tmpfs mounted nodev, which debootstrap cannot use.
workdir="$(mktemp -d "${BASE_IMAGE_TMPDIR:-/var/tmp}/agent-gateway-rootfs.XXXXXX")"
rootfs="$workdir/rootfs"
cleanup() {
    # debootstrap mounts /proc and /sys inside the target and may leave them mounted when it
    # fails: unmount everything below the work dir (deepest first) before deleting it.
    local mnt
    if [ -r /proc/mounts ]; then
        awk -v dir="$workdir/" 'index($2, dir) == 1 { print $2 }' /proc/mounts | sort -r |
            while IFS= read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    fi
    rm -rf --one-file-system "$workdir"
}
trap cleanup EXIT

started=$SECONDS
log "debootstrap $SUITE from $MIRROR (about a minute)"
if ! debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$MIRROR" >"$workdir/debootstrap.log" 2>&1; then
    tail -n 20 "$workdir/debootstrap.log" >&2
    [ -f "$rootfs/debootstrap/debootstrap.log" ] && tail -n 20 "$rootfs/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (mirror $MIRROR; set DEBIAN_MIRROR to use another)"
fi

# Keep the image small: no package caches, lists, docs, man pages or translations.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/var/tmp/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
    "$rootfs"/debootstrap
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +

log "importing the root file system as $IMAGE"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' \
    -c 'CMD ["python3"]' \
    -m "debootstrap --variant=minbase $SUITE ($MIRROR) by scripts/build-base-image.sh" \
    - "$IMAGE" >/dev/null

check_image "$IMAGE" || die "the imported image $IMAGE cannot run python3 or timeout"
size="$(docker image inspect "$IMAGE" --format '{{.Size}}')"
log "built $IMAGE ($((size / 1024 / 1024)) MiB) in $((SECONDS - started)) s"
