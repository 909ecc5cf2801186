#!/usr/bin/env bash
# Benchmark of the rollout dashboard: the rollout page and its series API for a fleet of HOSTS
# hosts with DAYS days of rollout history (grants, downloads, installs, completions, 2% install
# errors), on SQLite, driven by wrk with a viewer-equivalent bearer token. Baseline in the same
# run: the same 30-day status timeline computed from the raw history table (GET /api/v1/timeline,
# a GROUP BY over status_history), which is what the pre-aggregated series replace, and /healthz
# (the HTTP floor). Writes its table into docs/BENCHMARKS.md under "## dashboard".
#
# Usage: bench/dashboard.sh [HOSTS (default 100000)] [DAYS (default 30)] [SECONDS (default 10)]
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-100000}"
days="${2:-30}"
seconds="${3:-10}"
conns=4

cargo build -q --release -p update-server --bin update-server --example dashboard_seed
source bench/lib-server.sh
server="$target_dir/release/update-server"
seed="$target_dir/release/examples/dashboard_seed"

data="$work/data"
token="$("$seed" "$data" "$hosts" "$days" 2> "$work/seed.log")"
cat "$work/seed.log"
history_rows=$(sed -n 's/.* \([0-9]*\) history rows.*/\1/p' "$work/seed.log")

port=$(free_port)
"$server" serve --listen "127.0.0.1:$port" --data-dir "$data" 2> "$work/server.log" & pids+=($!)
base="http://127.0.0.1:$port"
wait_http "$base/healthz"

# The first dashboard read folds the whole history into the series (once, after an upgrade).
backfill=$(curl -s -o /dev/null -w '%{time_total}' -H "Authorization: Bearer $token" "$base/api/v1/series/beta?range=30d")
check=$(curl -s -H "Authorization: Bearer $token" "$base/api/v1/series/beta?range=30d" | python3 -c 'import json,sys; v=json.load(sys.stdin); print(v["total_hosts"], v["updated_hosts"], len(v["series"]["buckets"]))')
echo "after backfill: total_hosts updated_hosts buckets = $check"
db_mb=$(du -sm "$data" | cut -f1)

run_wrk() { # PATH -> "rps p50 p99 non2xx"
  wrk -t2 -c"$conns" -d"${seconds}s" --latency -H "Authorization: Bearer $token" "$base$1" > "$work/wrk.out"
  wrk_figures "$work/wrk.out"
}
# wrk's latency ("850.00us", "12.3ms", "1.2s") in milliseconds.
ms() { python3 -c 'import sys; v=sys.argv[1]; u=[("us",1e-3),("ms",1),("s",1e3)]; print(next(f"{float(v[:-len(s)])*m:.2f}" for s,m in u if v.endswith(s)))' "$1"; }
target_ms=100

since=$(( $(date +%s) - days * 86400 ))
rows=()
worst=0
worst_name=""
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for spec in \
  "rollout page HTML|/dashboard/" \
  "rollout page script|/dashboard/app.js" \
  "series, last hour (minute buckets)|/api/v1/series/beta?range=hour" \
  "series, last day (hour buckets)|/api/v1/series/beta?range=day" \
  "series, last week (hour buckets)|/api/v1/series/beta?range=week" \
  "series, 30 days (day buckets)|/api/v1/series/beta?range=30d" \
  "fleet overview|/api/v1/dashboard/overview" \
  "instance search (status filter, 100 rows)|/api/v1/dashboard/instances?status=error&q=7e" \
  "baseline: raw 30-day timeline (GROUP BY status_history)|/api/v1/timeline?channel=beta&since=$since&bucket_secs=86400" \
  "baseline: /healthz|/healthz"; do
  name="${spec%%|*}"; path="${spec#*|}"
  read -r rps p50 p99 errs < <(run_wrk "$path")
  p99ms=$(ms "$p99")
  ratio="–"
  case "$name" in
    baseline*) ;;
    *) ratio=$(python3 -c "print(f'{$p99ms/$target_ms:.2f}')")
       if python3 -c "import sys; sys.exit(0 if $p99ms > $worst else 1)"; then worst=$p99ms; worst_name=$name; fi ;;
  esac
  echo "$name: $rps req/s, p50 $p50, p99 $p99, non-2xx $errs"
  rows+=("| $name | $rps | $p50 | $p99 | $ratio | $errs |")
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)

