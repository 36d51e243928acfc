#!/usr/bin/env bash
# Runs everything on this machine: installs/starts Redis and RabbitMQ where missing, builds Cairn
# and runs every service in one process (`cairn dev`). Ctrl-C stops the services and whatever this
# script started.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
CAIRN_STARTED_FILE="$(mktemp)"
export CAIRN_STARTED_FILE

stop_started() {
  if grep -qx rabbitmq "$CAIRN_STARTED_FILE"; then echo "dev: stopping rabbitmq" >&2; rabbitmqctl -q stop || true; fi
  if grep -qx redis "$CAIRN_STARTED_FILE"; then echo "dev: stopping redis" >&2; redis-cli -p 6379 shutdown nosave || true; fi
  rm -f "$CAIRN_STARTED_FILE"
}
trap stop_started EXIT

scripts/deps.sh
cargo build --release --locked -p cairn-cli
cat >&2 <<MSG
dev: ingress REST        http://127.0.0.1:8080   (try: curl -d '{"progress":0.5}' localhost:8080/status/_demo.job
                                                        or curl -H 'Prefer: wait=5' -d '{"handler":"echo","payload":1}' localhost:8080/v1/requests)
dev: aggregator gRPC     127.0.0.1:50051         (cairn.v1.Progress, health, reflection)
dev: aggregator admin    http://127.0.0.1:9091   (/healthz /readyz /metrics)
dev: processor admin     http://127.0.0.1:9092   (/healthz /readyz /metrics)
dev: trimmer admin       http://127.0.0.1:9093   (/healthz /readyz /metrics)
dev: rabbitmq management http://127.0.0.1:15672  (guest/guest)
MSG
"$CARGO_TARGET_DIR/release/cairn" dev "$@"
