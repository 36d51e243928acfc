#!/usr/bin/env bash
# Where Redis's time goes, per Cairn Lua script, while a command runs: Redis's slow log with a
# threshold of 0 records every command with its execution time (µs); afterwards the script calls
# are grouped by script (named by recomputing each script's SHA1 the way the Rust code composes
# it) and printed as JSON: calls, total µs, µs per call, and the share of all script time.
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
import collections, hashlib, json, sys
from pathlib import Path

progress, requests = Path("crates/cairn-redis/src/progress"), Path("crates/cairn-redis/src/requests")
def lua(*parts):
    return "".join(p.read_text() for p in parts)
scripts = {
    "progress apply": lua(progress / "common.lua", progress / "read.lua", progress / "apply.lua"),
    "progress read": lua(progress / "common.lua", progress / "read.lua", progress / "read_main.lua"),
    "progress delete": lua(progress / "common.lua", progress / "delete.lua"),
    "requests submit": lua(progress / "common.lua", requests / "common.lua", requests / "submit.lua"),
}
for name in ["start", "heartbeat", "commit", "cancel", "retry_dead"]:
    scripts["requests " + name] = lua(requests / "common.lua", requests / (name + ".lua"))
by_sha = {hashlib.sha1(text.encode()).hexdigest(): name for name, text in scripts.items()}

calls, usec = collections.Counter(), collections.Counter()
# arguments may hold binary (the packed `_m` field): read them as text, leniently
entries = json.loads(open(sys.argv[1], encoding="utf-8", errors="replace").read(), strict=False)
for _, _, duration, args, *_ in entries:
    if args and args[0].lower() == "evalsha":
        name = by_sha.get(args[1], "other script " + args[1][:8])
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
