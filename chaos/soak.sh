#!/usr/bin/env bash
# The soak (`make soak`): steady load through nginx on the local cluster for
# SOAK_SECS (default 600) with a fault every FAULT_EVERY seconds (default 60),
# rotating through: SIGKILL of edge-3 (restarted 3 s later), a SIGTERM restart
# of edge-3, a restart of one NATS server. edge-1 and edge-2 run throughout:
# their RSS and open descriptors are sampled every 10 s and must stay flat (the
# least-squares slope is reported per hour). At the end the load generator's
# invariants must hold: zero lost, duplicated, reordered.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-soak}
export BASE_PORT=${BASE_PORT:-18080} NATS_PORT=${NATS_PORT:-14222} GOSSIP_PORT=${GOSSIP_PORT:-17946}
export EDGE_BIN=${EDGE_BIN:-$PWD/target/release/herald-edge}
export RUST_LOG=${RUST_LOG:-warn}
LOADTEST_BIN=${LOADTEST_BIN:-$PWD/target/release/herald-loadtest}
SOAK_SECS=${SOAK_SECS:-600}
FAULT_EVERY=${FAULT_EVERY:-60}
CONNECTIONS=${CONNECTIONS:-500}
RATE=${RATE:-200}
SECRET=${HERALD_SECRET:-herald-dev-secret-change-me-0123456789}
export HERALD_SECRET=$SECRET
RESULTS=$PWD/loadtest/results/chaos
mkdir -p "$RESULTS"
cluster=deploy/local/cluster.sh

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT

"$LOADTEST_BIN" --label soak --url "http://127.0.0.1:$BASE_PORT" \
  --nats "nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))" \
  --secret "$SECRET" --connections "$CONNECTIONS" --users "$CONNECTIONS" \
  --rate "$RATE" --duration "$SOAK_SECS" --drain 30 --publishers 4 \
  --reconnect 1 --honor-retry 1 --out "$RESULTS/soak.json" > "$RESULTS/soak.log" 2>&1 &
loadgen=$!

samples="$RESULTS/soak-samples.csv"
echo "t_secs,node,rss_kib,fds" > "$samples"
started=$(date +%s)
next_fault=$FAULT_EVERY
fault=0
while kill -0 "$loadgen" 2>/dev/null; do
  now=$(( $(date +%s) - started ))
  for node in edge-1 edge-2; do
    pid=$(cat "$CLUSTER_DIR/pid.$node")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    echo "$now,$node,$rss,$fds" >> "$samples"
  done
  if [ "$now" -ge "$next_fault" ] && [ "$now" -lt "$SOAK_SECS" ]; then
    case $(( fault % 3 )) in
      0) echo "[$now s] SIGKILL edge-3"; $cluster kill-edge 3; sleep 3; $cluster start-edge 3 >/dev/null ;;
      1) echo "[$now s] SIGTERM restart of edge-3"; $cluster restart-edge 3 >/dev/null ;;
      2) echo "[$now s] restart nats-1"; $cluster restart-nats 1 >/dev/null ;;
    esac
    fault=$(( fault + 1 ))
    next_fault=$(( next_fault + FAULT_EVERY ))
  fi
  sleep 10
done
wait "$loadgen" || true

python3 - "$samples" "$RESULTS/soak.json" "$fault" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
result = json.load(open(sys.argv[2]))
faults = int(sys.argv[3])
ok = result["lost"] == 0 and result["duplicated"] == 0 and result["reordered"] == 0
print(f"soak: {result['published']} events published, {result['delivered']} delivered, "
      f"lost {result['lost']}, duplicated {result['duplicated']}, reordered {result['reordered']}, "
      f"{result['reconnects']} reconnects, {faults} faults")
def slope(points):
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points) or 1
    return sum((x - mx) * (y - my) for x, y in points) / den
for node in ("edge-1", "edge-2"):
    points = [(int(r["t_secs"]), int(r["rss_kib"]), int(r["fds"])) for r in rows if r["node"] == node]
    # Skip the first minute (connections arriving, caches warming).
    steady = [p for p in points if p[0] >= 60] or points
    rss = slope([(t, r) for t, r, _ in steady]) * 3600
    fds = slope([(t, f) for t, _, f in steady]) * 3600
    print(f"soak: {node}: RSS {steady[0][1]}→{steady[-1][1]} KiB (slope {rss:+.0f} KiB/h), "
          f"descriptors {steady[0][2]}→{steady[-1][2]} (slope {fds:+.1f}/h) over {len(steady)} samples")
sys.exit(0 if ok else 1)
PY
