#!/usr/bin/env bash
# The product working, in one command: the lock crate's examples against three real Redis
# nodes on 127.0.0.1:7001-7003, then the job runner's payment demo (scripts/runner-demo.sh).
#
#   scripts/demo.sh                # every example, then the runner demo
#   scripts/demo.sh payment        # one example only, of: basic try_lock multi_resource
#                                  # payment fencing_sql auto_extend
#
# Builds the redis:7.0 image when it is missing, starts the nodes as containers on the
# host's network, and removes them afterwards (also on failure or Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/redis-image.sh
ids=()
cleanup() { [ ${#ids[@]} -eq 0 ] || docker rm -f "${ids[@]}" >/dev/null; }
trap cleanup EXIT
for port in 7001 7002 7003; do
  ids+=("$(docker run -d --rm --network host --label fencelock-demo=node redis:7.0 \
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no --save '' --appendonly no)")
done
for port in 7001 7002 7003; do
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
done
export FENCELOCK_NODES="redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003"

examples=("$@")
[ ${#examples[@]} -gt 0 ] || examples=(basic try_lock multi_resource payment fencing_sql auto_extend)
for ex in "${examples[@]}"; do
  echo "== example: $ex"
  cargo run -q --example "$ex"
done
if [ $# -eq 0 ]; then
  # The runner demo starts its own nodes on the same ports.
  cleanup
  ids=()
  echo "== the job runner's payment demo"
  bash scripts/runner-demo.sh
fi
