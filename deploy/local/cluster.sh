#!/usr/bin/env bash
# The docker compose topology as local processes on loopback:
#
#   deploy/local/cluster.sh up      three nats-servers (JetStream cluster, R3
#                                   stream), three herald-edge nodes in one
#                                   gossip cluster, nginx in front with the
#                                   shared SSE proxy rules
#   deploy/local/cluster.sh check   publish through nginx and read it back
#   deploy/local/cluster.sh down    stop everything (edges drain on SIGTERM)
#
# `make cluster-up` / `make cluster-down` call this. State, logs and data live
# in .cluster/ (ignored by git). Ports: nginx 8080, edges 8081-8083 (their
# admin listeners, /metrics /v1/cluster /healthz /readyz, 9081-9083; gossip
# 7946-7948), NATS 4222-4224 (cluster 6222-6224, monitoring 8222-8224);
# BASE_PORT shifts the HTTP ones, ADMIN_PORT (default BASE_PORT + 1000) the
# admin ones. EDGE_BIN picks the binary (default target/release/herald-edge);
# EDGE_ENV_<n> adds settings to edge n (see start_edge).
#
# NATS routing, for faults between the servers (the chaos suite's
# nats-route-drop puts one server's routes through a proxy); unset, every
# server lists every cluster port and they all start at once:
#   NATS_ROUTES_<i>             server i's explicit routes, comma-separated
#                               host:port (JetStream needs at least one)
#   NATS_CLUSTER_ADVERTISE_<i>  the cluster address server i gossips to its
#                               peers (where they dial it)
#   NATS_START_FIRST            servers started first (e.g. "0 1"); the others
#                               start once these are routed to each other
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE=${CLUSTER_DIR:-$PWD/.cluster}
EDGE_BIN=${EDGE_BIN:-$PWD/target/release/herald-edge}
NATS_BIN=${NATS_BIN:-$PWD/bin/nats-server}
BASE_PORT=${BASE_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-$((BASE_PORT + 1000))}
NATS_PORT=${NATS_PORT:-4222}
GOSSIP_PORT=${GOSSIP_PORT:-7946}
SECRET=${HERALD_SECRET:-herald-dev-secret-change-me-0123456789}
NGINX_BIN=$(command -v nginx || echo /usr/sbin/nginx)

