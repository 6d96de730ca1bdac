#!/usr/bin/env bash
# Headless Chromium's native EventSource against POST /v1/disconnect:
# tools/sse-clients/chromium-revoke.mjs drives Debian's Chromium directly
# against edge-1 and sends the disconnects to edge-2 (the order crosses NATS).
# A plain disconnect: reason event, the browser reconnects by itself. With
# "revoke": true: reason event, the reconnect is answered 204 and the
# EventSource stays CLOSED (one refusal counted at edge-1); the old token gets
# 204 on edge-2 too; a token minted afterwards works. Run by chaos/run.sh (its
# environment); leaves $RESULTS/$name.json as {"checks": [...]} for the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
. chaos/lib.sh

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT
user=chromium-revoke
user2=chromium-disconnect
sub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user "$user")
sub2=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --user "$user2")
pub=$(HERALD__AUTH__HS256_SECRET=$HERALD_SECRET "$EDGE_BIN" token --publish)
edge1="http://127.0.0.1:$((BASE_PORT + 1))"
verdict=$(EDGE=$edge1 EDGE2="http://127.0.0.1:$((BASE_PORT + 2))" METRICS="$(admin_url 1)/metrics" \
  USER_ID=$user USER_ID_2=$user2 SUB_TOKEN=$sub SUB_TOKEN_2=$sub2 PUB_TOKEN=$pub \
  MINT_TOKEN="HERALD__AUTH__HS256_SECRET=$HERALD_SECRET $EDGE_BIN token --user $user" \
  node tools/sse-clients/chromium-revoke.mjs || true)
echo "$verdict"
python3 - "$verdict" > "$RESULTS/$name.json" <<'PY' || rm -f "$RESULTS/$name.json"
import json, sys
v = json.loads(sys.argv[1])
print(json.dumps({"checks": v["checks"]}))
PY
