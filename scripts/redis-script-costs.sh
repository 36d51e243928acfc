#!/usr/bin/env bash
# Where Redis's time goes, per Cairn Lua function or script, while a command runs: Redis's slow
# log with a threshold of 0 records every command with its execution time (µs); afterwards the
# calls are grouped by function (FCALL of Cairn's library) or script (EVALSHA, named by its SHA1)
# and printed as JSON: calls, total µs, µs per call, and the share of all script time.
#
#   scripts/redis-script-costs.sh cargo run --release -p cairn-bench -- requests --duration 1s
#
# Uses the Redis at REDIS_HOST/REDIS_PORT (127.0.0.1:6379); its slow-log settings are restored
# afterwards. The slow log keeps at most SLOWLOG_MAX (1 000 000) entries, the newest: for a long
# command only its tail is counted. Needs redis-cli (7+, for --json) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=(redis-cli -h "${REDIS_HOST:-127.0.0.1}" -p "${REDIS_PORT:-6379}")
old_threshold=$("${cli[@]}" config get slowlog-log-slower-than | tail -n1)
old_len=$("${cli[@]}" config get slowlog-max-len | tail -n1)
out=$(mktemp)
restore() {
  "${cli[@]}" config set slowlog-log-slower-than "$old_threshold" >/dev/null
  "${cli[@]}" config set slowlog-max-len "$old_len" >/dev/null
  "${cli[@]}" slowlog reset >/dev/null
  rm -f "$out"
}
trap restore EXIT
"${cli[@]}" config set slowlog-max-len "${SLOWLOG_MAX:-1000000}" >/dev/null
"${cli[@]}" slowlog reset >/dev/null
"${cli[@]}" config set slowlog-log-slower-than 0 >/dev/null
"$@"
"${cli[@]}" config set slowlog-log-slower-than "$old_threshold" >/dev/null
"${cli[@]}" --json slowlog get -1 >"$out"
python3 - "$out" <<'EOF'
import collections, hashlib, json, re, sys
from pathlib import Path

# Cairn's own Lua runs as functions of one library, named cairn_<16 hex digits>_<function>; the
# trimmer's scripts (EVALSHA) are named by their file when they are one file, else by SHA1.
streams = Path("crates/cairn-redis/src/streams")
by_sha = {hashlib.sha1(p.read_text().encode()).hexdigest(): "streams " + p.stem for p in streams.glob("*.lua")}

calls, usec = collections.Counter(), collections.Counter()
# arguments may hold binary: read them as text, leniently
entries = json.loads(open(sys.argv[1], encoding="utf-8", errors="replace").read(), strict=False)
for _, _, duration, args, *_ in entries:
    if not args:
        continue
    command = args[0].lower()
    if command == "fcall":
        name = re.sub(r"^cairn_[0-9a-f]{16}_", "", args[1]).replace("_", " ", 1)
    elif command == "evalsha":
        name = by_sha.get(args[1], "other script " + args[1][:8])
    else:
        continue
    calls[name] += 1
    usec[name] += duration
total = sum(usec.values()) or 1
print(json.dumps({
    "slowlog_entries": len(entries),
    "script_usec_total": total,
    "scripts": {
        name: {"calls": calls[name], "usec": usec[name], "usec_per_call": round(usec[name] / calls[name], 1),
               "share": round(usec[name] / total, 3)}
        for name, _ in usec.most_common()
    },
}, indent=1))
EOF
