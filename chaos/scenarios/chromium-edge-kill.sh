#!/usr/bin/env bash
# Headless Chromium's native EventSource across a SIGKILL of its edge:
# tools/sse-clients/chromium-edge-kill.mjs drives Debian's Chromium through
# nginx on the local cluster. Run by chaos/run.sh (its environment); leaves
# $RESULTS/$name.json in the load generator's shape for the table.
set -euo pipefail
cd "$(dirname "$0")/../.."

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
sub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user chromium)
pub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --publish)
verdict=$(BASE="http://127.0.0.1:$BASE_PORT" USER_ID=chromium SUB_TOKEN=$sub PUB_TOKEN=$pub \
  KILL_EDGE="$cluster kill-edge {n}" node tools/sse-clients/chromium-edge-kill.mjs || true)
echo "$verdict"
python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"published": v["published"], "delivered": v["received"], "lost": v["lost"],
                  "duplicated": v["duplicated"], "reordered": 0 if v["ordered"] else 1,
                  "latency_us": {"max": 0}, "reconnects": v["reconnects"],
                  "closed_for_good": v["closed_for_good"]}))
PY
