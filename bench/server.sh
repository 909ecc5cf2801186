#!/usr/bin/env bash
# Benchmark of the update-server's Omaha endpoint: update checks per second from 10,000 distinct
# machine ids (every check-in persisted: rollout decision with database counts, changes committed
# before the answer, "still here" check-ins written within a second, held hosts answered from
# memory), versus a minimal axum handler returning a fixed Omaha response, all driven by wrk on
# the same machine in the same run. Two more servers show what the defaults are worth: one with
# --cached-hosts 0 (every check-in through the check-in writer) and one with --seen-delay-ms 0
# (every check-in committed before its answer). Also reports p50/p99 latency, server CPU per
# request, peak memory and the SQLite database size per 1,000 hosts. Writes its table into
# docs/BENCHMARKS.md under "## update-server".
#
# Usage: bench/server.sh [SECONDS (default 10)] [CONNECTIONS (default 32)] [ROUNDS (default 3)]
# Each round measures the baseline, then the three servers, back to back; the table shows the
# round with the median ratio, and every round's ratio is listed (other processes on the machine
# move single figures a lot: the load average is recorded too).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-10}"
conns="${2:-32}"
rounds="${3:-3}"
hosts=10000
load_before=$(cut -d' ' -f1-3 /proc/loadavg)

cargo build -q --release -p update-server --bin update-server --example omaha_bench
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
server="$target_dir/release/update-server"
fixture="$target_dir/release/examples/omaha_bench"

work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done; echo "no answer from $1" >&2; exit 1; }

# wrk script: an update_engine-shaped request, machine ids cycling through $hosts per thread.
cat > "$work/checkin.lua" <<LUA
local threads = {}
local n = 0
function setup(thread) thread:set("tid", n); n = n + 1; table.insert(threads, thread) end
function init(args) counter = tid * 7919 end
function request()
  counter = counter + 1
  local id = string.format("bench-machine-%05d", counter % $hosts)
  local body = '<?xml version="1.0" encoding="UTF-8"?>\n<request protocol="3.0" version="update_engine-0.4.10" updaterversion="update_engine-0.4.10" installsource="scheduler" ismachine="1">\n <os version="Chateau" platform="CoreOS" sp="1.0.0_x86_64"></os>\n <app appid="{e96281a6-d1af-4bde-9a0a-97b76e56dc57}" version="1.0.0" track="stable" bootid="{b}" oem="" oemversion="" alephversion="1.0.0" machineid="' .. id .. '" machinealias="" lang="en-US" board="amd64-usr" hardware_class="" delta_okay="false">\n  <ping active="1"></ping>\n  <updatecheck></updatecheck>\n </app>\n</request>\n'
  return wrk.format("POST", "/v1/update/", {["Content-Type"] = "text/xml"}, body)
end
LUA

# CPU time of a process so far, in clock ticks (user + system, all threads).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run_wrk() { # URL [PID] -> "rps p50 p99 non2xx cpu_us_per_request"
  local c0=0 c1=0
  [ -n "${2:-}" ] && c0=$(cpu_ticks "$2")
  wrk -t2 -c"$conns" -d"${seconds}s" --latency -s "$work/checkin.lua" "$1" > "$work/wrk.out"
  [ -n "${2:-}" ] && c1=$(cpu_ticks "$2")
  local rps p50 p99 errs reqs
  rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$work/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$work/wrk.out")
  errs=$(awk '/Non-2xx/ {print $4}' "$work/wrk.out")
  reqs=$(awk '/requests in/ {print $1}' "$work/wrk.out")
  echo "$rps $p50 $p99 ${errs:-0} $(python3 -c "print(f'{($c1 - $c0) * 1e6 / $(getconf CLK_TCK) / $reqs:.1f}')")"
}

# Baseline: fixed response.
bport=$(free_port)
"$fixture" baseline "127.0.0.1:$bport" & bpid=$!; pids+=($bpid)
wait_http "http://127.0.0.1:$bport/v1/update/"

