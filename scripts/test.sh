#!/usr/bin/env bash
# Runs the whole test suite against real Redis and RabbitMQ (installed and started if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
scripts/deps.sh --browser
cargo test --workspace --locked "$@"
# Deployment files (compose, Kubernetes, Dockerfile) checked offline, and the native path run.
scripts/test-deploy.sh
