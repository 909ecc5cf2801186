#!/usr/bin/env bash
# Fleet simulator benchmark: N simulated hosts (the real agent core, `update-agent simulate`)
# against a real update-server process (SQLite) and a real reboot-coordinator process on a real
# etcd, all on loopback free ports in a temp dir. Server and hosts share one time scale
# (`update-server serve --time-scale F`, `update-agent simulate --time-scale F`), so ramps,
# polling intervals and reboots are given in simulated seconds and play F times faster.
#
#   1  good release, ramp START% -> 100% over RAMP, SLOTS reboot slots: every host must end on
#      2.0.0 with never more than SLOTS holders (time to 50% / 100%, check-ins/s, server CPU/RSS)
#   2  bad release (fails its post-boot check on every host), start at START%, automatic halt at
#      5% failures with at least 20 reports: blast radius = hosts that booted it; beside it what
#      Nebraska's and hawkBit's documented rules would allow for the same fleet
#   3  release failing only on board X (10% of the hosts): channel-wide halt vs per-board groups
#   4  scenario 1 on S4_HOSTS hosts at time scale 1 while the update-server and then the
#      reboot-coordinator are killed (SIGKILL) and restarted on the same data and port
#   big scenario 1's policy on BIG_HOSTS hosts at time scale BIG_SCALE, stopped by --max-secs
#      after BIG_SECS real seconds: server CPU, RSS and sustained check-ins per second at that
#      fleet size (at x12 and a check per simulated hour the fleet asks for 333 checks/s)
#
# Usage: bench/simulator.sh [HOSTS (10000)] [SCENARIOS (1,2,3,4,big)]
#   env (simulated seconds unless noted): SCALE (120) SLOTS (20) START (1) RAMP (21600)
#       INTERVAL (3600) REBOOT (30) S4_HOSTS (2000) OUTAGE (5, real s) BIG_HOSTS (100000)
#       BIG_SCALE (12) BIG_SECS (360, real s)
# Writes the results under "## fleet simulator" in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
hosts="${1:-10000}"
scenarios="${2:-1,2,3,4,big}"
scale="${SCALE:-120}"
slots="${SLOTS:-20}"
start="${START:-1}"
ramp="${RAMP:-21600}"
interval="${INTERVAL:-3600}"
reboot="${REBOOT:-30}"
s4_hosts="${S4_HOSTS:-2000}"
outage="${OUTAGE:-5}"
big_hosts="${BIG_HOSTS:-100000}"
big_secs="${BIG_SECS:-360}"
big_scale="${BIG_SCALE:-12}"
has() { [[ ",$scenarios," == *,$1,* ]]; }

cargo build -q --release -p update-agent -p update-server -p reboot-coordinator -p image-tools
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/release"
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
    for _ in $(seq 1 600); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 never opened" >&2
    return 1
}

# Signing key, keyring, one small release (64 KiB image).
"$bin/image-tool" keygen --private "$work/release.key" --public "$work/release.pub" >/dev/null
"$bin/image-tool" keyring --public "$work/release.pub" --threshold 1 --out "$work/keyring.json" >/dev/null
head -c 65536 /dev/urandom >"$work/image-2.0.0"
"$bin/image-tool" bundle --image "$work/image-2.0.0" --version 2.0.0 --key "$work/release.key" --out "$work/2.0.0.bundle" >/dev/null

# etcd + coordinator (shared by the scenarios; each scenario uses its own FleetLock group).
etcd_port="$(free_port)"; peer_port="$(free_port)"
/usr/bin/etcd --name sim --data-dir "$work/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "sim=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_port "$etcd_port"
coord_port="$(free_port)"
start_coordinator() {
    "$bin/reboot-coordinator" serve --listen "127.0.0.1:$coord_port" --etcd "http://127.0.0.1:$etcd_port" \
        --default-slots "$slots" >>"$work/coordinator.log" 2>&1 &
    coord_pid=$!
    pids+=("$coord_pid")
    wait_port "$coord_port"
}
start_coordinator

