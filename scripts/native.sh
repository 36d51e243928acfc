#!/usr/bin/env bash
# Runs Cairn on this machine without containers, each service as its own process.
#
#   scripts/native.sh          start everything, stay in the foreground; Ctrl-C stops it all
#   scripts/native.sh start    start everything in the background and return once all are ready
#   scripts/native.sh stop     stop the services, then Redis/RabbitMQ if this script started them
#   scripts/native.sh status   which services run, and where
#
# `start` installs and starts Redis and RabbitMQ where missing (scripts/deps.sh, Debian/Ubuntu),
# builds the release binaries, starts progress-aggregator, ingress, request-processor and
# stream-trimmer, and waits for each one's /readyz. Services read their usual CAIRN_*
# variables (`<binary> --help`), so ports and key prefix can be moved off the defaults, e.g.
# CAIRN_INGRESS_ADDR=127.0.0.1:18080. Pids, logs and the record of what deps.sh started live in
# CAIRN_RUN_DIR (default ~/.cache/cairn-native): logs/<service>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cairn-target}"
RUN_DIR="${CAIRN_RUN_DIR:-$HOME/.cache/cairn-native}"
BIN_DIR="$CARGO_TARGET_DIR/release"
# Start order: the aggregator first (ingress forwards progress calls to it).
SERVICES=(progress-aggregator ingress request-processor stream-trimmer)
READY_TIMEOUT="${CAIRN_NATIVE_READY_TIMEOUT:-60}"
# Logs go to files: no terminal colour codes in them.
export NO_COLOR="${NO_COLOR-1}"

log() { echo "native: $*" >&2; }
die() { log "$*"; exit 1; }

port_of() { local addr=$1; echo "${addr##*:}"; }

# Where each service listens: the same defaults the binaries use, unless CAIRN_* says otherwise.
INGRESS_ADDR="${CAIRN_INGRESS_ADDR:-127.0.0.1:8080}"
GRPC_ADDR="${CAIRN_AGGREGATOR_GRPC_ADDR:-127.0.0.1:50051}"
AGGREGATOR_ADMIN_ADDR="${CAIRN_AGGREGATOR_ADMIN_ADDR:-127.0.0.1:9091}"
PROCESSOR_ADMIN_ADDR="${CAIRN_PROCESSOR_ADMIN_ADDR:-127.0.0.1:9092}"
TRIMMER_ADMIN_ADDR="${CAIRN_TRIMMER_ADMIN_ADDR:-127.0.0.1:9093}"
# Keep the services pointing at each other when ports move.
export CAIRN_AGGREGATOR_URL="${CAIRN_AGGREGATOR_URL:-http://127.0.0.1:$(port_of "$GRPC_ADDR")}"
export CAIRN_PUBLIC_URL="${CAIRN_PUBLIC_URL:-http://127.0.0.1:$(port_of "$INGRESS_ADDR")}"

# The port whose /readyz tells that a service is ready.
ready_port() {
  case $1 in
    ingress) port_of "$INGRESS_ADDR" ;;
    progress-aggregator) port_of "$AGGREGATOR_ADMIN_ADDR" ;;
    request-processor) port_of "$PROCESSOR_ADMIN_ADDR" ;;
    stream-trimmer) port_of "$TRIMMER_ADMIN_ADDR" ;;
  esac
}

# Every port a service binds, to refuse a start that would collide.
ports_of() {
  case $1 in
    progress-aggregator) echo "$(port_of "$GRPC_ADDR") $(port_of "$AGGREGATOR_ADMIN_ADDR")" ;;
    *) ready_port "$1" ;;
  esac
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# HTTP status of GET 127.0.0.1:<port><path>, with bash alone (no curl on a bare machine).
http_status() {
  local port=$1 path=$2 line
  exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
  IFS=' ' read -r -t 3 _ line _ <&3 || line=
  exec 3<&- 3>&-
  echo "$line"
}

pid_file() { echo "$RUN_DIR/$1.pid"; }

# The pid of a service this script started and that still runs, or nothing.
running_pid() {
  local file pid exe
  file=$(pid_file "$1")
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  # Check the pid still runs our binary, not a process that reused the number (a rebuild while
  # it runs leaves the old file " (deleted)").
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  if [ "${exe% (deleted)}" = "$(readlink -f "$BIN_DIR/$1")" ]; then
    echo "$pid"
  fi
}

stop_service() {
  local name=$1 pid
  pid=$(running_pid "$name")
  rm -f "$(pid_file "$name")"
  [ -n "$pid" ] || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || return 0
  # SIGTERM drains within CAIRN_SHUTDOWN_GRACE (10s by default); allow that and a margin.
  for _ in $(seq 100); do
    [ -d "/proc/$pid" ] || return 0
    sleep 0.2
  done
  log "$name did not stop within 20s; killing pid $pid"
  kill -KILL "$pid" 2>/dev/null || true
}

