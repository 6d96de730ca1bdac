#!/usr/bin/env bash
# The fault-injection suite (`make chaos`): each scenario starts the local
# cluster (3 NATS servers, 3 edges, nginx; deploy/local/cluster.sh), runs the
# load generator through nginx with clients that reconnect like browsers
# (honouring `retry:`, resuming with Last-Event-ID) while events are published
# into NATS JetStream, injects one fault mid-run, and checks what every client
# received. A scenario passes with zero lost, duplicated and reordered events,
# no stream request answered with anything but 200 (a browser's EventSource
# gives up for good after one), and proof that the fault took effect.
#
#   chaos/run.sh [scenario...]     default: every scenario
#
# Scenarios that need more than the load generator (a real browser, a skewed
# clock, a data-loss simulation) are scripts in chaos/scenarios/<name>.sh; they
# get this file's environment and leave $RESULTS/<name>.json.
#
# Sizes: CONNECTIONS (300), RATE (300 events/s), DURATION (15 s), CUT_SECS (8:
# how long a network cut lasts), STALL_SECS (2: how long client-slow-consumer
# stops edge-3). Binaries: EDGE_BIN, LOADTEST_BIN, FAULTS_BIN
# (default: the release builds). Traffic stays on 127.0.0.1; every run is
# bounded by DURATION plus the drain time.
set -euo pipefail
cd "$(dirname "$0")/.."

export CLUSTER_DIR=${CLUSTER_DIR:-$PWD/.cluster-chaos}
export BASE_PORT=${BASE_PORT:-28080} NATS_PORT=${NATS_PORT:-24222} GOSSIP_PORT=${GOSSIP_PORT:-27946}
export CONNECTIONS=${CONNECTIONS:-300} RATE=${RATE:-300} DURATION=${DURATION:-15} CUT_SECS=${CUT_SECS:-8}
export STALL_SECS=${STALL_SECS:-2}
# A port inside the kernel's ephemeral range can be taken at any moment by a
# client's source port (a run once failed to bind 127.0.0.1:49082 that way):
# every port a run derives (each base up to +4100) must stay below or above it.
if read -r ephemeral_low ephemeral_high < /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; then
  for setting in BASE_PORT NATS_PORT GOSSIP_PORT; do
    low=${!setting} high=$((${!setting} + 4100))
    if [ "$high" -ge "$ephemeral_low" ] && [ "$low" -le "$ephemeral_high" ]; then
      echo "chaos: $setting=$low reaches into the ephemeral port range $ephemeral_low-$ephemeral_high (net.ipv4.ip_local_port_range); pick ports below $((ephemeral_low - 4100)) (defaults: BASE_PORT=28080 NATS_PORT=24222 GOSSIP_PORT=27946)" >&2
      exit 64
    fi
  done
fi
. chaos/lib.sh
# No proxy outlives the run, even one whose cluster failed to start.
trap stop_faults EXIT

SCENARIOS=(edge-sigkill rolling-restart nats-restart stream-leader-kill edge-nats-cut edge-nats-partition gossip-partition
           slow-consumers reconnect-storm publisher-retries nats-power-loss nats-history-rewound
           chromium-edge-kill chromium-rolling-restart chromium-statuses chromium-revoke eventsource-npm clock-skew mixed-targets mixed-targets-leader
           nats-route-drop client-slow-consumer)