# Starts a fresh update-server at time scale $2 with 2.0.0 on stable; sets server_pid/url/token.
serve() {
    "$bin/update-server" serve --listen "127.0.0.1:$server_port" --data-dir "$server_data" \
        --keyring "$work/keyring.json" --time-scale "$server_scale" >>"$server_data.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    wait_port "$server_port"
}
start_server() {
    server_data="$work/server-$1"; server_scale="$2"
    mkdir -p "$server_data"
    server_port="$(free_port)"
    server_token="$("$bin/update-server" token create --data-dir "$server_data" --role admin | tail -1)"
    serve
    server_url="http://127.0.0.1:$server_port"
    cli release upload "$work/2.0.0.bundle" >/dev/null
    cli release promote 2.0.0 --channel stable --force >/dev/null
}
cli() { "$bin/update-server" "$@" --server "$server_url" --token "$server_token"; }
api() { curl -sf -H "Authorization: Bearer $server_token" "$server_url/api/v1/$1"; }
stop_server() { kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; }

# CPU seconds (user+system) and peak RSS (MiB) of a process.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{print ($14+$15)/hz}' "/proc/$1/stat"; }
peak_rss() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status"; }

# run_sim NAME HOSTS SCALE ARGS...: runs the simulator (in the background when BG=1; then
# finish_sim NAME collects it). Figures go to $work/sim-NAME.figures as one JSON line.
run_sim() {
    local name="$1" n="$2" sc="$3"; shift 3
    echo "$(cpu_secs "$server_pid") $(date +%s.%N)" >"$work/sim-$name.start"
    UPDATE_AGENT_LOG=warn /usr/bin/time -f "%M %U %S" -o "$work/sim-$name.time" \
        "$bin/update-agent" simulate --hosts "$n" --server "$server_url" --coordinator "http://127.0.0.1:$coord_port" \
        --keyring "$work/keyring.json" --time-scale "$sc" --interval-secs "$interval" --reboot-secs "$reboot" \
        --json "$work/sim-$name.json" "$@" 2>"$work/sim-$name.log" >"$work/sim-$name.txt" &
    sim_pid=$!
    if [[ "${BG:-0}" != 1 ]]; then finish_sim "$name"; fi
}
finish_sim() {
    local name="$1"
    wait "$sim_pid" || { cat "$work/sim-$name.txt" "$work/sim-$name.log" >&2; exit 1; }
    cat "$work/sim-$name.txt"
    read -r cpu0 t0 <"$work/sim-$name.start"
    python3 - "$work/sim-$name.json" "$cpu0" "$(cpu_secs "$server_pid")" "$t0" "$(date +%s.%N)" \
        "$(peak_rss "$server_pid")" "$(cat "$work/sim-$name.time")" "$name" \
        "$(api "rollouts?channel=stable" || echo '[]')" "$(api "instances?channel=stable" | python3 -c '
import json,sys,collections
c=collections.Counter((i.get("version") or "-")+"/"+i["status"] for i in json.load(sys.stdin)); print(json.dumps(c))')" \
        >"$work/sim-$name.figures" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["summary"]
cpu = float(sys.argv[3]) - float(sys.argv[2]); wall = float(sys.argv[5]) - float(sys.argv[4])
rss_kib, su, ss = sys.argv[7].split()
print(json.dumps({"name": sys.argv[8], "summary": r, "server_cpu_secs": cpu, "wall": wall,
                  "server_cpu_percent": 100 * cpu / wall, "server_peak_rss_mib": int(sys.argv[6]),
                  "sim_peak_rss_mib": int(rss_kib) // 1024, "sim_cpu_secs": float(su) + float(ss),
                  "checkins_per_sec": r["checks"] / r["real_secs"],
                  "rollouts": json.loads(sys.argv[9]), "server_hosts": json.loads(sys.argv[10])}))
PY
}
# Completed hosts on the server (for scenario 4's kill points).
completed() { api "instances?channel=stable" | python3 -c 'import json,sys; print(sum(i["status"]=="complete" for i in json.load(sys.stdin)))'; }
wait_completed() {
    until [[ "$(completed)" -ge "$1" ]]; do
        kill -0 "$sim_pid" 2>/dev/null || { echo "simulator ended before $1 hosts completed" >&2; exit 1; }
        sleep 0.5
    done
}

settle=$((interval * 2))
if has 1; then
    start_server s1 "$scale"
    cli rollout set stable --start-percent "$start" --ramp-secs "$ramp" >/dev/null
    run_sim s1 "$hosts" "$scale" --group sim1 --until-all-on 2.0.0 --max-secs "$((ramp * 4))" --settle-secs "$settle"
    stop_server
