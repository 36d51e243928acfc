#!/usr/bin/env bash
# Counts the instructions Redis spends per progress update in the apply function, with callgrind:
# deterministic on this noisy 2-core VM, where timing one script call varies by ±30 % run to run.
#
# Starts a private redis-server under valgrind on a spare port, loads Cairn's function library
# exactly as the services do (`cairn-bench lua-library` prints it), applies one batch of BATCH updates
# into a depth-4 tree once to create the nodes, then profiles CALLS more calls of the same batch
# (existing nodes, as in `cairn-bench progress` (b)). Prints instructions per update and where
# they go (Redis commands, Lua <-> Redis reply conversion, number formatting and parsing).
#
#   scripts/profile-progress-lua.sh            # BATCH=200 CALLS=10 PORT=6409 SHAPE=spread
#   BATCH=1 CALLS=200 scripts/profile-progress-lua.sh   # one update per call
#   SHAPE=burst scripts/profile-progress-lua.sh         # siblings sharing their ancestors
#   READ=1 BATCH=16 scripts/profile-progress-lua.sh     # nodes read back, as gRPC Update does
#   TOP=30 scripts/profile-progress-lua.sh              # also the 30 costliest functions (stderr)
#   LIBRARY=/tmp/variant.lua scripts/profile-progress-lua.sh # a library of your own (edit the printed one)
#
# SHAPE=spread: keys _bench.r.s.t.u spread over a wide tree, few shared ancestors in a batch (as
# `cairn-bench progress` (b)); SHAPE=burst: one producer's subtree _bench.c.x.y.z, ten leaves per
# parent (as (c)); SHAPE=roots: every key its own tree, as request lifecycles (_requests.{id}).
#
# Needs valgrind, redis-server, redis-cli, redis-benchmark and python3. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${BATCH:-200}"
CALLS="${CALLS:-10}"
PORT="${PORT:-6409}"
SHAPE="${SHAPE:-spread}"
READ="${READ:-0}"
work=$(mktemp -d)
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true; rm -rf "$work"' EXIT

if [ -n "${LIBRARY:-}" ]; then # a variant to compare, with the same ARGV
  cp "$LIBRARY" "$work/library.lua"
else
  cargo run -q -p cairn-bench -- lua-library >"$work/library.lua"
fi
library=$(head -n1 "$work/library.lua" | sed 's/^#!lua name=//')

valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no >"$work/valgrind.log" 2>&1 &
vg=$!
for _ in $(seq 100); do redis-cli -p "$PORT" ping >/dev/null 2>&1 && break; sleep 0.2; done

redis-cli -p "$PORT" -x FUNCTION LOAD <"$work/library.lua" >/dev/null
# The batch: a depth-4 tree below a namespace (SHAPE above), fractional progress.
mapfile -t args < <(python3 - "$BATCH" "$SHAPE" "$READ" <<'EOF'
import sys
n, shape, read = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
print("prof")
print(n)
for i in range(n):
    j = i * 37
    if shape == "roots":
        print("_requests.r%d" % i)
    elif shape == "burst":
        print("_bench.c1.x%d.y%d.z%d" % (i // 100, i // 10 % 10, i % 10))
    else:
        print("_bench.r%d.s%d.t%d.u%d" % (j % 10, j % 100, j % 1000, j % 10000))
    print(1796000000000 + i)
    print(1)
    print("progress")
    print("0.%d3" % (i % 10))
print(read)
print(100 if read else 0)
EOF
)
run() { redis-benchmark -p "$PORT" -q -n "$1" -c 1 FCALL "${library}_progress_apply" 0 "${args[@]}" >/dev/null; }
run 1
callgrind_control -z "$vg" >/dev/null 2>&1
run "$CALLS"
callgrind_control -d "$vg" >/dev/null 2>&1
redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
wait "$vg" 2>/dev/null || true

profile=$(find "$work" -maxdepth 1 -name 'cg.out.*' | head -n1)
callgrind_annotate --inclusive=yes --threshold=100 "$profile" >"$work/annotated.txt" 2>/dev/null
if [ -n "${TOP:-}" ]; then # the functions with the most instructions of their own
  callgrind_annotate --threshold=100 "$profile" 2>/dev/null | grep -E '^ *[0-9,]+ \(' | head -n "$TOP" >&2
fi
python3 - "$work/annotated.txt" "$BATCH" "$CALLS" "$SHAPE" "$READ" <<'EOF'
import re, sys, json
text = open(sys.argv[1]).read()
batch, calls = int(sys.argv[2]), int(sys.argv[3])
updates = batch * calls
def inclusive(pattern):
    best = 0
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(.*?\)\s+(.*)", line)
        if m and re.search(pattern, m.group(2)):
            best = max(best, int(m.group(1).replace(",", "")))
    return best
total = inclusive(r"lua_pcall")
parts = {
    "redis_commands": inclusive(r"\?\?\?:scriptCall "),
    "reply_to_lua": inclusive(r"\?\?\?:parseReply "),
    "number_formatting": inclusive(r"vfprintf-internal\.c:__vfprintf_internal "),
    "number_parsing": inclusive(r"strtod\.c:strtod "),
}
report = {
    "batch": batch,
    "calls": calls,
    "shape": sys.argv[4],
    "read_back": sys.argv[5] != "0",
    "instructions_per_update": round(total / updates),
    # everything Redis did meanwhile: reading and parsing the commands, calling, replying
    "redis_instructions_per_update": round(inclusive(r"PROGRAM TOTALS") / updates),
    "share": {k: round(v / total, 3) for k, v in parts.items()},
}
report["share"]["lua_vm_and_rest"] = round(1 - sum(report["share"].values()), 3)
print(json.dumps(report))
EOF
