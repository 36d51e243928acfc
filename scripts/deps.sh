#!/usr/bin/env bash
# Makes sure Redis (>= 7) and RabbitMQ (with the management and consistent-hash plugins) are
# installed and answering on their standard local ports. Installs them with apt where missing
# (Debian/Ubuntu), starts them where stopped. Idempotent.
#
# With CAIRN_STARTED_FILE set, appends "redis" / "rabbitmq" to that file for what it started, so
# the caller can stop exactly that (scripts/dev.sh does).
#
# With --lint (.ci/run), only the linters: shellcheck and cargo-deny.
#
# With --browser (scripts/test.sh), also what the web UI's browser tests need: Debian's chromium
# and Node (18 or later) with the test packages' npm dependencies (crates/ingress/tests/ui and
# crates/ingress/tests/socketio, `npm ci`).
set -euo pipefail

log() { echo "deps: $*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() {
  local port=$1 what=$2 tries=${3:-120}
  for _ in $(seq "$tries"); do port_open "$port" && return 0; sleep 0.5; done
  log "$what did not open port $port"; return 1
}
started() { if [ -n "${CAIRN_STARTED_FILE:-}" ]; then echo "$1" >> "$CAIRN_STARTED_FILE"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ "${1:-}" = --lint ]; then
  # What .ci/run lints with besides cargo: shellcheck for scripts/, cargo-deny for the dependency
  # tree. Nothing else is needed, so no broker or browser.
  if ! command -v shellcheck >/dev/null; then log "installing shellcheck"; apt_install shellcheck; fi
  if ! command -v cargo-deny >/dev/null; then
    log "installing cargo-deny (once; it compiles)"
    cargo install --locked --quiet cargo-deny
  fi
  exit 0
fi

if ! command -v redis-server >/dev/null; then log "installing redis"; apt_install redis-server; fi
if ! port_open 6379; then
  log "starting redis on 127.0.0.1:6379"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/cairn.log
  wait_port 6379 redis
  started redis
fi

if ! command -v rabbitmq-server >/dev/null; then log "installing rabbitmq"; apt_install rabbitmq-server; fi
if ! port_open 5672; then
  log "starting rabbitmq on 127.0.0.1:5672"
  as_root rabbitmq-server -detached
  wait_port 5672 rabbitmq 240
  started rabbitmq
fi
as_root rabbitmqctl -q await_startup >/dev/null
# The management API isolates tests in vhosts; consistent hashing shards the progress queue.
as_root rabbitmq-plugins -q enable rabbitmq_management rabbitmq_consistent_hash_exchange >/dev/null
wait_port 15672 "rabbitmq management" 240
log "redis on 127.0.0.1:6379, rabbitmq on 127.0.0.1:5672 (management on :15672)"

# The upload tests drive the tus endpoint with the stock PyPI client (crates/ingress/tests/tus).
tus_tests="$(cd "$(dirname "$0")/.." && pwd)/crates/ingress/tests/tus"
if ! "$tus_tests/.venv/bin/python" -c 'import tusclient' 2>/dev/null; then
  log "installing the upload tests' Python client (tuspy)"
  python3 -m venv "$tus_tests/.venv" || { apt_install python3-venv; python3 -m venv "$tus_tests/.venv"; }
  "$tus_tests/.venv/bin/pip" install -q -r "$tus_tests/requirements.txt"
fi

if [ "${1:-}" = --browser ]; then
  if ! command -v chromium >/dev/null; then log "installing chromium"; apt_install chromium; fi
  if ! command -v npm >/dev/null; then log "installing node and npm"; apt_install nodejs npm; fi
  ui_tests="$(cd "$(dirname "$0")/.." && pwd)/crates/ingress/tests/ui"
  if [ ! -d "$ui_tests/node_modules/playwright-core" ]; then
    log "installing the browser tests' npm packages"
    (cd "$ui_tests" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  sio_tests="$(cd "$(dirname "$0")/.." && pwd)/crates/ingress/tests/socketio"
  if [ ! -d "$sio_tests/node_modules/sio1" ] || [ ! -d "$sio_tests/node_modules/sio4" ]; then
    log "installing the socket.io tests' npm packages"
    (cd "$sio_tests" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  log "chromium $(chromium --version 2>/dev/null | awk '{print $2}'), node $(node --version)"
fi

# schemathesis (PyPI) for the OpenAPI conformance run against a live ingress, in its own venv.
api_venv="$(cd "$(dirname "$0")/.." && pwd)/.venv-api"
if [ ! -x "$api_venv/bin/schemathesis" ]; then
  log "installing schemathesis into $api_venv"
  python3 -m venv "$api_venv"
  "$api_venv/bin/pip" install --quiet --disable-pip-version-check 'schemathesis>=4,<5'
fi