# Polls for up to 60 s. With 15 s, an edge twice failed to become ready in a
# CI run of chaos-fast (debug builds, a loaded 2-core machine) for a reason
# the next scenario's start erased from the logs; the bound only decides how
# soon a start that really failed is reported, and a failure now prints the
# logs' ends and who holds the edges' ports.
wait_for() { # what, command...
  local what=$1; shift
  for _ in $(seq 600); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "cluster: $what did not come up; logs in $STATE/logs" >&2
  # The next start replaces those logs: keep their ends with this message.
  local log
  for log in "$STATE"/logs/*.log; do
    [ -s "$log" ] && { echo "--- tail of $log" >&2; tail -n 8 "$log" >&2; }
  done
  command -v ss >/dev/null && { echo "--- listening sockets" >&2; ss -ltnp 2>/dev/null | grep -E ":($BASE_PORT|$ADMIN_PORT|$((BASE_PORT + 1))|$((BASE_PORT + 2))|$((BASE_PORT + 3))|$((ADMIN_PORT + 1))|$((ADMIN_PORT + 2))|$((ADMIN_PORT + 3)))\b" >&2 || true; }
  return 1
}

nats_conf() { # index 0..2: writes its configuration (see NATS_ROUTES_<i> above)
  local i=$1 routes="" route advertise=""
  local routes_var="NATS_ROUTES_$i" advertise_var="NATS_CLUSTER_ADVERTISE_$i" list
  if [ -n "${!routes_var+set}" ]; then
    list=${!routes_var}
  else
    list=$(printf '127.0.0.1:%s,' $((NATS_PORT + 2000)) $((NATS_PORT + 2001)) $((NATS_PORT + 2002)))
  fi
  for route in ${list//,/ }; do routes+="\"nats-route://$route\", "; done
  [ -z "${!advertise_var:-}" ] || advertise=", advertise: \"${!advertise_var}\""
  mkdir -p "$STATE/nats-$i"
  cat > "$STATE/nats-$i.conf" <<CONF
server_name: nats-$i
listen: "127.0.0.1:$((NATS_PORT + i))"
http: "127.0.0.1:$((NATS_PORT + 4000 + i))"
jetstream { store_dir: "$STATE/nats-$i", sync_interval: always }
cluster { name: herald, listen: "127.0.0.1:$((NATS_PORT + 2000 + i))", routes: [ ${routes%, } ]$advertise }
CONF
}

# Routes server $1 holds right now, from its monitoring endpoint (/routez).
nats_routes() { # index 0..2
  curl -fsS "http://127.0.0.1:$((NATS_PORT + 4000 + $1))/routez" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["num_routes"])'
}
nats_routed() { local n; n=$(nats_routes "$1") && [ "$n" -gt 0 ]; }

start_nats() { # index 0..2
  "$NATS_BIN" -c "$STATE/nats-$1.conf" >> "$STATE/logs/nats-$1.log" 2>&1 &
  echo $! > "$STATE/pid.nats-$1"
  echo $! >> "$STATE/pids"
}

start_edge() { # number 1..3; returns when it is ready
  local i=$(( $1 - 1 )) urls seeds overrides
  urls=$(printf 'nats://127.0.0.1:%s,' $NATS_PORT $((NATS_PORT + 1)) $((NATS_PORT + 2)))
  seeds=$(printf '127.0.0.1:%s,' $GOSSIP_PORT $((GOSSIP_PORT + 1)) $((GOSSIP_PORT + 2)))
  # EDGE_ENV_<n>: extra VAR=value words for edge n, applied last (the chaos
  # suite routes one edge's NATS or gossip traffic through a proxy this way).
  overrides="EDGE_ENV_$1"
  # shellcheck disable=SC2086 # the overrides are words on purpose
  env HERALD__NODE__ID="edge-$1" \
    HERALD__AUTH__HS256_SECRET="$SECRET" \
    HERALD__HTTP__LISTEN="127.0.0.1:$((BASE_PORT + 1 + i))" \
    HERALD__ADMIN__LISTEN="127.0.0.1:$((ADMIN_PORT + 1 + i))" \
    HERALD__BUS__KIND=nats \
    HERALD__NATS__URL="${urls%,}" \
    HERALD__NATS__REPLICAS=3 \
    HERALD__GOSSIP__LISTEN="127.0.0.1:$((GOSSIP_PORT + i))" \
    HERALD__GOSSIP__SEEDS="${seeds%,}" \
    HERALD__TELEMETRY__OTLP_ENDPOINT="${OTLP_ENDPOINT:-}" \
    RUST_LOG="${RUST_LOG:-info}" \
    ${!overrides:-} \
    "$EDGE_BIN" >> "$STATE/logs/edge-$1.log" 2>&1 &
  echo $! > "$STATE/pid.edge-$1"
  echo $! >> "$STATE/pids"
  wait_for "edge-$1" curl -fsS "http://127.0.0.1:$((ADMIN_PORT + 1 + i))/readyz"
}

stop_one() { # component signal: waits until it exited
  local pid
  pid=$(cat "$STATE/pid.$1")
  kill "-$2" "$pid" 2>/dev/null || true
  for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

up() {
  if [ -f "$STATE/pids" ]; then echo "cluster: already up (deploy/local/cluster.sh down first)" >&2; exit 1; fi
  [ -x "$EDGE_BIN" ] || { echo "cluster: $EDGE_BIN missing (cargo build --release -p herald-edge)" >&2; exit 1; }
  [ -x "$NATS_BIN" ] || { echo "cluster: $NATS_BIN missing (make nats-server)" >&2; exit 1; }
  rm -rf "$STATE/logs"
  mkdir -p "$STATE/logs" "$STATE/nginx"
  : > "$STATE/pids"
  # A start that fails half-way leaves nothing running. (An EXIT trap: set -e
  # ends the script from inside a function, where an ERR trap does not run.)
  trap 'echo "cluster: start failed, stopping what was started" >&2; down >/dev/null' EXIT
  local i first=${NATS_START_FIRST:-0 1 2}
  for i in 0 1 2; do nats_conf "$i"; done
  for i in $first; do start_nats "$i"; done
  if [ "$first" != "0 1 2" ]; then
    for i in $first; do wait_for "nats-$i routed to the servers started with it" nats_routed "$i"; done
    for i in 0 1 2; do [[ " $first " == *" $i "* ]] || start_nats "$i"; done
  fi
  # Healthy once JetStream has a meta leader (the edges create the stream).
  for i in 0 1 2; do nats_healthy "$i"; done

  for i in 1 2 3; do
    # The first edge creates the R3 stream; the others find it.
    start_edge "$i"
  done

  sed -e "s/edge-\([0-9]\):8080/127.0.0.1:EDGE\1/" \
      -e "s|/etc/nginx/herald/sse-proxy.conf|$PWD/deploy/nginx/sse-proxy.conf|" \
      -e "s|listen 80;|listen 127.0.0.1:$BASE_PORT;|" \
      -e "s|root /usr/share/nginx/html;|root $STATE/nginx/html;|" \
      deploy/compose/nginx/herald.conf > "$STATE/nginx/herald.conf"
  for i in 1 2 3; do sed -i "s/127.0.0.1:EDGE$i/127.0.0.1:$((BASE_PORT + i))/" "$STATE/nginx/herald.conf"; done
  mkdir -p "$STATE/nginx/html/demo"
  cp deploy/compose/demo/index.html "$STATE/nginx/html/index.html"
  HERALD__AUTH__HS256_SECRET=$SECRET "$EDGE_BIN" token --user alice --ttl 86400 > "$STATE/nginx/html/demo/token.txt"
  cat > "$STATE/nginx/nginx.conf" <<CONF
pid $STATE/nginx/nginx.pid;
error_log $STATE/logs/nginx-error.log;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    access_log $STATE/logs/nginx-access.log;
    client_body_temp_path $STATE/nginx/body;
    proxy_temp_path $STATE/nginx/proxy;
    fastcgi_temp_path $STATE/nginx/fastcgi;
    uwsgi_temp_path $STATE/nginx/uwsgi;
    scgi_temp_path $STATE/nginx/scgi;
    types { text/html html; text/plain txt; }
    include $STATE/nginx/herald.conf;
}
CONF
  "$NGINX_BIN" -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf"
  wait_for nginx curl -fsS "http://127.0.0.1:$BASE_PORT/"
  wait_for "three alive members" bash -c \
    "curl -fsS http://127.0.0.1:$((ADMIN_PORT + 1))/v1/cluster | grep -o '\"state\":\"alive\"' | wc -l | grep -qx 3"
  trap - EXIT

  cat <<EOF
Herald cluster up: nginx http://127.0.0.1:$BASE_PORT (demo page), edges :$((BASE_PORT + 1))-$((BASE_PORT + 3)) (admin :$((ADMIN_PORT + 1))-$((ADMIN_PORT + 3))), NATS :$NATS_PORT-$((NATS_PORT + 2)).
  curl -s http://127.0.0.1:$((ADMIN_PORT + 1))/v1/cluster
  SUB=\$(HERALD__AUTH__HS256_SECRET=$SECRET $EDGE_BIN token --user alice)
  curl -N -H "Authorization: Bearer \$SUB" http://127.0.0.1:$BASE_PORT/v1/stream
  publish from any NATS client to subject herald.user.alice at nats://127.0.0.1:$NATS_PORT
Logs: $STATE/logs. Stop: make cluster-down
EOF
}

check() {
  # Through nginx: a stream on one edge, a publish through another.
  local sub pub out
  sub=$(HERALD__AUTH__HS256_SECRET=$SECRET "$EDGE_BIN" token --user cluster-check)
  pub=$(HERALD__AUTH__HS256_SECRET=$SECRET "$EDGE_BIN" token --publish)
  out=$(mktemp)
  curl -sN --max-time 10 -H "Authorization: Bearer $sub" "http://127.0.0.1:$BASE_PORT/v1/stream" > "$out" &
  local reader=$!
  wait_for "the stream through nginx" grep -q '^id: ' "$out"
  curl -fsS -H "Authorization: Bearer $pub" -H 'content-type: application/json' \
    -d '{"user":"cluster-check","data":"through nginx"}' "http://127.0.0.1:$BASE_PORT/v1/publish" > /dev/null
  wait_for "the event through nginx" grep -q '^data: through nginx' "$out"
  kill "$reader" 2>/dev/null || true
  rm -f "$out"
  # Only streams and publish are public (docs/deploy.md, "Exposing Herald").
  local path status edge
  for path in /v1/cluster /v1/presence/cluster-check /metrics /healthz /readyz; do
    status=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $pub" "http://127.0.0.1:$BASE_PORT$path")
    [ "$status" = 404 ] || { echo "cluster: nginx answers $status for $path, which must not be exposed" >&2; return 1; }
  done
  # The operators' paths live on each edge's admin listener, not its public one.
  for edge in 1 2 3; do
    for path in /v1/cluster /metrics /healthz /readyz; do
      status=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((BASE_PORT + edge))$path")
      [ "$status" = 404 ] || { echo "cluster: edge-$edge's public port answers $status for $path" >&2; return 1; }
      curl -fsS -o /dev/null "http://127.0.0.1:$((ADMIN_PORT + edge))$path" \
        || { echo "cluster: edge-$edge's admin port does not answer $path" >&2; return 1; }
    done
  done
  echo "cluster: an event published through nginx reached a stream opened through nginx; cluster, presence, metrics and health are not exposed, and each edge serves them on its admin port only"
}

nats_healthy() { # index 0..2
  wait_for "nats-$1" curl -fsS "http://127.0.0.1:$((NATS_PORT + 4000 + $1))/healthz"
}

# Prints a field of the HERALD stream as the first server that has it
# reports it on its monitoring endpoint: `leader` (the index, 0..2, of the
# server leading its replicas) or `last_seq`.
nats_stream() { # field
  local i value
  for i in 0 1 2; do
    value=$(curl -fsS "http://127.0.0.1:$((NATS_PORT + 4000 + i))/jsz?streams=true&accounts=true" 2>/dev/null \
      | python3 -c '
import json, sys
for account in json.load(sys.stdin).get("account_details") or []:
    for stream in account.get("stream_detail") or []:
        leader = (stream.get("cluster") or {}).get("leader")
        if stream["name"] == "HERALD" and leader:
            print(leader.removeprefix("nats-") if sys.argv[1] == "leader" else stream["state"]["last_seq"])
' "$1") && [ -n "$value" ] && { echo "$value"; return 0; }
  done
  echo "cluster: no server reports a leader for the HERALD stream" >&2
  return 1
}
nats_leader() { nats_stream leader; }

# Asks the HERALD stream's leader to step down (the JetStream API request,
# in the NATS text protocol, through server 0); the other replicas elect a
# new one.
stream_stepdown() {
  python3 - "$NATS_PORT" <<'PY'
import socket, sys
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
reader = connection.makefile("rb")
reader.readline()  # INFO
connection.sendall(b'CONNECT {"verbose":false}\r\nSUB _INBOX.stepdown 1\r\n'
                   b"PUB $JS.API.STREAM.LEADER.STEPDOWN.HERALD _INBOX.stepdown 0\r\n\r\n")
while True:
    line = reader.readline()
    if not line:
        sys.exit("cluster: no answer to the stream leader step-down")
    if line.startswith(b"PING"):
        connection.sendall(b"PONG\r\n")
    elif line.startswith(b"MSG"):
        answer = reader.read(int(line.split()[-1]) + 2).decode().strip()
        print(answer)
        sys.exit(0 if '"success":true' in answer else 1)
PY
}

# Stops every NATS server cleanly, copies their stores aside and starts them
# again; `restore-nats` later kills them all and puts the copies back: the
# stream's history goes back in time, as after losing acknowledged writes.
snapshot_nats() {
  local i
  for i in 0 1 2; do stop_one "nats-$i" TERM; done
  for i in 0 1 2; do rm -rf "$STATE/snapshot-$i"; cp -a "$STATE/nats-$i" "$STATE/snapshot-$i"; done
  for i in 0 1 2; do start_nats "$i"; done
  for i in 0 1 2; do nats_healthy "$i"; done
  wait_for "a leader for the HERALD stream" nats_leader
}
restore_nats() {
  local i
  for i in 0 1 2; do stop_one "nats-$i" KILL; done
  for i in 0 1 2; do rm -rf "$STATE/nats-$i"; mv "$STATE/snapshot-$i" "$STATE/nats-$i"; done
  for i in 0 1 2; do start_nats "$i"; done
  for i in 0 1 2; do nats_healthy "$i"; done
  wait_for "a leader for the HERALD stream" nats_leader
}

# Stops nginx at once (every client connection closes) and starts it again.
restart_nginx() {
  local pid
  pid=$(cat "$STATE/nginx/nginx.pid")
  "$NGINX_BIN" -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf" -s stop
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  "$NGINX_BIN" -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf"
  wait_for nginx curl -fsS "http://127.0.0.1:$BASE_PORT/"
}

down() {
  [ -f "$STATE/nginx/nginx.pid" ] && "$NGINX_BIN" -p "$STATE/nginx" -c "$STATE/nginx/nginx.conf" -s quit 2>/dev/null || true
  if [ -f "$STATE/pids" ]; then
    # Edges first (they drain), then NATS.
    tac "$STATE/pids" | while read -r pid; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 100); do
      alive=0
      while read -r pid; do kill -0 "$pid" 2>/dev/null && alive=1; done < "$STATE/pids"
      [ $alive = 0 ] && break
      sleep 0.1
    done
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done < "$STATE/pids"
  fi
  # Keep the logs for a look after a failure; drop data and state.
  rm -rf "$STATE"/nats-* "$STATE"/snapshot-* "$STATE/nginx" "$STATE/pids" "$STATE"/pid.*
  echo "cluster: down (logs kept in $STATE/logs)"
}

case "${1:-}" in
  up) up ;;
  check) check ;;
  down) down ;;
  # Fault injection for the chaos suite: edge N is 1..3, nats N is 0..2.
  kill-edge) stop_one "edge-$2" KILL ;;
  start-edge) start_edge "$2" ;;
  restart-edge) stop_one "edge-$2" TERM; start_edge "$2" ;;
  restart-nats) stop_one "nats-$2" TERM; start_nats "$2"; nats_healthy "$2" ;;
  kill-nats) stop_one "nats-$2" KILL ;;
  start-nats) start_nats "$2"; nats_healthy "$2" ;;
  nats-leader) nats_leader ;;
  nats-routes) nats_routes "$2" ;;
  stream-stepdown) stream_stepdown ;;
  nats-last-seq) nats_stream last_seq ;;
  snapshot-nats) snapshot_nats ;;
  restore-nats) restore_nats ;;
  restart-nginx) restart_nginx ;;
  *) echo "usage: $0 up|check|down|kill-edge N|start-edge N|restart-edge N|restart-nats N|kill-nats N|start-nats N|nats-leader|nats-routes N|stream-stepdown|nats-last-seq|snapshot-nats|restore-nats|restart-nginx" >&2
     exit 64 ;;
esac
