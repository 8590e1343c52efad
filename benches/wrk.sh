#!/usr/bin/env bash
# Cache hits under load, all four ways (see examples/bench_server.rs): bare
# (no layer, the upper bound), memory, redis, tiered. Starts its own
# redis-server on a free loopback port.
#
#   bash benches/wrk.sh [seconds] [connections] [rounds]
#
# The four servers run side by side (only the one under load uses CPU),
# and the modes take turns, round after round: bare, memory, redis, tiered,
# bare, ... so that a machine whose speed drifts (a shared VM) moves every
# mode alike. Prints, per mode and route, the median requests/s over the
# rounds, the p50 and p99 of the median run (wrk's --latency), and the
# median of the rounds' ratios to bare (each round against its own bare
# run), then every round's ratio.
#
# On a small machine wrk and the server share the cores. The servers are
# pinned to SERVER_CPUS (default: CPU 0; tokio then runs one worker) and
# wrk and redis-server to CLIENT_CPUS (default: CPU 1), so that each mode
# gets the same one core and the ratio measures the server. Set both to
# "" to run unpinned.
#
# Beside requests/s, each run reads the server's CPU time (user and
# kernel, from /proc/PID/stat) and wrk's request count: the server's CPU
# per request, kernel included, which the client's noise moves less than
# requests/s (and the redis-server's, for the modes that use it). bare's
# CPU per request over a mode's is the ceiling of that mode's ratio when
# the server's core is the bottleneck. The same file gives the server's
# minor page faults per request: memory the allocator handed back to the
# kernel and touched again (each fault costs kernel time).
#
# WRK_HEADER adds one request header to every request, for example
# WRK_HEADER='Accept-Encoding: gzip, deflate, br, zstd' for what browsers
# send (wrk alone sends only Host).
set -euo pipefail
secs=${1:-5}
conns=${2:-64}
rounds=${3:-3}
server_cpus=${SERVER_CPUS-0}
client_cpus=${CLIENT_CPUS-1}
modes=(bare memory redis tiered)
routes=(1k 64k)
# taskset execs its command, so `$!` below is the process itself.
server_pin=(); [[ -n $server_cpus ]] && server_pin=(taskset -c "$server_cpus")
client_pin=(); [[ -n $client_cpus ]] && client_pin=(taskset -c "$client_cpus")
header=(); [[ -n ${WRK_HEADER:-} ]] && header=(-H "$WRK_HEADER")
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
cd "$(dirname "$0")/.."
cargo build --release --example bench_server >/dev/null 2>&1
bin=target/release/examples/bench_server
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
pids=()
results=$(mktemp)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -f "$results"
}
trap cleanup EXIT
rport=$(free_port)
"${client_pin[@]}" redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
export REDIS_URL="redis://127.0.0.1:$rport"
declare -A port spid
for mode in "${modes[@]}"; do
  port[$mode]=$(free_port)
  "${server_pin[@]}" "$bin" "$mode" "127.0.0.1:${port[$mode]}" 2>/dev/null &
  pids+=($!)
  spid[$mode]=$!
done
# User and kernel CPU ticks a process has used so far, and its minor page
# faults (fields 14, 15 and 10 of /proc/PID/stat, counted after the
# parenthesised name).
ticks() {
  awk '{sub(/.*\) /, ""); print $12, $13, $8}' "/proc/$1/stat"
}
for mode in "${modes[@]}"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:${port[$mode]}/mode" >/dev/null 2>&1 && break; sleep 0.1; done
  # Fill the caches: the measured runs are hits.
  for route in "${routes[@]}"; do
    curl -sf "http://127.0.0.1:${port[$mode]}/$route" >/dev/null
    curl -sf "http://127.0.0.1:${port[$mode]}/$route" >/dev/null
  done