fi
if has 2; then
    start_server s2 "$scale"
    cli rollout set stable --start-percent "$start" --halt-failure-percent 5 --halt-min-reports 20 >/dev/null
    run_sim s2 "$hosts" "$scale" --group sim2 --health '2.0.0:fail=100%' --max-secs "$((interval * 10))" --settle-secs "$settle"
    stop_server
fi
if has 3; then
    boards=(--board-share X=10% --board-share Y=90% --group-by-board --health '2.0.0:fail=100%,board=X')
    start_server s3wide "$scale"
    cli rollout set stable --start-percent "$start" --ramp-secs "$ramp" --halt-failure-percent 5 --halt-min-reports 20 >/dev/null
    run_sim s3wide "$hosts" "$scale" --group sim3a "${boards[@]}" --max-secs "$((ramp * 4))" --settle-secs "$settle"
    stop_server
    start_server s3group "$scale"
    for g in X Y; do
        cli rollout set stable --group "$g" --start-percent "$start" --ramp-secs "$ramp" --halt-failure-percent 5 --halt-min-reports 20 >/dev/null
    done
    run_sim s3group "$hosts" "$scale" --group sim3b "${boards[@]}" --max-secs "$((ramp * 4))" --settle-secs "$((ramp / 4))"
    stop_server
fi
if has 4; then
    # Time scale 1: a restarted server's clock starts again at the wall clock (docs/SERVER.md),
    # which under a larger scale would move the ramp backwards. Real seconds: ramp 60 s, a check
    # every 30 s, 0.5 s reboots.
    start_server s4 1
    cli rollout set stable --start-percent 10 --ramp-secs 60 >/dev/null
    interval_saved="$interval"; reboot_saved="$reboot"; interval=30; reboot=0.5
    BG=1 run_sim s4 "$s4_hosts" 1 --group sim4 --until-all-on 2.0.0 --max-secs 900 --settle-secs 60
    wait_completed "$((s4_hosts / 3))"
    kill -9 "$server_pid"; wait "$server_pid" 2>/dev/null || true
    echo "update-server killed; down for ${outage}s"
    sleep "$outage"
    serve
    wait_completed "$((2 * s4_hosts / 3))"
    kill -9 "$coord_pid"; wait "$coord_pid" 2>/dev/null || true
    echo "reboot-coordinator killed; down for ${outage}s"
    sleep "$outage"
    start_coordinator
    finish_sim s4
    interval="$interval_saved"; reboot="$reboot_saved"
    stop_server
fi
if has big; then
    start_server big "$big_scale"
    cli rollout set stable --start-percent "$start" --ramp-secs "$ramp" >/dev/null
    run_sim big "$big_hosts" "$big_scale" --group simbig --max-secs "$(python3 -c "print(int($big_secs * $big_scale))")" \
        --parallel 64
    stop_server
fi

cat "$work"/sim-*.figures >"$work/all.figures"
FIGURES="$work/all.figures" HOSTS="$hosts" SLOTS="$slots" START="$start" RAMP="$ramp" INTERVAL="$interval" \
REBOOT="$reboot" SCALE="$scale" SCEN="$scenarios" S4_HOSTS="$s4_hosts" OUTAGE="$outage" BIG_HOSTS="$big_hosts" \
BIG_SECS="$big_secs" BIG_SCALE="$big_scale" LOAD="$(cut -d' ' -f1-3 /proc/loadavg)" WORK="$work" python3 - <<'PY'
import json, os, re, datetime
env = os.environ
rows = {}
for line in open(env["FIGURES"]):
    if line.strip():
        r = json.loads(line); rows[r["name"]] = r
hosts = int(env["HOSTS"]); slots = env["SLOTS"]; scale = env["SCALE"]
def ver(summary, v, board=None):
    vs = summary["versions"] if board is None else next((b["versions"] for b in summary.get("boards", []) if b["board"] == board), [])
    return next((x for x in vs if x["version"] == v), {})
def board_hosts(summary, b):
    return next((x["hosts"] for x in summary.get("boards", []) if x["board"] == b), 0)
def hours(x):
    return "-" if x is None else f"{x/3600:.1f} h"
def timeline(name):
    return json.load(open(f"{env['WORK']}/sim-{name}.json"))["timeline"]
