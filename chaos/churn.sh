#!/usr/bin/env bash
# Memory across stream churn (`make churn`): does an edge give back what its
# streams used once they are gone? The soak's nodes grow while streams move
# onto them; this separates "more streams" from "something kept".
#
# The local cluster runs; CYCLES times, the load generator opens CONNECTIONS
# streams straight to edge-1 (no nginx, so all land there), sends them away,
# publishes OWED events to each, brings them all back at once (a replay
# burst, as after a fault), publishes live for a few seconds and disconnects
# everything. After each cycle, with no stream open, edge-1's RSS is sampled.
# A leak grows every cycle by about the same amount; allocator high-water
# marks grow in the first cycles and then stay.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-churn}
export BASE_PORT=${BASE_PORT:-21080} NATS_PORT=${NATS_PORT:-21222} GOSSIP_PORT=${GOSSIP_PORT:-21946}
CYCLES=${CYCLES:-12}
CONNECTIONS=${CONNECTIONS:-1000}
OWED=${OWED:-10}
. chaos/lib.sh
# No rebalancing: edge-1 keeps what it is given.
export EDGE_ENV_1="HERALD__REBALANCE__ENABLED=false ${CHURN_EDGE_ENV:-}"

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
pid=$(cat "$CLUSTER_DIR/pid.edge-1")
rss() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }
open_streams() {
  curl -fsS "$(admin_url 1)/metrics" | awk '$1 == "herald_connections_open" {print $2}'
}

samples="$RESULTS/churn.csv"
echo "cycle,rss_kib" > "$samples"
echo "0,$(rss)" >> "$samples"
for cycle in $(seq "$CYCLES"); do
  # Straight to edge-1, clients that do not reconnect on their own.
  RATE=500 loadgen --label churn --url "http://127.0.0.1:$((BASE_PORT + 1))" \
    --reconnect 0 --honor-retry 0 --owed "$OWED" --duration 3 --drain 10 \
    > "$RESULTS/churn-$cycle.log" 2>&1 || { echo "churn: cycle $cycle failed (see $RESULTS/churn-$cycle.log)" >&2; exit 1; }
  grep -q "^lost / dup / reordered 0 / 0 / 0" "$RESULTS/churn-$cycle.log" \
    || { echo "churn: cycle $cycle lost, doubled or reordered events" >&2; exit 1; }
  # Every stream of the cycle is gone before the sample.
  for _ in $(seq 100); do [ "$(open_streams)" = 0 ] && break; sleep 0.1; done
  echo "$cycle,$(rss)" >> "$samples"
  echo "churn: cycle $cycle: $CONNECTIONS streams came, replayed $OWED events each and went; RSS $(rss) KiB"
done

python3 - "$samples" <<'PY'
import csv, sys
rows = [(int(r["cycle"]), int(r["rss_kib"])) for r in csv.DictReader(open(sys.argv[1]))]
first_half = rows[1:len(rows) // 2 + 1]
second_half = rows[len(rows) // 2:]
def slope(points):
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((x - mx) ** 2 for x, _ in points) or 1
    return sum((x - mx) * (y - my) for x, y in points) / den
print(f"churn: RSS before {rows[0][1]} KiB, after cycle 1 {rows[1][1]} KiB, after the last {rows[-1][1]} KiB")
print(f"churn: growth per cycle {slope(first_half):+.0f} KiB in the first half, {slope(second_half):+.0f} KiB in the second")
PY
