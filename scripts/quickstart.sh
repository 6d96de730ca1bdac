#!/usr/bin/env bash
# Starts one Herald node with the embedded bus and prints commands to try it.
# Usage: scripts/quickstart.sh PATH/TO/herald-edge LISTEN_ADDR
# The secret comes from HERALD__AUTH__HS256_SECRET (the Makefile sets a dev one).
set -euo pipefail
edge="$1"
listen="$2"
admin="${HERALD__ADMIN__LISTEN:-127.0.0.1:9090}"

subscriber=$("$edge" token --user alice --topic news --ttl 86400)
publisher=$("$edge" token --publish --ttl 86400)

cat <<MSG

  Herald is starting on http://$listen (memory bus: single node, nothing kept across restarts).

  In another terminal, subscribe as user "alice" (plus topic "news"):

    curl -N -H 'Authorization: Bearer $subscriber' 'http://$listen/v1/stream?topic=news'

  and publish to her from a third:

    curl -s -X POST -H 'Authorization: Bearer $publisher' -H 'Content-Type: application/json' \\
      -d '{"user":"alice","event":"greeting","data":{"hello":"world"}}' http://$listen/v1/publish

  Health, metrics and the cluster view are on the admin listener (loopback):

    curl -s http://$admin/readyz; curl -s http://$admin/metrics | head

  Stop with Ctrl-C.

MSG
exec "$edge"