# Live updates: with the event stream open, the time from a pause or resume through the admin API
# (answered) to the stream's `change` event, 10 times (the server looks for changes once a second).
live=$(python3 - "$base" "$token" <<'PY'
import http.client, json, random, statistics, sys, time, urllib.parse
base, token = urllib.parse.urlparse(sys.argv[1]), sys.argv[2]
auth = {"Authorization": "Bearer " + token}
stream = http.client.HTTPConnection(base.hostname, base.port, timeout=30)
stream.request("GET", "/api/v1/dashboard/events", headers=auth)
events = stream.getresponse()
def next_event():
    name, data = None, None
    while True:
        line = events.readline().decode().strip()
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            data = json.loads(line.split(":", 1)[1])
        elif line == "" and name:
            return name, data
name, marks = next_event()
assert name == "hello"
while marks["config"] == 0:  # a poller just started: its first read follows
    name, marks = next_event()
api = http.client.HTTPConnection(base.hostname, base.port, timeout=30)
waits = []
for i in range(10):
    time.sleep(1 + random.random())  # at any point of the server's 1 s poll
    action = "pause" if i % 2 == 0 else "resume"
    seen = marks["activity"]
    t0 = time.monotonic()
    api.request("POST", f"/api/v1/rollouts/beta/{action}", body="{}", headers={**auth, "Content-Type": "application/json"})
    api.getresponse().read()
    # Skip events about earlier changes (the first poll after connecting reports the state).
    while marks["activity"] <= seen:
        name, marks = next_event()
    waits.append(time.monotonic() - t0)
print(f"{statistics.median(waits):.2f} {max(waits):.2f}")
PY
)
read -r live_median live_max <<< "$live"
echo "live update: median ${live_median} s, max ${live_max} s"

cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //') ($(nproc) cores)"
section="$work/section.md"
{
  echo "## dashboard"
  echo
  echo "\`bench/dashboard.sh $hosts $days $seconds\` on $(date -u +%Y-%m-%d), $cpu, SQLite, release build."
  echo "Fleet: $hosts hosts on channel beta, $history_rows status history rows over $days days (a linear"
  echo "ramp to release 2.0.0 with 2% install errors); database $db_mb MiB. wrk, 2 threads, $conns"
  echo "connections, ${seconds} s per row, admin bearer token. Every series request first folds new"
  echo "history into the buckets (a catch-up transaction), so the figures include that. Load average"
  echo "(1, 5, 15 min) before the rows: $load_before; after: $load_after."
  echo
  echo "First dashboard read after seeding (folds all $history_rows rows and $hosts hosts into the series,"
  echo "once): ${backfill} s. Check after it (hosts, updated, buckets): $check."
  echo
  echo "| request | req/s | p50 | p99 | p99 / ${target_ms} ms target | non-2xx |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Live updates: with \`/api/v1/dashboard/events\` open, a pause or resume through the admin API"
  echo "reached the stream as a \`change\` event after ${live_median} s (median of 10; max ${live_max} s). The"
  echo "server looks for changes once a second; an open page then re-reads its view (one series row)."
  echo
  echo "Target: p99 under ${target_ms} ms for the rollout page, its series and the other dashboard reads;"
  echo "the highest here is \"$worst_name\" at $worst ms ($(python3 -c "print(f'{$worst/$target_ms:.2f}')") of the target)."
  echo "The instance search row is the most expensive filter: a status plus a substring that every"
  echo "machine id contains (matches counted up to 10,000). The baseline rows show what the same chart"
  echo "costs when computed from the raw history on each request, and the HTTP floor."
} > "$section"
cat "$section"

write_section dashboard "$section"
