#!/usr/bin/env bash
# What `serve --history-days` costs the fleet while it works off a backlog: a database holding
# ROWS status history rows older than the retention (as after a first start on years of
# history) is served twice under the same wrk load of update checks from 10,000 machine ids,
# once with --history-days 0 (nothing pruned: the baseline) and once with --history-days 90
# (pruning the whole time). Reports requests/s, p50/p99, non-2xx answers and the rows pruned
# during the run (a 3 s warm-up precedes each measured pass and counts in the pruning rate).
# Prints a Markdown table for docs/BENCHMARKS.md.
#
# Usage: bench/prune.sh [ROWS (default 2000000)] [SECONDS (default 15)]
set -euo pipefail
cd "$(dirname "$0")/.."
rows="${1:-2000000}"
seconds="${2:-15}"
hosts=10000

cargo build -q --release -p update-server --bin update-server --example omaha_bench
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
server="$target_dir/release/update-server"
fixture="$target_dir/release/examples/omaha_bench"
command -v sqlite3 >/dev/null || { echo "bench/prune.sh needs the sqlite3 tool (Debian sqlite3)" >&2; exit 1; }

work="$(mktemp -d)"
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# The same update_engine-shaped check-ins as bench/server.sh.
sed -n '/^cat > "\$work\/checkin.lua"/,/^LUA$/p' bench/server.sh > "$work/gen.sh"
# shellcheck source=/dev/null
source "$work/gen.sh"

"$fixture" bundle "$work" 2.0.0 >/dev/null
data="$work/data"
"$server" token create --data-dir "$data" --role admin >/dev/null
old=$(( $(date +%s) - 200 * 86400 ))
sqlite3 "$data/server.db" "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < $rows)
  INSERT INTO status_history (at, machine_id, channel, grp, version, status)
  SELECT $old + i, 'old-' || (i % $hosts), 'stable', '', '1.0.0', 'idle' FROM n;"
db_bytes=$(stat -c %s "$data/server.db")

run() { # HISTORY_DAYS -> "rps p50 p99 non2xx pruned"
  local port
  port=$(free_port)
  RUST_LOG=warn "$server" serve --listen "127.0.0.1:$port" --data-dir "$data" \
    --keyring "$work/release.keyring" --history-days "$1" &
  pid=$!
  for _ in $(seq 1 200); do curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.05; done
  # Warm-up: the first run registers the 10,000 hosts, so both measure updates of known hosts.
  wrk -t2 -c32 -d3s -s "$work/checkin.lua" "http://127.0.0.1:$port" >/dev/null
  wrk -t2 -c32 -d"${seconds}s" --latency -s "$work/checkin.lua" "http://127.0.0.1:$port" > "$work/wrk.out"
  local pruned
  pruned=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^twinroot_history_rows_pruned_total/ {print $2}')
  kill "$pid"; wait "$pid" || true; pid=""
  echo "$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out") \
$(awk '$1=="50%" {print $2}' "$work/wrk.out") $(awk '$1=="99%" {print $2}' "$work/wrk.out") \
$(awk '/Non-2xx/ {n=$4} END {print n+0}' "$work/wrk.out") $pruned"
}

read -r b_rps b_p50 b_p99 b_err b_pruned < <(run 0)
read -r p_rps p_p50 p_p99 p_err p_pruned < <(run 90)
ratio=$(python3 -c "print(f'{$p_rps / $b_rps:.2f}')")
rate=$(python3 -c "print(f'{$p_pruned / ($seconds + 3):,.0f}')")
cat <<EOF
| server | requests/s | p50 | p99 | non-2xx | history rows pruned during the run |
| --- | --- | --- | --- | --- | --- |
| \`--history-days 0\` (baseline, nothing pruned) | $b_rps | $b_p50 | $b_p99 | $b_err | $b_pruned |
| \`--history-days 90\`, pruning a backlog of $rows rows | $p_rps | $p_p50 | $p_p99 | $p_err | $p_pruned |

Check-ins while pruning: **${ratio}x** of the baseline; about $rate rows pruned per second under that
load. Database before the runs: $db_bytes bytes.
EOF
