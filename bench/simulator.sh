#!/usr/bin/env bash
# Fleet simulator benchmark: N simulated hosts (the real agent core, `update-agent simulate`)
# against a real update-server (SQLite) and a real reboot-coordinator on a real etcd, all on
# loopback free ports in a temp dir.
#
#   scenario 1: good release, ramp START% -> 100% over RAMP s, SLOTS reboot slots: every host
#               must end on 2.0.0 with never more than SLOTS reboot-slot holders.
#   scenario 2: bad release (fails its post-boot check on every host), start at START%, automatic
#               halt at 5% failures with at least 20 reports: blast radius = hosts that booted it.
#
# Baselines, from the documented rules of the same run's fleet size (docs/SIMULATOR.md):
# Nebraska has no automatic halt (a failure even lifts safe mode), hawkBit pauses a group at its
# default 50% error threshold.
#
# Usage: bench/simulator.sh [HOSTS (10000)] [SCENARIOS (1,2)]
#   env: SLOTS (20) START (1) RAMP (120, real seconds) INTERVAL (30, real seconds between checks)
#        REBOOT (0.5, real seconds per reboot) MAX1 (900, real-second cap of scenario 1)
# Writes the results under "## fleet simulator" in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-10000}"
scenarios="${2:-1,2}"
slots="${SLOTS:-20}"
start="${START:-1}"
ramp="${RAMP:-120}"
interval="${INTERVAL:-30}"
reboot="${REBOOT:-0.5}"
max1="${MAX1:-900}"

cargo build -q -p update-agent -p update-server -p reboot-coordinator -p image-tools
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/debug"
work="$(mktemp -d /tmp/twinroot-sim-bench.XXXXXX)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 1 300); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# Signing key, keyring, two small releases (64 KiB images).
"$bin/image-tool" keygen --private "$work/release.key" --public "$work/release.pub" >/dev/null
"$bin/image-tool" keyring --public "$work/release.pub" --threshold 1 --out "$work/keyring.json" >/dev/null
head -c 65536 /dev/urandom >"$work/image-2.0.0"
"$bin/image-tool" bundle --image "$work/image-2.0.0" --version 2.0.0 --key "$work/release.key" --out "$work/2.0.0.bundle" >/dev/null

# etcd + coordinator (shared by both scenarios; each scenario uses its own FleetLock group).
etcd_port="$(free_port)"; peer_port="$(free_port)"
/usr/bin/etcd --name sim --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "sim=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_port "$etcd_port"
coord_port="$(free_port)"
"$bin/reboot-coordinator" serve --listen "127.0.0.1:$coord_port" --etcd "http://127.0.0.1:$etcd_port" \
    --default-slots "$slots" >"$work/coordinator.log" 2>&1 &
pids+=($!)
wait_port "$coord_port"

# Starts a fresh update-server with 2.0.0 on stable and the given rollout flags; sets server_pid.
start_server() {
    local name="$1"; shift
    local port data
    port="$(free_port)"; data="$work/server-$name"
    mkdir -p "$data"
    "$bin/update-server" serve --listen "127.0.0.1:$port" --data-dir "$data" --keyring "$work/keyring.json" \
        >"$work/server-$name.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    wait_port "$port"
    server_url="http://127.0.0.1:$port"
    server_token="$("$bin/update-server" token create --data-dir "$data" --role admin | tail -1)"
    cli release upload "$work/2.0.0.bundle" >/dev/null
    cli release promote 2.0.0 --channel stable --force >/dev/null
    cli rollout set stable "$@" >/dev/null
}
cli() { "$bin/update-server" "$@" --server "$server_url" --token "$server_token"; }

# CPU seconds (user+system) and peak RSS (MiB) of a process.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"; }
peak_rss() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

run_sim() {
    local name="$1"; shift
    local cpu0 t0 t1 cpu1
    cpu0="$(cpu_secs "$server_pid")"
    t0="$(date +%s.%N)"
    UPDATE_AGENT_LOG=warn /usr/bin/time -f "%M" -o "$work/sim-$name.rss" \
        "$bin/update-agent" simulate --hosts "$hosts" --server "$server_url" --coordinator "http://127.0.0.1:$coord_port" \
        --keyring "$work/keyring.json" --interval-secs "$interval" --reboot-secs "$reboot" \
        --json "$work/sim-$name.json" "$@" 2>"$work/sim-$name.log" | tee "$work/sim-$name.txt"
    t1="$(date +%s.%N)"
    cpu1="$(cpu_secs "$server_pid")"
    python3 - "$work/sim-$name.json" "$cpu0" "$cpu1" "$t0" "$t1" "$(peak_rss "$server_pid")" \
        "$(cat "$work/sim-$name.rss")" >"$work/sim-$name.figures" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["summary"]
cpu = float(sys.argv[3]) - float(sys.argv[2]); wall = float(sys.argv[5]) - float(sys.argv[4])
print(json.dumps({"summary": r, "server_cpu_secs": cpu, "wall": wall,
                  "server_cpu_percent": 100 * cpu / wall, "server_peak_rss_mib": int(sys.argv[6]),
                  "sim_peak_rss_mib": int(sys.argv[7]) // 1024,
                  "checkins_per_sec": r["checks"] / r["real_secs"]}))
PY
}

results=""
if [[ ",$scenarios," == *,1,* ]]; then
    start_server s1 --start-percent "$start" --ramp-secs "$ramp"
    run_sim s1 --group sim1 --until-all-on 2.0.0 --max-secs "$max1" --settle-secs "$((interval * 2))"
    results+="$(cat "$work/sim-s1.figures")"$'\n'
    kill "$server_pid"; wait "$server_pid" 2>/dev/null || true
