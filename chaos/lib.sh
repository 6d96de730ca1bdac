# Shared by chaos/run.sh, soak.sh, churn.sh and chaos/scenarios/*.sh (sourced
# from the repository root, after the caller set CLUSTER_DIR, BASE_PORT,
# NATS_PORT and GOSSIP_PORT): the binaries, the secret, where results go, the
# local cluster script, and the load generator as the chaos runs use it.
# ADMIN_PORT: edge n's admin listener (/metrics, /v1/cluster, /healthz,
# /readyz) is ADMIN_PORT + n, as deploy/local/cluster.sh starts it.
export ADMIN_PORT=${ADMIN_PORT:-$((BASE_PORT + 1000))}
export EDGE_BIN=${EDGE_BIN:-$PWD/target/release/herald-edge}
export LOADTEST_BIN=${LOADTEST_BIN:-$PWD/target/release/herald-loadtest}
export FAULTS_BIN=${FAULTS_BIN:-$(dirname "$LOADTEST_BIN")/herald-faults}
export RUST_LOG=${RUST_LOG:-warn}
export HERALD_SECRET=${HERALD_SECRET:-herald-dev-secret-change-me-0123456789}
export RESULTS=${RESULTS:-$PWD/loadtest/results/chaos}
export cluster=$PWD/deploy/local/cluster.sh
NATS_URLS="nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))"
mkdir -p "$RESULTS"

# The load generator: CONNECTIONS clients through nginx that resume like
# browsers (honour `retry:`, send Last-Event-ID), RATE events/s published into
# JetStream by 4 publishers. Further options (--label, --duration, --drain,
# --out, …) are the caller's; a later option overrides an earlier one.
loadgen() {
  "$LOADTEST_BIN" --url "http://127.0.0.1:$BASE_PORT" --nats "$NATS_URLS" --secret "$HERALD_SECRET" \
    --connections "$CONNECTIONS" --users "$CONNECTIONS" --rate "$RATE" --publishers 4 \
    --reconnect 1 --honor-retry 1 "$@"
}

# Checks on the cluster a fault is proven with.
# Polls a command every 0.1 s for up to $1 seconds; prints the seconds waited.
waited() {
  local limit=$1 start; shift
  start=$(date +%s.%N)
  for _ in $(seq $((limit * 10))); do
    if "$@" >/dev/null 2>&1; then awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }"; return 0; fi
    sleep 0.1
  done
  return 1
}
edge_url() { echo "http://127.0.0.1:$((BASE_PORT + $1))"; }
admin_url() { echo "http://127.0.0.1:$((ADMIN_PORT + $1))"; }
# How edge $1 sees edge $2 in GET /v1/cluster (alive, suspect, dead, left).
member_state() {
  curl -fsS "$(admin_url "$1")/v1/cluster" \
    | python3 -c "import json,sys; print(next((m['state'] for m in json.load(sys.stdin)['members'] if m['id']=='edge-$2'), 'absent'))"
}
not_alive() { local state; state=$(member_state "$1" "$2") && [ "$state" != alive ]; }
is_alive() { local state; state=$(member_state "$1" "$2") && [ "$state" = alive ]; }
unready() { ! curl -fsS "$(admin_url "$1")/readyz"; }
ready() { curl -fsS "$(admin_url "$1")/readyz"; }
converged() { is_alive 1 3 && is_alive 3 1 && is_alive 2 3; }
# A metric of edge $1 from its /metrics (one without labels).
edge_metric() { # edge name
  curl -fsS "$(admin_url "$1")/metrics" | awk -v name="$2" '$1 == name { print $2; found = 1 } END { exit !found }'
}

