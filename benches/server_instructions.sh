#!/usr/bin/env bash
# Instructions per request of examples/bench_server, counted by callgrind:
# unlike requests/s (benches/wrk.sh), a count that a noisy machine does not
# move, so a change to the hit path shows as a number.
#
#   bash benches/server_instructions.sh [route] [modes...]
#
# For each mode (default: bare memory redis tiered) the server runs under
# `valgrind --tool=callgrind` twice, answering N1 and then N2 requests on
# one keep-alive connection (a Python client sending a browser's
# Accept-Encoding, or the value of ACCEPT_ENCODING: empty sends none, as
# wrk does); the difference of the two totals over N2 - N1 is the
# cost of one request with start-up and warm-up taken out. Prints each
# mode's instructions per request, what it adds over bare, and bare's
# count divided by the mode's (the ceiling its requests/s could reach
# against bare if the CPU time of the server were all that mattered; the
# kernel's share, the same for every mode, is not counted).
#
# Starts its own redis-server on a free loopback port for the redis and
# tiered modes. Takes a few minutes: callgrind runs the server about 50
# times slower.
set -euo pipefail
route=${1:-1k}
shift || true
modes=("$@")
[[ ${#modes[@]} -eq 0 ]] && modes=(bare memory redis tiered)
n1=${N1:-1000}
n2=${N2:-3000}
command -v valgrind >/dev/null || { echo "valgrind is needed: apt-get install valgrind" >&2; exit 1; }
cd "$(dirname "$0")/.."
cargo build --release --example bench_server >/dev/null 2>&1
bin=target/release/examples/bench_server
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
export REDIS_URL="redis://127.0.0.1:$rport"
# Instructions the server ran for `n` requests (start-up and warm-up
# included).
count() {
  local mode=$1 n=$2 port pid
  port=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$mode" "127.0.0.1:$port" \
    2>"$work/$mode.$n.log" &
  pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/mode" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 - "$port" "$route" "$n" <<'EOF'
import http.client, os, sys
port, route, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", port)
encoding = os.environ.get("ACCEPT_ENCODING", "gzip, deflate, br, zstd")
for _ in range(n):
    conn.putrequest("GET", "/" + route, skip_accept_encoding=True)
    if encoding:
        conn.putheader("Accept-Encoding", encoding)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"status {response.status}")
EOF
  # Let the server go idle, then stop it: callgrind writes its totals.
  sleep 1
  kill -TERM "$pid"
  wait "$pid" || true
  awk '/Collected :/ {print $NF}' "$work/$mode.$n.log"
}
declare -A per
for mode in "${modes[@]}"; do
  a=$(count "$mode" "$n1")
  b=$(count "$mode" "$n2")
  per[$mode]=$(( (b - a) / (n2 - n1) ))
done
printf '%-7s %-5s %14s %12s %10s\n' mode route "instr/request" "over bare" "bare/mode"
for mode in "${modes[@]}"; do
  if [[ -n ${per[bare]:-} ]]; then
    over=$(( per[$mode] - per[bare] ))
    ratio=$(python3 -c "print(f'{${per[bare]} / ${per[$mode]}:.2f}')")
  else
    over=-; ratio=-
  fi
  printf '%-7s %-5s %14d %12s %10s\n' "$mode" "$route" "${per[$mode]}" "$over" "$ratio"
done