stop_deps() {
  local started="$RUN_DIR/started-deps"
  [ -f "$started" ] || return 0
  if grep -qx rabbitmq "$started"; then log "stopping rabbitmq (started by this script)"; rabbitmqctl -q stop || true; fi
  if grep -qx redis "$started"; then log "stopping redis (started by this script)"; redis-cli -p 6379 shutdown nosave || true; fi
  rm -f "$started"
}

stop_all() {
  local i
  # Reverse start order: intake (ingress) stops before what it depends on.
  for ((i = ${#SERVICES[@]} - 1; i >= 0; i--)); do stop_service "${SERVICES[$i]}"; done
  stop_deps
}

start_service() {
  local name=$1 port pid status=
  setsid "$BIN_DIR/$name" </dev/null >>"$RUN_DIR/logs/$name.log" 2>&1 &
  pid=$!
  echo "$pid" >"$(pid_file "$name")"
  port=$(ready_port "$name")
  for _ in $(seq $((READY_TIMEOUT * 5))); do
    if [ ! -d "/proc/$pid" ]; then
      tail -n 20 "$RUN_DIR/logs/$name.log" >&2 || true
      die "$name exited during start (log: $RUN_DIR/logs/$name.log)"
    fi
    status=$(http_status "$port" /readyz 2>/dev/null || true)
    if [ "$status" = 200 ]; then
      log "$name ready (pid $pid)"
      return 0
    fi
    sleep 0.2
  done
  tail -n 20 "$RUN_DIR/logs/$name.log" >&2 || true
  die "$name not ready on 127.0.0.1:$port/readyz within ${READY_TIMEOUT}s (last status: ${status:-none}; log: $RUN_DIR/logs/$name.log)"
}

print_endpoints() {
  cat >&2 <<MSG
native: ingress REST        http://127.0.0.1:$(port_of "$INGRESS_ADDR")   (/healthz /readyz /metrics; try: curl -d '{"progress":0.5}' 127.0.0.1:$(port_of "$INGRESS_ADDR")/status/_demo.job)
native: aggregator gRPC     127.0.0.1:$(port_of "$GRPC_ADDR")          (cairn.v1.Progress, health, reflection)
native: aggregator admin    http://127.0.0.1:$(port_of "$AGGREGATOR_ADMIN_ADDR")
native: processor admin     http://127.0.0.1:$(port_of "$PROCESSOR_ADMIN_ADDR")
native: trimmer admin       http://127.0.0.1:$(port_of "$TRIMMER_ADMIN_ADDR")
native: redis               127.0.0.1:6379; rabbitmq 127.0.0.1:5672, management http://127.0.0.1:15672 (guest/guest)
native: logs                $RUN_DIR/logs/
MSG
}

start_all() {
  local name port
  mkdir -p "$RUN_DIR/logs"
  for name in "${SERVICES[@]}"; do
    if [ -n "$(running_pid "$name")" ]; then
      die "$name already runs (pid $(running_pid "$name")); run scripts/native.sh stop first"
    fi
    for port in $(ports_of "$name"); do
      if port_open "$port"; then
        die "port $port (for $name) is already in use; stop what uses it or move $name with its CAIRN_*_ADDR variable"
      fi
    done
  done
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and retry"

  # A failure from here on stops whatever already started.
  trap 'if [ $? -ne 0 ]; then log "start failed; stopping what started"; stop_all; fi' EXIT
  CAIRN_STARTED_FILE="$RUN_DIR/started-deps" scripts/deps.sh
  log "building release binaries"
  cargo build --release --locked -p progress-aggregator -p ingress -p request-processor -p stream-trimmer
  for name in "${SERVICES[@]}"; do start_service "$name"; done
  trap - EXIT
  print_endpoints
}

case "${1:-run}" in
  start) start_all ;;
  stop) stop_all ;;
  status)
    for name in "${SERVICES[@]}"; do
      pid=$(running_pid "$name")
      if [ -n "$pid" ]; then
        echo "$name: running (pid $pid), /readyz on 127.0.0.1:$(ready_port "$name")"
      else
        echo "$name: stopped"
      fi
    done
    ;;
  run)
    trap 'stop_all; exit 130' INT TERM
    start_all
    log "running; Ctrl-C stops the services and what this script started"
    # Return when a service dies, then stop the rest.
    while true; do
      for name in "${SERVICES[@]}"; do
        if [ -z "$(running_pid "$name")" ]; then
          log "$name stopped (log: $RUN_DIR/logs/$name.log); stopping the rest"
          stop_all
          exit 1
        fi
      done
      sleep 1
    done
    ;;
  *) die "usage: scripts/native.sh [run|start|stop|status]" ;;
esac
