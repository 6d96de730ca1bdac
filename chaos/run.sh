#!/usr/bin/env bash
# The fault-injection suite (`make chaos`): each scenario starts the local
# cluster (3 NATS servers, 3 edges, nginx; deploy/local/cluster.sh), runs the
# load generator through nginx with clients that reconnect like browsers
# (honouring `retry:`, resuming with Last-Event-ID) while events are published
# into NATS JetStream, injects one fault mid-run, and checks what every client
# received. A scenario passes with zero lost, duplicated and reordered events
# and no stream request answered with anything but 200 (a browser's
# EventSource gives up for good after one).
#
#   chaos/run.sh [scenario...]     default: every scenario
#
# Sizes: CONNECTIONS (300), RATE (300 events/s), DURATION (15 s). Binaries:
# EDGE_BIN, LOADTEST_BIN (default: the release builds). Traffic stays on
# 127.0.0.1; every run is bounded by DURATION plus the drain time.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-chaos}
export BASE_PORT=${BASE_PORT:-28080} NATS_PORT=${NATS_PORT:-24222} GOSSIP_PORT=${GOSSIP_PORT:-27946}
export EDGE_BIN=${EDGE_BIN:-$PWD/target/release/herald-edge}
export RUST_LOG=${RUST_LOG:-warn}
LOADTEST_BIN=${LOADTEST_BIN:-$PWD/target/release/herald-loadtest}
CONNECTIONS=${CONNECTIONS:-300}
RATE=${RATE:-300}
DURATION=${DURATION:-15}
SECRET=${HERALD_SECRET:-herald-dev-secret-change-me-0123456789}
export HERALD_SECRET=$SECRET
RESULTS=$PWD/loadtest/results/chaos
mkdir -p "$RESULTS"
cluster=deploy/local/cluster.sh

# Faults, run in the background while the load flows.
fault_edge_sigkill() { sleep 5; $cluster kill-edge 3; sleep 3; $cluster start-edge 3 >/dev/null; }
fault_rolling_restart() { sleep 3; for n in 1 2 3; do $cluster restart-edge "$n" >/dev/null; sleep 1; done; }
fault_nats_restart() { sleep 5; $cluster restart-nats 1 >/dev/null; }
fault_slow_consumers() { :; }   # the fault is the clients: see SLOW below

SCENARIOS=(edge-sigkill rolling-restart nats-restart slow-consumers chromium-edge-kill)
declare -A DESCRIBE=(
  [edge-sigkill]="an edge killed with SIGKILL under load, back 3 s later"
  [rolling-restart]="every edge restarted in turn with SIGTERM (drain)"
  [nats-restart]="one of the three NATS servers restarted"
  [slow-consumers]="10 % of clients stop reading next to fast ones"
  [chromium-edge-kill]="headless Chromium's EventSource across a SIGKILL of its edge"
)

# A real browser: tools/sse-clients/chromium-edge-kill.mjs drives Chromium.
run_chromium() {
  local name=$1 verdict
  $cluster down >/dev/null 2>&1 || true
  $cluster up >/dev/null
  local sub pub
  sub=$(HERALD__AUTH__HS256_SECRET=$SECRET "$EDGE_BIN" token --user chromium)
  pub=$(HERALD__AUTH__HS256_SECRET=$SECRET "$EDGE_BIN" token --publish)
  verdict=$(BASE="http://127.0.0.1:$BASE_PORT" USER_ID=chromium SUB_TOKEN=$sub PUB_TOKEN=$pub \
    KILL_EDGE="$PWD/$cluster kill-edge {n}" \
    node tools/sse-clients/chromium-edge-kill.mjs 2> "$RESULTS/$name.log" || true)
  echo "$verdict" >> "$RESULTS/$name.log"
  awk '$7 ~ /^\/v1\/stream/ && $9 != 200 && $9 != 499' "$CLUSTER_DIR/logs/nginx-access.log" > "$RESULTS/$name.non200.log" 2>/dev/null || true
  $cluster down >/dev/null
  # The same fields as a load-generator result, for the table.
  python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"published": v["published"], "delivered": v["received"], "lost": v["lost"],
                  "duplicated": v["duplicated"], "reordered": 0 if v["ordered"] else 1,
                  "latency_us": {"max": 0}, "reconnects": v["reconnects"],
                  "closed_for_good": v["closed_for_good"]}))
PY
}

run_scenario() {
  local name=$1 slow=0 log
  [ "$name" = slow-consumers ] && slow=0.1
  $cluster down >/dev/null 2>&1 || true
  $cluster up >/dev/null
  log="$CLUSTER_DIR/logs/nginx-access.log"
  local fault="fault_${name//-/_}"
  "$fault" > "$RESULTS/$name.fault.log" 2>&1 &
  local fault_pid=$!
  "$LOADTEST_BIN" \
    --label "chaos-$name" \
    --url "http://127.0.0.1:$BASE_PORT" \
    --nats "nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))" \
    --secret "$SECRET" \
    --connections "$CONNECTIONS" --users "$CONNECTIONS" \
    --rate "$RATE" --duration "$DURATION" --drain 20 \
    --publishers 4 --slow-fraction "$slow" \
    --reconnect 1 --honor-retry 1 \
    --out "$RESULTS/$name.json" > "$RESULTS/$name.log" 2>&1 || true
  wait "$fault_pid" || echo "fault injection failed: see $RESULTS/$name.fault.log" >> "$RESULTS/$name.log"
  # Stream requests nginx answered with anything but 200 (499 is nginx's note
  # that the client left before an answer; nothing was sent).
  awk '$7 ~ /^\/v1\/stream/ && $9 != 200 && $9 != 499' "$log" > "$RESULTS/$name.non200.log" 2>/dev/null || true
  $cluster down >/dev/null
}

report() {
  python3 - "$RESULTS" "$@" <<'PY'
import json, pathlib, sys
results = pathlib.Path(sys.argv[1])
failed = 0
print(f"{'scenario':<17} {'published':>9} {'delivered':>9} {'lost':>5} {'dup':>4} {'reord':>5} {'max delay':>10} {'reconnects':>10} {'non-200':>7}  result")
for name in sys.argv[2:]:
    path = results / f"{name}.json"
    non200 = len((results / f"{name}.non200.log").read_text().splitlines()) if (results / f"{name}.non200.log").exists() else 0
    if not path.exists():
        print(f"{name:<17} {'no result (see loadtest/results/chaos/' + name + '.log)'}  FAIL")
        failed += 1
        continue
    r = json.loads(path.read_text())
    ok = (r["lost"] == 0 and r["duplicated"] == 0 and r["reordered"] == 0 and non200 == 0
          and r["delivered"] > 0 and not r.get("closed_for_good", False))
    failed += not ok
    print(f"{name:<17} {r['published']:>9} {r['delivered']:>9} {r['lost']:>5} {r['duplicated']:>4} {r['reordered']:>5} "
          f"{r['latency_us']['max'] / 1e6:>9.2f}s {r['reconnects']:>10} {non200:>7}  {'pass' if ok else 'FAIL'}")
sys.exit(1 if failed else 0)
PY
}

selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${SCENARIOS[@]}")
for name in "${selected[@]}"; do
  [ -n "${DESCRIBE[$name]:-}" ] || { echo "chaos: unknown scenario $name (one of: ${SCENARIOS[*]})" >&2; exit 64; }
  echo "== $name: ${DESCRIBE[$name]}"
  if [ "$name" = chromium-edge-kill ]; then run_chromium "$name"; else run_scenario "$name"; fi
done
echo
report "${selected[@]}"
