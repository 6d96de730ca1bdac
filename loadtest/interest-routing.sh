#!/usr/bin/env bash
# Interest-based routing, measured: three edges on one NATS JetStream server,
# every user streaming from exactly one edge, per-user events published
# straight into JetStream at random users. Each edge subscribes only to the
# subjects of the users it holds, so each should receive about its share of
# the events (a third), not all of them.
#
# Usage: loadtest/interest-routing.sh   (CONNECTIONS, RATE, DURATION override)
# Prints, per edge: streams opened, live messages received from NATS
# (herald_bus_messages_received_total) and that as a share of all events
# published; exits non-zero if an edge received more than half of them.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${RESULTS_DIR:-loadtest/results}"
name=interest-routing
export CONNECTIONS="${CONNECTIONS:-6000}" RATE="${RATE:-3000}" DURATION="${DURATION:-20}"
NODES=3 BUS=nats LABEL=$name RESULTS_DIR="$results" loadtest/run-scenario.sh fanout
python3 - "$results" "$name" <<'PY'
import json, sys
results, name = sys.argv[1], sys.argv[2]
run = json.load(open(f"{results}/{name}.json"))
published = run["published"]
def metric(text, name):
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
rows, worst = [], 0.0
for edge in range(3):
    text = open(f"{results}/{name}.edge-{edge}.metrics").read()
    streams = metric(text, "herald_connects_total")
    received = metric(text, "herald_bus_messages_received_total")
    share = received / published if published else 0.0
    worst = max(worst, share)
    rows.append((edge, streams, received, share))
print(f"events published into JetStream: {published}; lost {run['lost']}, duplicated {run['duplicated']}, reordered {run['reordered']}")
print("| edge | streams opened | live messages received from NATS | share of all events |")
print("|---|---|---|---|")
for edge, streams, received, share in rows:
    print(f"| edge-{edge} | {streams:.0f} | {received:.0f} | {share:.1%} |")
print(f"| all three | {sum(r[1] for r in rows):.0f} | {sum(r[2] for r in rows):.0f} | {sum(r[3] for r in rows):.1%} |")
if worst > 0.5 or run["lost"] or run["duplicated"] or run["reordered"]:
    sys.exit(f"an edge received {worst:.0%} of all events, or events were lost: interest routing is not working")
PY
