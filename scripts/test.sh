#!/usr/bin/env bash
# Runs every test: unit tests, and the integration tests against real Redis nodes in
# containers (testcontainers starts and removes them). Builds the redis:7.0 image first
# when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/redis-image.sh
cargo test --workspace "$@"
