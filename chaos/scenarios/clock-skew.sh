#!/usr/bin/env bash
# Clock skew (reliability matrix row 21): edge-3's wall clock runs SKEW_SECS
# (300) ahead and edge-2's SKEW_SECS behind, through libfaketime; edge-1 keeps
# the real clock. Run by chaos/run.sh (its environment); leaves
# $RESULTS/$name.json: the load generator's result plus "checks".
#
#   1. The skew took effect: each edge's own `Date` header is off by its skew.
#   2. Resume and order: the load generator runs through nginx while edge-1 and
#      then edge-3 restart, so clients resume (Last-Event-ID) on edges whose
#      clocks disagree with the edge that wrote their last id. SSE ids are the
#      JetStream sequence (epoch = the stream's creation time, from NATS), so
#      nothing may be lost, duplicated or reordered.
#   3. Tokens: JWTs minted with the real clock whose exp / nbf sit LEEWAY_SECS
#      ± MARGIN_SECS from each edge's idea of now go to every edge directly;
#      each answer (200 or 401) is predicted from that edge's skew and the
#      configured leeway: accepted iff exp >= now + skew - leeway and
#      nbf <= now + skew + leeway. No more tolerance than the leeway.
#   4. Gossip: every edge sees three alive members at the end (failure
#      detection runs on monotonic time; wall clocks are never compared).
#
# libfaketime (Debian package libfaketime) must be installed; nothing is
# installed here. With a relative FAKETIME, libfaketime shifts CLOCK_MONOTONIC
# too (to the faked wall time: a different base, same rate) unless
# FAKETIME_DONT_FAKE_MONOTONIC=1: edge-3 runs with both clocks shifted (an
# arbitrary monotonic base), edge-2 with only its wall clock (what a wrong
# clock on a real machine looks like).
set -euo pipefail
cd "$(dirname "$0")/../.."

FAKETIME_LIB=${FAKETIME_LIB:-/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1}
SKEW=${SKEW_SECS:-300}
LEEWAY=${LEEWAY_SECS:-30}
MARGIN=${MARGIN_SECS:-5}
if [ ! -r "$FAKETIME_LIB" ]; then
  echo "clock-skew: libfaketime not found at $FAKETIME_LIB (Debian: apt-get install libfaketime)" >&2
  python3 -c 'import json,sys; print(json.dumps({"checks": [{"name": "libfaketime installed (Debian package libfaketime)",
    "expected": sys.argv[1], "got": "missing", "pass": False}]}))' "$FAKETIME_LIB" > "$RESULTS/$name.json"
  exit 1
fi
. chaos/lib.sh
checks=$RESULTS/$name.checks.jsonl
: > "$checks"
# check NAME EXPECTED GOT PASS(true|false)
check() {
  python3 -c 'import json,sys; print(json.dumps({"name": sys.argv[1], "expected": sys.argv[2], "got": sys.argv[3], "pass": sys.argv[4] == "true"}))' \
    "$@" >> "$checks"
}
edge_url() { echo "http://127.0.0.1:$((BASE_PORT + $1))"; }

# Every edge gets the leeway explicitly, so the predictions below use the
# value the edges run with.
export EDGE_ENV_1="HERALD__AUTH__LEEWAY_SECS=$LEEWAY"
export EDGE_ENV_2="HERALD__AUTH__LEEWAY_SECS=$LEEWAY LD_PRELOAD=$FAKETIME_LIB FAKETIME=-$SKEW FAKETIME_DONT_FAKE_MONOTONIC=1"
export EDGE_ENV_3="HERALD__AUTH__LEEWAY_SECS=$LEEWAY LD_PRELOAD=$FAKETIME_LIB FAKETIME=+$SKEW"
declare -A SKEW_OF=([1]=0 [2]=-$SKEW [3]=$SKEW)

$cluster down >/dev/null 2>&1 || true
$cluster up >/dev/null
trap '$cluster down >/dev/null 2>&1 || true' EXIT

