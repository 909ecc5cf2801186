# Shared by the benchmarks that start servers and drive them with wrk (bench/dashboard.sh; meant
# for bench/server.sh too). Source it from a script that did `set -euo pipefail` and `cd` to the
# repository root. It defines:
#   target_dir        cargo's target directory
#   work              a temp dir, removed on exit together with every pid in `pids`
#   free_port         prints a free loopback TCP port
#   wait_http URL     waits until URL answers (any HTTP status), exits 1 after 20 s
#   wrk_figures FILE  prints "req/s p50 p99 non-2xx" from the output of `wrk --latency`
#   write_section HEADING FILE
#                     replaces the section "## HEADING" of docs/BENCHMARKS.md with FILE
#                     (appends it when missing)

target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"

work="$(mktemp -d)"
pids=()
bench_cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap bench_cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_http() {
  for _ in $(seq 1 400); do curl -s -o /dev/null "$1" && return 0; sleep 0.05; done
  echo "no answer from $1" >&2
  exit 1
}

wrk_figures() {
  local rps p50 p99 errs
  rps=$(awk '/Requests\/sec/ {print $2}' "$1")
  p50=$(awk '$1=="50%" {print $2}' "$1")
  p99=$(awk '$1=="99%" {print $2}' "$1")
  errs=$(awk '/Non-2xx/ {print $4}' "$1")
  echo "$rps $p50 $p99 ${errs:-0}"
}

write_section() {
  python3 - "$1" "$2" <<'PY'
import re, sys
heading, section = sys.argv[1], open(sys.argv[2]).read().strip() + "\n"
path = "docs/BENCHMARKS.md"
text = open(path).read()
pattern = re.compile(r"^## " + re.escape(heading) + r"\n.*?(?=^## |\Z)", re.S | re.M)
if pattern.search(text):
    text = pattern.sub(lambda m: section + "\n", text, count=1)
else:
    text = text.rstrip() + "\n\n" + section
open(path, "w").write(text)
PY
}