# herald-faults between edges and what they talk to. Each proxy has a label:
# its pid and addresses are $CLUSTER_DIR/faults-<label>.{pid,addrs}, its log
# $RESULTS/<label>.faults.log. SIGUSR1 cuts, SIGUSR2 heals (faults_signal).
# The routing goes into EDGE_ENV_<n> (read by deploy/local/cluster.sh when it
# starts edge n), so set it up before `cluster.sh up`.
start_faults() { # label kind args...
  local label=$1; shift
  rm -f "$CLUSTER_DIR/faults-$label.addrs"
  mkdir -p "$CLUSTER_DIR"
  "$FAULTS_BIN" "$@" --addr-file "$CLUSTER_DIR/faults-$label.addrs" > "$RESULTS/$label.faults.log" 2>&1 &
  echo $! > "$CLUSTER_DIR/faults-$label.pid"
  for _ in $(seq 100); do [ -s "$CLUSTER_DIR/faults-$label.addrs" ] && return 0; sleep 0.1; done
  echo "chaos: herald-faults did not start (see $RESULTS/$label.faults.log)" >&2
  return 1
}
faults_signal() { kill "-$2" "$(cat "$CLUSTER_DIR/faults-$1.pid")"; } # label USR1|USR2
stop_faults() { # every proxy, and the routing through them
  local pid
  for pid in "$CLUSTER_DIR"/faults-*.pid; do
    [ -f "$pid" ] || continue
    kill "$(cat "$pid")" 2>/dev/null || true
    rm -f "$pid"
  done
  unset EDGE_ENV_1 EDGE_ENV_2 EDGE_ENV_3 NATS_START_FIRST
  unset NATS_ROUTES_0 NATS_ROUTES_1 NATS_ROUTES_2
  unset NATS_CLUSTER_ADVERTISE_0 NATS_CLUSTER_ADVERTISE_1 NATS_CLUSTER_ADVERTISE_2
}
# edge-3 reaches each NATS server only through a proxy of its own. Silent
# (1): a cut freezes the connections; otherwise (0) it resets them.
route_edge3_nats() { # label silent
  start_faults "$1" tcp --upstream "127.0.0.1:$NATS_PORT" --upstream "127.0.0.1:$((NATS_PORT + 1))" \
    --upstream "127.0.0.1:$((NATS_PORT + 2))" --silent "$2"
  local urls
  urls=$(sed 's|^|nats://|' "$CLUSTER_DIR/faults-$1.addrs" | paste -sd,)
  export EDGE_ENV_3="${EDGE_ENV_3:-} HERALD__NATS__URL=$urls HERALD__NATS__IGNORE_DISCOVERED_SERVERS=true HERALD__NATS__PING_INTERVAL_MS=1000"
}
# Every route of nats-2 passes a proxy of one herald-faults process, so a cut
# isolates nats-2 from its peers while every server and every client
# connection stays up (deploy/local/cluster.sh reads the NATS_* routing).
# nats-2 routes to nats-0 and nats-1 through their proxies (a JetStream
# server refuses to start without configured routes, so its list cannot be
# empty) and advertises its own; nats-0 and nats-1 route to each other
# directly and to nats-2 through its proxy, and advertise their own proxies,
# so a route dialled after gossip passes a proxy too. They start first: their
# direct route is up before nats-2 gossips the proxied addresses.
route_nats2() { # label
  local cluster0=127.0.0.1:$((NATS_PORT + 2000)) cluster1=127.0.0.1:$((NATS_PORT + 2001))
  start_faults "$1" tcp --upstream "$cluster0" --upstream "$cluster1" --upstream "127.0.0.1:$((NATS_PORT + 2002))"
  local proxies
  mapfile -t proxies < "$CLUSTER_DIR/faults-$1.addrs"
  export NATS_ROUTES_0="$cluster1,${proxies[2]}" NATS_ROUTES_1="$cluster0,${proxies[2]}" NATS_ROUTES_2="${proxies[0]},${proxies[1]}"
  export NATS_CLUSTER_ADVERTISE_0=${proxies[0]} NATS_CLUSTER_ADVERTISE_1=${proxies[1]} NATS_CLUSTER_ADVERTISE_2=${proxies[2]}
  export NATS_START_FIRST="0 1"
}
# Every edge advertises a relay of its own, so all gossip passes through them;
# a cut isolates edge-3 from its peers (not from NATS).
route_gossip() { # label
  start_faults "$1" gossip --node "127.0.0.1:$GOSSIP_PORT" --node "127.0.0.1:$((GOSSIP_PORT + 1))" \
    --node "127.0.0.1:$((GOSSIP_PORT + 2))" --isolate "127.0.0.1:$((GOSSIP_PORT + 2))"
  local relays relay n=1 env
  relays=$(paste -sd, "$CLUSTER_DIR/faults-$1.addrs")
  while read -r relay; do
    env="EDGE_ENV_$n"
    export "EDGE_ENV_$n=${!env:-} HERALD__GOSSIP__ADVERTISE=$relay HERALD__GOSSIP__SEEDS=$relays"
    n=$((n + 1))
  done < "$CLUSTER_DIR/faults-$1.addrs"
}
