#!/usr/bin/env bash
# The soak (`make soak`): steady load through nginx on the local cluster for
# SOAK_SECS (default 600) with a fault every FAULT_EVERY seconds (default 60),
# rotating through: SIGKILL of edge-3 (restarted 3 s later), a SIGTERM restart
# of edge-3, a restart of one NATS server, SIGKILL of the stream's leader
# (restarted 5 s later), nginx stopped and started (every client reconnects at
# once), edge-3's NATS traffic silently frozen for CUT_SECS (default 8), edge-3
# cut off from its peers' gossip for CUT_SECS. The two partitions need
# herald-faults in place from the start: edge-3 reaches NATS through its
# proxies and all gossip passes through relays whenever those faults are in
# the rotation; each proves it took effect (edge-3 unready, edge-1 no longer
# seeing edge-3 alive) or the soak fails. edge-1 and edge-2 run throughout: their RSS, open descriptors and
# open streams are sampled every 10 s. Faults move streams between edges, so
# besides the plain least-squares slope per hour the report gives the slope
# with the number of open streams factored out (RSS ~ a + b*streams + c*t:
# c is growth that streams do not explain). Edges built with --features
# heap-stats (make soak builds them so) also report their live heap bytes,
# which tell a leak from memory the allocator keeps. At the end the load generator's
# invariants must hold: zero lost, duplicated, reordered.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-soak}
export BASE_PORT=${BASE_PORT:-19080} NATS_PORT=${NATS_PORT:-15222} GOSSIP_PORT=${GOSSIP_PORT:-19946}
SOAK_SECS=${SOAK_SECS:-600}
FAULT_EVERY=${FAULT_EVERY:-60}
# Which faults rotate (all seven by default); e.g. SOAK_FAULTS="nats-restart
# leader-kill" keeps every stream where it is and faults only NATS.
SOAK_FAULTS=${SOAK_FAULTS:-edge-kill edge-restart nats-restart leader-kill nginx-restart nats-partition gossip-partition}
read -r -a faults <<< "$SOAK_FAULTS"
CONNECTIONS=${CONNECTIONS:-500}
RATE=${RATE:-200}
CUT_SECS=${CUT_SECS:-8}
. chaos/lib.sh

$cluster down >/dev/null 2>&1 || true
stop_faults
trap '$cluster down >/dev/null 2>&1 || true; stop_faults' EXIT
case " $SOAK_FAULTS " in *" nats-partition "*) route_edge3_nats soak-nats 1 ;; esac
case " $SOAK_FAULTS " in *" gossip-partition "*) route_gossip soak-gossip ;; esac
$cluster up >/dev/null

# A partition of CUT_SECS through proxy $1, proven by $2 (while cut) and $3
# (after healing), each a check with its limit in seconds.
ineffective=0
partition() { # label "limit check..." "limit check..."
  local t
  faults_signal "$1" USR1
  # shellcheck disable=SC2086 # the checks are words on purpose
  if t=$(waited $2); then echo "  in effect after $t s"; else echo "  FAULT NOT EFFECTIVE: $2"; ineffective=$((ineffective + 1)); fi
  sleep "$CUT_SECS"
  faults_signal "$1" USR2
  # shellcheck disable=SC2086
  if t=$(waited $3); then echo "  healed after $t s"; else echo "  NOT HEALED: $3"; ineffective=$((ineffective + 1)); fi
}

loadgen --label soak --duration "$SOAK_SECS" --drain 30 --out "$RESULTS/soak.json" > "$RESULTS/soak.log" 2>&1 &
loadgen=$!

samples="$RESULTS/soak-samples.csv"
echo "t_secs,node,rss_kib,fds,streams,heap_kib" > "$samples"
started=$(date +%s)
next_fault=$FAULT_EVERY
fault=0
while kill -0 "$loadgen" 2>/dev/null; do
  now=$(( $(date +%s) - started ))
  for node in edge-1 edge-2; do
    pid=$(cat "$CLUSTER_DIR/pid.$node")
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
    fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l)
    metrics=$(curl -fsS "http://127.0.0.1:$((BASE_PORT + ${node#edge-}))/metrics" 2>/dev/null || true)
    streams=$(awk '$1 == "herald_connections_open" {print $2}' <<< "$metrics")
    # Live heap bytes, when the edge was built with --features heap-stats.
    heap=$(awk '$1 == "herald_heap_allocated_bytes" {printf "%d", $2 / 1024}' <<< "$metrics")
    echo "$now,$node,$rss,$fds,${streams:-0},$heap" >> "$samples"
  done
  if [ "$now" -ge "$next_fault" ] && [ "$now" -lt "$SOAK_SECS" ]; then
    case ${faults[$(( fault % ${#faults[@]} ))]} in
      edge-kill) echo "[$now s] SIGKILL edge-3"; $cluster kill-edge 3; sleep 3; $cluster start-edge 3 >/dev/null ;;
      edge-restart) echo "[$now s] SIGTERM restart of edge-3"; $cluster restart-edge 3 >/dev/null ;;
      nats-restart) echo "[$now s] restart nats-1"; $cluster restart-nats 1 >/dev/null ;;
      leader-kill) leader=$($cluster nats-leader) && { echo "[$now s] SIGKILL the stream leader nats-$leader"
           $cluster kill-nats "$leader"; sleep 5; $cluster start-nats "$leader" >/dev/null; } ;;
      nginx-restart) echo "[$now s] nginx stopped and started"; $cluster restart-nginx >/dev/null ;;
      nats-partition) echo "[$now s] edge-3's NATS traffic frozen for $CUT_SECS s"
           partition soak-nats "15 unready 3" "30 ready 3" ;;
      gossip-partition) echo "[$now s] edge-3 cut off from its peers' gossip for $CUT_SECS s"
           partition soak-gossip "20 not_alive 1 3" "20 converged" ;;
      *) echo "soak: unknown fault ${faults[$(( fault % ${#faults[@]} ))]}" >&2; exit 64 ;;
    esac
    fault=$(( fault + 1 ))
    next_fault=$(( next_fault + FAULT_EVERY ))
  fi
  sleep 10