declare -A DESCRIBE=(
  [edge-sigkill]="an edge killed with SIGKILL under load, back 3 s later"
  [rolling-restart]="every edge restarted in turn with SIGTERM (drain)"
  [nats-restart]="one of the three NATS servers restarted"
  [stream-leader-kill]="the JetStream stream leader killed with SIGKILL, back 5 s later"
  [edge-nats-cut]="edge-3's connections to every NATS server reset and refused for CUT_SECS"
  [edge-nats-partition]="edge-3's traffic to every NATS server silently frozen for CUT_SECS (nothing closes)"
  [gossip-partition]="edge-3 cut off from its peers' gossip (not from NATS) for CUT_SECS"
  [slow-consumers]="10 % of clients stop reading next to fast ones"
  [reconnect-storm]="nginx stopped and started: every client reconnects at once"
  [publisher-retries]="every event published twice with the same Nats-Msg-Id"
  [nats-power-loss]="every NATS server killed with SIGKILL at once (sync_interval: always), back 2 s later"
  [nats-history-rewound]="the NATS stores put back to a copy taken 5 s earlier: acknowledged events gone"
  [chromium-edge-kill]="headless Chromium's EventSource across a SIGKILL of its edge"
  [chromium-rolling-restart]="headless Chromium's EventSource across every edge restarted in turn with SIGTERM (drain)"
  [eventsource-npm]="30 npm eventsource clients through nginx, events from the Node nats client, across an edge SIGKILL and a drain"
  [chromium-statuses]="headless Chromium's EventSource against forced 401, 429, 503 and 204 answers"
  [chromium-revoke]="headless Chromium's EventSource disconnected (reconnects) and revoked (204, CLOSED for good) with POST /v1/disconnect sent to another edge"
  [clock-skew]="edge-3's clock 5 minutes fast, edge-2's 5 minutes slow (libfaketime): resumes, order, tokens, gossip"
  [mixed-targets]="each client follows its user and a shared topic (one stream, two targets) across an edge SIGKILL and a NATS server restart (not the stream leader's): each target's events in order, and every id resumes exactly"
  [mixed-targets-leader]="mixed-targets with the stream leader's NATS server restarted: each target's events in order, and every id resumes exactly, through an election"
  [nats-route-drop]="every route of nats-2 cut for CUT_SECS, no server restarted; edge-3 stays connected to nats-2 only, so its live copies are lost without a reconnect; quiet users among the clients"
  [client-slow-consumer]="edge-3's NATS client drops live copies itself (live buffer of 8, edge-3 stopped for STALL_SECS); quiet users among the clients"
)
# The longest a quiet user's event may take (publish to client), seconds:
# how long the fault kept it from edge-3, plus the 5 s within which a check
# (every 2 s, nats.check_interval_ms) fills a lost live copy.
# client-slow-consumer: an event published while edge-3 is stopped waits
# the stall; a copy dropped when it resumes is filled by the check the drop
# asks for: the stall plus 5 s. nats-route-drop: nothing reaches edge-3
# while nats-2 is cut off (not its copies, not its reads of the stream), and
# healing does not end it at once: nats-2 campaigned alone during the cut,
# so its higher Raft term makes the stream's and the meta group's leaders
# step down when it is back, and nothing can be read or stored until they
# are elected again (5-10 s). The fault measures that time, from the cut to
# every server's /healthz passing with a stream leader, and writes the
# bound ($RESULTS/<scenario>.quiet-bound): that time plus 5 s.
export QUIET_BOUNDS="client-slow-consumer=$((STALL_SECS + 5))"

# The edge holding most streams is not known in advance; the faults below
# pick fixed members (edge-3, the stream leader) and prove the fault took
# effect, or fail the scenario.
note() { echo "$*" >> "$RESULTS/$name.note"; }
fault_failed() { note "FAULT NOT EFFECTIVE: $*"; return 1; }
leader_other_than() { local now; now=$($cluster nats-leader) && [ "$now" != "$1" ]; }

