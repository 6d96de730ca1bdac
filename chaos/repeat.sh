#!/usr/bin/env bash
# Runs one chaos scenario N times in a row and prints how many passed: a
# scenario that passed once proves little.
#
#   chaos/repeat.sh SCENARIO N        (make chaos-repeat SCENARIO=… N=… builds first)
#
# BUILD=release|debug picks the binaries (target/<BUILD>/; EDGE_BIN and
# LOADTEST_BIN override), HOG=1 keeps every core busy with a CPU hog this
# script starts and stops itself (one `sha256sum /dev/zero` per core, each
# bounded by `timeout` and killed on exit). Run n keeps its result, logs and
# the cluster's logs in loadtest/results/chaos/repeat/<scenario>/<n>/. Each
# run is bounded by RUN_LIMIT_SECS (1200); the cluster is taken down after
# every run, whatever happened. The ports are chaos/run.sh's (BASE_PORT,
# NATS_PORT, GOSSIP_PORT, CLUSTER_DIR may be overridden the same way).
set -euo pipefail
cd "$(dirname "$0")/.."

scenario=${1:-}
count=${2:-5}
BUILD=${BUILD:-release}
HOG=${HOG:-0}
RUN_LIMIT_SECS=${RUN_LIMIT_SECS:-1200}
if [ -z "$scenario" ] || ! grep -q "^  \[$scenario\]=" chaos/run.sh; then
  echo "usage: chaos/repeat.sh SCENARIO N (SCENARIO: a scenario of chaos/run.sh, not '${scenario}')" >&2
  exit 64
fi
[[ $count =~ ^[0-9]+$ ]] && [ "$count" -ge 1 ] && [ "$count" -le 1000 ] \
  || { echo "chaos/repeat.sh: N must be a count from 1 to 1000, not '$count'" >&2; exit 64; }
case $BUILD in release | debug) ;; *) echo "chaos/repeat.sh: BUILD is release or debug, not '$BUILD'" >&2; exit 64 ;; esac

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-chaos}
export BASE_PORT=${BASE_PORT:-28080} NATS_PORT=${NATS_PORT:-24222} GOSSIP_PORT=${GOSSIP_PORT:-27946}
export EDGE_BIN=${EDGE_BIN:-$PWD/target/$BUILD/herald-edge}
export LOADTEST_BIN=${LOADTEST_BIN:-$PWD/target/$BUILD/herald-loadtest}
. chaos/lib.sh
for bin in "$EDGE_BIN" "$LOADTEST_BIN" "$FAULTS_BIN"; do
  [ -x "$bin" ] || { echo "chaos/repeat.sh: $bin missing (make chaos-repeat builds it)" >&2; exit 1; }
done

out=$RESULTS/repeat/$scenario
rm -rf "$out"
mkdir -p "$out"

# The hog: one busy process per core, each ending by itself after the longest
# the runs can take, and killed when this script exits for any reason.
hogs=()
stop_hogs() {
  local pid
  for pid in "${hogs[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${hogs[@]}"; do wait "$pid" 2>/dev/null || true; done
  hogs=()
}
# A run goes in the background, in a process group of its own (timeout's),
# so an interrupt here ends it at once: bash runs a trap only after the
# foreground command it waits for has ended, and a Ctrl-C does not reach
# timeout's group.
run_pid=
stop_run() {
  [ -z "$run_pid" ] || kill -TERM -- "-$run_pid" 2>/dev/null || true
  [ -z "$run_pid" ] || wait "$run_pid" 2>/dev/null || true
  run_pid=
}
trap 'stop_run; stop_hogs; $cluster down >/dev/null 2>&1 || true; stop_faults' EXIT
trap 'exit 130' INT TERM
if [ "$HOG" = 1 ]; then
  for _ in $(seq "$(nproc)"); do
    timeout $((count * RUN_LIMIT_SECS)) sha256sum /dev/zero >/dev/null 2>&1 &
    hogs+=($!)
  done
  echo "CPU hog: ${#hogs[@]} busy processes (pids ${hogs[*]})"
fi

passed=0
for n in $(seq "$count"); do
  dir=$out/$n
  mkdir -p "$dir"
  started=$(date +%s)
  RESULTS=$dir timeout "$RUN_LIMIT_SECS" chaos/run.sh "$scenario" > "$dir/run.log" 2>&1 &
  run_pid=$!
  if wait "$run_pid"; then
    result=pass
    passed=$((passed + 1))
  else
    result=FAIL
  fi
  run_pid=
  # Whatever the run left (a timeout ends it anywhere): down, and its logs kept.
  $cluster down >/dev/null 2>&1 || true
  stop_faults
  [ -d "$CLUSTER_DIR/logs" ] && cp -r "$CLUSTER_DIR/logs" "$dir/cluster-logs"
  line=$(grep -E "^$scenario " "$dir/run.log" | tail -1 || true)
  echo "run $n of $count: $result in $(( $(date +%s) - started )) s   ${line:-no result line (see $dir/run.log)}"
done
stop_hogs
echo "$scenario: $passed of $count passed ($BUILD, hog $([ "$HOG" = 1 ] && echo on || echo off))" | tee "$out/summary"
[ "$passed" = "$count" ]