# 1. Each edge's clock as its Date header shows it, against ours.
skew_ok=true
verify_skew() { # label
  local n date observed expected
  for n in 1 2 3; do
    date=$(curl -sS --max-time 2 -D - -o /dev/null "$(admin_url "$n")/healthz" | tr -d '\r' \
      | awk 'tolower($1) == "date:" { $1 = ""; print substr($0, 2) }') || date=
    observed=$(python3 -c '
import sys, time, email.utils
print(round(email.utils.parsedate_to_datetime(sys.argv[1]).timestamp() - time.time()))' "$date" 2>/dev/null || echo none)
    expected=${SKEW_OF[$n]}
    if [ "$observed" != none ] && [ $((observed - expected)) -ge -2 ] && [ $((observed - expected)) -le 2 ]; then
      check "$1: edge-$n clock offset (Date header)" "${expected} s ± 2" "${observed} s" true
    else
      check "$1: edge-$n clock offset (Date header)" "${expected} s ± 2" "${observed} s (Date: ${date:-none})" false
      skew_ok=false
    fi
  done
}
verify_skew "at start"
[ "$skew_ok" = true ] || echo "clock-skew: the skew did not take effect (see $checks)" >&2

# 2. Load through nginx; edge-1 (real clock) then edge-3 (+skew) restart, so
# their clients resume on edges whose clocks differ from their last edge's.
# Edge-2 (-skew) stays up and takes clients from both.
moves() {
  sleep 4
  $cluster restart-edge 1 >/dev/null
  sleep 2
  $cluster restart-edge 3 >/dev/null
}
moves > "$RESULTS/$name.fault.log" 2>&1 &
moves_pid=$!
loadgen --label "chaos-$name" --duration "$DURATION" --drain 20 \
  --out "$RESULTS/$name.load.json" || echo "clock-skew: the load generator failed" >&2
if wait "$moves_pid"; then
  check "edge-1 and edge-3 restarted under load" "both back" "both back" true
else
  check "edge-1 and edge-3 restarted under load" "both back" "a restart failed (see $name.fault.log)" false
fi
# Restarted edges must still be skewed (EDGE_ENV_n applies at every start).
verify_skew "after restarts"

# Resumes by edge (herald_replays: streams resumed from a Last-Event-ID).
# Edge-2 (-skew) was never restarted: its resumes came from edge-1 (real
# clock) and edge-3 (+skew). Edge-1 restarted first: its resumes after that
# came from edge-3 and edge-2.
for n in 1 2; do
  replays=$(curl -fsS --max-time 2 "$(admin_url "$n")/metrics" \
    | awk '$1 ~ /^herald_replays(_total)?$/ { s += $2 } END { print s + 0 }') || replays=0
  if [ "${replays%.*}" -gt 0 ]; then pass=true; else pass=false; fi
  check "edge-$n (skew ${SKEW_OF[$n]} s) served resumes from other clocks" "> 0" "$replays" "$pass"
done

# 3. Token checks, every token against every edge. Expectations from each
# edge's skew and the leeway; requests go out in parallel right after minting.
python3 - "$HERALD_SECRET" "$LEEWAY" "$MARGIN" "$BASE_PORT" "${SKEW_OF[1]}" "${SKEW_OF[2]}" "${SKEW_OF[3]}" \
  >> "$checks" <<'PY' || check "token checks" "run" "the token check script failed" false
import base64, concurrent.futures, hashlib, hmac, json, subprocess, sys, time

secret, leeway, margin, base_port = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
skews = {1: int(sys.argv[5]), 2: int(sys.argv[6]), 3: int(sys.argv[7])}
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()

def jwt(claims):
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    return head + "." + b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())

now = int(time.time())
tokens = []  # (name, claims)
for k, skew in skews.items():
    edge_now = now + skew
    far = 3 * 3600
    for where, delta in (("inside", margin), ("outside", -margin)):
        # exp: accepted while exp >= edge_now - leeway.
        tokens.append((f"exp {where} edge-{k}'s leeway (exp = edge-{k} now - {leeway} {'+' if delta > 0 else '-'} {margin})",
                       {"exp": edge_now - leeway + delta, "nbf": now - far}))
        # nbf: accepted while nbf <= edge_now + leeway.
        tokens.append((f"nbf {where} edge-{k}'s leeway (nbf = edge-{k} now + {leeway} {'-' if delta > 0 else '+'} {margin})",
                       {"exp": now + far, "nbf": edge_now + leeway - delta}))

def request(i, n, claims):
    claims = dict(claims, sub=f"skew-{i}-{n}", iat=now)
    sent = time.time()
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2",
                          "-H", f"Authorization: Bearer {jwt(claims)}",
                          f"http://127.0.0.1:{base_port + n}/v1/stream"],
                         capture_output=True, text=True)
    return sent, out.stdout.strip() or "none"

