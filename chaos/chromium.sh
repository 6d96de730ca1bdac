#!/usr/bin/env bash
# Headless Chromium's native EventSource across edge faults:
# tools/sse-clients/chromium-faults.mjs drives Debian's Chromium through nginx
# on the local cluster. The scenario's name picks the fault:
#   chromium-edge-kill        the edge holding the stream SIGKILLed half-way;
#   chromium-rolling-restart  every edge SIGTERMed (drain) and restarted in turn.
# Run by chaos/run.sh (its environment, through chaos/scenarios/<name>.sh);
# leaves $RESULTS/$name.json in the load generator's shape for the table.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
sub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user chromium)
pub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --publish)
verdict=$(BASE="http://127.0.0.1:$BASE_PORT" PRESENCE_BASE="http://127.0.0.1:$((BASE_PORT + 1))" USER_ID=chromium SUB_TOKEN=$sub PUB_TOKEN=$pub \
  FAULT="${name#chromium-}" KILL_EDGE="$cluster kill-edge {n}" RESTART_EDGE="$cluster restart-edge {n}" \
  node tools/sse-clients/chromium-faults.mjs || true)
echo "$verdict"
python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"published": v["published"], "delivered": v["received"], "lost": v["lost"],
                  "duplicated": v["duplicated"], "reordered": 0 if v["ordered"] else 1,
                  "latency_us": {"max": 0}, "reconnects": v["reconnects"],
                  "closed_for_good": v["closed_for_good"]}))
PY
