#!/usr/bin/env bash
# Headless Chromium's native EventSource against 401, 429, 503, 204 (and a
# wrong content type) on /v1/stream, and Herald's documented re-creating
# wrapper: tools/sse-clients/chromium-statuses.mjs drives Debian's Chromium
# directly against edge-1 (not through nginx, whose access log must show only
# 200s for /v1/stream). Run by chaos/run.sh (its environment); leaves
# $RESULTS/$name.json as {"checks": [...]} for the table.
set -euo pipefail
cd "$(dirname "$0")/../.."

$cluster down >/dev/null 2>&1 || true
# Node holds the user's 32 streams on edge-1 while the other edges hold none:
# rebalancing would move some of them away (each move frees a slot and the
# 429 with it), so edge-1 keeps its streams here.
EDGE_ENV_1="HERALD__REBALANCE__ENABLED=false" $cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
user=chromium-statuses
sub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user "$user")
pub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --publish)
verdict=$(BASE="http://127.0.0.1:$BASE_PORT" EDGE="http://127.0.0.1:$((BASE_PORT + 1))" \
  USER_ID=$user SUB_TOKEN=$sub PUB_TOKEN=$pub node tools/sse-clients/chromium-statuses.mjs || true)
echo "$verdict"
python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"checks": v["checks"]}))
PY
