#!/usr/bin/env bash
# What the NATS bus's periodic live check costs: one edge and one nats-server
# (both pinned to CPU 0), USERS idle-ish users each followed by one stream
# (so USERS followed targets), RATE events/s spread over them (quiet users:
# each receives one every USERS/RATE seconds), for DURATION seconds — once
# with the check every CHECK_MS, once with it effectively off. Prints, for
# each run, the edge's and nats-server's CPU seconds over the load and the
# messages nats-server received per second (its /varz in_msgs: publishes
# plus API requests); the difference between the runs is the check's cost.
#
#   loadtest/check-cost.sh            USERS=10000 RATE=170 DURATION=60 CHECK_MS=2000
#
# Loopback only; every run is bounded by DURATION plus the drain.
set -euo pipefail
cd "$(dirname "$0")/.."
USERS=${USERS:-10000} RATE=${RATE:-170} DURATION=${DURATION:-60} CHECK_MS=${CHECK_MS:-2000}
edge=${EDGE_BIN:-target/release/herald-edge}  # EDGE_BIN: another build, back to back
generator=target/release/herald-loadtest
secret="loadtest-secret-0123456789abcdef0123"
port=${PORT:-19080}
admin_port=$((port + 1000))
nats_port=${NATS_PORT:-19222}
monitor=$((nats_port + 1000))
results=loadtest/results
mkdir -p "$results"
ulimit -n "$(ulimit -Hn)" || true

cpu_seconds() { # pid: user + system CPU seconds so far
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"
}
in_msgs() { curl -fsS "http://127.0.0.1:$monitor/varz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["in_msgs"])'; }

run() { # label check_interval_ms
  local label=$1 interval=$2 store pids=()
  store=$(mktemp -d)
  trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$store"' RETURN
  taskset -c 0 bin/nats-server -js -a 127.0.0.1 -p "$nats_port" -m "$monitor" -sd "$store" > "$results/$label.nats.log" 2>&1 &
  local nats=$!; pids+=($nats)
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$monitor/varz" >/dev/null 2>&1 && break; sleep 0.1; done
  HERALD__BUS__KIND=nats HERALD__NATS__URL="nats://127.0.0.1:$nats_port" \
  HERALD__NATS__CHECK_INTERVAL_MS=$interval \
  HERALD__AUTH__HS256_SECRET=$secret HERALD__HTTP__LISTEN=127.0.0.1:$port \
  HERALD__ADMIN__LISTEN=127.0.0.1:$admin_port \
  HERALD__STREAM__MAX_CONNECTIONS_PER_USER=1000000 RUST_LOG=warn \
    taskset -c 0 "$edge" > "$results/$label.edge.log" 2>&1 &
  local edge_pid=$!; pids+=($edge_pid)
  for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  local e0 n0 m0 e1 n1 m1 started
  # Connections first (nothing published), so the measured window holds
  # only the steady state.
  taskset -c 1 "$generator" --label "$label" --url "http://127.0.0.1:$port" --secret "$secret" \
    --connections "$USERS" --users "$USERS" --rate "$RATE" --duration "$DURATION" --drain 5 \
    --nats "nats://127.0.0.1:$nats_port" --source-ips 16 --pids "$edge_pid" \
    --out "$results/$label.json" > "$results/$label.log" 2>&1 &
  local gen=$!; pids+=($gen)
  # Start measuring once every stream is open (the generator prints its
  # first progress line then).
  for _ in $(seq 600); do grep -q "ev/s" "$results/$label.log" 2>/dev/null && break; sleep 0.1; done
  e0=$(cpu_seconds "$edge_pid"); n0=$(cpu_seconds "$nats"); m0=$(in_msgs); started=$(date +%s.%N)
  wait "$gen"
  e1=$(cpu_seconds "$edge_pid"); n1=$(cpu_seconds "$nats"); m1=$(in_msgs)
  python3 - "$label" "$interval" "$started" "$e0" "$e1" "$n0" "$n1" "$m0" "$m1" "$results/$label.json" <<'PY'
import json, sys, time
label, interval, started, e0, e1, n0, n1, m0, m1, path = sys.argv[1:]
secs = time.time() - float(started)
r = json.load(open(path))
print(f"{label:<18} check every {int(interval):>9} ms  over {secs:5.1f} s: edge {float(e1)-float(e0):6.2f} CPU-s, "
      f"nats-server {float(n1)-float(n0):6.2f} CPU-s, nats in_msgs {(int(m1)-int(m0))/secs:8.1f}/s; "
      f"lost {r.get('lost')} dup {r.get('duplicated')} reordered {r.get('reordered')}")
PY
}

echo "== check cost: $USERS followed users, $RATE events/s over them, ${DURATION}s"
run check-cost-on "$CHECK_MS"
run check-cost-off 3600000