done
for round in $(seq "$rounds"); do
  for route in "${routes[@]}"; do
    for mode in "${modes[@]}"; do
      read -r su0 ss0 sf0 < <(ticks "${spid[$mode]}")
      read -r ru0 rs0 _ < <(ticks "$redis_pid")
      out=$("${client_pin[@]}" wrk -t1 -c"$conns" -d"${secs}s" --latency "${header[@]}" "http://127.0.0.1:${port[$mode]}/$route")
      read -r su1 ss1 sf1 < <(ticks "${spid[$mode]}")
      read -r ru1 rs1 _ < <(ticks "$redis_pid")
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      p50=$(awk '$1=="50%" {print $2}' <<<"$out")
      p99=$(awk '$1=="99%" {print $2}' <<<"$out")
      requests=$(awk '/requests in/ {print $1}' <<<"$out")
      echo "$round $route $mode $rps $p50 $p99 $requests $((su1 - su0)) $((ss1 - ss0)) $((ru1 - ru0 + rs1 - rs0)) $((sf1 - sf0))" >>"$results"
    done
  done
done
python3 - "$results" "${modes[*]}" "${routes[*]}" "$(getconf CLK_TCK)" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
modes, routes = sys.argv[2].split(), sys.argv[3].split()
us_per_tick = 1e6 / int(sys.argv[4])
runs = {}
cpu = {}
faults = {}
for rnd, route, mode, rps, p50, p99, requests, user, kernel, redis, minflt in rows:
    runs.setdefault((route, mode), []).append((int(rnd), float(rps), p50, p99))
    n = max(int(requests), 1)
    cpu.setdefault((route, mode), []).append(
        (int(rnd), int(user) * us_per_tick / n, int(kernel) * us_per_tick / n,
         int(redis) * us_per_tick / n))
    faults.setdefault((route, mode), []).append(int(minflt) / n)
print(f"{'mode':<7} {'route':<5} {'req/s':>10} {'p50':>9} {'p99':>9} {'ratio':>6}  ratio per round")
for route in routes:
    bare = {rnd: rps for rnd, rps, _, _ in runs[(route, "bare")]}
    for mode in modes:
        mine = sorted(runs[(route, mode)], key=lambda run: run[1])
        median = mine[len(mine) // 2]
        ratios = [rps / bare[rnd] for rnd, rps, _, _ in sorted(runs[(route, mode)])]
        each = " / ".join(f"{r:.2f}" for r in ratios)
        print(f"{mode:<7} {route:<5} {median[1]:>10.0f} {median[2]:>9} {median[3]:>9} "
              f"{statistics.median(ratios):>6.2f}  {each}")
print()
print("server CPU per request (us, median over rounds; kernel included), and")
print("bare's CPU per request over the mode's: its ratio's ceiling when the")
print("server's core is the bottleneck (redis-server's own CPU not counted there)")
print("(faults: the server's minor page faults per request)")
print(f"{'mode':<7} {'route':<5} {'cpu/req':>8} {'user':>7} {'kernel':>7} {'redis':>7} {'faults':>7} {'ceiling':>8}  ceiling per round")
for route in routes:
    bare = {rnd: user + kernel for rnd, user, kernel, _ in cpu[(route, "bare")]}
    for mode in modes:
        mine = cpu[(route, mode)]
        total = statistics.median(u + k for _, u, k, _ in mine)
        user = statistics.median(u for _, u, _, _ in mine)
        kernel = statistics.median(k for _, _, k, _ in mine)
        redis = statistics.median(r for _, _, _, r in mine)
        minflt = statistics.median(faults[(route, mode)])
        ceilings = [bare[rnd] / max(u + k, 1e-9) for rnd, u, k, _ in sorted(mine)]
        each = " / ".join(f"{c:.2f}" for c in ceilings)
        print(f"{mode:<7} {route:<5} {total:>8.2f} {user:>7.2f} {kernel:>7.2f} {redis:>7.2f} {minflt:>7.2f} "
              f"{statistics.median(ceilings):>8.2f}  {each}")
EOF
