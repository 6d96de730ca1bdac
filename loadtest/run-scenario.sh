#!/usr/bin/env bash
# Runs one load scenario end to end: starts an edge node (pinned to CPU 0 where
# the machine has two or more), runs the load generator (pinned to the others),
# writes loadtest/results/<scenario>.json, and stops everything it started.
#
# Usage: loadtest/run-scenario.sh NAME   (variables in scenarios/NAME.env can be
# overridden from the environment, e.g. CONNECTIONS=50000 RATE=20000)
#
# BASELINE=express (or 1) runs the seed article's Express + Redis design
# instead of Herald (loadtest/baselines/express-redis), BASELINE=nchan runs
# nchan (loadtest/baselines/nchan); same generator, pinning and load. BUS=nats
# runs Herald on NATS JetStream (the nats-server is sampled apart: bus_* in
# the result). RESULTS_DIR (default loadtest/results) is where results go.
set -euo pipefail
cd "$(dirname "$0")/.."
scenario_name="${1:?usage: run-scenario.sh SCENARIO}"
scenario="loadtest/scenarios/$scenario_name.env"
case "${BASELINE:-}" in
  "") baseline="" suffix="" ;;
  1|express) baseline=express suffix=-baseline ;;
  nchan) baseline=nchan suffix=-nchan ;;
  *) echo "BASELINE=$BASELINE: express (or 1) or nchan"; exit 2 ;;
esac
# LABEL names the result (default: the scenario, with -baseline or -nchan for
# a baseline), for variants of one scenario.
name="${LABEL:-$scenario_name$suffix}"
[ -f "$scenario" ] || { echo "no scenario $scenario (have: $(ls loadtest/scenarios | sed 's/\.env//' | tr '\n' ' '))"; exit 2; }
# shellcheck source=/dev/null
source "$scenario"

# EDGE_BIN runs another build of the node (e.g. an older commit, back to back).
edge="${EDGE_BIN:-target/release/herald-edge}"
generator=target/release/herald-loadtest
secret="loadtest-secret-0123456789abcdef0123"
port="${PORT:-18080}"
results="${RESULTS_DIR:-loadtest/results}"
mkdir -p "$results"
if [ -n "$baseline" ] && [ "${BUS:-memory}" = nats ]; then
  echo "BASELINE=$BASELINE runs its own server, not Herald on BUS=nats"; exit 2
fi

if [ "$(nproc)" -ge 2 ]; then
  pin_server="taskset -c 0"; pin_client="taskset -c 1-$(( $(nproc) - 1 ))"
else
  pin_server=""; pin_client=""
fi
# SERVER_CPUS / CLIENT_CPUS override the pinning (e.g. SERVER_CPUS=0,1
# CLIENT_CPUS=0,1: the node given both cores, sharing them with the generator,
# whose own CPU time the result reports as client_cpu_secs).
if [ -n "${SERVER_CPUS:-}" ]; then pin_server="taskset -c $SERVER_CPUS"; fi
if [ -n "${CLIENT_CPUS:-}" ]; then pin_client="taskset -c $CLIENT_CPUS"; fi

pids=()
scratch=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for dir in "${scratch[@]}"; do rm -rf "$dir"; done
}
trap cleanup EXIT

ulimit -n "$(ulimit -Hn)" || true
if [ "${BUS:-memory}" = nats ]; then
  nats_port="${NATS_PORT:-14222}"
  store=$(mktemp -d)
  scratch+=("$store")
  # NATS_CPUS=1 puts nats-server on the load generator's core instead of the
  # edge's (to tell the edge's own latency from the shared core's).
  pin_nats=$pin_server
  if [ -n "${NATS_CPUS:-}" ]; then pin_nats="taskset -c $NATS_CPUS"; fi
  $pin_nats "${HERALD_NATS_SERVER:-bin/nats-server}" -js -a 127.0.0.1 -p "$nats_port" -sd "$store" > "$results/$name.nats.log" 2>&1 &
  pids+=($!)
  # Sampled apart from the edge (--bus-pids): the result shows both.
  bus_pids=$!
  for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break; sleep 0.1; done
  export HERALD__BUS__KIND=nats HERALD__NATS__URL="nats://127.0.0.1:$nats_port" HERALD__NATS__STORAGE="${NATS_STORAGE:-file}"
  # Publish straight into JetStream as applications do (PUBLISH_VIA=http: POST /v1/publish).
  if [ "${PUBLISH_VIA:-nats}" = nats ]; then nats_publish="nats://127.0.0.1:$nats_port"; fi
fi
if [ -n "${TRACE_RATIO:-}" ]; then
  sink_port="${SINK_PORT:-14318}"
  $pin_client python3 loadtest/otlp-sink.py "$sink_port" &
  pids+=($!)
  export HERALD__TELEMETRY__OTLP_ENDPOINT="http://127.0.0.1:$sink_port" HERALD__TELEMETRY__SAMPLE_RATIO="$TRACE_RATIO"
