#!/usr/bin/env bash
# The job runner's payment demo on real nodes, in one command:
#
#   scripts/runner-demo.sh
#
# Starts three lock nodes (127.0.0.1:7001-7003) and a queue node (127.0.0.1:7004) as
# containers, enqueues 400 payment jobs over 100 orders (four jobs per order: three are
# duplicates), drains them with two runner processes of 8 workers each, audits the ledger,
# and runs `lock exec` twice on one resource at once. Removes the containers afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/redis-image.sh
ids=()
work="$(mktemp -d /tmp/runner-demo.XXXXXX)"
cleanup() {
  [ ${#ids[@]} -eq 0 ] || docker rm -f "${ids[@]}" >/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
for port in 7001 7002 7003 7004; do
  ids+=("$(docker run -d --rm --network host --label fencelock-demo=node redis:7.0 \
    redis-server --port "$port" --bind 127.0.0.1 --protected-mode no --save '' --appendonly no)")
done
for port in 7001 7002 7003 7004; do
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
  done
done

cargo build -q -p job-runner --features payment-demo
jr="${CARGO_TARGET_DIR:-target}/debug/job-runner"
export JOB_RUNNER_LOCK_NODES="redis://127.0.0.1:7001,redis://127.0.0.1:7002,redis://127.0.0.1:7003"
export JOB_RUNNER_QUEUE="redis://127.0.0.1:7004"
export JOB_RUNNER_LEDGER="$work/ledger.db"
export JOB_RUNNER_METRICS_ADDR=off

echo "== enqueue 400 payment jobs over 100 orders"
for order in $(seq 1 100); do
  "$jr" enqueue payment --resource "order:$order" --count 4 \
    --payload "{\"order_id\":$order,\"amount_cents\":$((order * 100))}" >/dev/null
done
"$jr" info

echo "== two runners, 8 workers each, until the queue is drained"
RUST_LOG=warn "$jr" run --once -c 8 --gateway-latency-ms 20 --consumer demo-a &
a=$!
RUST_LOG=warn "$jr" run --once -c 8 --gateway-latency-ms 20 --consumer demo-b &
b=$!
wait "$a" "$b"
"$jr" info

echo "== audit: every order charged exactly once"
"$jr" ledger audit

echo "== lock exec: two at once on one resource take turns"
RUST_LOG=warn "$jr" lock exec --resource nightly-report -- sh -c 'echo "run with token $FENCING_TOKEN"; sleep 1' &
c=$!
RUST_LOG=warn "$jr" lock exec --resource nightly-report -- sh -c 'echo "run with token $FENCING_TOKEN"; sleep 1'
wait "$c"
echo "== done"