# Faults, run in the background while the load flows.
fault_edge_sigkill() { sleep 5; $cluster kill-edge 3; sleep 3; $cluster start-edge 3 >/dev/null; }
fault_rolling_restart() { sleep 3; for n in 1 2 3; do $cluster restart-edge "$n" >/dev/null; sleep 1; done; }
fault_nats_restart() { sleep 5; $cluster restart-nats 1 >/dev/null; }
# Clients resume on other edges (replay) and edges fill what NATS dropped
# while they reconnected, with two targets' events interleaved in each stream.
# mixed-targets restarts a NATS server that is not the stream's leader (the
# edges connected to it reconnect and fill); mixed-targets-leader restarts
# the leader's, whose last copies may never be sent, also to edges whose own
# connection stays up (docs/reliability.md: a window remains there).
fault_mixed_targets() { mixed_targets_fault follower; }
fault_mixed_targets_leader() { mixed_targets_fault leader; }
mixed_targets_fault() { # leader|follower: which NATS server to restart
  sleep 4; $cluster kill-edge 3; sleep 3; $cluster start-edge 3 >/dev/null
  sleep 2
  local leader server
  leader=$($cluster nats-leader) || fault_failed "no stream leader found"
  server=$leader
  [ "$1" = leader ] || server=$(( (leader + 1) % 3 ))
  $cluster restart-nats "$server" >/dev/null
  note "restarted nats-$server (the stream leader was nats-$leader)"
}
# nats-2 cut off from its peers (chaos/lib.sh route_nats2) while edge-3 is
# connected to it alone: the leader's republished copies stop reaching edge-3,
# and nothing tells it (its connection stays up). The stream's leader is
# kept off nats-2 first (asked to step down if it is there): the case to show
# is the leader keeping its quorum and publishing on while nats-2 misses its
# copies. Led by nats-2, the cut would stall publishing until the other two
# elect a leader (one run kept nats-2 leading through all 8 s), and little
# would be lost.
fault_nats_route_drop() {
  sleep 4
  local leader cid repairs pids t
  leader=$($cluster nats-leader) || fault_failed "no stream leader found"
  if [ "$leader" = 2 ]; then
    for _ in 1 2 3; do
      $cluster stream-stepdown >/dev/null || true
      t=$(waited 10 leader_other_than 2) && break
    done
    leader=$($cluster nats-leader) && [ "$leader" != 2 ] || fault_failed "nats-2 still leads the stream after three step-downs"
    note "nats-2 led the stream: asked it to step down, nats-$leader leads ${t} s later"
  fi
  cid=$(nats_client_cid 2 edge-3) || fault_failed "edge-3 has no connection on nats-2"
  repairs=$(edge_metric 3 herald_gap_repairs_total)
  pids=$(nats_pids)
  local cut_at healthy_at
  cut_at=$(date +%s.%N)
  faults_signal "$name" USR1
  t=$(waited 10 nats_unrouted 2) || fault_failed "nats-2 still had routes 10 s into the cut"
  note "nats-2 had no route ${t} s into the cut (the stream leader: nats-$leader)"
  connected_throughout 3 "$CUT_SECS" || fault_failed "edge-3's NATS connection dropped during the cut"
  faults_signal "$name" USR2
  t=$(waited 30 nats_routed 2) || fault_failed "nats-2 had no route 30 s after healing"
  note "nats-2 routed again ${t} s after healing ($($cluster nats-routes 2) routes)"
  t=$(waited 60 nats_healthy) || fault_failed "NATS not healthy 60 s after healing"
  healthy_at=$(date +%s.%N)
  awk "BEGIN { printf \"%.1f\", $healthy_at - $cut_at + 5 }" > "$RESULTS/$name.quiet-bound"
  note "NATS healthy again ${t} s after healing (every /healthz, a stream leader: nats-$($cluster nats-leader)); quiet bound $(cat "$RESULTS/$name.quiet-bound") s"
  [ "$(nats_client_cid 2 edge-3)" = "$cid" ] || fault_failed "edge-3 reconnected (its connection $cid on nats-2 is gone)"
  [ "$(nats_pids)" = "$pids" ] || fault_failed "a NATS server restarted"
  t=$(waited 15 metric_beyond 3 herald_gap_repairs_total "$repairs") \
    || fault_failed "edge-3 filled no gap: no live copy was lost"
  sleep 3
  note "edge-3 stayed connected (herald_nats_connected 1 throughout, connection $cid on nats-2 kept) and filled $(( $(edge_metric 3 herald_gap_repairs_total) - repairs )) gaps; $(check_fills 3)"
}
nats_healthy() {
  local i
  for i in 0 1 2; do curl -fsS "http://127.0.0.1:$((NATS_PORT + 4000 + i))/healthz" >/dev/null || return 1; done
  $cluster nats-leader >/dev/null 2>&1
}
nats_unrouted() { [ "$($cluster nats-routes "$1")" = 0 ]; }
nats_routed() { local n; n=$($cluster nats-routes "$1") && [ "$n" -gt 0 ]; }
nats_pids() { cat "$CLUSTER_DIR"/pid.nats-{0,1,2}; }
# The cid of the client connection named $2 on NATS server $1 (/connz).
nats_client_cid() {
  curl -fsS "http://127.0.0.1:$((NATS_PORT + 4000 + $1))/connz?limit=4096" | python3 -c '
import json, sys
print(next(c["cid"] for c in json.load(sys.stdin)["connections"] if c.get("name") == sys.argv[1]))' "$2"
}
# What edge $1's periodic check found (its dispatcher logs at info level):
# targets whose newest stored event never arrived live, quiet users' apart.
check_fills() {
  local first_quiet=$((CONNECTIONS - CONNECTIONS / 10))
  grep 'never arrived live' "$CLUSTER_DIR/logs/edge-$1.log" | grep -o 'user:lt-u[0-9]*' | sed 's/.*lt-u//' \
    | awk -v q="$first_quiet" '{ all++; if ($1 >= q) quiet++ } END { printf "its check found a target whose newest event never arrived live %d times (%d of them a quiet user)", all, quiet }'
}
metric_beyond() { local value; value=$(edge_metric "$1" "$2") && [ "$value" -gt "$3" ]; }
# herald_nats_connected of edge $1 read as 1 every quarter second for $2 s.
connected_throughout() {
  local until=$(( $(date +%s) + $2 ))
  while [ "$(date +%s)" -lt "$until" ]; do
    [ "$(edge_metric "$1" herald_nats_connected)" = 1 ] || return 1
    sleep 0.25
  done
}
# edge-3 runs with nats.subscription_capacity = 8 (SLOW_CAPACITY: its live
# buffer, shared by every target it follows: far below a stall's backlog of
# a few hundred copies; at 64, a debug build on a busy CI machine took them
# as fast as they came and nothing was dropped) and is stopped (SIGSTOP)
# for STALL_SECS under load: its server keeps sending, and once it runs again
# (SIGCONT) its NATS client reads the backlog faster than the dispatcher
# takes it, so async-nats drops copies of busy targets. The drop asks for a
# check at once; quiet targets show that nothing waits for a next event.
fault_client_slow_consumer() {
  sleep 5
  local pid before repairs t
  pid=$(cat "$CLUSTER_DIR/pid.edge-3")
  before=$(edge_metric 3 herald_nats_slow_consumer_total) \
    || fault_failed "edge-3 exports no herald_nats_slow_consumer_total"
  repairs=$(edge_metric 3 herald_gap_repairs_total)
  kill -STOP "$pid"
  sleep "$STALL_SECS"
  kill -CONT "$pid"
  t=$(waited 10 metric_beyond 3 herald_nats_slow_consumer_total "$before") \
    || fault_failed "edge-3's NATS client dropped nothing (herald_nats_slow_consumer_total stayed $before)"
  note "edge-3 stopped for ${STALL_SECS} s; ${t} s after SIGCONT its NATS client had dropped copies $(( $(edge_metric 3 herald_nats_slow_consumer_total) - before )) times"
  t=$(waited 15 metric_beyond 3 herald_gap_repairs_total "$repairs") \
    || fault_failed "edge-3 filled no gap after the drops"
  sleep 3
  note "edge-3 filled $(( $(edge_metric 3 herald_gap_repairs_total) - repairs )) gaps ($(edge_metric 3 herald_nats_slow_consumer_total) drops in all, herald_nats_connected $(edge_metric 3 herald_nats_connected)); $(check_fills 3)"
}
fault_slow_consumers() { :; }     # the fault is the clients: --slow-fraction
fault_publisher_retries() { :; }  # the fault is the publishers: --publish-twice
fault_stream_leader_kill() {
  sleep 5
  local leader after
  leader=$($cluster nats-leader) || fault_failed "no stream leader found"
  $cluster kill-nats "$leader"
  note "killed the stream leader nats-$leader"
  after=$(waited 15 leader_other_than "$leader") \
    || fault_failed "no new stream leader within 15 s"
  note "a new leader ($($cluster nats-leader)) within ${after} s"
  sleep 5
  $cluster start-nats "$leader" >/dev/null
}
fault_edge_nats_cut() { cut_edge_nats 10 20 "its NATS connections reset"; }
# Nothing closes: the edge notices only when its pings go unanswered.
fault_edge_nats_partition() { cut_edge_nats 15 30 "a silent partition (nats.ping_interval_ms = 1000)"; }
cut_edge_nats() { # seconds to notice, seconds to recover, what the cut is
  sleep 4
  local t
  faults_signal "$name" USR1
  t=$(waited "$1" unready 3) || fault_failed "edge-3 stayed ready through $3"
  note "edge-3 unready ${t} s into $3"
  sleep "$CUT_SECS"
  faults_signal "$name" USR2
  t=$(waited "$2" ready 3) || fault_failed "edge-3 not ready within $2 s of the routes coming back"
  note "edge-3 ready again ${t} s after the routes came back"
}
fault_gossip_partition() {
  sleep 3
  local t
  faults_signal "$name" USR1
  t=$(waited 20 not_alive 1 3) || fault_failed "edge-1 still saw edge-3 alive 20 s into the partition"
  note "edge-1 saw edge-3 $(member_state 1 3) ${t} s into the partition"
  not_alive 3 1 || fault_failed "edge-3 still saw edge-1 alive"
  sleep "$CUT_SECS"
  faults_signal "$name" USR2
  t=$(waited 20 converged) \
    || fault_failed "membership did not converge within 20 s of healing"
  note "membership converged ${t} s after healing"
}
fault_nats_power_loss() {
  sleep 5
  local i
  for i in 0 1 2; do $cluster kill-nats "$i"; done
  note "killed every NATS server with SIGKILL"
  sleep 2
  for i in 0 1 2; do $cluster start-nats "$i" >/dev/null & done
  wait
}
fault_nats_history_rewound() {
  sleep 4
  $cluster snapshot-nats >/dev/null
  local copied stored
  copied=$($cluster nats-last-seq)
  # History to lose: at least a second of publishing after the copy.
  waited 30 stored_beyond $((copied + RATE)) >/dev/null \
    || fault_failed "fewer than $RATE events stored after the copy (sequence $copied)"
  stored=$($cluster nats-last-seq)
  $cluster restore-nats >/dev/null
  note "copied every store at sequence $copied; at $stored killed every server and put the copies back: $((stored - copied)) acknowledged events gone"
}
stored_beyond() { local seq; seq=$($cluster nats-last-seq) && [ "$seq" -ge "$1" ]; }
fault_reconnect_storm() {
  sleep 5
  $cluster restart-nginx >/dev/null
  note "nginx stopped and started: every client's connection closed at once"
}