# The server: a release on stable at a 5% staged rollout with an automatic-halt rule, so each
# check-in runs the full decision (cohort bucket plus the outcome counts query). Two of them, on
# databases of their own: as served by default, and with --seen-delay-ms 0 (every check-in
# written before its answer, also those that only say "still here").
"$fixture" bundle "$work" 2.0.0
start_server() { # DATA_DIR EXTRA_ARGS... -> "port pid token"
  local data=$1; shift
  local token port pid
  token=$("$server" token create --data-dir "$data" --role admin)
  port=$(free_port)
  RUST_LOG=warn "$server" serve --listen "127.0.0.1:$port" --data-dir "$data" --keyring "$work/release.keyring" "$@" >&2 &
  pid=$!
  wait_http "http://127.0.0.1:$port/healthz"
  TWINROOT_SERVER="http://127.0.0.1:$port" TWINROOT_TOKEN="$token" "$server" release upload "$work/2.0.0.bundle" >/dev/null
  TWINROOT_SERVER="http://127.0.0.1:$port" TWINROOT_TOKEN="$token" "$server" release promote 2.0.0 --channel stable --force >/dev/null
  TWINROOT_SERVER="http://127.0.0.1:$port" TWINROOT_TOKEN="$token" "$server" rollout set stable --start-percent 5 --halt-failure-percent 20 --halt-min-reports 10 >/dev/null
  # Warm-up pass registers the 10,000 hosts (first check-in = insert); the measured pass updates them.
  local saved=$seconds; seconds=3; run_wrk "http://127.0.0.1:$port" >/dev/null; seconds=$saved
  echo "$port $pid $token"
}
data="$work/data"
read -r sport spid token < <(start_server "$data"); pids+=($spid)
read -r cport cpid _ < <(start_server "$work/data-nocache" --cached-hosts 0); pids+=($cpid)
read -r zport zpid _ < <(start_server "$work/data-sync" --seen-delay-ms 0); pids+=($zpid)
export TWINROOT_SERVER="http://127.0.0.1:$sport" TWINROOT_TOKEN="$token"
: > "$work/rounds"
for _ in $(seq 1 "$rounds"); do
  read -r b_rps b_p50 b_p99 b_err b_cpu < <(run_wrk "http://127.0.0.1:$bport" "$bpid")
  read -r s_rps s_p50 s_p99 s_err s_cpu < <(run_wrk "http://127.0.0.1:$sport" "$spid")
  read -r c_rps c_p50 c_p99 c_err c_cpu < <(run_wrk "http://127.0.0.1:$cport" "$cpid")
  read -r z_rps z_p50 z_p99 z_err z_cpu < <(run_wrk "http://127.0.0.1:$zport" "$zpid")
  echo "$(python3 -c "print(f'{$s_rps/$b_rps:.2f} {$c_rps/$b_rps:.2f} {$z_rps/$b_rps:.2f}')") $b_rps $b_p50 $b_p99 $b_err $b_cpu $s_rps $s_p50 $s_p99 $s_err $s_cpu $c_rps $c_p50 $c_p99 $c_err $c_cpu $z_rps $z_p50 $z_p99 $z_err $z_cpu" >> "$work/rounds"
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
# Resident memory after the rounds (before the admin API reads below), and at its peak: what
# keeping the hosts' records for answering from memory costs.
mem_mib() { awk -v k="$2:" '$1==k {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
s_rss=$(mem_mib "$spid" VmRSS); s_peak=$(mem_mib "$spid" VmHWM)
c_rss=$(mem_mib "$cpid" VmRSS); c_peak=$(mem_mib "$cpid" VmHWM)
ratios_of() { cut -d' ' -f"$1" "$work/rounds" | paste -sd' ' | sed 's/ /x, /g; s/$/x/'; }
median_of() { cut -d' ' -f"$1" "$work/rounds" | sort -n | sed -n "$(( (rounds + 1) / 2 ))p"; }
all_ratios=$(ratios_of 1)
nocache_ratios=$(ratios_of 2)
nocache_median=$(median_of 2)
sync_ratios=$(ratios_of 3)
sync_median=$(median_of 3)
read -r ratio _ _ b_rps b_p50 b_p99 b_err b_cpu s_rps s_p50 s_p99 s_err s_cpu c_rps c_p50 c_p99 c_err c_cpu z_rps z_p50 z_p99 z_err z_cpu < <(sort -n "$work/rounds" | sed -n "$(( (rounds + 1) / 2 ))p")
hosts_seen=$("$server" instances --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
granted=$("$server" instances --json | python3 -c 'import json,sys; print(sum(1 for i in json.load(sys.stdin) if i["status"]=="granted"))')
from_memory=$(curl -s "http://127.0.0.1:$sport/metrics" | awk '$1=="twinroot_checkins_from_memory_total" {print $2}')
checkins=$(curl -s "http://127.0.0.1:$sport/metrics" | awk '$1=="twinroot_checkins_total" {print $2}')
memory_share=$(python3 -c "print(f'{$from_memory * 100 / $checkins:.0f}')")
kill -TERM "$spid"
while kill -0 "$spid" 2>/dev/null; do sleep 0.1; done  # it writes pending check-ins and folds the WAL
db_bytes=$(du -cb "$data"/server.db* | tail -1 | cut -f1)
per_1000=$(python3 -c "print(f'{$db_bytes/$hosts_seen*1000/1024:.0f}')")

table="$(cat <<MD
| what | requests/s | p50 | p99 | non-2xx | server CPU per request |
| --- | --- | --- | --- | --- | --- |
| minimal axum handler, fixed Omaha response (baseline) | $b_rps | $b_p50 | $b_p99 | $b_err | $b_cpu us |
| update-server \`POST /v1/update/\`, SQLite, 10,000 machine ids | $s_rps | $s_p50 | $s_p99 | $s_err | $s_cpu us |
| the same with \`--cached-hosts 0\` (every check-in through the check-in writer) | $c_rps | $c_p50 | $c_p99 | $c_err | $c_cpu us |
| the same with \`--seen-delay-ms 0\` (every check-in written before its answer) | $z_rps | $z_p50 | $z_p99 | $z_err | $z_cpu us |

Ratio update-server / baseline: **${ratio}x** (median of $rounds rounds: $all_ratios; target >= 0.5x).
With \`--cached-hosts 0\`: ${nocache_median}x (rounds: $nocache_ratios). With \`--seen-delay-ms 0\`:
${sync_median}x (rounds: $sync_ratios). The table shows the round with the median default ratio.
The default server answered ${memory_share}% of its check-ins from memory (held hosts that only
checked in). Resident memory after the run: $s_rss MiB (peak $s_peak MiB), against $c_rss MiB
(peak $c_peak MiB) with \`--cached-hosts 0\`.
Load average (1, 5, 15 min) before: $load_before, after: $load_after. Hosts in the database after the run:
$hosts_seen ($granted granted at 5%); SQLite size (database + WAL after shutdown): $db_bytes bytes,
**${per_1000} KiB per 1,000 hosts** (instances, grants and status history).
MD
)"
echo "$table"

section="$(cat <<MD
## update-server

\`bench/server.sh $seconds $conns $rounds\` on $(date -u +%Y-%m-%d), $(nproc) CPUs, release build, wrk -t2
-c$conns for ${seconds} s per case and round on the same machine (wrk competes with the server
for the cores). Both binaries use mimalloc. Each
request is an update_engine-shaped update check; machine ids cycle through $hosts distinct values,
registered by a 3 s warm-up pass before the measured pass. The server reads each host's record,
decides with its database counts and commits grants (the 5% cohort), new hosts and any other
change before answering; a check-in that only says "still here" has its \`last_seen\` and
\`checkins\` written within 1 s (docs/SERVER.md, "Check-ins written behind"), and when the host
is held it is answered on the HTTP thread from the writer's last committed view (docs/SERVER.md,
"Held hosts answered from memory").

$table
MD
)"
python3 - "$section" <<'PY'
import re, sys
section = sys.argv[1].strip() + "\n"
path = "docs/BENCHMARKS.md"
text = open(path).read()
# The generated part ends at the next heading: "### " notes below it are kept.
pattern = re.compile(r"^## update-server\n.*?(?=^## |^### |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda m: section + "\n", text, count=1)
else:
    text = text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
