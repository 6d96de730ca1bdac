#!/usr/bin/env bash
# Profiles one edge build under a load scenario (fanout-10k by default):
# perf samples the pinned edge for PERF_SECS once publishing has begun, then
# strace counts its system calls for STRACE_SECS, with the node's delivered
# events read from /metrics around that window. Writes into OUT:
#   NAME.perf.txt   perf report --stdio --no-children (top entries)
#   NAME.folded     stacks folded for a flame graph (docs/profiles/flamegraph.py)
#   NAME.svg        the flame graph
#   NAME.strace.txt strace -c -f, with delivered events over the same window
#   NAME.json       the load generator's result
# Usage (from the repository root, release builds first):
#   docs/profiles/profile-run.sh EDGE_BIN OUT NAME [SCENARIO]   (BUS=nats for the NATS bus)
set -euo pipefail
edge_bin="${1:?EDGE_BIN}" out="${2:?OUT}" name="${3:?NAME}" scenario="${4:-fanout-10k}"
port="${PORT:-18080}"
perf_secs="${PERF_SECS:-10}" strace_secs="${STRACE_SECS:-5}"
mkdir -p "$out"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
log="$out/$name.run.log"
EDGE_BIN="$edge_bin" RESULTS_DIR="$scratch" LABEL="$name" PORT="$port" \
  loadtest/run-scenario.sh "$scenario" > "$log" 2>&1 &
runner=$!
for _ in $(seq 1200); do grep -q "connected in" "$log" && break; sleep 0.1; done
edge=""
for environ in /proc/[0-9]*/environ; do
  if { tr '\0' '\n' < "$environ"; } 2>/dev/null | grep -qx "HERALD__HTTP__LISTEN=127.0.0.1:$port"; then
    edge=$(basename "$(dirname "$environ")"); break
  fi
done
[ -n "$edge" ] || { echo "no edge on port $port"; cat "$log"; exit 1; }
sleep 1.5 # the generator settles 0.5 s, then publishing starts
delivered() {
  curl -fsS "http://127.0.0.1:$(( port + 200 ))/metrics" | awk '$1 == "herald_events_delivered_total" {print $2}' || echo 0
}
/usr/bin/perf record -F 999 -g --call-graph dwarf,16384 -p "$edge" -o "$scratch/perf.data" -- sleep "$perf_secs" 2> "$scratch/perf.log"
before=$(delivered)
timeout -s INT "$strace_secs" strace -c -f -p "$edge" -o "$scratch/strace.txt" || true
after=$(delivered)
{ echo "delivered events while strace ran: $(( after - before ))"; cat "$scratch/strace.txt"; } > "$out/$name.strace.txt"
wait "$runner" || true
cp "$scratch/$name.json" "$out/$name.json" 2>/dev/null || true
# Top entries, self time (no children), padding squeezed out of the columns.
/usr/bin/perf report -i "$scratch/perf.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.25 2>/dev/null \
  | sed -E 's/ {2,}/  /g; s/ +- +- *$//' | grep -v -e '^$' -e '^# \.\.' | head -80 > "$out/$name.perf.txt"
/usr/bin/perf script -i "$scratch/perf.data" 2>/dev/null | python3 docs/profiles/flamegraph.py fold > "$out/$name.folded"
python3 docs/profiles/flamegraph.py svg "$name" < "$out/$name.folded" > "$out/$name.svg"
python3 docs/profiles/flamegraph.py summary < "$out/$name.folded" >> "$out/$name.perf.txt"
ls -la "$out"/"$name".*