# Network scenarios put herald-faults between edges and what they talk to
# (chaos/lib.sh), under the scenario's name.
setup_edge_nats_cut() { route_edge3_nats "$name" 0; }
setup_edge_nats_partition() { route_edge3_nats "$name" 1; }
setup_gossip_partition() { route_gossip "$name"; }
setup_nats_route_drop() {
  route_nats2 "$name"
  export EDGE_ENV_3="HERALD__NATS__URL=nats://127.0.0.1:$((NATS_PORT + 2)) HERALD__NATS__IGNORE_DISCOVERED_SERVERS=true $CHECK_LOG"
}
setup_client_slow_consumer() { export EDGE_ENV_3="HERALD__NATS__SUBSCRIPTION_CAPACITY=${SLOW_CAPACITY:-8} $CHECK_LOG"; }
# edge-3 logs what its periodic check fills (check_fills).
CHECK_LOG="RUST_LOG=$RUST_LOG,herald_edge::bus::nats::dispatcher=info"

run_loadtest_scenario() {
  local extra=() duration=$DURATION
  case $name in
    slow-consumers) extra=(--slow-fraction 0.1) ;;
    publisher-retries) extra=(--publish-twice 1) ;;
    # Ten clients per user, so each user's events and the topic's come at
    # the same pace and interleave in every stream.
    mixed-targets | mixed-targets-leader) extra=(--topic chaos-news --mixed 1 --users $((CONNECTIONS / 10))) ;;
    # A whole NATS cluster takes 10-20 s to elect its leaders again: publish
    # long enough for events to flow after it (and, rewound, before the rewind).
    nats-power-loss | nats-history-rewound) duration=$((DURATION + 30)) ;;
    # The last tenth of the users get an event every 5 s. Publishers stay
    # off nats-2, whose routes are cut: the fault is edge-3's, not theirs.
    nats-route-drop) duration=$((DURATION + 10)) extra=(--quiet-users $((CONNECTIONS / 10)) --quiet-every-secs 5
                            --nats "nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1))") ;;
    # Three events at each quiet turn: one more than edge-3's subscriptions
    # buffer, so a turn that falls in the stall loses its last copy, which no
    # later event reveals for 5 s.
    client-slow-consumer) extra=(--quiet-users $((CONNECTIONS / 10)) --quiet-every-secs 5 --quiet-burst 3) ;;
  esac
  $cluster down >/dev/null 2>&1 || true
  if declare -F "setup_${name//-/_}" >/dev/null; then "setup_${name//-/_}"; fi
  $cluster up >/dev/null
  local fault="fault_${name//-/_}"
  "$fault" > "$RESULTS/$name.fault.log" 2>&1 &
  local fault_pid=$!
  loadgen --label "chaos-$name" --duration "$duration" --drain 20 "${extra[@]}" \
    --out "$RESULTS/$name.json" > "$RESULTS/$name.log" 2>&1 || true
  wait "$fault_pid" || touch "$RESULTS/$name.fault-failed"
  $cluster down >/dev/null
  stop_faults
}