fi
if [[ ",$scenarios," == *,2,* ]]; then
    start_server s2 --start-percent "$start" --halt-failure-percent 5 --halt-min-reports 20
    run_sim s2 --group sim2 --health '2.0.0:fail=100%' --max-secs 600 --settle-secs "$((interval * 2))"
    reason="$(cli rollout show stable --json | python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d.get("pause_reason"))')"
    results+="$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); d["pause_reason"]=sys.argv[2]; print(json.dumps(d))' "$(cat "$work/sim-s2.figures")" "$reason")"$'\n'
fi

RESULTS="$results" HOSTS="$hosts" SLOTS="$slots" START="$start" RAMP="$ramp" INTERVAL="$interval" \
REBOOT="$reboot" SCEN="$scenarios" LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" python3 - <<'PY'
import json, os, re, datetime
rows = [json.loads(l) for l in os.environ["RESULTS"].splitlines() if l.strip()]
hosts = int(os.environ["HOSTS"]); slots = os.environ["SLOTS"]
def v(summary, ver):
    return next((x for x in summary["versions"] if x["version"] == ver), {})
out = []
out.append("## fleet simulator\n")
out.append(f"`bench/simulator.sh {hosts} {os.environ['SCEN']}` (SLOTS={slots} START={os.environ['START']} "
           f"RAMP={os.environ['RAMP']} INTERVAL={os.environ['INTERVAL']} REBOOT={os.environ['REBOOT']}) on "
           f"{datetime.date.today()}, {os.cpu_count()} CPUs shared with other builds (load average at the end: "
           f"{os.environ['LOAD']}), dev profile (dependencies at opt-level 2). {hosts} simulated hosts "
           "(`update-agent simulate`: the real agent core per host, in-memory slots, payload fetched once) "
           "against a real update-server (SQLite) and a real reboot-coordinator on etcd, loopback HTTP. "
           "Times are real seconds (time scale 1: the server's ramp is in real seconds).\n")
out.append("| scenario | ended | hosts that booted 2.0.0 | failed | rolled back | on 2.0.0 at end | time to 50% / 100% | max slot holders | check-ins/s | server CPU | server peak RSS | simulator peak RSS |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name, r in zip([s for s in ("1", "2") if s in os.environ["SCEN"].split(",")], rows):
    s = r["summary"]; b = v(s, "2.0.0")
    t = lambda x: "-" if x is None else f"{x:.0f} s"
    out.append(f"| {name} | {s['ended']} | {b.get('hosts_booted', 0)} ({100*b.get('hosts_booted',0)/hosts:.2f}%) | "
               f"{b.get('failed',0)} | {b.get('rolled_back',0)} | {b.get('running_at_end',0)} | "
               f"{t(b.get('t50'))} / {t(b.get('t100'))} | {s['max_lock_holders']} (of {slots}) | "
               f"{r['checkins_per_sec']:.0f} | {r['server_cpu_percent']:.0f}% of a core ({r['server_cpu_secs']:.0f} s in {r['wall']:.0f} s) | "
               f"{r['server_peak_rss_mib']} MiB | {r['sim_peak_rss_mib']} MiB |")
two = [r for name, r in zip([s for s in ("1", "2") if s in os.environ["SCEN"].split(",")], rows) if name == "2"]
if two:
    r = two[0]; b = v(r["summary"], "2.0.0"); br = b.get("hosts_booted", 0)
    out.append("")
    out.append(f"Scenario 2, blast radius of a release that fails on every host, same {hosts}-host fleet:\n")
    out.append("| system (rule) | hosts that get the bad release before the rollout stops |")
    out.append("| --- | --- |")
    out.append(f"| twinroot (start {os.environ['START']}%, halt at 5% failures, min 20 reports) | **{br} ({100*br/hosts:.2f}%)**; paused: \"{r.get('pause_reason')}\" |")
    out.append(f"| Nebraska (safe mode: one host first; a failure lifts safe mode, no automatic halt) | {hosts} (100%), at the max-updates-per-period rate until an operator stops it |")
    out.append(f"| hawkBit (one group, default error threshold 50% of the group) | {hosts//2} (50%) failures before the pause |")
    out.append(f"| hawkBit (groups of 1,000, default 50%) | 500 (5%) failures before the first group pauses |")
out.append("")
out.append("Reading it: scenario 1's duration is set by the reboot slots, not the server: each host holds a "
           "slot from its grant through the reboot until its healthy boot is confirmed, and a host refused a "
           "slot retries with backoff (a tenth of the check interval, doubling up to the interval), so the "
           "slots are not kept busy all the time. Scenario 2's blast radius is the 20 reports the halt waits "
           "for plus the hosts already granted while those reports came in; it grows with the start "
           "percentage and with the time between grant and failure report, and shrinks with a lower "
           "`--halt-min-reports` or a `--max-in-flight` limit. Server CPU and RSS are the update-server "
           "process's own (from /proc), measured over the simulator's run.")
section = "\n".join(out) + "\n"
path = "docs/BENCHMARKS.md"
text = open(path).read()
pattern = re.compile(r"^## fleet simulator\n.*?(?=^## |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda m: section + "\n", text, count=1)
else:
    text = text.rstrip() + "\n\n" + section
open(path, "w").write(text)
print(section)
PY
echo "updated docs/BENCHMARKS.md (## fleet simulator)"
