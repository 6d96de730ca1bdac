#!/usr/bin/env bash
# Clients and a publisher Herald's team did not write, across edge faults:
# tools/sse-clients/eventsource-npm-faults.mjs streams with npm `eventsource`
# clients through nginx and publishes with the Node `nats` client straight
# into JetStream, while edge-1 is SIGKILLed and edge-2 drained and restarted.
# Run by chaos/run.sh (its environment); leaves $RESULTS/$name.json in the
# load generator's shape for the table.
set -euo pipefail
cd "$(dirname "$0")/../.."

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
tokens="{"
for i in $(seq 1 "${NPM_CLIENTS:-30}"); do
  tokens+="\"npm-$i\": \"$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user "npm-$i")\","
done
tokens="${tokens%,}}"
verdict=$(BASE="http://127.0.0.1:$BASE_PORT" TOKENS=$tokens \
  NATS_URL="nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))" \
  KILL_EDGE="$cluster kill-edge {n}" START_EDGE="$cluster start-edge {n}" RESTART_EDGE="$cluster restart-edge {n}" \
  node tools/sse-clients/eventsource-npm-faults.mjs || true)
echo "$verdict"
python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"published": v["published"], "delivered": v["received"], "lost": v["lost"],
                  "duplicated": v["duplicated"], "reordered": v["reordered"],
                  "latency_us": {"max": 0}, "reconnects": v["reconnects"],
                  "closed_for_good": v["closed_for_good"]}))
PY
