#!/usr/bin/env python3
"""The soak's report (chaos/soak.sh): the load generator's invariants, then the
memory and descriptor slopes of every node sampled.

    soak_report.py SAMPLES.csv RESULT.json FAULTS INEFFECTIVE

SAMPLES.csv has one row per node and sample: t_secs, node, pid, rss_kib, fds,
streams (open SSE streams; 0 for a NATS server) and heap_kib (an edge's live
heap bytes / 1024 when it was built with --features heap-stats, else empty).

Faults restart nodes (edge-3, NATS servers), and a new process starts from
nothing, so a slope across restarts means nothing. Each process (node, pid)
is an incarnation; the slope is fitted *within* incarnations (every
incarnation gets its own intercept, they share the slope), after the first
minute of the run and the first WARMUP seconds of every incarnation. For a
node that ran throughout that is the plain least-squares slope.

Faults also move streams between edges, so for edges the report also gives
the slope with the open streams factored out (value ~ a + b*streams + c*t:
c is growth that more streams do not explain), and, for edges that ran
throughout, the two halves of the run compared: allocator high-water marks
step up early and are then reused, a leak keeps climbing. Live heap bytes
tell a leak from memory the allocator keeps.

Exits 1 unless nothing was lost, duplicated or reordered and every partition
was seen and healed (INEFFECTIVE = 0).
"""

import csv
import json
import sys
from collections import defaultdict

RUN_WARMUP_SECS = 60  # connections arriving, caches warming
WARMUP_SECS = 30  # a restarted process taking back its share of streams


def centred(groups):
    """Each group's points [(t, s, y)] minus the group's means, all together."""
    out = []
    for points in groups:
        n = len(points)
        mt = sum(p[0] for p in points) / n
        ms = sum(p[1] for p in points) / n
        my = sum(p[2] for p in points) / n
        out += [(t - mt, s - ms, y - my) for t, s, y in points]
    return out


def slope(groups):
    """Least squares y ~ a_group + c*t; returns c (per second)."""
    rows = centred(groups)
    den = sum(t * t for t, _, _ in rows)
    return sum(t * y for t, _, y in rows) / den if den else 0.0


def fit(groups):
    """Least squares y ~ a_group + b*streams + c*t; returns (b, c), solved from
    the centred normal equations (2x2). Without variation in streams (a NATS
    server, or streams never moved) b is 0 and c the plain slope."""
    rows = centred(groups)
    sss = sum(s * s for _, s, _ in rows)
    stt = sum(t * t for t, _, _ in rows)
    sst = sum(s * t for t, s, _ in rows)
    ssy = sum(s * y for _, s, y in rows)
    sty = sum(t * y for t, _, y in rows)
    det = sss * stt - sst * sst
    if len(rows) < 3 or abs(det) < 1e-9 * max(sss * stt, 1):
        return 0.0, slope(groups)
    return (ssy * stt - sty * sst) / det, (sty * sss - ssy * sst) / det


def incarnations(rows):
    """The node's samples, one list per process, each after its warm-up."""
    by_pid = defaultdict(list)
    for r in rows:
        by_pid[r["pid"]].append(r)
    kept = []
    for samples in by_pid.values():
        start = samples[0]["t"]
        steady = [r for r in samples if r["t"] >= RUN_WARMUP_SECS and r["t"] - start >= WARMUP_SECS]
        if len(steady) >= 2:
            kept.append(steady)
    return len(by_pid), kept


def per_hour(value):
    return value * 3600


def report_node(node, rows):
    total, groups = incarnations(rows)
    if not groups:
        print(f"soak: {node}: {total} processes, none ran long enough to fit a slope")
        return
    used = sum(len(g) for g in groups)
    first, last = groups[0][0], groups[-1][-1]
    rss = per_hour(slope([[(r["t"], 0, r["rss"]) for r in g] for g in groups]))
    fds = per_hour(slope([[(r["t"], 0, r["fds"]) for r in g] for g in groups]))
    where = "ran throughout" if total == 1 else f"{total} processes, {len(groups)} fitted"
    line = (f"soak: {node} ({where}, {used} samples): RSS {first['rss']}→{last['rss']} KiB "
            f"(slope {rss:+.0f} KiB/h), descriptors {first['fds']}→{last['fds']} (slope {fds:+.1f}/h)")
    if any(r["streams"] for g in groups for r in g):
        per_stream, rss_beyond = fit([[(r["t"], r["streams"], r["rss"]) for r in g] for g in groups])
        _, fds_beyond = fit([[(r["t"], r["streams"], r["fds"]) for r in g] for g in groups])
        line += (f"; {per_stream:.1f} KiB per open stream, {per_hour(rss_beyond):+.0f} KiB/h and "
                 f"{per_hour(fds_beyond):+.1f} descriptors/h beyond that; "
                 f"streams {first['streams']}→{last['streams']}")
    print(line)
    if total != 1:
        return
    steady = groups[0]
    half = steady[len(steady) // 2]["t"]
    early = [r for r in steady if r["t"] < half]
    late = [r for r in steady if r["t"] >= half]
    if early and late:
        late_rss = per_hour(slope([[(r["t"], 0, r["rss"]) for r in late]]))
        print(f"soak: {node}: second half (from {half} s): RSS slope {late_rss:+.0f} KiB/h, "
              f"peak {max(r['rss'] for r in early)} KiB in the first half, "
              f"{max(r['rss'] for r in late)} KiB in the second; "
              f"descriptors peak {max(r['fds'] for r in early)} then {max(r['fds'] for r in late)}")
    heap = [r for r in steady if r["heap"] is not None]
    if len(heap) >= 3:
        per_stream, beyond = fit([[(r["t"], r["streams"], r["heap"]) for r in heap]])
        half_heap = heap[len(heap) // 2]["t"]
        late_heap = per_hour(slope([[(r["t"], 0, r["heap"]) for r in heap if r["t"] >= half_heap]]))
        whole = per_hour(slope([[(r["t"], 0, r["heap"]) for r in heap]]))
        print(f"soak: {node}: live heap {heap[0]['heap']}→{heap[-1]['heap']} KiB "
              f"(slope {whole:+.0f} KiB/h; {per_stream:.1f} KiB per open stream, "
              f"{per_hour(beyond):+.0f} KiB/h beyond that; second half {late_heap:+.0f} KiB/h), "
              f"peak {max(r['heap'] for r in heap)} KiB")


def main(samples_path, result_path, faults, ineffective):
    result = json.load(open(result_path))
    print(f"soak: {result['published']} events published, {result['delivered']} delivered, "
          f"lost {result['lost']}, duplicated {result['duplicated']}, reordered {result['reordered']}, "
          f"{result['reconnects']} reconnects, {faults} faults")
    nodes = defaultdict(list)
    for r in csv.DictReader(open(samples_path)):
        nodes[r["node"]].append({
            "t": int(r["t_secs"]), "pid": r["pid"], "rss": int(r["rss_kib"]), "fds": int(r["fds"]),
            "streams": int(float(r["streams"] or 0)),
            "heap": int(r["heap_kib"]) if r.get("heap_kib") else None,
        })
    for node in sorted(nodes):
        report_node(node, nodes[node])
    ok = result["lost"] == 0 and result["duplicated"] == 0 and result["reordered"] == 0
    return 0 if ok and ineffective == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
