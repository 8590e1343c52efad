#!/usr/bin/env bash
# Cache hits under load, all four ways in one run (see
# examples/bench_server.rs): bare (no layer, the upper bound), memory,
# redis, tiered. Starts its own redis-server on a free loopback port.
#
#   bash benches/wrk.sh [seconds] [connections]
#
# Prints one line per mode and route: requests/s, p50, p99 (wrk's
# --latency), and the ratio to bare in this same run.
#
# On a small machine wrk and the server share the cores. The server is
# pinned to SERVER_CPUS (default: CPU 0; tokio then runs one worker) and
# wrk and redis-server to CLIENT_CPUS (default: CPU 1), so that each mode
# gets the same one core and the ratio measures the server. Set both to
# "" to run unpinned.
set -euo pipefail
secs=${1:-10}
conns=${2:-64}
server_cpus=${SERVER_CPUS-0}
client_cpus=${CLIENT_CPUS-1}
# taskset execs its command, so `$!` below is the process itself.
server_pin=(); [[ -n $server_cpus ]] && server_pin=(taskset -c "$server_cpus")
client_pin=(); [[ -n $client_cpus ]] && client_pin=(taskset -c "$client_cpus")
cd "$(dirname "$0")/.."
cargo build --release --example bench_server >/dev/null 2>&1
bin=target/release/examples/bench_server
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
rport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"${client_pin[@]}" redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
redis_pid=$!
trap 'kill $redis_pid 2>/dev/null || true' EXIT
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
export REDIS_URL="redis://127.0.0.1:$rport"
declare -A bare
printf '%-7s %-5s %10s %9s %9s %7s\n' mode route req/s p50 p99 ratio
for mode in bare memory redis tiered; do
  "${server_pin[@]}" "$bin" "$mode" "127.0.0.1:$port" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/mode" >/dev/null 2>&1 && break; sleep 0.1; done
  for route in 1k 64k; do
    out=$("${client_pin[@]}" wrk -t1 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$port/$route")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p50=$(awk '$1=="50%" {print $2}' <<<"$out")
    p99=$(awk '$1=="99%" {print $2}' <<<"$out")
    [[ $mode == bare ]] && bare[$route]=$rps
    ratio=$(python3 -c "print(f'{$rps/${bare[$route]}:.2f}')")
    printf '%-7s %-5s %10s %9s %9s %7s\n' "$mode" "$route" "$rps" "$p50" "$p99" "$ratio"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
