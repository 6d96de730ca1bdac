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
# seeing edge-3 alive) or the soak fails. Every edge and NATS server is
# sampled every 10 s (RSS, open descriptors, open streams) and
# chaos/soak_report.py fits each node's slopes within its processes, since
# faults restart some of them: per hour, and for edges also with the number of
# open streams factored out, as faults move streams between edges. Edges
# built with --features heap-stats (make soak builds them so) also report
# their live heap bytes, which tell a leak from memory the allocator keeps. At
# the end the load generator's invariants must hold: zero lost, duplicated,
# reordered.
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
echo "t_secs,node,pid,rss_kib,fds,streams,heap_kib" > "$samples"
# One row per live process: every edge and every NATS server, whichever
# process holds the node's pid file now (faults restart some of them).
sample() { # node
  local pid rss fds metrics streams="" heap=""
  pid=$(cat "$CLUSTER_DIR/pid.$1" 2>/dev/null) || return 0
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 0
  [ -n "$rss" ] || return 0
  fds=$(ls "/proc/$pid/fd" 2>/dev/null | wc -l) || return 0
  case $1 in
    edge-*)
      metrics=$(curl -fsS "$(admin_url "${1#edge-}")/metrics" 2>/dev/null || true)
      streams=$(awk '$1 == "herald_connections_open" {print $2}' <<< "$metrics")
      # Live heap bytes, when the edge was built with --features heap-stats.
      heap=$(awk '$1 == "herald_heap_allocated_bytes" {printf "%d", $2 / 1024}' <<< "$metrics") ;;
  esac
  echo "$now,$1,$pid,$rss,$fds,${streams:-0},$heap" >> "$samples"
}
started=$(date +%s)
next_fault=$FAULT_EVERY
fault=0
while kill -0 "$loadgen" 2>/dev/null; do
  now=$(( $(date +%s) - started ))
  for node in edge-1 edge-2 edge-3 nats-0 nats-1 nats-2; do sample "$node"; done
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
python3 chaos/soak_report.py "$samples" "$RESULTS/soak.json" "$fault" "$ineffective"