out = ["## fleet simulator", ""]
out.append(f"`bench/simulator.sh {hosts} {env['SCEN']}` (SCALE={scale} SLOTS={slots} START={env['START']} "
           f"RAMP={env['RAMP']} INTERVAL={env['INTERVAL']} REBOOT={env['REBOOT']} S4_HOSTS={env['S4_HOSTS']} "
           f"OUTAGE={env['OUTAGE']} BIG_HOSTS={env['BIG_HOSTS']} BIG_SCALE={env['BIG_SCALE']} BIG_SECS={env['BIG_SECS']}) on {datetime.date.today()}, "
           f"{os.cpu_count()} CPUs (load average at the end: {env['LOAD']}), release build. "
           "Simulated hosts run the real agent core (in-memory slots, payload fetched once) against a real "
           "update-server process (SQLite) and a real reboot-coordinator process on etcd, loopback HTTP. "
           f"Server and hosts share the time scale x{scale}: the ramp ({int(env['RAMP'])/3600:.0f} h), the check "
           f"interval ({int(env['INTERVAL'])/60:.0f} min, +-10%) and the reboot ({env['REBOOT']} s) are simulated "
           "time; `real` is wall-clock time. Server CPU and RSS are the update-server process's own (/proc), "
           "over the simulator's run; check-ins/s are real-time update checks the server answered.")
out.append("")
out.append("| run | hosts | ended | booted 2.0.0 | failed | on 2.0.0 at end | 50% / 100% (simulated) | real | max slot holders | check-ins/s | server CPU | server peak RSS | simulator RSS / CPU |")
out.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
labels = {"s1": "1 good release", "s2": "2 bad release", "s3wide": "3 board X bad, channel-wide halt",
          "s3group": "3 board X bad, per-board groups", "s4": "4 restarts (x1)", "big": "scale (stopped)"}
for name in ["s1", "s2", "s3wide", "s3group", "s4", "big"]:
    if name not in rows: continue
    r = rows[name]; s = r["summary"]; b = ver(s, "2.0.0"); n = s["hosts"]
    out.append(f"| {labels[name]} | {n} | {s['ended']} | {b.get('hosts_booted', 0)} ({100*b.get('hosts_booted',0)/n:.2f}%) | "
               f"{b.get('failed',0)} | {b.get('running_at_end',0)} | {hours(b.get('t50'))} / {hours(b.get('t100'))} | "
               f"{s['real_secs']:.0f} s | {s['max_lock_holders']} (of {slots}) | {r['checkins_per_sec']:.0f} | "
               f"{r['server_cpu_percent']:.0f}% of a core ({r['server_cpu_secs']:.0f} s in {r['wall']:.0f} s) | "
               f"{r['server_peak_rss_mib']} MiB | {r['sim_peak_rss_mib']} MiB / {r['sim_cpu_secs']:.0f} s |")
if "s2" in rows:
    r = rows["s2"]; b = ver(r["summary"], "2.0.0"); br = b.get("hosts_booted", 0)
    reason = next((x.get("pause_reason") for x in r["rollouts"] if x.get("paused")), None)
    out += ["", f"Scenario 2, blast radius of a release that fails on every host, same {hosts}-host fleet:", "",
            "| system (rule) | hosts that get the bad release before the rollout stops |", "| --- | --- |",
            f"| twinroot (start {env['START']}%, halt at 5% failures, min 20 reports) | **{br} ({100*br/hosts:.2f}%)**, all rolled back ({b.get('rolled_back', 0)}); paused: \"{reason}\" |",
            f"| Nebraska (safe mode: one host first; a failure lifts safe mode, no automatic halt) | {hosts} (100%), at the max-updates-per-period rate until an operator pauses the group |",
            f"| hawkBit (one deployment group, default error threshold 50% of the group) | {hosts//2} (50%) failures before the emergency shutdown |",
            f"| hawkBit (groups of 1,000, default error threshold 50%) | 500 ({50000/hosts:.0f}%) failures in the first group before the shutdown |"]
