#!/usr/bin/env bash
# The failover lab, by hand. Runs from any directory.
#
#   deploy/lab.sh up [SERVICE...]   build what is missing, start the lab (default: everything,
#                                   the producer included, which enqueues LAB_ORDERS x LAB_COPIES jobs)
#   deploy/lab.sh info              job-runner info, from inside the lab
#   deploy/lab.sh audit             job-runner ledger audit over the shared ledger
#   deploy/lab.sh logs [SERVICE]    follow the logs
#   deploy/lab.sh down              stop everything and delete the volumes (down -v)
#   deploy/lab.sh compose ARGS...   any other docker-compose command
#
# Uses `docker compose` (v2) when present, else `docker-compose` (v1). Images: redis:7.0
# comes from scripts/redis-image.sh (pulled, or built with debootstrap where no registry
# is reachable); job-runner:lab from deploy/Dockerfile.runner around a release binary
# built here. Nothing else is pulled.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
file="$root/deploy/docker-compose.yml"
export COMPOSE_PROJECT_NAME=fencelock-lab

if docker compose version >/dev/null 2>&1; then
  compose() { docker compose -f "$file" "$@"; }
elif command -v docker-compose >/dev/null 2>&1; then
  compose() { docker-compose -f "$file" "$@"; }
else
  echo "lab: neither 'docker compose' nor 'docker-compose' is installed" >&2
  exit 1
fi

build() {
  bash "$root/scripts/redis-image.sh"
  (cd "$root" && cargo build --release -q -p job-runner --features payment-demo)
  # The image takes the binary from target/release (deploy/Dockerfile.runner); a build into
  # another CARGO_TARGET_DIR (relative ones are relative to the repository) is copied there.
  local dir="${CARGO_TARGET_DIR:-target}"
  case "$dir" in /*) ;; *) dir="$root/$dir" ;; esac
  if [ "$dir/release/job-runner" -ef "$root/target/release/job-runner" ]; then :; else
    mkdir -p "$root/target/release"
    cp "$dir/release/job-runner" "$root/target/release/job-runner"
  fi
  docker build -q -f "$root/deploy/Dockerfile.runner" -t job-runner:lab "$root" >/dev/null
  echo "lab: images redis:7.0 and job-runner:lab are ready"
}

cmd="${1:-up}"
shift || true
case "$cmd" in
  build) build ;;
  up)
    build
    compose up -d --no-build "$@"
    ;;
  info) docker exec lab-runner1 job-runner info ;;
  audit) docker exec lab-runner1 job-runner ledger audit ;;
  logs) compose logs -f "$@" ;;
  down) compose down -v --remove-orphans ;;
  compose) compose "$@" ;;
  *)
    sed -n '2,16p' "$0"
    exit 1
    ;;
esac
