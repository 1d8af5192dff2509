#!/usr/bin/env bash
# Makes sure a `redis:7.0` image exists for the tests, the benchmark and the examples.
#
# Order of preference: an image that is already there; `docker pull` (users with a
# registry); and, where nothing can be pulled, a local build: a Debian bookworm rootfs with
# redis-server, made by debootstrap and turned into an image by `docker import`.
set -euo pipefail

IMAGE="${REDIS_IMAGE:-redis:7.0}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "redis-image: $IMAGE is present"
  exit 0
fi

if timeout 60 docker pull "$IMAGE" >/dev/null 2>&1; then
  echo "redis-image: pulled $IMAGE"
  exit 0
fi

echo "redis-image: $IMAGE cannot be pulled; building it from Debian $SUITE with debootstrap"
if ! command -v debootstrap >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "redis-image: debootstrap is missing; install it (apt-get install debootstrap) or run as root" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

rootfs="$(mktemp -d /tmp/redis-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=redis-server "$SUITE" "$rootfs" "$MIRROR" >/tmp/redis-image-debootstrap.log 2>&1 || {
  echo "redis-image: debootstrap failed; see /tmp/redis-image-debootstrap.log" >&2
  tail -20 /tmp/redis-image-debootstrap.log >&2
  exit 1
}
# A smaller image and a faster import: nothing at run time needs apt's caches or docs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc "$rootfs"/usr/share/man
tar -C "$rootfs" -c . | docker import \
  -c 'CMD ["redis-server", "--protected-mode", "no"]' \
  -c 'EXPOSE 6379' \
  - "$IMAGE" >/dev/null
echo "redis-image: built $IMAGE ($(docker run --rm "$IMAGE" redis-server --version | head -c 60))"