if "s3wide" in rows and "s3group" in rows:
    out += ["", "Scenario 3, 2.0.0 fails its post-boot check on board X only (10% of the hosts); each host sends its "
            "board as its rollout group (`--group-by-board`); the same policy (start "
            f"{env['START']}%, ramp {int(env['RAMP'])/3600:.0f} h, halt at 5% failures with at least 20 reports) "
            "set once for the channel, or once per board group:", "",
            "| policy | halted | board X hosts that booted 2.0.0 | good (Y) hosts on 2.0.0 at the end | good hosts held on 1.0.0 |",
            "| --- | --- | --- | --- | --- |"]
    for name, label in [("s3wide", "channel-wide"), ("s3group", "per board group")]:
        r = rows[name]; s = r["summary"]
        x = ver(s, "2.0.0", "X"); y = ver(s, "2.0.0", "Y"); nx = board_hosts(s, "X"); ny = board_hosts(s, "Y")
        halted = "; ".join(f"{x_.get('group') or 'channel'}: {x_.get('pause_reason')}" for x_ in r["rollouts"] if x_.get("paused")) or "nothing"
        out.append(f"| {label} | {halted} | {x.get('hosts_booted', 0)} of {nx} (all rolled back: {x.get('rolled_back', 0)}) | "
                   f"{y.get('running_at_end', 0)} of {ny} | {ny - y.get('running_at_end', 0)} |")
if "s4" in rows:
    r = rows["s4"]; s = r["summary"]; b = ver(s, "2.0.0"); n = s["hosts"]
    tl = timeline("s4")
    unreachable = {e["host"] for e in tl if e["event"] == "bad" and "not reachable" in e["detail"]}
    other_bad = {e["host"] for e in tl if e["event"] == "bad"} - unreachable
    srv = r["server_hosts"]
    out += ["", f"Scenario 4, {n} hosts at time scale 1 (ramp 10% -> 100% over 60 s, a check every 30 s, 0.5 s "
            f"reboots, {slots} slots): the update-server was killed (SIGKILL) once a third of the fleet had "
            f"completed and restarted after {env['OUTAGE']} s on the same data and port; the reboot-coordinator "
            f"likewise at two thirds (etcd kept running). Ended: {s['ended']} after {s['real_secs']:.0f} s; "
            f"{b.get('running_at_end', 0)} hosts on 2.0.0; {len(unreachable)} hosts booted 2.0.0 while the server "
            "was down, failed the agent's built-in server-reachable check, rolled back and quarantined 2.0.0 "
            f"(other failures: {len(other_bad)}); {s['check_errors']} failed checks, {s['lock_busy_answers']} refused "
            f"slot requests, max slot holders {s['max_lock_holders']} of {slots}, {s['extra_reboots']} reboots beyond need. "
            f"The server's records by version/status: {json.dumps(srv, sort_keys=True)}."]
if "big" in rows:
    r = rows["big"]; s = r["summary"]
    nominal = s['hosts'] / int(env['INTERVAL']) * float(env['BIG_SCALE'])
    out += ["", f"Scale run: {s['hosts']} hosts with scenario 1's policy at x{env['BIG_SCALE']} (the fleet asks for "
            f"{nominal:.0f} checks/s), stopped by `--max-secs` after "
            f"{s['real_secs']:.0f} s real ({s['sim_secs']/3600:.1f} h simulated): {s['checks']} update checks "
            f"({s['check_errors']} failed), {r['checkins_per_sec']:.0f} check-ins/s sustained, "
            f"{ver(s, '2.0.0').get('running_at_end', 0)} hosts updated meanwhile, {sum(r['server_hosts'].values())} host "
            "records on the server at the end; update-server "
            f"{r['server_cpu_percent']:.0f}% of a core, {r['server_peak_rss_mib']} MiB peak RSS; simulator "
            f"{r['sim_peak_rss_mib']} MiB, {r['sim_cpu_secs']:.0f} CPU s."]
out += ["", "Sources of the baselines: hawkBit's rollout management (eclipse-hawkbit/hawkbit docs/rollout-management.md: "
        "targets auto-split into deployment groups, an error condition as an absolute number or percentage of failed "
        "installations triggers an emergency shutdown of the rollout; the 50% defaults are those of its rollout UI, "
        "/work/shared/REFERENCE.md section 4); Nebraska (flatcar/nebraska: group policy fields updates enabled, safe mode, "
        "office hours, max updates per period, update timeout; pause/resume by hand; no failure-based halt, and a "
        "failed update lifts safe mode, REFERENCE.md section 3)."]
section = "\n".join(out) + "\n"
path = "docs/BENCHMARKS.md"
text = open(path).read()
pattern = re.compile(r"^## fleet simulator\n.*?(?=^## |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda m: section + "\n", text, count=1)
else:
    text = text.rstrip() + "\n\n" + section
open(path, "w").write(text)
open(os.path.join(env["WORK"], "..", "twinroot-sim-bench-section.md"), "w").write(section)
print(section)
PY
echo "updated docs/BENCHMARKS.md (## fleet simulator)"