done
wait "$loadgen" || true

if [ "$ineffective" -gt 0 ]; then echo "soak: $ineffective partition checks failed (above)"; fi
python3 - "$samples" "$RESULTS/soak.json" "$fault" "$ineffective" <<'PY'
import csv, json, sys
rows = list(csv.DictReader(open(sys.argv[1])))
result = json.load(open(sys.argv[2]))
faults = int(sys.argv[3])
ok = result["lost"] == 0 and result["duplicated"] == 0 and result["reordered"] == 0 and sys.argv[4] == "0"
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
def fit(rows):
    """Least squares y ~ a + b*streams + c*t; returns (b, c). Solved from
    the centred normal equations (2x2), no numpy needed."""
    n = len(rows)
    mt = sum(t for t, _, _ in rows) / n
    ms = sum(s for _, s, _ in rows) / n
    my = sum(y for _, _, y in rows) / n
    sss = sum((s - ms) ** 2 for _, s, _ in rows)
    stt = sum((t - mt) ** 2 for t, _, _ in rows)
    sst = sum((s - ms) * (t - mt) for t, s, _ in rows)
    ssy = sum((s - ms) * (y - my) for _, s, y in rows)
    sty = sum((t - mt) * (y - my) for t, _, y in rows)
    det = sss * stt - sst * sst
    if n < 3 or det == 0:
        return 0.0, slope([(t, y) for t, _, y in rows])
    return (ssy * stt - sty * sst) / det, (sty * sss - ssy * sst) / det
for node in ("edge-1", "edge-2"):
    points = [(int(r["t_secs"]), int(r["rss_kib"]), int(r["fds"]), int(float(r.get("streams") or 0)))
              for r in rows if r["node"] == node]
    # Skip the first minute (connections arriving, caches warming).
    steady = [p for p in points if p[0] >= 60] or points
    rss = slope([(t, r) for t, r, _, _ in steady]) * 3600
    fds = slope([(t, f) for t, _, f, _ in steady]) * 3600
    per_stream, rss_beyond = fit([(t, s, r) for t, r, _, s in steady])
    fd_per_stream, fds_beyond = fit([(t, s, f) for t, _, f, s in steady])
    print(f"soak: {node}: RSS {steady[0][1]}→{steady[-1][1]} KiB (slope {rss:+.0f} KiB/h; "
          f"{per_stream:.1f} KiB per open stream, {rss_beyond * 3600:+.0f} KiB/h beyond that), "
          f"descriptors {steady[0][2]}→{steady[-1][2]} (slope {fds:+.1f}/h; "
          f"{fds_beyond * 3600:+.1f}/h beyond open streams), "
          f"streams {steady[0][3]}→{steady[-1][3]}, {len(steady)} samples")
    # Allocator high-water marks step up early and are then reused; a leak
    # keeps climbing. So also compare the two halves of the run.
    half = steady[len(steady) // 2][0]
    first = [p for p in steady if p[0] < half]
    second = [p for p in steady if p[0] >= half]
    if first and second:
        late = slope([(t, r) for t, r, _, _ in second]) * 3600
        print(f"soak: {node}: second half (from {half} s): RSS slope {late:+.0f} KiB/h, "
              f"peak {max(r for _, r, _, _ in first)} KiB in the first half, "
              f"{max(r for _, r, _, _ in second)} KiB in the second; "
              f"descriptors peak {max(f for _, _, f, _ in first)} then {max(f for _, _, f, _ in second)}")
    # What the allocator keeps is not a leak; live heap bytes tell them apart.
    heap = [(int(r["t_secs"]), int(r["heap_kib"]), int(float(r.get("streams") or 0)))
            for r in rows if r["node"] == node and r.get("heap_kib") and int(r["t_secs"]) >= 60]
    if len(heap) >= 3:
        per_stream, beyond = fit([(t, s, h) for t, h, s in heap])
        half_heap = heap[len(heap) // 2][0]
        late = slope([(t, h) for t, h, _ in heap if t >= half_heap]) * 3600
        print(f"soak: {node}: live heap {heap[0][1]}→{heap[-1][1]} KiB "
              f"(slope {slope([(t, h) for t, h, _ in heap]) * 3600:+.0f} KiB/h; "
              f"{per_stream:.1f} KiB per open stream, {beyond * 3600:+.0f} KiB/h beyond that; "
              f"second half {late:+.0f} KiB/h), peak {max(h for _, h, _ in heap)} KiB")
sys.exit(0 if ok else 1)
PY