# Every stream request nginx answered with anything but 200 (499 is nginx's
# note that the client left before an answer; nothing was sent).
non_200() {
  awk '$7 ~ /^\/v1\/stream/ && $9 != 200 && $9 != 499' "$CLUSTER_DIR/logs/nginx-access.log" \
    > "$RESULTS/$name.non200.log" 2>/dev/null || true
}

report() {
  python3 - "$RESULTS" "$CONNECTIONS" "$@" <<'PY'
import json, os, pathlib, sys
results, connections = pathlib.Path(sys.argv[1]), int(sys.argv[2])
quiet_bounds = {k: float(v) for k, v in (b.split("=") for b in os.environ.get("QUIET_BOUNDS", "").split())}
failed = 0
print(f"{'scenario':<24} {'published':>9} {'delivered':>9} {'lost':>5} {'dup':>4} {'reord':>5} "
      f"{'recover':>8} {'quiet max':>9} {'reconn':>6} {'retries':>7} {'dup acks':>8} {'non-200':>7}  result")
notes = []
for name in sys.argv[3:]:
    path = results / f"{name}.json"
    non200_log = results / f"{name}.non200.log"
    non200 = len(non200_log.read_text().splitlines()) if non200_log.exists() else 0
    note = results / f"{name}.note"
    if note.exists():
        notes += [f"  {name}: {line}" for line in note.read_text().splitlines()]
    if not path.exists():
        print(f"{name:<24} no result (see loadtest/results/chaos/{name}.log)  FAIL")
        failed += 1
        continue
    r = json.loads(path.read_text())
    problems = []
    # Scenarios that check behaviour rather than count events list "checks":
    # [{"name": …, "expected": …, "got": …, "pass": bool}].
    checks = r.get("checks", [])
    for check in checks:
        if not check["pass"]:
            problems.append(f"{check['name']}: expected {check['expected']}, got {check['got']}")
    if checks:
        notes += [f"  {name}: {'ok  ' if c['pass'] else 'FAIL'} {c['name']}: {c['got']}" for c in checks]
    if non200:
        problems.append(f"{non200} stream requests answered with a non-200 through nginx")
    if "published" not in r:
        failed += bool(problems)
        print(f"{name:<24} {len(checks) - len(problems)}/{len(checks)} checks passed  "
              f"{'pass' if not problems else 'FAIL: ' + '; '.join(problems)}")
        continue
    if r["lost"] or r["duplicated"] or r["reordered"]:
        problems.append("lost, duplicated or reordered events")
    if r["delivered"] == 0:
        problems.append("nothing delivered")
    if r.get("closed_for_good"):
        problems.append("an EventSource closed for good")
    if (results / f"{name}.fault-failed").exists():
        problems.append("the fault did not take effect")
    if name == "publisher-retries" and r.get("duplicate_acks", 0) < r["published"]:
        problems.append("a repeated Nats-Msg-Id was not acknowledged as a duplicate")
    if name == "nats-history-rewound" and r.get("connections_reset", 0) < connections:
        problems.append(f"only {r.get('connections_reset', 0)} of {connections} clients were told (herald.reset) that history went back")
    if name != "nats-history-rewound" and r.get("resets", 0):
        problems.append(f"{r['resets']} unexpected herald.reset")
    if name == "reconnect-storm" and r["reconnects"] < connections:
        problems.append("not every client reconnected")
    # Quiet users: the longest any of their events took (a lost live copy
    # of a target that stays quiet is repaired by the periodic check).
    quiet = "—"
    if r.get("quiet_users"):
        quiet = f"{r['quiet_delay_max_secs']:.2f}s"
        bound_file = results / f"{name}.quiet-bound"
        bound = float(bound_file.read_text()) if bound_file.exists() else quiet_bounds.get(name)
        if not r.get("quiet_delivered"):
            problems.append("no quiet user's event was delivered")
        elif bound is not None and r["quiet_delay_max_secs"] > bound:
            problems.append(f"a quiet user's event took {r['quiet_delay_max_secs']:.2f} s (bound {bound:g} s)")
    failed += bool(problems)
    # Recovery: the longest any event waited between publish and delivery.
    print(f"{name:<24} {r['published']:>9} {r['delivered']:>9} {r['lost']:>5} {r['duplicated']:>4} "
          f"{r['reordered']:>5} {r['latency_us']['max'] / 1e6:>7.2f}s {quiet:>9} {r['reconnects']:>6} "
          f"{r.get('publish_retries', 0):>7} {r.get('duplicate_acks', 0):>8} {non200:>7}  "
          f"{'pass' if not problems else 'FAIL: ' + '; '.join(problems)}")
if notes:
    print("\n" + "\n".join(notes))
sys.exit(1 if failed else 0)
PY
}

selected=("$@")
[ ${#selected[@]} -eq 0 ] && selected=("${SCENARIOS[@]}")
for name in "${selected[@]}"; do
  [ -n "${DESCRIBE[$name]:-}" ] || { echo "chaos: unknown scenario $name (one of: ${SCENARIOS[*]})" >&2; exit 64; }
done
for name in "${selected[@]}"; do
  echo "== $name: ${DESCRIBE[$name]}"
  rm -f "$RESULTS/$name".{json,note,fault-failed,non200.log,quiet-bound}
  export name
  if [ -x "chaos/scenarios/$name.sh" ]; then
    "chaos/scenarios/$name.sh" > "$RESULTS/$name.log" 2>&1 || true
    $cluster down >/dev/null 2>&1 || true
  else
    run_loadtest_scenario
  fi
  non_200
done
echo
report "${selected[@]}"