jobs = {}
with concurrent.futures.ThreadPoolExecutor(max_workers=len(tokens) * len(skews)) as pool:
    for i, (label, claims) in enumerate(tokens):
        for n in skews:
            jobs[(i, n)] = pool.submit(request, i, n, claims)
latest = now
for (i, n), job in sorted(jobs.items()):
    label, claims = tokens[i]
    sent, status = job.result()
    latest = max(latest, sent)
    # What edge n must answer, by its own clock at minting time.
    edge_now = now + skews[n]
    accepted = claims["exp"] >= edge_now - leeway and claims["nbf"] <= edge_now + leeway
    expected = "200" if accepted else "401"
    print(json.dumps({"name": f"{label} at edge-{n} (skew {skews[n]:+d} s)", "expected": expected,
                      "got": status, "pass": status == expected}))
# The margins only hold if every request left within them of minting.
elapsed = latest - now
print(json.dumps({"name": "token requests sent within the margin of minting", "expected": f"< {margin - 1} s",
                  "got": f"{elapsed:.1f} s", "pass": elapsed < margin - 1}))
PY

# 4. Gossip: three alive members as every edge sees them (waits up to 10 s
# for the last restart to settle).
for n in 1 2 3; do
  alive=none
  for _ in $(seq 100); do
    alive=$(curl -fsS --max-time 2 "$(admin_url "$n")/v1/cluster" 2>/dev/null \
      | python3 -c 'import json,sys; print(",".join(sorted(m["id"] for m in json.load(sys.stdin)["members"] if m["state"] == "alive")))' \
      2>/dev/null) || alive=none
    [ "$alive" = "edge-1,edge-2,edge-3" ] && break
    sleep 0.1
  done
  if [ "$alive" = "edge-1,edge-2,edge-3" ]; then pass=true; else pass=false; fi
  check "edge-$n (skew ${SKEW_OF[$n]} s) sees every member alive" "edge-1,edge-2,edge-3" "$alive" "$pass"
done

# 5. The clock corrected: edge-3 restarts with the real clock (as after an
# NTP step back), so its new gossip generation (its start time in
# microseconds) is lower than the one it replaces. Every edge, edge-3 itself
# included, must list the new incarnation alive, not the old one as `left`.
export EDGE_ENV_3="HERALD__AUTH__LEEWAY_SECS=$LEEWAY"
generation_of_3() {
  curl -fsS --max-time 2 "$(admin_url 1)/v1/cluster" \
    | python3 -c 'import json,sys; print(next(m["generation"] for m in json.load(sys.stdin)["members"] if m["id"] == "edge-3"))'
}
before=$(generation_of_3 2>/dev/null) || before=0
if $cluster restart-edge 3 >/dev/null; then
  for n in 1 2 3; do
    seen=none
    for _ in $(seq 150); do
      seen=$(curl -fsS --max-time 2 "$(admin_url "$n")/v1/cluster" 2>/dev/null \
        | python3 -c '
import json, sys
m = next(m for m in json.load(sys.stdin)["members"] if m["id"] == "edge-3")
print(m["state"] + ", generation " + str(m["generation"]))' 2>/dev/null) || seen=none
      [ "${seen%%,*}" = alive ] && [ "${seen##* }" -lt "$before" ] && break
      sleep 0.1
    done
    if [ "${seen%%,*}" = alive ] && [ "${seen##* }" != none ] && [ "${seen##* }" -lt "$before" ]; then pass=true; else pass=false; fi
    check "edge-$n lists edge-3 alive after its clock stepped back ${SKEW} s and it restarted" \
      "alive, generation < $before" "$seen" "$pass"
  done
else
  check "edge-3 restarted with the real clock" "ready" "did not come up" false
fi

# The result: the load generator's JSON plus the checks. Without the load
# generator's result there is no table line; the checks still say why.
python3 - "$RESULTS/$name.load.json" "$checks" "$RESULTS/$name.json" <<'PY'
import json, pathlib, sys
load, checks, out = map(pathlib.Path, sys.argv[1:])
result = json.loads(load.read_text()) if load.exists() else {}
result["checks"] = [json.loads(line) for line in checks.read_text().splitlines() if line.strip()]
if not load.exists():
    result["checks"].append({"name": "load generator result", "expected": "present", "got": "missing", "pass": False})
out.write_text(json.dumps(result, indent=2))
PY
rm -f "$RESULTS/$name.load.json" "$checks"