fi
urls=()
admin_urls=()
edges=()
api=herald
wait_ready() {
  for _ in $(seq 100); do
    curl -fsS "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "no answer from $1/readyz"; return 1
}
if [ "$baseline" = nchan ]; then
  # nchan: nginx's master and its one worker, pinned like Herald.
  nchan_dir=$(mktemp -d -t herald-nchan.XXXXXX)
  scratch+=("$nchan_dir")
  $pin_server loadtest/baselines/nchan/run.sh "$port" "$nchan_dir" > "$results/$name.nchan.log" 2>&1 &
  pids+=($!)
  master=$!
  urls+=("http://127.0.0.1:$port")
  wait_ready "${urls[0]}"
  worker=$(pgrep -P "$master" | head -1)
  [ -n "$worker" ] || { echo "nchan: no worker process under $master"; cat "$nchan_dir/error.log"; exit 1; }
  edges+=("$master,$worker")
  api=nchan
  NODES=0
elif [ "$baseline" = express ]; then
  # The seed article's design instead of Herald: Express + Redis pub/sub.
  redis_port="${REDIS_PORT:-16379}"
  $pin_server redis-server --port "$redis_port" --save '' --appendonly no > "$results/$name.redis.log" 2>&1 &
  pids+=($!)
  redis_pid=$!
  sleep 0.3
  PORT=$port REDIS_URL="redis://127.0.0.1:$redis_port" \
    $pin_server node loadtest/baselines/express-redis/server.mjs > "$results/$name.baseline.log" 2>&1 &
  pids+=($!)
  edges+=("$!,$redis_pid")
  urls+=("http://127.0.0.1:$port")
  wait_ready "http://127.0.0.1:$port"
  NODES=0
fi
for node in $(seq 0 $(( ${NODES:-1} - 1 ))); do
  node_port=$(( port + node ))
  admin_port=$(( port + 200 + node ))
  HERALD__AUTH__HS256_SECRET=$secret \
  HERALD__HTTP__LISTEN=127.0.0.1:$node_port \
  HERALD__ADMIN__LISTEN=127.0.0.1:$admin_port \
  HERALD__NODE__ID=edge-$node \
  HERALD__GOSSIP__LISTEN=127.0.0.1:$(( port + 100 + node )) \
  HERALD__GOSSIP__SEEDS=127.0.0.1:$(( port + 100 )) \
  HERALD__STREAM__MAX_CONNECTIONS_PER_USER=1000000 \
  HERALD__HTTP__PUBLISH_RATE_PER_SEC=1000000 \
  RUST_LOG=${EDGE_LOG:-warn} \
    $pin_server "$edge" > "$results/$name.edge-$node.log" 2>&1 &
  pids+=($!)
  edges+=($!)
  urls+=("http://127.0.0.1:$node_port")
  admin_urls+=("http://127.0.0.1:$admin_port")
  wait_ready "http://127.0.0.1:$admin_port"
done
url_list=$(IFS=,; echo "${urls[*]}")
admin_list=$(IFS=,; echo "${admin_urls[*]}")
if [ -n "${KILL_AFTER:-}" ] && [ "${#edges[@]}" -gt 1 ]; then
  # SIGKILL the last node mid-run; its clients must resume on the others.
  victim="${edges[-1]}"
  (sleep "$KILL_AFTER"; kill -9 "$victim" 2>/dev/null && echo "== killed node $victim (SIGKILL) after ${KILL_AFTER}s") &
fi

echo "== $name: $DESCRIPTION"
# The generator's own CPU time goes to $name.client-cpu (user + system
# seconds over its whole run), for runs where it shares the node's cores.
$pin_client python3 -c 'import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{usage.ru_utime + usage.ru_stime:.2f}\n")
sys.exit(code)' "$results/$name.client-cpu" "$generator" \
  --label "$name" \
  --url "$url_list" \
  --admin "$admin_list" \
  --api "$api" \
  --secret "$secret" \
  --connections "$CONNECTIONS" \
  --users "$USERS" \
  --topic "${TOPIC:-}" \
  --rate "$RATE" \
  --duration "$DURATION" \
  --payload "${PAYLOAD:-0}" \
  --publishers "${PUBLISHERS:-4}" \
  --slow-fraction "${SLOW_FRACTION:-0}" \
  --source-ips "${SOURCE_IPS:-16}" \
  --pids "${edges[0]}" \
  ${bus_pids:+--bus-pids "$bus_pids"} \
  ${OWED:+--owed "$OWED"} \
  ${nats_publish:+--nats "$nats_publish"} \
  --reconnect "${RECONNECT:-0}" \
  --honor-retry "${HONOR_RETRY:-0}" \
  --out "$results/$name.json"
# Each edge's /metrics after the run, for checks across nodes
# (loadtest/interest-routing.sh reads them).
for i in "${!admin_urls[@]}"; do
  curl -fsS "${admin_urls[$i]}/metrics" > "$results/$name.edge-$i.metrics" 2>/dev/null || true
done
